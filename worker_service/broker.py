"""The Redis transport, with one fault of kombu's made survivable.

kombu 5.7's Redis QoS, on losing the connection, restores the messages the worker had
taken but not acknowledged (prefetched, or held for their ETA). When Redis itself is gone
that restore fails inside kombu with ``AttributeError`` (its connection info is already
torn down), which Celery treats as unrecoverable: the whole worker exits, and with it the
outbox relay; so does an acknowledgement sent on the old channel just after a reconnect.
Here the failure is logged and the worker carries on reconnecting. Nothing
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


    # The same fault on the other side: a task that finishes while the connection is being
    # re-established acknowledges on the old channel, whose connection is gone, and kombu
    # raises AttributeError there too (seen in tests/test_worker_faults.py). The message
    # stays in the unacked hash; Redis hands it out again after the visibility timeout and
    # the outbox sweep sends its row again only if it was not completed: tasks are
    # idempotent, so a second run finds the work done.
    def ack(self, delivery_tag):
        try:
            return super().ack(delivery_tag)
        except AttributeError as exc:
            log.warning("Could not acknowledge a message on a closed broker connection (%s); "
                        "it is handed out again after the visibility timeout", exc)
            return None

    def reject(self, delivery_tag, requeue=False):
        try:
            return super().reject(delivery_tag, requeue=requeue)
        except AttributeError as exc:
            log.warning("Could not reject a message on a closed broker connection (%s); "
                        "it is handed out again after the visibility timeout", exc)
            return None


class Channel(kombu_redis.Channel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    Channel = Channel
