"""Prometheus metric objects, named once here (DESIGN.md, "Operations").

In multi-process servers (gunicorn, Celery prefork) prometheus_client aggregates through
PROMETHEUS_MULTIPROC_DIR; the objects are declared the same way either way.
"""
from prometheus_client import Counter, Gauge, Histogram

TRANSACTIONS = Counter("transactions_total", "Ledger transactions committed",
                       ["type", "status"])
NOTIFICATIONS = Counter("notifications_total", "Notification deliveries by outcome",
                        ["type", "success"])
REFUND_LATENCY = Histogram("refund_latency_seconds",
                           "From expiry (or cancel/fail) to the refund's commit",
                           buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 15, 30, 60, 120))
OUTBOX_BACKLOG = Gauge("outbox_backlog", "Due outbox rows not yet dispatched",
                       multiprocess_mode="mostrecent")
ALERTS = Counter("alerts_total", "Suspicious-activity alerts raised", ["rule"])
EMAILS = Counter("emails_total", "Emails by result", ["result"])

# Pre-create the label sets operators query, so the series exist before the first event.
for _type in ("credit", "sms_purchase", "verification_refund", "adjustment"):
    TRANSACTIONS.labels(type=_type, status="completed")

WS_OPEN = Gauge("websocket_connections", "Open websocket connections",
                multiprocess_mode="livesum")
WS_RELAYED = Counter("websocket_messages_relayed_total", "Messages handed to sockets")
WS_DROPPED = Counter("websocket_slow_dropped_total",
                     "Messages not queued because a socket could not keep up")
WS_CLOSED_SLOW = Counter("websocket_closed_slow_total", "Sockets closed for being too slow")
