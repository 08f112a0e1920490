"""Benchmark harness: Tether against its peers on the same workloads (see README.md).

Every module here that a peer's driver imports uses the standard library only, so
the drivers can run in the peers' own virtual environments with the repository
root on ``sys.path`` (``python -m bench.<driver>`` from the repository root).
"""
