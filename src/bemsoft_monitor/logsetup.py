"""Logging: readable Portuguese console lines or JSON lines, rotating file, masking (LGPD).

Every line passes through :class:`SafetyFilter`: secrets (the Bemsoft token, the database
password, bearer headers, URL/ODBC passwords) are always removed, tracebacks included;
patient data (CPF, e-mail, phone, and name/birth date written as JSON or dict fields) is
masked unless ``LOG_PII=1``. Free-text names and birth dates cannot be recognised, so the
code must never put them in a message outside a payload (see :func:`mask_payload`).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import logging.handlers
import os
import re
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

from urllib3.exceptions import InsecureRequestWarning

from .errors import ConfigError
from .oserrors import os_error_fix, os_error_reason, os_error_text
from .redact import redact_secrets

__all__ = [
    "JsonFormatter",
    "SafetyFilter",
    "TextFormatter",
    "mask_name",
    "mask_payload",
    "mask_text",
    "pii_shown",
    "prepare_log_file",
    "setup_logging",
]

_CPF = re.compile(r"(?<!\d)(\d{3})\.?(\d{3})\.?(\d{3})-?(\d{2})(?!\d)")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_PHONE = re.compile(r"(?<!\d)\(?\d{2}\)?\s?9?\d{4}-?\d{4}(?!\d)")

NAME_KEYS = frozenset({"name", "nome", "patient_name", "NomePaciente"})
PATIENT_KEYS = NAME_KEYS | frozenset({
    "birthDate", "patient_birth", "datanasc", "patient_cpf", "cpf", "fone", "telefone",
    "celular", "phone", "EmailPac", "email",
})
# "key": "value" or 'key': 'value' of a patient field inside any logged text (a JSON dump
# of a payload, the repr of a dict): the value is masked even when the caller forgot to.
_FIELD = re.compile(
    r"""(?P<q>["'])(?P<key>"""
    + "|".join(sorted(PATIENT_KEYS, key=len, reverse=True))
    + r""")(?P=q)(?P<sep>\s*:\s*)(?P<vq>["'])(?P<value>(?:\\.|(?!(?P=vq)).)*)(?P=vq)"""
)
_DATE_REPR = r"datetime\.date(?:time)?\([^)]*\)"
# The same fields as Python writes them in a repr: ``'datanasc': datetime.date(1990, 5, 15)``
# (a dict) or ``patient_name='MARIA'`` (a dataclass such as LisItem, in an error message).
# A bare ``name=`` is left alone: catalogue entries and exams have names too.
_KEYS_RE = "|".join(sorted(PATIENT_KEYS, key=len, reverse=True))
_KWARG_KEYS_RE = "|".join(sorted(PATIENT_KEYS - {"name"}, key=len, reverse=True))
_DICT_DATE = re.compile(rf"""(?P<head>(?P<q>["'])(?:{_KEYS_RE})(?P=q)\s*:\s*){_DATE_REPR}""")
_KWARG = re.compile(rf"""\b(?P<key>{_KWARG_KEYS_RE})="""
                    rf"""(?P<value>'(?:\\.|[^'\\])*'|"(?:\\.|[^"\\])*"|{_DATE_REPR})""")
# externalId of a patient identified by CPF: ``cpf-12345678909`` or the compact ``c12345678909``.
_CPF_EXTID = re.compile(r"^(?:cpf-|c)\d{11}$")

_show_pii = False  # the process's LOG_PII, set by setup_logging


def pii_shown() -> bool:
    """True when LOG_PII=1 was configured for this process."""
    return _show_pii


def mask_name(name: str | None) -> str:
    """'MARIA DA SILVA' → 'M**** D* S****'."""
    if not name:
        return ""
    return " ".join(w[0] + "*" * (len(w) - 1) for w in name.split())


def _mask_field(match: re.Match[str]) -> str:
    key, value = match.group("key"), match.group("value")
    masked = mask_name(value) if key in NAME_KEYS else ("***" if value else "")
    return (f"{match.group('q')}{key}{match.group('q')}{match.group('sep')}"
            f"{match.group('vq')}{masked}{match.group('vq')}")


def _mask_kwarg(match: re.Match[str]) -> str:
    key, value = match.group("key"), match.group("value")
    if value[:1] in "'\"" and key in NAME_KEYS:
        return f"{key}={value[0]}{mask_name(value[1:-1])}{value[0]}"
    return f"{key}='***'"


def mask_text(text: str) -> str:
    """Mask CPFs, e-mails, phone numbers and patient fields written as JSON/dict items."""
    text = _FIELD.sub(_mask_field, text)
    text = _DICT_DATE.sub(lambda m: f"{m.group('head')}'***'", text)
    text = _KWARG.sub(_mask_kwarg, text)
    text = _CPF.sub(lambda m: f"***.***.***-{m.group(4)}", text)
    text = _EMAIL.sub("***@***", text)
    return _PHONE.sub("(**) *****-****", text)


def mask_payload(payload: Any, *, show_pii: bool | None = None) -> Any:
    """A copy of a payload (or LIS snapshot) with the patient's data masked.

    Name → initials, birth date/CPF/phone/e-mail → ``***``, a CPF-based patient
    ``externalId`` → ``cpf-***``. ``show_pii=None`` follows the process's LOG_PII.
    """
    if show_pii if show_pii is not None else _show_pii:
        return copy.deepcopy(payload)
    out = copy.deepcopy(payload)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in list(node.items()):
                if key in PATIENT_KEYS and isinstance(value, str):
                    node[key] = mask_name(value) if key in NAME_KEYS else "***"
                elif key == "externalId" and isinstance(value, str) and _CPF_EXTID.match(value):
                    node[key] = "cpf-***"
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(out)
    return out


class SafetyFilter(logging.Filter):
    """Removes secrets always and patient data unless LOG_PII=1, from every record.

    The traceback of ``exc_info`` is formatted here and folded into the message, so that
    an exception text carrying the token is redacted like any other line.
    """

    def __init__(self, *, secrets: tuple[str, ...] = (), show_pii: bool = False) -> None:
        super().__init__()
        self.secrets = secrets
        self.show_pii = show_pii

    def clean(self, text: str) -> str:
        """Apply the same redaction and masking as a log line gets."""
        text = redact_secrets(text, self.secrets)
        return text if self.show_pii else mask_text(text)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            message = f"{record.msg} {record.args!r}"
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
        elif record.exc_text:
            message += "\n" + record.exc_text
        if record.stack_info:
            message += "\n" + record.stack_info
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        record.msg = self.clean(message)
        record.args = ()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line with stable keys: ``ts``, ``level``, ``logger``, ``msg``."""

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
    """``2026-12-03 10:00:00 INFO   mensagem`` (local time)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = dt.datetime.fromtimestamp(record.created).strftime("%Y-%m-%d %H:%M:%S")
        level = LEVEL_PT.get(record.levelname, record.levelname)
        return f"{stamp} {level:<6} {record.getMessage()}"


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log file created readable by the owner only (0600), rotations included."""

    def _open(self):  # type: ignore[no-untyped-def]
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


def prepare_log_file(path: Path) -> str | None:
    """Create LOG_FILE's folder (a missing folder is created, like FAILED_DIR) and check the
    file can be appended to; a Portuguese error or None."""
    path = Path(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return (f"LOG_FILE: não foi possível criar a pasta {folder} "
                f"({os_error_text(exc)}); {os_error_fix(exc)} ou aponte LOG_FILE para outra")
    if path.is_dir():
        return f"LOG_FILE: {path} é uma pasta; informe um arquivo, ex.: {path / 'monitor.log'}"
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
    except OSError as exc:
        return (f"LOG_FILE: não foi possível gravar em {path} ({os_error_reason(exc)}); "
                f"{os_error_fix(exc)} ou aponte LOG_FILE para outra pasta")
    return None


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
    """Configure the root logger once for the process.

    Raises :class:`ConfigError` (one Portuguese line) when LOG_FILE cannot be written.
    """
    global _show_pii  # noqa: PLW0603 - logging configuration is process-wide by nature
    problem = prepare_log_file(log_file) if log_file is not None else None
    if problem:
        raise ConfigError(problem)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    _show_pii = show_pii
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    safety = SafetyFilter(secrets=secrets, show_pii=show_pii)
    console = logging.StreamHandler(stream or sys.stderr)
    console.setFormatter(formatter)
    console.addFilter(safety)
    root.addHandler(console)
    if log_file is not None:
        handler = PrivateRotatingFileHandler(
            log_file, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8")
        handler.setFormatter(formatter)
        handler.addFilter(safety)
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("urllib3", "requests", "sqlalchemy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # BEMSOFT_VERIFY=0 is already said once, in Portuguese, among the configuration warnings;
    # urllib3 would add an English one. Other Python warnings go through the log's filter.
    warnings.filterwarnings("ignore", category=InsecureRequestWarning)
    logging.captureWarnings(True)
    _route_uncaught_exceptions()


def _route_uncaught_exceptions() -> None:
    """Uncaught exceptions (main and threads) go through the log, so the SafetyFilter removes
    the token and masks patient data from their tracebacks too."""
    crash = logging.getLogger("bemsoft_monitor")

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        crash.critical("erro inesperado; o programa será encerrado", exc_info=(exc_type, exc, tb))

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        crash.critical("erro inesperado na thread %s", getattr(args.thread, "name", "?"),
                       exc_info=args.exc_value if args.exc_value is not None else True)

    sys.excepthook = hook
    threading.excepthook = thread_hook
