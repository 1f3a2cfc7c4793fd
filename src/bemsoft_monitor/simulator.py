"""Bemsoft API simulator: a real HTTP server on loopback for tests, demos and development.

Standard library only. It reproduces the contract in ``bemsoft-api.md`` including the
observed quirks (late tests silently dropped, long externalIds refused with a 201 carrying
an error) and can inject faults (5xx before/after saving, 429, connection reset, HTML
error pages, empty bodies, delays) one per ``POST /requests``. The core never imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import signal
import socket
import struct
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, time, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, NoReturn

__all__ = [
    "DEFAULT_TOKEN",
    "FAULT_KINDS",
    "Simulator",
    "load_catalog_file",
    "load_catalog_sample",
    "main",
    "serve",
    "validate_order",
]

logger = logging.getLogger(__name__)

DEFAULT_TOKEN = "sim-token"  # noqa: S105 - a development token, not a secret
FAULT_KINDS = frozenset({"status", "429", "error201", "reset", "delay", "html", "empty"})

# A handler blocked on a silent client gives up after this; stop() does not wait for it anyway.
_HANDLER_TIMEOUT_S = 10.0
# stop() waits up to one poll of serve_forever; test suites start and stop many simulators.
_POLL_INTERVAL_S = 0.01
_MAX_BODY_BYTES = 10 * 1024 * 1024
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TIME_RE = re.compile(r"^\d{2}:\d{2}:\d{2}$")
_HTML_ERROR_PAGE = (
    "<html><head><title>{status} Bad Gateway</title></head><body>"
    "<center><h1>{status} Bad Gateway</h1></center><hr><center>nginx</center>"
    "</body></html>"
)


def load_catalog_sample() -> list[dict[str, Any]]:
    """Return the packaged sample catalogue (the ``tests`` list of a GET /tests answer)."""
    text = (
        resources.files("bemsoft_monitor")
        .joinpath("data/catalog_sample.json")
        .read_text(encoding="utf-8")
    )
    return _catalog_tests(json.loads(text), origin="catalog_sample.json")


def _catalog_tests(data: Any, *, origin: str) -> list[dict[str, Any]]:
    tests = data.get("tests") if isinstance(data, dict) else data
    if not isinstance(tests, list) or not all(isinstance(t, dict) for t in tests):
        raise ValueError(f'Catálogo inválido em {origin}: esperado {{"tests": [...]}}')
    return tests


def load_catalog_file(path: Path) -> list[dict[str, Any]]:
    """A ``--catalog`` file, checked entry by entry; ValueError in Portuguese when unusable.

    Unlike :meth:`Simulator.set_catalog` (which tests use to serve odd catalogues on
    purpose), a file a person wrote is checked so that a typo is reported, not served.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ValueError(f"arquivo de catálogo não encontrado: {path}") from None
    except UnicodeDecodeError:
        raise ValueError(f"arquivo de catálogo {path} não está em UTF-8") from None
    except OSError as exc:
        raise ValueError(f"não foi possível ler o catálogo {path} ({exc.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"catálogo {path}: JSON inválido na linha {exc.lineno}, coluna {exc.colno} "
            f"({exc.msg})"
        ) from None
    tests = _catalog_tests(data, origin=str(path))
    for index, test in enumerate(tests):
        where = f"catálogo {path}: tests[{index}]"
        if not _is_text(test.get("id")):
            raise ValueError(f"{where}.id: deve ser um texto não vazio")
        specimen = test.get("specimen")
        if not isinstance(specimen, dict) or not _is_text(specimen.get("id")):
            raise ValueError(f'{where}.specimen: esperado {{"id": "...", "name": "..."}}')
    if not tests:
        raise ValueError(f"catálogo {path}: a lista tests está vazia")
    return tests


# --------------------------------------------------------------------------- validation


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _check_text(obj: dict[str, Any], key: str, path: str) -> str | None:
    if key not in obj:
        return f"{path}.{key}: campo obrigatório"
    if not _is_text(obj[key]):
        return f"{path}.{key}: deve ser um texto não vazio"
    return None


def _check_date(obj: dict[str, Any], key: str, path: str) -> str | None:
    if key not in obj:
        return f"{path}.{key}: campo obrigatório"
    value = obj[key]
    try:
        if isinstance(value, str) and _DATE_RE.match(value):
            date.fromisoformat(value)
            return None
    except ValueError:
        pass
    return f"{path}.{key}: deve ser uma data válida no formato AAAA-MM-DD"


