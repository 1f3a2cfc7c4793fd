"""FAILED_DIR files in the original format: ``{"reason": …, "event": …}``."""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def ensure_private_dir(path: Path) -> Path:
    """Create the folder readable by the owner only (patient data lives there)."""
    path.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # Windows ACLs or a foreign owner
        os.chmod(path, 0o700)
    return path


def write_failed(
    folder: Path, *, reason: str, event: dict[str, Any], name_hint: str, now: dt.datetime
) -> Path:
    """Write one failed event atomically; the file name sorts by time."""
    ensure_private_dir(folder)
    stamp = now.astimezone(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    base = f"{stamp}_{_SAFE.sub('_', name_hint)[:60]}"
    target = folder / f"{base}.json"
    n = 1
    while target.exists():
        n += 1
        target = folder / f"{base}_{n}.json"
    tmp = target.with_suffix(".json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"reason": reason, "event": event}, fh, ensure_ascii=False, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    return target


@dataclass(frozen=True)
class FailedFile:
    """One FAILED_DIR file as read back."""

    path: Path
    reason: str | None
    event: dict[str, Any] | None
    problem: str | None  # why the file cannot be used (Portuguese), None when fine


def read_failed(path: Path) -> FailedFile:
    """Read one file; a corrupted or foreign file comes back with ``problem`` set."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return FailedFile(path, None, None, f"não foi possível ler o arquivo: {exc.strerror}")
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        return FailedFile(path, None, None, "arquivo não está em UTF-8")
    except json.JSONDecodeError as exc:
        return FailedFile(path, None, None,
                          f"JSON inválido na linha {exc.lineno}, coluna {exc.colno}: {exc.msg}")
    if not isinstance(data, dict) or "event" not in data:
        return FailedFile(path, None, None,
                          "arquivo não é um evento do monitor (falta a chave \"event\")")
    event = data.get("event")
    if not isinstance(event, dict):
        return FailedFile(path, str(data.get("reason")), None, "\"event\" não é um objeto JSON")
    return FailedFile(path, str(data.get("reason") or ""), event, None)


def list_failed(folder: Path) -> list[Path]:
    """Every ``*.json`` in the folder, oldest name first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.json") if p.is_file())


REFUSED_COLUMNS = ("data", "solicitacao", "item", "codigo", "codigo_exame", "descricao", "motivo")


# Excel treats a cell starting with these as a formula; LIS descriptions are free text.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def excel_safe(value: object) -> str:
    """A CSV cell Excel shows as text: a leading formula character gets a ``'`` before it."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_START) else text


def append_refused_report(path: Path, rows: list[dict[str, str]]) -> None:
    """Append refused items to the CSV report (``;`` and UTF-8 with BOM, as Excel expects)."""
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", encoding="utf-8-sig" if new else "utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=REFUSED_COLUMNS, delimiter=";")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: excel_safe(row.get(k, "")) for k in REFUSED_COLUMNS})
