"""The hub's own benchmark suite: `python -m bench <workload> [options]` (see README, Benchmarks).

Each run starts what it measures (a reference hub, then the real hub on a fresh database with its
own Redis), drives both with the same load client, and prints one JSON object per workload with
both sets of figures and their ratio.
"""
