"""The one place that turns errors into the contract's error body."""
from __future__ import annotations

import json
import logging

from flask import Flask, jsonify
from sqlalchemy.exc import DBAPIError, OperationalError
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from shared.errors import TxmonError

log = logging.getLogger("txmon.api")

HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 408: "request_timeout", 409: "conflict",
              413: "payload_too_large",
              415: "unsupported_media_type", 422: "validation_error", 429: "rate_limited",
              503: "unavailable"}


def error_response(status: int, code: str, message: str, details: dict | None = None):
    """A JSON response with the contract's ``{"error": {...}}`` body."""
    response = jsonify({"error": {"code": code, "message": message, "details": details or {}}})
    response.status_code = status
    return response


def wsgi_error(status: int, code: str, message: str, details: dict | None = None,
               headers: dict | None = None) -> Response:
    """The same body as a plain WSGI response, for middleware that runs outside Flask."""
    body = json.dumps({"error": {"code": code, "message": message, "details": details or {}}})
    return Response(body, status=status, mimetype="application/json", headers=headers)


def _unavailable(exc: BaseException):
    """503 for a database that is down, restarting or too slow; one log line, no traceback."""
    orig = getattr(exc, "orig", None) or exc
    if type(orig).__name__ == "QueryCanceled":  # statement_timeout
        log.error("Database statement cancelled: %s", str(orig).splitlines()[0])
        return error_response(503, "unavailable", "The database did not answer in time; "
                              "retry later.")
    log.error("Database unavailable: %s", type(orig).__name__)
    return error_response(503, "unavailable", "The database is unavailable; retry later.")


def init_app(app: Flask) -> None:
    """Register the handlers."""

    @app.errorhandler(TxmonError)
    def _txmon(exc: TxmonError):
        return error_response(exc.status, exc.code, exc.message, exc.details)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        if exc.code == 429:
            return error_response(429, "rate_limited", "Too many requests; slow down.",
                                  {"limit": str(getattr(exc, "description", ""))})
        code = HTTP_CODES.get(exc.code, "error")
        response = error_response(exc.code, code, exc.description or exc.name)
        for name, value in exc.get_headers():  # e.g. Allow on 405
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    app.register_error_handler(OperationalError, _unavailable)
    try:  # the ledger's hot path runs on the driver's cursor: its errors come unwrapped
        import psycopg
    except ImportError:
        pass
    else:
        # OperationalError: server gone, restarting, statement cancelled; InterfaceError:
        # a connection the outage closed under us.
        app.register_error_handler(psycopg.OperationalError, _unavailable)
        app.register_error_handler(psycopg.InterfaceError, _unavailable)

    @app.errorhandler(DBAPIError)
    def _db_error(exc: DBAPIError):
        if exc.connection_invalidated:
            return _unavailable(exc)
        log.exception("Database error")
        return error_response(500, "internal_error", "Internal error.")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("Unhandled error")
        return error_response(500, "internal_error", "Internal error.")
