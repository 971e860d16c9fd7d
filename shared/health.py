"""Which workers are alive: each worker's relay records a beat every few seconds in the Redis
sorted set ``txmon:workers`` (member: host and pid, score: the time); /readyz counts the
members that beat within TTL_S, for the home page."""
from __future__ import annotations

import os
import socket
import time

KEY = "txmon:workers"
TTL_S = 15  # three relay rounds (worker_service/relay.py LAPSED_EVERY_S)


def beat(redis_client) -> None:
    """This worker process is alive (and members silent for a day are dropped)."""
    now = time.time()
    pipe = redis_client.pipeline()
    pipe.zadd(KEY, {f"{socket.gethostname()}:{os.getpid()}": now})
    pipe.zremrangebyscore(KEY, "-inf", now - 86400)
    pipe.execute()


def workers_alive(redis_client) -> int:
    """How many worker processes beat within TTL_S."""
    return redis_client.zcount(KEY, time.time() - TTL_S, "+inf")
