"""Logging: readable Portuguese console lines or JSON lines, rotating file, masking (LGPD)."""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import logging.handlers
import re
import sys
from pathlib import Path
from typing import Any

from .redact import redact_secrets

_CPF = re.compile(r"(?<!\d)(\d{3})\.?(\d{3})\.?(\d{3})-?(\d{2})(?!\d)")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_PHONE = re.compile(r"(?<!\d)\(?\d{2}\)?\s?9?\d{4}-?\d{4}(?!\d)")
_DATE_ISO = re.compile(r"(?<![\d-])(19|20)\d{2}-\d{2}-\d{2}(?![\d-])")

PATIENT_KEYS = frozenset({"name", "birthDate", "patient_name", "patient_cpf", "patient_birth",
                          "nome", "cpf", "datanasc", "fone", "EmailPac", "email", "phone"})


def mask_text(text: str) -> str:
    """Mask CPFs, e-mails and phone numbers found in free text."""
    text = _CPF.sub(lambda m: f"***.***.***-{m.group(4)}", text)
    text = _EMAIL.sub("***@***", text)
    return _PHONE.sub("(**) *****-****", text)


def mask_name(name: str | None) -> str:
    """'MARIA DA SILVA' → 'M*** D* S****'."""
    if not name:
        return ""
    return " ".join(w[0] + "*" * (len(w) - 1) for w in name.split())


def mask_payload(payload: Any) -> Any:
    """A copy of a payload with patient name and birth date masked."""
    out = copy.deepcopy(payload)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in list(node.items()):
                if key in PATIENT_KEYS and isinstance(value, str):
                    if key in ("name", "nome", "patient_name"):
                        node[key] = mask_name(value)
                    else:
                        node[key] = "***"
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(out)
    return out


class SafetyFilter(logging.Filter):
    """Removes secrets always and patient data unless LOG_PII=1, from every record."""

    def __init__(self, *, secrets: tuple[str, ...] = (), show_pii: bool = False) -> None:
        super().__init__()
        self.secrets = secrets
        self.show_pii = show_pii

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not lose the line
            message = str(record.msg)
        if record.exc_info:
            formatter = logging.Formatter()
            message += "\n" + formatter.formatException(record.exc_info)
            record.exc_info = None
            record.exc_text = None
        message = redact_secrets(message, self.secrets)
        if not self.show_pii:
            message = mask_text(message)
        record.msg = message
        record.args = ()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line with stable keys."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }, ensure_ascii=False)


LEVEL_PT = {"DEBUG": "DEBUG", "INFO": "INFO", "WARNING": "AVISO", "ERROR": "ERRO",
            "CRITICAL": "CRÍTICO"}


class TextFormatter(logging.Formatter):
    """``2026-12-03 10:00:00 INFO  mensagem``."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = dt.datetime.fromtimestamp(record.created).strftime("%Y-%m-%d %H:%M:%S")
        level = LEVEL_PT.get(record.levelname, record.levelname)
        return f"{stamp} {level:<6} {record.getMessage()}"


def setup_logging(
    *,
    level: str = "INFO",
    fmt: str = "text",
    log_file: Path | None = None,
    max_bytes: int = 10 * 1024 * 1024,
    backup_count: int = 5,
    secrets: tuple[str, ...] = (),
    show_pii: bool = False,
    stream: Any = None,
) -> None:
    """Configure the root logger once for the process."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    safety = SafetyFilter(secrets=secrets, show_pii=show_pii)
    console = logging.StreamHandler(stream or sys.stderr)
    console.setFormatter(formatter)
    console.addFilter(safety)
    root.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8")
        handler.setFormatter(formatter)
        handler.addFilter(safety)
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("urllib3", "requests", "sqlalchemy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
