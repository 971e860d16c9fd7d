"""shared.mail builds the bytes the email package's stock compat32 classes would build.

``mail.build`` writes plain headers and ASCII parts without compat32's Header and charset
machinery (shared/mail.py ``_Policy``, ``_part``); each case here builds the same message
the stock way (MIMEText, the default policy) and the two must be equal byte for byte,
headers that need folding or encoding included.
"""
from __future__ import annotations

import email
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest
from flask import Flask

from shared import mail

pytestmark = pytest.mark.smoke

CASES = {
    "ascii": ("Ana <ana@example.com>", "txmon: Credits Used", {
        "title": "Credits Used", "message": "$0.01 deducted. New balance: $9.99",
        "amount": "$0.01", "balance": "$9.99"}),
    "non-ascii text and subject": ("ana@example.com", "txmon: Crédits utilisés ✓", {
        "title": "Crédits utilisés ✓", "message": "0,01 $ déduits — merci",
        "amount": "$0.01", "balance": "$9.99"}),
    "long subject, folded": ("ana@example.com", "txmon: " + "very long title " * 8, {
        "title": "t", "message": "m", "amount": None, "balance": "$1.00"}),
    "double spaces and edge spaces": ("ana@example.com", " txmon:  two  spaces ", {
        "title": "t", "message": "m", "amount": "$1.00", "balance": "$1.00"}),
    "encoded-word look-alike, exactly 78 columns": (
        "ana@example.com", "=?utf-8?q?not_encoded?= " + "x" * (78 - 9 - 24), {
            "title": "t", "message": "m", "amount": "$1.00", "balance": "$1.00"}),
    "79 columns, folded": ("ana@example.com", "txmon: " + "word " * 12 + "xxx", {
        "title": "t", "message": "m", "amount": "$1.00", "balance": "$1.00"}),
    "a tab": ("ana@example.com", "txmon:\tx", {
        "title": "t", "message": "m", "amount": "$1.00", "balance": "$1.00"}),
    "non-ascii sender": ("ana@example.com", "txmon: x", {
        "title": "t", "message": "m", "amount": "$1.00", "balance": "$1.00"}),
}


def _stock(ours, to: str, subject: str) -> bytes:
    """The same message through the stock classes: same boundary, ids and rendered parts."""
    stock = MIMEMultipart("alternative", boundary=ours.get_boundary())
    for name in ("From", "To", "Subject", "Message-ID"):
        stock[name] = ours[name]
    for part in ours.get_payload():
        text = part.get_payload(decode=True).decode(part.get_content_charset())
        stock.attach(MIMEText(text, part.get_content_subtype(),
                              "us-ascii" if text.isascii() else "utf-8"))
    return bytes(stock)


@pytest.mark.parametrize("case", CASES)
def test_built_message_equals_the_stock_compat32_bytes(case):
    to, subject, context = CASES[case]
    app = Flask(__name__)
    app.config["MAIL_FROM"] = ("Ünïcode Sender <n@txmon.local>" if case == "non-ascii sender"
                               else mail.FROM_ADDRESS)
    with app.app_context():
        ours = mail.build(to=to, subject=subject, context={"wallet_url": "http://w/x", **context})
    raw = bytes(ours)
    assert raw == _stock(ours, to, subject)
    # and it reads back as what was put in (up to whitespace, which folding may change)
    parsed = email.message_from_bytes(raw)
    read = str(email.header.make_header(email.header.decode_header(parsed["Subject"])))
    if "=?" not in subject:  # a look-alike reads back as the encoded word it resembles
        assert read.split() == subject.split()
    plain = parsed.get_payload(0)
    assert context["message"] in plain.get_payload(decode=True).decode(
        plain.get_content_charset())
