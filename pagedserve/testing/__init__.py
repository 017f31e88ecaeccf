"""Helpers shared by the test suite and the benchmarks: tiny random-weight models of each
family built with `transformers` (tiny_models.py), GGUF files (gguf_files.py), a model driven
through paged batches (paged_run.py, paged_batches.py) and starting services as processes on
free loopback ports (processes.py). Nothing else in pagedserve imports this package."""
