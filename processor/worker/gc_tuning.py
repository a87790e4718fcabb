"""Garbage-collector settings for a worker process.

Aggregate keeps many small objects alive (buffered spans, their records, the sampler's and the
assembler's indexes). CPython's cyclic collector runs every 700 net allocations and its older
generations scan every one of those objects again, although the pipeline makes almost no
reference cycles: reference counting frees its objects. With the default thresholds the
collector took a tenth to a third of aggregate's time on 100-span traces, depending on the run
(``benchmarks/bench_sampling.py --gc default`` against the default ``--gc worker``).
Collections still run, only less often.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 50_000  # net allocations between young collections (CPython's default: 700)


def tune_for_throughput() -> None:
    """Call once start-up is done: what exists then (modules, the app) is never scanned again."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, older, oldest)
