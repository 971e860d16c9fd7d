"""/metrics: prometheus-flask-exporter, multi-process aware under gunicorn."""
from __future__ import annotations

import os

from flask import Flask


def init_app(app: Flask) -> None:
    """Expose request metrics plus shared/metrics.py's counters on /metrics."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics

        exporter = GunicornInternalPrometheusMetrics(app, group_by="endpoint",
                                                     excluded_paths=["/metrics", "/healthz"])
    else:
        from prometheus_flask_exporter import PrometheusMetrics

        exporter = PrometheusMetrics(app, group_by="endpoint",
                                     excluded_paths=["/metrics", "/healthz"])
    app.extensions["txmon_metrics"] = exporter