def _check_time(obj: dict[str, Any], key: str, path: str) -> str | None:
    if key not in obj:
        return f"{path}.{key}: campo obrigatório"
    value = obj[key]
    try:
        if isinstance(value, str) and _TIME_RE.match(value):
            time.fromisoformat(value)
            return None
    except ValueError:
        pass
    return f"{path}.{key}: deve ser uma hora válida no formato HH:MM:SS"


def _check_object(obj: dict[str, Any], key: str, path: str) -> str | None:
    if key not in obj:
        return f"{path}.{key}: campo obrigatório"
    if not isinstance(obj[key], dict):
        return f"{path}.{key}: deve ser um objeto"
    return None


def _first(*problems: str | None) -> str | None:
    return next((p for p in problems if p is not None), None)


def _validate_physician(physician: Any, path: str) -> str | None:
    if not isinstance(physician, dict):
        return f"{path}: deve ser um objeto"
    for key in ("externalId", "name", "councilAbbreviation", "councilNumber", "councilUf"):
        if key not in physician:
            return f"{path}.{key}: campo obrigatório"
        if not isinstance(physician[key], str):
            return f"{path}.{key}: deve ser um texto"
    return None


def _validate_test(test: Any, path: str) -> str | None:
    if not isinstance(test, dict):
        return f"{path}: deve ser um objeto"
    problem = _first(
        _check_text(test, "externalId", path),
        _check_date(test, "collectionDate", path),
        _check_time(test, "collectionTime", path),
        _check_text(test, "supportTestId", path),
        _check_text(test, "supportSpecimenId", path),
    )
    if problem or "additionalInformations" not in test:
        return problem
    infos = test["additionalInformations"]
    if not isinstance(infos, list):
        return f"{path}.additionalInformations: deve ser uma lista"
    for index, info in enumerate(infos):
        info_path = f"{path}.additionalInformations[{index}]"
        if not isinstance(info, dict):
            return f"{info_path}: deve ser um objeto com key e value"
        for key in ("key", "value"):
            if not isinstance(info.get(key), str):
                return f"{info_path}.{key}: deve ser um texto"
    return None


def validate_order(body: Any) -> str | None:
    """First shape problem of a POST /requests body (pt-BR, naming the field path), or None."""
    if not isinstance(body, dict):
        return "corpo: deve ser um objeto JSON"
    if "batch" not in body:
        return "batch: campo obrigatório"
    batch = body["batch"]
    if not isinstance(batch, dict):
        return "batch: deve ser um objeto"
    problem = _first(
        _check_text(batch, "externalId", "batch"),
        _check_date(batch, "date", "batch"),
        _check_time(batch, "time", "batch"),
        _check_object(batch, "order", "batch"),
    )
    if problem:
        return problem
    order: dict[str, Any] = batch["order"]
    path = "batch.order"
    problem = _first(
        _check_text(order, "externalId", path),
        _check_date(order, "date", path),
        _check_time(order, "time", path),
        _check_object(order, "patient", path),
    )
    if problem:
        return problem
    patient: dict[str, Any] = order["patient"]
    problem = _first(
        _check_text(patient, "externalId", f"{path}.patient"),
        _check_text(patient, "name", f"{path}.patient"),
        _check_date(patient, "birthDate", f"{path}.patient"),
    )
    if problem:
        return problem
    if patient.get("gender") not in ("M", "F"):
        return f"{path}.patient.gender: deve ser M ou F"
    if "physician" in order:
        problem = _validate_physician(order["physician"], f"{path}.physician")
        if problem:
            return problem
    tests = order.get("tests")
    if not isinstance(tests, list) or not tests:
        return f"{path}.tests: deve ser uma lista não vazia"
    for index, test in enumerate(tests):
        problem = _validate_test(test, f"{path}.tests[{index}]")
        if problem:
            return problem
    return None


def _external_ids(body: dict[str, Any]) -> list[str]:
    """Every externalId of a validated body (batch, order, patient, physician, tests)."""
    batch = body["batch"]
    order = batch["order"]
    ids = [batch["externalId"], order["externalId"], order["patient"]["externalId"]]
    if isinstance(order.get("physician"), dict):
        ids.append(order["physician"]["externalId"])
    ids.extend(test["externalId"] for test in order["tests"])
    return ids


# --------------------------------------------------------------------------- faults


