"""Builds test messages as raw bytes, the way a mail client would send them."""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import formatdate, make_msgid


def build(
    sender: str = "j.hughes@redborne.example",
    to: str | list[str] = "a.patel@redborne.example",
    subject: str = "Hello",
    body: str | None = "Hello,\n\nSee you tomorrow.\n",
    html: str | None = None,
    cc: list[str] | None = None,
    bcc: list[str] | None = None,
    attachments: list[tuple[str, bytes, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(to) if isinstance(to, list) else to
    if cc:
        msg["Cc"] = ", ".join(cc)
    if bcc:
        msg["Bcc"] = ", ".join(bcc)
    msg["Subject"] = subject
    msg["Date"] = formatdate(0)
    msg["Message-ID"] = make_msgid(domain="test.example")
    for name, value in (headers or {}).items():
        msg[name] = value
    if body is not None:
        msg.set_content(body)
        if html is not None:
            msg.add_alternative(html, subtype="html")
    elif html is not None:
        msg.set_content(html, subtype="html")
    for filename, data, ctype in attachments or []:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes()
