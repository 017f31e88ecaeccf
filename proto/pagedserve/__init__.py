"""pagedserve: the distribution's shared core.

- `pagedserve.v1`: the versioned gRPC contract between gateway, scheduler and executors, generated
  from the .proto files beside it (the only thing the services share about each other);
- `pagedserve.cli` and `pagedserve.launcher`: the `pagedserve` command and `pagedserve up`;
- `pagedserve.flags`, `pagedserve.log`, `pagedserve.serving`: flag/env configuration, structured
  logging and the gRPC server lifecycle every service uses.

It lives under proto/ because the project's top level is fixed (pyproject, proto, the three
services, kernels, k8s, tests); see docs/architecture.md.
"""
