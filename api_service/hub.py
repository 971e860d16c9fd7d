"""The per-process realtime hub: ONE Redis subscription, fanned out to local sockets.

Workers publish on ``txmon:rt:user:<id>`` and ``txmon:rt:admin`` after commit. The hub
pattern-subscribes once, routes each message to the subscribers of that user (or to the
admin sockets) by putting it on each subscriber's bounded queue without blocking. A
subscriber whose queue is full is marked slow and its socket is closed by its own handler;
no socket can delay another. When Redis goes away the hub reconnects by itself and tells
every subscriber to resync (fresh snapshot, missed transactions from the database).
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import defaultdict

import redis

from shared.metrics import WS_DROPPED, WS_RELAYED

log = logging.getLogger("txmon.hub")
PATTERN = "txmon:rt:*"
USER_PREFIX = "txmon:rt:user:"
ADMIN_CHANNEL = "txmon:rt:admin"


class Subscriber:
    """One socket's mailbox: a bounded queue the hub fills and the socket's handler drains."""

    def __init__(self, *, user_id: str | None, admin: bool = False, maxsize: int = 256,
                 on_slow=None):
        self.user_id, self.admin = user_id, admin
        # SimpleQueue, bounded here: every idle socket holds one, and Queue carries more
        # (the standard one a mutex and three conditions, gevent's a join event).
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.maxsize = maxsize
        self.slow = False
        self.on_slow = on_slow

    def offer(self, item) -> bool:
        """Queue ``item`` without waiting; a full queue marks this subscriber slow."""
        if self.queue.qsize() < self.maxsize:
            self.queue.put_nowait(item)
            return True
        if not self.slow:
            self.slow = True
            if self.on_slow is not None:
                self.on_slow()
        return False

    def wake(self, item) -> None:
        """Queue a control item (resync, client input); if full, the slow flag already rules."""
        self.offer(item)


class Hub:
    """The process's single subscription and its routing table."""

    def __init__(self, redis_url: str):
        self.redis_url = redis_url
        self.users: dict[str, set[Subscriber]] = defaultdict(set)
        self.admins: set[Subscriber] = set()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.connected = threading.Event()
        self.subscriptions = 0  # how many times the subscription was (re)established

    def start(self, wait: float = 0.0) -> bool:
        """Start the subscription (once); wait up to ``wait`` s for it; True once it is live.

        gunicorn.conf.py calls it as a worker starts, so a socket that connects later syncs
        under a live subscription and gets one snapshot.
        """
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="txmon-hub", daemon=True)
                self.thread.start()
        return self.connected.wait(wait) if wait else self.connected.is_set()

    def add(self, sub: Subscriber) -> None:
        """Register a subscriber (and start the subscription if nothing has yet)."""
        with self.lock:
            (self.admins if sub.admin else self.users[sub.user_id]).add(sub)
        self.start()

    def remove(self, sub: Subscriber) -> None:
        """Forget a subscriber."""
        with self.lock:
            if sub.admin:
                self.admins.discard(sub)
            else:
                subs = self.users.get(sub.user_id)
                if subs is not None:
                    subs.discard(sub)
                    if not subs:
                        del self.users[sub.user_id]

    def _everyone(self) -> list[Subscriber]:
        with self.lock:
            return [s for subs in self.users.values() for s in subs] + list(self.admins)

    def _targets(self, channel: str) -> list[Subscriber]:
        with self.lock:
            if channel == ADMIN_CHANNEL:
                return list(self.admins)
            if channel.startswith(USER_PREFIX):
                return list(self.users.get(channel[len(USER_PREFIX):], ()))
        return []

    def route(self, channel: str, data: bytes | str) -> None:
        """Deliver one published message to the subscribers it is for."""
        targets = self._targets(channel)
        if not targets:
            return
        message = json.loads(data)
        for sub in targets:
            if sub.offer(("message", message)):
                WS_RELAYED.inc()
            else:
                WS_DROPPED.inc()
        # Let the sockets' pumps send it before the next: a burst read from Redis at once (a
        # batch handler publishes up to 100 in one pipeline) must not fill the queue of a
        # socket that keeps up. Only a socket whose send blocks falls behind (gevent: a yield).
        time.sleep(0)

    def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2,
                                              socket_keepalive=True, health_check_interval=10)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.psubscribe(PATTERN)
                pubsub.get_message(timeout=2.0)  # the psubscribe reply: now it is live
                self.subscriptions += 1
                self.connected.set()
                # Whatever was published before this moment never reached us: every socket
                # that synced under an older subscription takes a fresh snapshot.
                for sub in self._everyone():
                    sub.wake(("resync", self.subscriptions))
                delay = 0.1
                while True:
                    msg = pubsub.get_message(timeout=5.0)
                    if msg is None:
                        pubsub.ping()  # notices a dead connection while idle
                        continue
                    if msg.get("type") == "pmessage":
                        channel = msg["channel"]
                        self.route(channel.decode() if isinstance(channel, bytes) else channel,
                                   msg["data"])
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                self.connected.clear()
                log.warning("Realtime subscription lost (%s); reconnecting",
                            type(exc).__name__)
                threading.Event().wait(delay)
                delay = min(delay * 2, 2.0)
            except Exception:  # a bad message must not kill the process's only subscription
                log.exception("Realtime hub error; continuing")

    def going_away(self) -> None:
        """The process is stopping: every socket closes itself (1001) at its next turn."""
        for sub in self._everyone():
            sub.wake(("going_away", None))


_hubs: dict[str, Hub] = {}
_hubs_lock = threading.Lock()


def hub_for(redis_url: str) -> Hub:
    """The process's hub for ``redis_url`` (one subscription per process)."""
    with _hubs_lock:
        if redis_url not in _hubs:
            _hubs[redis_url] = Hub(redis_url)
        return _hubs[redis_url]


def going_away() -> None:
    """Tell every socket of this process that the server is going away (see Hub.going_away)."""
    with _hubs_lock:
        hubs = list(_hubs.values())
    for hub in hubs:
        hub.going_away()
