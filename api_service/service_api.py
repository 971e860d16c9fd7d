"""The service API the main app calls with its X-API-Key: accounts, credits, verifications."""
from __future__ import annotations

from flask import Blueprint, jsonify

from api_service import schemas as s
from api_service.contract import operation
from api_service.transactions_view import detailed_page
from shared import accounts, ledger
from shared.ids import new_verification_id

bp = Blueprint("service", __name__, url_prefix="/api/v1")
TAGS = ("service",)


def _movement(m: ledger.Movement, key: str = "transaction"):
    body = {key: m.transaction, "balance_cents": m.balance_cents}
    if m.verification is not None:
        body["verification"] = m.verification
    return jsonify(body), 201 if m.created else 200


@bp.put("/accounts/<user_id>")
@operation("Create or update an account", auth_as="service", body=s.AccountIn, ids=("user_id",),
           responses={200: s.AccountOut, 201: s.AccountOut}, tags=TAGS)
def put_account(user_id, body, principal):
    account, created = accounts.upsert(user_id=user_id, **body.model_dump(exclude_unset=True))
    return jsonify(accounts.serialize(account)), 201 if created else 200


@bp.get("/accounts/<user_id>")
@operation("Read an account", auth_as="service", ids=("user_id",),
           responses={200: s.AccountOut, 404: s.ErrorOut}, tags=TAGS)
def get_account(user_id, principal):
    return jsonify(accounts.serialize(accounts.get_or_raise(user_id=user_id)))


@bp.post("/accounts/<user_id>/credits")
@operation("Credit a payment (idempotent on payment_id)", auth_as="service", body=s.CreditIn,
           ids=("user_id",), tags=TAGS,
           responses={200: s.MovementOut, 201: s.MovementOut, 404: s.ErrorOut, 409: s.ErrorOut})
def post_credit(user_id, body, principal):
    return _movement(ledger.record_credit(user_id=user_id, amount_cents=body.amount_cents,
                                          payment_id=body.payment_id,
                                          description=body.description))


@bp.post("/accounts/<user_id>/adjustments")
@operation("Apply a signed adjustment (idempotent on idempotency_key)", auth_as="service",
           body=s.AdjustmentIn, ids=("user_id",), tags=TAGS,
           responses={200: s.MovementOut, 201: s.MovementOut, 404: s.ErrorOut, 409: s.ErrorOut})
def post_adjustment(user_id, body, principal):
    return _movement(ledger.apply_adjustment(user_id=user_id, amount_cents=body.amount_cents,
                                             reason=body.reason,
                                             idempotency_key=body.idempotency_key))


@bp.get("/accounts/<user_id>/transactions")
@operation("An account's transactions, filtered and paged", auth_as="service",
           query=s.DetailedQuery, ids=("user_id",), tags=TAGS,
           responses={200: s.DetailedPage, 404: s.ErrorOut})
def get_account_transactions(user_id, query, principal):
    accounts.get_or_raise(user_id=user_id)
    return jsonify(detailed_page(user_id, query))


@bp.post("/verifications")
@operation("Charge a verification purchase (idempotent on id)", auth_as="service",
           body=s.PurchaseIn, tags=TAGS,
           responses={200: s.PurchaseOut, 201: s.PurchaseOut, 402: s.ErrorOut, 404: s.ErrorOut,
                      409: s.ErrorOut})
def post_verification(body, principal):
    return _movement(ledger.charge_verification(
        verification_id=body.id or new_verification_id(), user_id=body.user_id,
        service_name=body.service_name, country=body.country, cost_cents=body.cost_cents,
        timeout_seconds=body.timeout_seconds))


@bp.get("/verifications/<verification_id>")
@operation("Read a verification", auth_as="service", ids=("verification_id",), tags=TAGS,
           responses={200: s.VerificationOut, 404: s.ErrorOut})
def get_verification(verification_id, principal):
    return jsonify(ledger.get_verification(verification_id=verification_id))


@bp.post("/verifications/<verification_id>/complete")
@operation("Mark a verification completed", auth_as="service", ids=("verification_id",),
           tags=TAGS, responses={200: s.VerificationOut, 404: s.ErrorOut, 409: s.ErrorOut})
def complete_verification(verification_id, principal):
    return jsonify(ledger.complete_verification(verification_id=verification_id))


def _end(verification_id: str, status: str, reason: str | None):
    m = ledger.refund_verification(verification_id=verification_id, status=status, reason=reason)
    return jsonify({"verification": m.verification, "refund": m.transaction})


@bp.post("/verifications/<verification_id>/cancel")
@operation("Cancel a pending verification and refund it once", auth_as="service",
           body=s.EndVerificationIn, ids=("verification_id",), tags=TAGS,
           responses={200: s.RefundOut, 404: s.ErrorOut, 409: s.ErrorOut})
def cancel_verification(verification_id, body, principal):
    return _end(verification_id, "cancelled", body.reason)


@bp.post("/verifications/<verification_id>/fail")
@operation("Mark a pending verification failed and refund it once", auth_as="service",
           body=s.EndVerificationIn, ids=("verification_id",), tags=TAGS,
           responses={200: s.RefundOut, 404: s.ErrorOut, 409: s.ErrorOut})
def fail_verification(verification_id, body, principal):
    return _end(verification_id, "failed", body.reason)
