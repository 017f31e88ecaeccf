"""The most KV blocks one executor's pool may have: the scheduler refuses a registration above
it (scheduler/executor_pool.py: it builds an object per block, on its event loop), and an
executor that could hold more sizes its pool down to it (executor/kv_cache.py). Far above any
real need: a 141 GB GPU serving a 135M-parameter model holds about 400k blocks of 16 tokens,
and a million blocks cost the scheduler about 100 MB and a second to build."""

MAX_KV_BLOCKS = 1 << 20
