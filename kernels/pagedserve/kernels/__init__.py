"""The executor's hot operations (docs/design.md §5): each a Triton kernel for CUDA and a PyTorch
reference with the same signature, which is also the CPU path. Imports nothing of the services."""
