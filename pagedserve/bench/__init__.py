"""`pagedserve bench`: load generation and throughput measurement.

- `serve` (serve.py) streams requests to a running server, OpenAI-compatible HTTP (pagedserve,
  vLLM, llama.cpp) or pagedserve's public gRPC API, and reports latency and throughput the way
  `vllm bench serve` does, so figures compare across engines.
- `throughput` (throughput.py) runs the same datasets in-process through
  `pagedserve.entrypoints.offline.LLM` and adds the engine's own counters.

Both draw their requests from datasets.py and their arithmetic from metrics.py. The package is
a client of the engine like `pagedserve.entrypoints.offline`'s users: it never imports a
service, and loads heavy modules (torch, matplotlib, the offline engine) only in the command
that needs them.
"""
