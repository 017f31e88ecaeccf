"""The scheduler service: owns the request queue, every executor's KV block pool and block
tables, the prefix-cache index and every batching decision (docs/design.md §1, §3, §4).
It never imports torch and talks to the other services only through `pagedserve.v1`."""
