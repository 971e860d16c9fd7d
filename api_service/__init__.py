"""txmon's HTTP service: create_app() builds the Flask app (see DESIGN.md for the contract)."""
from __future__ import annotations

import logging
import sys
import os

import click
from flask import Flask, request
from flask_limiter import Limiter
from flask_migrate import Migrate

from shared.config import Config
from shared.db import db

migrate = Migrate(directory=os.path.join(os.path.dirname(__file__), "..", "migrations"))


def _rate_key() -> str:
    # Per verified principal: header spellings of one token share its bucket. Never raises
    # (Flask-Limiter would take an exception for a storage outage).
    from api_service.auth import verified_principal

    principal = verified_principal()
    if principal is None:
        return "addr:" + (request.remote_addr or "unknown")
    return f"{principal.kind}:{principal.user_id or 'service'}"


limiter = Limiter(key_func=_rate_key)


def create_app(test_config: dict | None = None) -> Flask:
    """Build the app from the environment (``test_config`` overrides for tests)."""
    app = Flask(__name__)
    app.config.update(Config().as_dict())
    if test_config:
        app.config.update(test_config)
    app.json.sort_keys = False
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")

    if "gevent.monkey" in sys.modules:  # a gevent worker: psycopg waits on gevent's loop
        from shared import gevent_pg

        gevent_pg.install()
    db.init_app(app)
    migrate.init_app(app, db)
    limiter.init_app(app)

    from api_service import (admin, errors, metrics, notifications_api, ops, pages,
                             realtime_ws, service_api, wallet)

    errors.init_app(app)
    for bp in (wallet.bp, notifications_api.bp, admin.bp):
        limiter.limit(lambda: app.config["RATELIMIT_USER"])(bp)
    for bp in (ops.bp, service_api.bp):  # unlimited: skip the limiter's per-request work
        limiter.exempt(bp)
    for bp in (ops.bp, service_api.bp, wallet.bp, notifications_api.bp, admin.bp):
        app.register_blueprint(bp)
    pages.init_app(app)
    limiter.exempt(pages.bp)
    metrics.init_app(app)
    # simple-websocket closes with 1009 past this, the auth window included.
    app.config.setdefault("SOCK_SERVER_OPTIONS",
                          {"max_message_size": realtime_ws.MAX_MESSAGE_BYTES})
    realtime_ws.sock.init_app(app)
    _register_cli(app)
    from api_service.admission import Admission

    app.wsgi_app = Admission(app.wsgi_app, app.config["HTTP_CONCURRENCY"],
                             service_keys=app.config["SERVICE_KEYS"])
    return app


def _register_cli(app: Flask) -> None:
    @app.cli.command("token")
    @click.argument("user_id")
    @click.option("--admin", is_flag=True, help="Mint an admin token.")
    @click.option("--hours", default=12, show_default=True, help="Lifetime in hours.")
    def token(user_id: str, admin: bool, hours: int):
        """Print a development JWT for USER_ID (refused in production: the main app mints)."""
        from datetime import timedelta

        from api_service.auth import mint_token

        if app.config["TXMON_ENV"] == "production":
            raise click.ClickException("the token command is for development; in production "
                                       "the main app mints tokens")

        click.echo(mint_token(user_id, admin=admin, ttl=timedelta(hours=hours)))

    @app.cli.command("reconcile")
    def reconcile_cmd():
        """Check every account's balance and seq against its ledger now."""
        from shared import reconcile

        result = reconcile.run()
        click.echo(f"accounts checked: {result['accounts_checked']}, "
                   f"mismatches: {len(result['mismatches'])}")
        for m in result["mismatches"]:
            click.echo(f"  {m['user_id']}: {', '.join(m['problems'])}")
