"""The pages (DESIGN.md "Pages"): home, API reference, wallet and operator dashboard.

Templates under api_service/templates, ES modules and styles under api_service/static, the
libraries vendored by scripts/vendor. A page carries no token: the wallet and the dashboard
take theirs from the URL fragment and call the JSON API like any other client.
"""
from __future__ import annotations

import re

from flask import Blueprint, Flask, render_template, request

bp = Blueprint("pages", __name__)
_HOST = re.compile(r"[A-Za-z0-9.:\[\]-]{1,255}")  # a Host header cannot add a directive

# No inline script or style, nothing from another origin; websockets back to this host only
# (named as well: older browsers do not count ws: as 'self').
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "font-src 'self'; connect-src 'self' ws://{host} wss://{host}; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'none'")


@bp.get("/")
def home():
    return render_template("home.html")


@bp.get("/docs")
def docs():
    return render_template("docs.html")


@bp.get("/wallet")
def wallet():
    return render_template("wallet.html")


@bp.get("/admin")
def admin():
    return render_template("admin.html")


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)

    @app.after_request
    def security_headers(response):
        host = request.host if _HOST.fullmatch(request.host or "") else "localhost"
        response.headers.setdefault("Content-Security-Policy", CSP.format(host=host))
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response
