"""What starts or wires the services: the `pagedserve` command (cli.py), `pagedserve up`
(launcher.py), the offline `LLM` (offline.py, a scheduler and an in-process executor) and beam
search on top of it (beam_search.py). The only package that may import more than one service;
no service imports it (tests/test_boundaries.py)."""
