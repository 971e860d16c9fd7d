"""Email: building messages from templates, and sending them over SMTP or into var/mail/.

``SMTP_URL`` (smtp://host:port, smtps:// for TLS, user:password@ allowed) selects SMTP;
without it messages are written as .eml files, which is what development wants.
"""
from __future__ import annotations

import smtplib
import uuid
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from urllib.parse import unquote, urlparse

from flask import current_app
from jinja2 import Environment, FileSystemLoader, select_autoescape

_templates = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                         autoescape=select_autoescape(["html"]))
FROM_ADDRESS = "txmon <notifications@txmon.local>"


def build(*, to: str, subject: str, context: dict) -> EmailMessage:
    """A multipart message (plain text and HTML) from the notification templates."""
    msg = EmailMessage()
    msg["From"] = current_app.config.get("MAIL_FROM", FROM_ADDRESS)
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="txmon.local")
    msg.set_content(_templates.get_template("email/notification.txt").render(**context))
    msg.add_alternative(_templates.get_template("email/notification.html").render(**context),
                        subtype="html")
    return msg


def send(msg: EmailMessage) -> None:
    """Deliver over SMTP_URL, or write to the mail directory when SMTP_URL is unset."""
    url = current_app.config.get("SMTP_URL")
    if not url:
        folder = Path(current_app.config["MAIL_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{uuid.uuid4().hex}.eml").write_bytes(bytes(msg))
        return
    parts = urlparse(url)
    smtp_cls = smtplib.SMTP_SSL if parts.scheme == "smtps" else smtplib.SMTP
    with smtp_cls(parts.hostname or "127.0.0.1", parts.port or 25, timeout=10) as smtp:
        if parts.scheme == "smtp+starttls":
            smtp.starttls()
        if parts.username:
            smtp.login(unquote(parts.username), unquote(parts.password or ""))
        smtp.send_message(msg)
