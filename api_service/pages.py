"""The pages (DESIGN.md "Pages"): home, API reference, wallet and operator dashboard.

Templates under api_service/templates, ES modules and styles under api_service/static, the
libraries vendored by scripts/vendor. A page carries no token: the wallet and the dashboard
take theirs from the URL fragment and call the JSON API like any other client.
"""
from __future__ import annotations

from flask import Blueprint, Flask, render_template

bp = Blueprint("pages", __name__)

# No inline script or style, nothing from another origin; websockets back to this host only.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "font-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")


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
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response
