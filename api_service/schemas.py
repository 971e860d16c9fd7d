"""Request and response schemas. The same classes validate requests and build /openapi.json."""
from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Literal, Optional

import email_validator
from email_validator import EmailNotValidError, validate_email
from pydantic import (AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field,
                      StrictBool, StrictInt, StrictStr, StringConstraints, field_validator)

MAX_CENTS = 1_000_000_000

Id = Annotated[StrictStr, StringConstraints(min_length=1, max_length=64,
                                            pattern=r"^[A-Za-z0-9_.:-]+$")]
PositiveCents = Annotated[StrictInt, Field(gt=0, le=MAX_CENTS)]
NonNegativeCents = Annotated[StrictInt, Field(ge=0, le=MAX_CENTS)]
SignedCents = Annotated[StrictInt, Field(ge=-MAX_CENTS, le=MAX_CENTS)]
# C0, DEL, C1, U+2028/U+2029: a newline in a name would forge a line in the operators' logs,
# and PostgreSQL text cannot hold NUL.
_CHAR = r"[^\x00-\x1f\x7f-\x9f\u2028\u2029]"
NO_CONTROL = rf"^{_CHAR}*$"
# Required text: at least one character that stripping leaves (the schema says so too).
NO_CONTROL_NOT_BLANK = rf"^{_CHAR}*[^\s\x00-\x1f\x7f-\x9f\u2028\u2029]{_CHAR}*$"


def PlainText(max_length: int, min_length: int = 1):
    """A text field (DESIGN.md "Text fields"): no control characters, at most ``max_length``."""
    return Annotated[StrictStr, StringConstraints(min_length=min_length, max_length=max_length,
                                                  strip_whitespace=True,
                                                  pattern=NO_CONTROL_NOT_BLANK if min_length
                                                  else NO_CONTROL)]


Text = PlainText(200)
Name = PlainText(64)


def _iso_datetime(value):
    """Query dates are ISO 8601 text only (pydantic would also take Unix timestamps)."""
    if isinstance(value, str) and not re.match(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}",
                                               value):
        raise ValueError("must be an ISO 8601 date-time with a UTC offset")
    return value


_UTC_MIN = datetime.min.replace(tzinfo=timezone.utc)
_UTC_MAX = datetime.max.replace(tzinfo=timezone.utc)


def _in_utc(value: datetime) -> datetime:
    """In UTC. A valid date-time UTC cannot hold (0001-01-01T00:00+14:00 is year 0 there) is
    the nearest one it can: as a bound it keeps and excludes the same rows."""
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        return _UTC_MIN if value.year == 1 else _UTC_MAX


def _ascii_digits(value):
    """Query integers are 1-18 ASCII digits: int() and isdigit() also take '²' or '١٢'."""
    if isinstance(value, str) and not re.fullmatch(r"[0-9]{1,18}", value):
        raise ValueError("must be 1-18 digits 0-9")
    return value


IsoDateTime = Annotated[AwareDatetime, BeforeValidator(_iso_datetime),
                        AfterValidator(_in_utc)]


def QueryInt(ge: int, le: int):
    """A query-string integer in ge..le, written in ASCII digits."""
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_ascii_digits)]


Limit = QueryInt(1, 200)


# The documented way to allow a special-use name: admin@localhost is legitimate on a
# private deployment.
if "localhost" in email_validator.SPECIAL_USE_DOMAIN_NAMES:
    email_validator.SPECIAL_USE_DOMAIN_NAMES.remove("localhost")


def _one_address(value: str) -> str:
    """Exactly one deliverable-looking address, by email-validator; no DNS lookup (the main
    app verifies ownership, and a lookup per request would stall on a slow resolver)."""
    try:
        return validate_email(value, check_deliverability=False,
                              globally_deliverable=False, test_environment=True).normalized
    except EmailNotValidError as exc:
        raise ValueError(f"must be one email address ({exc})") from None


Email = Annotated[StrictStr, Field(max_length=254, json_schema_extra={"format": "email"}),
                  AfterValidator(_one_address)]
TransactionType = Literal["credit", "sms_purchase", "verification_refund", "adjustment"]


class Body(BaseModel):
    """A JSON request body: unknown fields are an error, types are strict."""

    model_config = ConfigDict(extra="forbid")


class Query(BaseModel):
    """Query-string parameters (strings from the URL, converted where unambiguous)."""

    model_config = ConfigDict(extra="forbid")


# -- service API ---------------------------------------------------------------------------

class AccountIn(Body):
    email: Optional[Email] = None
    display_name: Optional[PlainText(100, min_length=0)] = None
    low_balance_threshold_cents: Optional[NonNegativeCents] = None


class CreditIn(Body):
    amount_cents: PositiveCents
    payment_id: Id
    description: Optional[Text] = None


