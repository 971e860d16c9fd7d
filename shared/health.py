"""Which workers are alive: each worker's relay beats a Redis key every few seconds (it lapses
when the worker stops beating); /readyz reports how many beat, for the home page."""
from __future__ import annotations

import os
import socket
import time

PREFIX = "txmon:workers:"
TTL_S = 15  # three relay rounds (worker_service/relay.py LAPSED_EVERY_S)


def beat(redis_client) -> None:
    """This worker process is alive."""
    redis_client.set(f"{PREFIX}{socket.gethostname()}:{os.getpid()}", int(time.time()), ex=TTL_S)


def workers_alive(redis_client) -> int:
    """How many worker processes beat within TTL_S."""
    return sum(1 for _ in redis_client.scan_iter(f"{PREFIX}*", count=100))
