"""Email: building messages from templates, and sending them over SMTP or into var/mail/.

``SMTP_URL`` (smtp://host:port, smtps:// for TLS, user:password@ allowed) selects SMTP;
without it messages are written as .eml files, which is what development wants.
"""
from __future__ import annotations

import os
import smtplib
import threading
import time
import uuid
from email.header import Header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.mime.text import MIMEText
from email.policy import Compat32
from email.utils import make_msgid
from pathlib import Path
from urllib.parse import unquote, urlparse

from flask import current_app
from jinja2 import Environment, FileSystemLoader, select_autoescape

_templates = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                         autoescape=select_autoescape(["html"]))
FROM_ADDRESS = "txmon <notifications@txmon.local>"


def build(*, to: str, subject: str, context: dict, message_id: str | None = None) -> Message:
    """A multipart/alternative message (plain text and HTML) from the notification templates.

    Built with the compat32 MIME classes: the same message as ``EmailMessage`` would give,
    at a tenth of the CPU (its header registry parses every header it is given; ~0.85 ms
    against ~0.09 ms per message, measured). ASCII parts go as 7bit, others as UTF-8;
    non-ASCII header values are RFC 2047 encoded.
    """
    # A boundary of our own: the generator would otherwise compile a regex per message to
    # pick one (a random 128-bit token cannot occur in the rendered parts).
    msg = MIMEMultipart("alternative", boundary=f"=_txmon_{uuid.uuid4().hex}", policy=POLICY)
    msg["From"] = _header(current_app.config.get("MAIL_FROM", FROM_ADDRESS))
    msg["To"] = _header(to)
    msg["Subject"] = _header(subject)
    msg["Message-ID"] = message_id or make_msgid(domain="txmon.local")
    for name, subtype in (("email/notification.txt", "plain"), ("email/notification.html", "html")):
        msg.attach(_part(_templates.get_template(name).render(**context), subtype))
    return msg


class _Policy(Compat32):
    """compat32, except that a header needing neither folding nor encoding (printable
    ASCII within the line length) is written as it is instead of through
    email.header.Header, which compat32 builds and encodes for every header: the same
    bytes (tests/test_mail.py compares them), at a fraction of the CPU (the header folding
    was most of a delivery's email cost: cProfile, CPU time)."""

    def _fold(self, name, value, sanitize):
        if (type(value) is str and value.isascii() and value.isprintable()
                and len(name) + 2 + len(value) <= (self.max_line_length or 0)):
            return f"{name}: {value}{self.linesep}"
        return super()._fold(name, value, sanitize)


POLICY = _Policy()


def _part(text: str, subtype: str) -> Message:
    """One text part. ASCII text, the usual case, goes as 7bit with its headers set
    directly (MIMEText would run the charset machinery to arrive at the same); other
    text goes through MIMEText as UTF-8."""
    if not text.isascii():
        return MIMEText(text, subtype, "utf-8", policy=POLICY)
    part = MIMENonMultipart("text", subtype, charset="us-ascii", policy=POLICY)
    part["Content-Transfer-Encoding"] = "7bit"
    part.set_payload(text)
    return part


def _header(value: str):
    return value if value.isascii() else Header(value, "utf-8")


def send(msg: Message) -> None:
    """Deliver over SMTP_URL, or write to the mail directory when SMTP_URL is unset.

    Over SMTP the connection is kept open and reused by the next message of this process
    (connect, EHLO and QUIT per message cost more than the message itself). A connection
    the server has dropped meanwhile (idle timeout, restart) is noticed on the first
    command of the next message, before anything of it was accepted, and that message is
    sent once more on a fresh connection; any other failure closes the connection and is
    raised (the caller's retry policy decides).
    """
    url = current_app.config.get("SMTP_URL")
    if not url:
        folder = Path(current_app.config["MAIL_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{uuid.uuid4().hex}.eml").write_bytes(bytes(msg))
        return
    reused = _pool.get(url)
    smtp = reused or _pool.connect(url)
    try:
        smtp.send_message(msg)
    except _STALE:
        _pool.discard(url)
        if reused is None:
            raise
        smtp = _pool.connect(url)  # the kept connection had gone away: once more, fresh
        try:
            smtp.send_message(msg)
        except BaseException:
            _pool.discard(url)
            raise
    except (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused):
        raise  # smtplib has reset the session already; the connection stays usable
    except BaseException:
        _pool.discard(url)
        raise


# Refusals of one message: the connection stays usable, retrying soon cannot help.
REFUSED = (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused)
# A dropped connection shows as one of these on the first command of the next message.
_STALE = (smtplib.SMTPServerDisconnected, ConnectionResetError, BrokenPipeError,
          ConnectionAbortedError)


class _Connections:
    """One open SMTP connection per URL, process and thread (forked children and the
    worker's batch lanes never share one)."""

    MAX_IDLE_S = 60.0  # older than this: closed and reopened rather than trusted
    MAX_MESSAGES = 1000  # then a fresh connection (servers cap messages per session)

    def __init__(self):
        self._open: dict[tuple, list] = {}  # (url, thread) -> [smtp, pid, last_used, messages]

    def get(self, url: str):
        url = _key(url)
        entry = self._open.get(url)
        if entry is None:
            return None
        smtp, pid, last_used, count = entry
        if pid != os.getpid():  # inherited over fork: the parent's socket, never ours
            self._open.pop(url, None)
            return None
        if time.monotonic() - last_used > self.MAX_IDLE_S or count >= self.MAX_MESSAGES:
            self.discard(url)
            return None
        entry[2], entry[3] = time.monotonic(), count + 1
        return smtp

    def connect(self, url: str):
        key, parts = _key(url), urlparse(url)
        smtp_cls = smtplib.SMTP_SSL if parts.scheme == "smtps" else smtplib.SMTP
        smtp = smtp_cls(parts.hostname or "127.0.0.1", parts.port or 25, timeout=10)
        try:
            if parts.scheme == "smtp+starttls":
                smtp.starttls()
            if parts.username:
                smtp.login(unquote(parts.username), unquote(parts.password or ""))
        except BaseException:
            _close(smtp)
            raise
        self.discard(url)
        self._open[key] = [smtp, os.getpid(), time.monotonic(), 1]
        return smtp

    def discard(self, url: str) -> None:
        entry = self._open.pop(_key(url), None)
        if entry is not None and entry[1] == os.getpid():
            _close(entry[0])

    def close_all(self) -> None:
        """Close this thread's connections."""
        me = threading.get_ident()
        for key in [k for k in self._open if k[1] == me]:
            entry = self._open.pop(key)
            if entry[1] == os.getpid():
                _close(entry[0])


def _key(url) -> tuple:
    return url if isinstance(url, tuple) else (url, threading.get_ident())


def _close(smtp) -> None:
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        pass
    try:
        smtp.close()
    except OSError:
        pass


_pool = _Connections()
close_connections = _pool.close_all
