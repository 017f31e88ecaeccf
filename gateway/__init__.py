"""The gateway: the stateless front door. OpenAI-compatible HTTP and the public gRPC API,
tokenization, incremental detokenization, stop strings (DESIGN.md §1, §2)."""
