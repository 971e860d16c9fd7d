"""The Redis transport, with one fault of kombu's made survivable.

kombu 5.7's Redis QoS, on losing the connection, restores the messages the worker had
taken but not acknowledged (prefetched, or held for their ETA). When Redis itself is gone
that restore fails inside kombu with ``AttributeError`` (its connection info is already
torn down), which Celery treats as unrecoverable: the whole worker exits, and with it the
outbox relay. Here the failure is logged and the worker carries on reconnecting. Nothing
is lost: the messages stay in Redis's unacked set (restored after the visibility timeout)
and txmon's outbox sweep sends their rows again once their lease has passed.
"""
from __future__ import annotations

import logging

import redis
from kombu.transport import redis as kombu_redis

log = logging.getLogger("txmon.broker")


class QoS(kombu_redis.QoS):
    def restore_unacked(self, client=None):
        try:
            return super().restore_unacked(client)
        except (AttributeError, OSError, redis.RedisError) as exc:
            log.warning("Could not hand %d unacknowledged message(s) back to Redis (%s); "
                        "the outbox sweep will send them again", len(self._delivered),
                        type(exc).__name__)
            self._delivered.clear()
            return None


class Channel(kombu_redis.Channel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    Channel = Channel