def _normalize_fault(fault: Any) -> dict[str, Any]:
    """Check one fault dict and fill its defaults; raise ValueError (pt-BR) when unusable."""
    if not isinstance(fault, dict) or fault.get("kind") not in FAULT_KINDS:
        kinds = ", ".join(sorted(FAULT_KINDS))
        raise ValueError(f"Falha simulada inválida: {fault!r} (kind deve ser um de: {kinds})")
    kind = fault["kind"]
    normalized = dict(fault)
    if kind in ("status", "reset", "html", "empty"):
        normalized["after_save"] = bool(fault.get("after_save", False))
    if kind in ("status", "html", "empty"):
        default_status = {"status": 500, "html": 502, "empty": 200}[kind]
        status = fault.get("status", default_status)
        if not isinstance(status, int) or not 100 <= status <= 599:
            raise ValueError(f"Falha simulada inválida: status {status!r} não é um código HTTP")
        normalized["status"] = status
    if kind == "delay":
        seconds = fault.get("seconds")
        if not isinstance(seconds, int | float) or seconds < 0:
            raise ValueError(f"Falha simulada inválida: seconds {seconds!r} deve ser >= 0")
    return normalized


# --------------------------------------------------------------------------- state


@dataclass
class _Reply:
    """What the handler writes back; ``status`` None means drop the connection unanswered."""

    status: int | None
    body: bytes = b""
    content_type: str = "application/json; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


def _json_reply(status: int, payload: Any, headers: dict[str, str] | None = None) -> _Reply:
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    return _Reply(status, body, headers=headers or {})


def _message(status: int, text: str) -> _Reply:
    return _json_reply(status, {"message": text})


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _unsaved_error(batch_external_id: str | None) -> dict[str, str]:
    return {
        "error": f"Não foi possível salvar os dados recebidos no lote {batch_external_id or '?'}."
    }


def _peek_batch(raw: bytes) -> tuple[str | None, int]:
    """Best-effort batch externalId and test count, for the call log only."""
    try:
        body = json.loads(raw)
        batch = body["batch"]
        tests = batch["order"].get("tests") or []
        batch_id = batch.get("externalId")
        return (batch_id if isinstance(batch_id, str) else None), len(tests)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None, 0


