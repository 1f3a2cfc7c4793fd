"""FAILED_DIR files in the original format: ``{"reason": …, "event": …}``."""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .oserrors import json_error_text, os_error_reason

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
        return FailedFile(path, None, None,
                          f"não foi possível ler o arquivo ({os_error_reason(exc)})")
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        return FailedFile(path, None, None, "arquivo não está em UTF-8")
    except json.JSONDecodeError as exc:
        return FailedFile(path, None, None, json_error_text(exc))
    if not isinstance(data, dict) or "event" not in data:
        return FailedFile(path, None, None,
                          "arquivo não é um evento do monitor (falta a chave \"event\")")
    event = data.get("event")
    if not isinstance(event, dict):
        return FailedFile(path, str(data.get("reason")), None, "\"event\" não é um objeto JSON")
    return FailedFile(path, str(data.get("reason") or ""), event, None)


#: The UTC time at the start of a FAILED_DIR name (``20240101T120000Z_123.json``, or with
#: microseconds as :func:`write_failed` writes them).
_NAME_TIME = re.compile(r"^(?P<stamp>\d{8}T\d{6})(?P<frac>\d{1,6})?Z")


def failed_file_time(path: Path) -> float:
    """When the event failed: the time in its name, else the file's modification time."""
    m = _NAME_TIME.match(path.name)
    if m is not None:
        try:
            when = dt.datetime.strptime(m["stamp"], "%Y%m%dT%H%M%S").replace(
                tzinfo=dt.timezone.utc)
            return when.timestamp() + int((m["frac"] or "0").ljust(6, "0")) / 1e6
        except ValueError:
            pass
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def list_failed(folder: Path) -> list[Path]:
    """Every ``*.json`` in the folder, oldest first (time in the name, else modification)."""
    if not folder.is_dir():
        return []
    files = [p for p in folder.glob("*.json") if p.is_file()]
    return sorted(files, key=lambda p: (failed_file_time(p), p.name))


REFUSED_COLUMNS = ("data", "solicitacao", "item", "codigo", "codigo_exame", "descricao", "motivo")


# Excel treats a cell starting with these as a formula; LIS descriptions are free text.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def excel_safe(value: object) -> str:
    """A CSV cell Excel shows as text: a leading formula character gets a ``'`` before it."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_START) else text


#: Per report file: its (mtime, size) when last read or written here, and the last reason
#: written for each item. Re-read only when another process changed the file.
_reported: dict[Path, tuple[tuple[int, int] | None, dict[str, str]]] = {}
_reported_lock = threading.Lock()


def _file_stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _last_reasons(path: Path) -> dict[str, str]:
    """Item -> the last reason the report holds for it (cells as written, Excel-safe)."""
    try:
        text = path.read_bytes().decode("utf-8-sig", errors="replace")
    except FileNotFoundError:
        return {}
    reasons: dict[str, str] = {}
    try:
        for row in csv.DictReader(io.StringIO(text, newline=""), delimiter=";"):
            item = (row.get("item") or "").strip()
            if item:
                reasons[item] = row.get("motivo") or ""
    except csv.Error:
        pass  # a report edited by hand: what was read so far still counts
    return reasons


def append_refused_report(path: Path, rows: list[dict[str, str]]) -> None:
    """Append refused items to the CSV report (``;`` and UTF-8 with BOM, as Excel expects).

    An item is written again only when its reason changed since the report last named it:
    ``retry --refused`` and catalogue refreshes refuse the same items over and over.
    """
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    key = path.absolute()
    with _reported_lock:
        stamp = _file_stamp(path)
        cached = _reported.get(key)
        reasons = dict(cached[1]) if cached is not None and stamp is not None \
            and cached[0] == stamp else _last_reasons(path)
        fresh: list[dict[str, str]] = []
        for row in rows:
            cells = {k: excel_safe(row.get(k, "")) for k in REFUSED_COLUMNS}
            if reasons.get(cells["item"]) == cells["motivo"]:
                continue
            reasons[cells["item"]] = cells["motivo"]
            fresh.append(cells)
        if fresh:
            new = stamp is None or stamp[1] == 0
            with path.open("a", encoding="utf-8-sig" if new else "utf-8", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=REFUSED_COLUMNS, delimiter=";")
                if new:
                    writer.writeheader()
                writer.writerows(fresh)
        _reported[key] = (_file_stamp(path), reasons)
