"""One error type per failure a caller can act on; api_service/errors.py maps them to HTTP."""
from __future__ import annotations


class TxmonError(Exception):
    """Base of every error the contract names."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}


class BadRequest(TxmonError):
    status, code = 400, "bad_request"


class Unauthorized(TxmonError):
    status, code = 401, "unauthorized"


class InsufficientFunds(TxmonError):
    status, code = 402, "insufficient_funds"


class Forbidden(TxmonError):
    status, code = 403, "forbidden"


class NotFound(TxmonError):
    status, code = 404, "not_found"


class IdempotencyMismatch(TxmonError):
    status, code = 409, "idempotency_mismatch"


class InvalidState(TxmonError):
    status, code = 409, "invalid_state"


class ValidationFailed(TxmonError):
    status, code = 422, "validation_error"


class RateLimited(TxmonError):
    status, code = 429, "rate_limited"


class Unavailable(TxmonError):
    status, code = 503, "unavailable"