class AdjustmentIn(Body):
    amount_cents: Annotated[SignedCents, Field(description="Signed, non-zero",
                                               json_schema_extra={"not": {"const": 0}})]
    reason: Text
    idempotency_key: Id

    @field_validator("amount_cents")
    @classmethod
    def _nonzero(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must not be zero")
        return value


class PurchaseIn(Body):
    id: Optional[Id] = None
    user_id: Id
    service_name: Name
    country: Name
    cost_cents: PositiveCents
    timeout_seconds: Annotated[StrictInt, Field(ge=10, le=86400)] = 300


class EndVerificationIn(Body):
    reason: Optional[Text] = None


# -- wallet, notifications, admin ---------------------------------------------------------

class PageQuery(Query):
    skip: QueryInt(0, 1_000_000) = 0
    limit: Limit = 50


class DetailedQuery(PageQuery):
    type: Optional[TransactionType] = None
    start_date: Optional[IsoDateTime] = None
    end_date: Optional[IsoDateTime] = None
    cursor: Optional[Annotated[str, StringConstraints(pattern=r"^[0-9]{1,18}$")]] = None


class ExportQuery(Query):
    type: Optional[TransactionType] = None
    start_date: Optional[IsoDateTime] = None
    end_date: Optional[IsoDateTime] = None


class NotificationQuery(Query):
    unread_only: bool = False
    limit: Limit = 50
    cursor: Optional[Annotated[str, StringConstraints(pattern=r"^[0-9]{1,18}$")]] = None


class PreferencesIn(Body):
    email_on_credit: Optional[StrictBool] = None
    email_on_debit: Optional[StrictBool] = None
    email_on_refund: Optional[StrictBool] = None
    push_on_credit: Optional[StrictBool] = None
    push_on_debit: Optional[StrictBool] = None
    push_on_refund: Optional[StrictBool] = None
    min_amount_notify_cents: Optional[NonNegativeCents] = None


class MonitorQuery(Query):
    minutes: QueryInt(1, 10080) = 60


class AlertQuery(Query):
    status: Optional[Literal["open", "acknowledged"]] = None
    limit: Limit = 50


class AcknowledgeIn(Body):
    note: Optional[PlainText(500, min_length=0)] = None


# -- responses (documentation; handlers build plain dicts of the same shape) ---------------

class ErrorDetail(BaseModel):
    code: str
    message: str
    details: dict


class ErrorOut(BaseModel):
    error: ErrorDetail


class AccountOut(BaseModel):
    user_id: str
    email: Optional[str]
    display_name: Optional[str]
    balance_cents: int
    currency: str
    last_seq: int
    low_balance_threshold_cents: int
    created_at: datetime
    updated_at: datetime


class TransactionOut(BaseModel):
    id: int
    seq: int
    user_id: str
    amount_cents: int
    type: TransactionType
    status: str
    description: Optional[str]
    service: Optional[str]
    verification_id: Optional[str]
    reference: Optional[str]
    balance_after_cents: int
    created_at: datetime


class VerificationOut(BaseModel):
    id: str
    user_id: str
    service_name: str
    country: str
    cost_cents: int
    status: Literal["pending", "completed", "cancelled", "failed", "timed_out"]
    created_at: datetime
    expires_at: datetime
    charge_transaction_id: Optional[int]
    refund_transaction_id: Optional[int]


class MovementOut(BaseModel):
    transaction: TransactionOut
    balance_cents: int


class PurchaseOut(MovementOut):
    verification: VerificationOut


class RefundOut(BaseModel):
    verification: VerificationOut
    refund: TransactionOut


class BalanceOut(BaseModel):
    balance_cents: int
    currency: str
    last_seq: int
    updated_at: datetime


class TransactionPage(BaseModel):
    total: int
    transactions: list[TransactionOut]


class DetailedPage(TransactionPage):
    next_cursor: Optional[str]


class DeliveryOut(BaseModel):
    channel: str
    status: Literal["pending", "sent", "skipped", "failed"]
    attempts: int
    last_error: Optional[str]
    updated_at: datetime


class NotificationOut(BaseModel):
    id: int
    type: str
    title: str
    message: str
    link: Optional[str]
    icon: Optional[str]
    transaction_id: Optional[int]
    read: bool
    created_at: datetime
    email_status: Literal["pending", "sent", "skipped", "failed"]
    deliveries: list[DeliveryOut]


class NotificationPage(BaseModel):
    unread_count: int
    notifications: list[NotificationOut]
    next_cursor: Optional[str]


class UpdatedOut(BaseModel):
    updated: int


class PreferencesOut(BaseModel):
    email_on_credit: bool
    email_on_debit: bool
    email_on_refund: bool
    push_on_credit: bool
    push_on_debit: bool
    push_on_refund: bool
    min_amount_notify_cents: int


class RecentTransaction(BaseModel):
    id: int
    user_id: str
    amount_cents: int
    type: str
    description: Optional[str]
    created_at: datetime


class MonitorOut(BaseModel):
    window_minutes: int
    total_transactions: int
    credits_added_cents: int
    credits_spent_cents: int
    refunds_issued_cents: int
    unique_users: int
    by_type: dict[str, int]
    recent_transactions: list[RecentTransaction]


class AlertOut(BaseModel):
    id: int
    user_id: Optional[str]
    rule: str
    transaction_id: Optional[int]
    details: dict
    status: Literal["open", "acknowledged"]
    created_at: datetime
    acknowledged_at: Optional[datetime]
    note: Optional[str]


class AlertList(BaseModel):
    alerts: list[AlertOut]


class ReconciliationOut(BaseModel):
    ran_at: Optional[datetime]
    accounts_checked: int
    mismatches: list[dict]


class StatusOut(BaseModel):
    status: str
    checks: dict[str, str] = {}
    workers: int | None = None  # /readyz: worker processes that beat within 15 s
