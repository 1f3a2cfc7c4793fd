"""Hide secrets and patient data in text meant for logs and screens."""

from __future__ import annotations

import re

_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^@\s]*)@")
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9\-._~+/=]+")
_ODBC_PWD = re.compile(r"(?i)(\bPWD=)(\{(?:[^}]|\}\})*\}|[^;]*)")


def redact_url(url: str) -> str:
    """``scheme://user:secret@host`` → ``scheme://user:***@host``."""
    return _URL_PASSWORD.sub(lambda m: m.group("head") + "***@", url)


def redact_secrets(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove bearer tokens, URL and ODBC passwords and any given secret value."""
    out = _BEARER.sub(r"\1***", text)
    out = redact_url(out)
    out = _ODBC_PWD.sub(r"\1***", out)
    for secret in secrets:
        if secret and len(secret) >= 4:
            out = out.replace(secret, "***")
    return out
