"""/metrics: prometheus-flask-exporter, multi-process aware under gunicorn; answered only to
the networks in TXMON_METRICS_ALLOW (others get 404, as if it did not exist)."""
from __future__ import annotations

import ipaddress
import os
from functools import wraps

from flask import Flask, current_app, request


def allowed(address: str | None, networks) -> bool:
    """Whether ``address`` (a REMOTE_ADDR) is in one of ``networks``."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    if getattr(ip, "ipv4_mapped", None):
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def _only_allowed_networks(view):
    @wraps(view)
    def guarded(*args, **kwargs):
        if not allowed(request.remote_addr, current_app.config["METRICS_ALLOW"]):
            from api_service.errors import error_response

            return error_response(404, "not_found", "Not found.")
        return view(*args, **kwargs)
    return guarded


def init_app(app: Flask) -> None:
    """Expose request metrics plus shared/metrics.py's counters on /metrics."""
    options = dict(group_by="endpoint", excluded_paths=["/metrics", "/healthz"],
                   metrics_decorator=_only_allowed_networks)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics

        exporter = GunicornInternalPrometheusMetrics(app, **options)
    else:
        from prometheus_flask_exporter import PrometheusMetrics

        exporter = PrometheusMetrics(app, **options)
    app.extensions["txmon_metrics"] = exporter
