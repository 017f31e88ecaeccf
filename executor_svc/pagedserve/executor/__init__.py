"""The executor service: holds the model weights and the paged KV cache, runs exactly the step
plans the scheduler sends, and samples on its device (docs/design.md §1, §5)."""
