"""How many copies a topic keeps, and how many must hold a write before Kafka acknowledges it.

One rule for the local stack's internal topics, the worker's topics and the load generator's:
three replicas where the cluster has three brokers or more (one per broker below that), and
``min.insync.replicas`` one less than three. With producers on ``acks=all`` a write is then on
two brokers before it counts, and one broker may be down (killed, restarted, upgraded) without
stopping writes. Two replicas keep a minimum of one: requiring both would stop every write
while either broker is away.
"""

from __future__ import annotations

MAX_REPLICATION = 3


def replication_for(brokers: int) -> int:
    """The replication factor of a topic created on a cluster of ``brokers`` brokers."""
    return max(1, min(MAX_REPLICATION, brokers))


def min_insync_for(replication: int) -> int:
    """``min.insync.replicas`` for a topic of ``replication`` replicas: 2 from 3 replicas up."""
    return 2 if replication >= MAX_REPLICATION else 1
