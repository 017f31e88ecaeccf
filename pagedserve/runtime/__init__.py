"""What every pagedserve process shares: flags from the command line or the environment
(flags.py), structured logging (log.py), the gRPC server lifecycle, limits and credentials
(serving.py) and chat prompt rendering (chat.py). Imports only the contract (`pagedserve.v1`)
and third-party libraries, never torch, so the light services stay light
(tests/test_boundaries.py)."""