class Simulator:
    """A Bemsoft API on a loopback port; every piece of state sits behind one lock."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str = DEFAULT_TOKEN,
        catalog_path: Path | None = None,
        catalog: list[dict[str, Any]] | None = None,
        extid_max: int = 20,
        latency_s: float = 0.0,
    ) -> None:
        self.host = host
        self.port = port
        self.extid_max = extid_max
        self.latency_s = latency_s
        # Tests: called in the server's thread while a POST /requests is being answered,
        # i.e. while the client's HTTP call is in flight.
        self.on_post: Callable[[], None] | None = None
        if catalog is not None:
            tests = list(catalog)
        elif catalog_path is not None:
            tests = load_catalog_file(Path(catalog_path))
        else:
            tests = load_catalog_sample()
        self._lock = threading.Lock()
        self._token = token
        self._catalog = tests
        self._saved: list[dict[str, Any]] = []
        self._keys: set[str] = set()
        self._calls: list[dict[str, Any]] = []
        self._faults: list[dict[str, Any]] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # ----------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8123`` (the real port once started)."""
        return f"http://{self.host}:{self.port}"

    @property
    def token(self) -> str:
        """The token currently accepted."""
        with self._lock:
            return self._token

    def start(self) -> Simulator:
        """Serve in a daemon thread; port 0 picks a free port, kept across stop()/start()."""
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _Server((self.host, self.port), _Handler)
        server.simulator = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL_S},
            name=f"bemsoft-simulator-{self.port}",
            daemon=True,
        )
        self._thread.start()
        logger.debug("simulador iniciado", extra={"url": self.url})
        return self

    def stop(self) -> None:
        """Stop serving and drop open connections; a restart keeps the same port."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.close_open_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = None
        self._thread = None
        logger.debug("simulador parado", extra={"url": self.url})

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------- inspection and control

    def saved_tests(self) -> list[dict[str, Any]]:
        """Every test saved so far, in order."""
        with self._lock:
            return [dict(record) for record in self._saved]

    def calls(self) -> list[dict[str, Any]]:
        """Every POST /requests received: key, status (None = reset), at, batch, n_tests, fault."""
        with self._lock:
            return [dict(call) for call in self._calls]

    def set_faults(self, plan: list[dict[str, Any]]) -> None:
        """Replace the fault queue; one fault is consumed per authorised POST /requests."""
        faults = [_normalize_fault(f) for f in plan]
        with self._lock:
            self._faults = faults

    def add_faults(self, plan: list[dict[str, Any]]) -> None:
        """Append to the fault queue (what POST /_sim/faults does)."""
        faults = [_normalize_fault(f) for f in plan]
        with self._lock:
            self._faults.extend(faults)

    def pending_faults(self) -> list[dict[str, Any]]:
        """Faults still queued, first to be applied first."""
        with self._lock:
            return [dict(f) for f in self._faults]

    def set_token(self, token: str) -> None:
        """Accept only ``token`` from now on (simulates a revoked or rotated token)."""
        with self._lock:
            self._token = token

    def set_catalog(self, catalog: list[dict[str, Any]]) -> None:
        """Replace the catalogue served by GET /tests (simulates tests added over time)."""
        tests = _catalog_tests(catalog, origin="set_catalog")
        with self._lock:
            self._catalog = list(tests)

    def catalog(self) -> list[dict[str, Any]]:
        """The catalogue GET /tests currently serves."""
        with self._lock:
            return list(self._catalog)

    def reset(self) -> None:
        """Forget saved tests, recorded keys, calls and queued faults (token and catalogue stay)."""
        with self._lock:
            self._saved.clear()
            self._keys.clear()
            self._calls.clear()
            self._faults.clear()

    # ----------------------------------------------------------------- request handling

    def _authorized(self, header: str | None) -> bool:
        with self._lock:
            return header == f"Bearer {self._token}"

    def _sleep(self, seconds: float) -> None:
        # Wakes early on stop() so a delayed handler never outlives the server for long.
        if seconds > 0:
            self._stopping.wait(seconds)

    def _handle_get_tests(self, authorization: str | None) -> _Reply:
        if not self._authorized(authorization):
            return _message(401, "Token ausente ou inválido")
        with self._lock:
            return _json_reply(200, {"tests": self._catalog})

    def _handle_get_saved(self) -> _Reply:
        with self._lock:
            return _json_reply(200, {"tests": self._saved, "count": len(self._saved)})

    def _handle_post_requests(
        self, authorization: str | None, key: str | None, raw: bytes
    ) -> _Reply:
        if self.on_post is not None:
            self.on_post()
        self._sleep(self.latency_s)
        batch_id, n_tests = _peek_batch(raw)
        fault: dict[str, Any] | None = None
        if not self._authorized(authorization):
            reply = _message(401, "Token ausente ou inválido")
        else:
            with self._lock:
                fault = self._faults.pop(0) if self._faults else None
            reply = self._apply_fault(fault, key, raw, batch_id)
        with self._lock:
            self._calls.append(
                {
                    "key": key,
                    "status": reply.status,
                    "at": _now_iso(),
                    "batch": batch_id,
                    "n_tests": n_tests,
                    "fault": fault["kind"] if fault else None,
                }
            )
        logger.debug(
            "POST /requests simulado",
            extra={"status": reply.status, "fault": fault["kind"] if fault else None},
        )
        return reply

    def _apply_fault(
        self, fault: dict[str, Any] | None, key: str | None, raw: bytes, batch_id: str | None
    ) -> _Reply:
        kind = fault["kind"] if fault else None
        if fault is None or kind == "delay":
            if fault is not None:
                self._sleep(float(fault["seconds"]))
            return self._process(key, raw)
        if kind == "429":
            retry_after = fault.get("retry_after")
            headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
            return _json_reply(429, {"message": "Muitas requisições; tente mais tarde"}, headers)
        if kind == "error201":
            return _json_reply(201, _unsaved_error(batch_id))
        if fault["after_save"]:
            self._process(key, raw)
        status = int(fault.get("status", 0))
        if kind == "reset":
            return _Reply(None)
        if kind == "html":
            page = _HTML_ERROR_PAGE.format(status=status).encode("utf-8")
            return _Reply(status, page, content_type="text/html; charset=utf-8")
        if kind == "empty":
            return _Reply(status, b"")
        return _message(status, f"Falha simulada no servidor (HTTP {status})")

    def _process(self, key: str | None, raw: bytes) -> _Reply:
        """The real behaviour of POST /requests, quirks included."""
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return _message(400, f"Corpo não é JSON válido: {exc}")
        problem = validate_order(body)
        if problem:
            return _message(400, problem)
        if not key:
            return _message(400, "Cabeçalho Idempotency-Key é obrigatório")
        batch = body["batch"]
        order = batch["order"]
        with self._lock:
            if key in self._keys:
                return _message(409, "Idempotency-Key já processada")
            self._keys.add(key)
            # Quirk 2: a too-long externalId is refused with a 201 carrying an error and
            # nothing saved, yet the key IS recorded. A retry with the same key then gets
            # 409 for an order that was never saved: this is why bemsoft-api.md note 4
            # says a 409 after a failed attempt is ambiguous and needs a person.
            if any(len(ext_id) > self.extid_max for ext_id in _external_ids(body)):
                return _json_reply(201, _unsaved_error(batch["externalId"]))
            saved_at = _now_iso()
            for test in order["tests"]:
                # Quirk 1: a test collected after the batch date is accepted and dropped.
                if test["collectionDate"] > batch["date"]:
                    continue
                self._saved.append(
                    {
                        "key": key,
                        "batch_external_id": batch["externalId"],
                        "order_external_id": order["externalId"],
                        "patient_external_id": order["patient"]["externalId"],
                        "test_external_id": test["externalId"],
                        "support_test_id": test["supportTestId"],
                        "support_specimen_id": test["supportSpecimenId"],
                        "collection_date": test["collectionDate"],
                        "batch_date": batch["date"],
                        "saved_at": saved_at,
                    }
                )
        return _json_reply(201, {"id": str(uuid.uuid4()), "status": "created"})

    def _handle_control(self, path: str, raw: bytes) -> _Reply:
        """POST /_sim/faults, /_sim/token, /_sim/reset, /_sim/catalog (no auth)."""
        if path == "/_sim/reset":
            self.reset()
            return _json_reply(200, {"status": "ok"})
        try:
            body = json.loads(raw) if raw else {}
        except ValueError as exc:
            return _message(400, f"Corpo não é JSON válido: {exc}")
        if not isinstance(body, dict):
            return _message(400, "corpo: deve ser um objeto JSON")
        try:
            if path == "/_sim/faults":
                faults = body.get("faults")
                if not isinstance(faults, list):
                    return _message(400, "faults: deve ser uma lista")
                self.add_faults(faults)
                return _json_reply(200, {"status": "ok", "pending": len(self.pending_faults())})
            if path == "/_sim/token":
                if not _is_text(body.get("token")):
                    return _message(400, "token: deve ser um texto não vazio")
                self.set_token(body["token"])
                return _json_reply(200, {"status": "ok"})
            if path == "/_sim/catalog":
                self.set_catalog(_catalog_tests(body, origin=path))
                return _json_reply(200, {"status": "ok"})
        except ValueError as exc:
            return _message(400, str(exc))
        return _message(404, f"Caminho não encontrado: {path}")

    def _handle_get_calls(self) -> _Reply:
        calls = self.calls()
        return _json_reply(200, {"calls": calls, "count": len(calls)})


# --------------------------------------------------------------------------- HTTP plumbing


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # stop() must not wait for handlers stuck on a slow client or a delay fault.
    block_on_close = False
    simulator: Simulator

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def track(self, sock: socket.socket, *, opened: bool) -> None:
        with self._open_lock:
            if opened:
                self._open.add(sock)
            else:
                self._open.discard(sock)

    def close_open_connections(self) -> None:
        # Keep-alive connections would otherwise keep being served after stop().
        with self._open_lock:
            sockets = list(self._open)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away mid-answer is normal here; never print tracebacks to stderr.
        logger.debug("erro ao atender cliente do simulador", exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = _HANDLER_TIMEOUT_S
    server_version = "BemsoftSimulator/1.0"

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, opened=True)

    def finish(self) -> None:
        self.server.track(self.connection, opened=False)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("simulador HTTP: " + format, *args)

    # ----------------------------------------------------------------- verbs

    def do_GET(self) -> None:
        self._read_body()
        path = self.path.split("?", 1)[0]
        sim = self.server.simulator
        if path == "/tests":
            reply = sim._handle_get_tests(self.headers.get("Authorization"))
        elif path == "/saved":
            reply = sim._handle_get_saved()
        elif path == "/_sim/calls":
            reply = sim._handle_get_calls()
        elif path in ("/requests", "/_sim/faults", "/_sim/token", "/_sim/reset"):
            reply = _message(405, f"Método GET não permitido em {path}")
        else:
            reply = _message(404, f"Caminho não encontrado: {path}")
        self._write(reply)

    def do_POST(self) -> None:
        raw = self._read_body()
        if raw is None:
            self._write(_message(413, "Corpo grande demais"))
            return
        path = self.path.split("?", 1)[0]
        sim = self.server.simulator
        if path == "/requests":
            reply = sim._handle_post_requests(
                self.headers.get("Authorization"), self.headers.get("Idempotency-Key"), raw
            )
        elif path.startswith("/_sim/"):
            reply = sim._handle_control(path, raw)
        elif path in ("/tests", "/saved"):
            reply = _message(405, f"Método POST não permitido em {path}")
        else:
            reply = _message(404, f"Caminho não encontrado: {path}")
        self._write(reply)

    def _other_method(self) -> None:
        self._read_body()
        self._write(_message(405, f"Método {self.command} não permitido"))

    do_PUT = do_PATCH = do_DELETE = _other_method  # noqa: N815 - stdlib naming

    # ----------------------------------------------------------------- I/O

    def _read_body(self) -> bytes | None:
        """Read the whole body (keeps keep-alive connections in sync); None when too large."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if length > _MAX_BODY_BYTES:
            self.close_connection = True
            return None
        return self.rfile.read(length) if length > 0 else b""

    def _write(self, reply: _Reply) -> None:
        if reply.status is None:
            # Fault "reset": no status line at all; linger 0 makes close() send a TCP RST.
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if reply.body:
            self.wfile.write(reply.body)


