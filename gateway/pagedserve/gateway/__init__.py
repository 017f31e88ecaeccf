"""The gateway: the stateless front door. OpenAI-compatible HTTP and the public gRPC API,
tokenization, incremental detokenization, stop strings (docs/design.md §1, §2)."""
