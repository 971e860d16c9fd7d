"""One Redis client per process, built from REDIS_URL."""
from __future__ import annotations

import functools

import redis


@functools.lru_cache(maxsize=4)
def client(url: str) -> redis.Redis:
    """A pooled client for ``url`` with short timeouts (health checks must not hang)."""
    return redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2,
                                health_check_interval=30)