# --------------------------------------------------------------------------- entry points


def serve(
    *,
    host: str,
    port: int,
    token: str,
    catalog_path: Path | None,
    extid_max: int,
    latency_s: float,
) -> None:
    """Run the simulator in the foreground until Ctrl+C or SIGTERM.

    A catalogue file that cannot be used or a port already taken is one Portuguese line
    on stderr and exit code 2, not a traceback.
    """
    try:
        sim = Simulator(
            host=host,
            port=port,
            token=token,
            catalog_path=catalog_path,
            extid_max=extid_max,
            latency_s=latency_s,
        )
    except ValueError as exc:
        _fail(str(exc))
    stop_requested = threading.Event()
    previous: Any = None
    in_main_thread = threading.current_thread() is threading.main_thread()

    def _on_sigterm(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    try:
        sim.start()
    except OSError as exc:
        _fail(
            f"não foi possível escutar em {host}:{port} ({exc.strerror or exc}); a porta já "
            "está em uso? Escolha outra com --port (0 = uma porta livre)"
        )
    if in_main_thread:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    print(f"Simulador Bemsoft ouvindo em {sim.url}", flush=True)
    print(f"Token: {token}", flush=True)
    print(
        f"Catálogo: {len(sim.catalog())} exames; limite de externalId: {extid_max} caracteres",
        flush=True,
    )
    print(
        "Rotas: GET /tests, POST /requests, GET /saved (o que foi salvo, só leitura), "
        "GET /_sim/calls",
        flush=True,
    )
    print("Ctrl+C para parar.", flush=True)
    try:
        while not stop_requested.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        print("Simulador parado.", flush=True)


def _fail(message: str) -> NoReturn:
    print(f"✗ Simulador: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m bemsoft_monitor.simulator``; the CLI command is the usual way."""
    parser = argparse.ArgumentParser(description="Simulador da API Bemsoft para desenvolvimento.")
    parser.add_argument("--host", default="127.0.0.1", help="endereço de escuta")
    parser.add_argument("--port", type=int, default=8099, help="porta (0 = livre)")
    parser.add_argument("--token", default=DEFAULT_TOKEN, help="token Bearer aceito")
    parser.add_argument("--catalog", type=Path, default=None, help="JSON do catálogo /tests")
    parser.add_argument("--extid-max", type=int, default=20, help="tamanho máximo de externalId")
    parser.add_argument("--latency", type=float, default=0.0, help="atraso por POST (segundos)")
    args = parser.parse_args(argv)
    serve(
        host=args.host,
        port=args.port,
        token=args.token,
        catalog_path=args.catalog,
        extid_max=args.extid_max,
        latency_s=args.latency,
    )


if __name__ == "__main__":
    main()
