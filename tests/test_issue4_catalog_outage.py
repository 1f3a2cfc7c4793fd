"""GET /tests going wrong: the real client and the real monitor keep the last good catalogue.

A small loopback server stands in front of the simulator: it answers ``GET /tests`` the way
a broken Bemsoft, proxy or network would (5xx, HTML, not JSON, empty list, rows without ids,
repeats, no answer in time) and forwards everything else to the simulator unchanged.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from bemsoft_monitor.app import build_client
from bemsoft_monitor.catalog import CatalogCache, parse_catalog
from bemsoft_monitor.simulator import Simulator, load_catalog_sample

from .conftest import LAB, FakeClock, Lis, drive, make_monitor, make_settings

NOVO = {"id": "NOVO", "name": "EXAME NOVO", "specimen": {"id": "SORO", "name": "Soro"}}


class Front:
    """``GET /tests`` as configured; every other request forwarded to the simulator."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.mode = "ok"
        self.extra: list[dict[str, Any]] = []
        self.gets = 0
        self.release = threading.Event()
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/tests":
                    self._forward("GET")
                    return
                front.gets += 1
                status, ctype, body = front.tests_answer(self.headers.get("Authorization"))
                if status is None:
                    return  # no answer at all: the client times out
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                self._forward("POST")

            def _forward(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() in ("authorization", "content-type", "idempotency-key")}
                resp = requests.request(method, front.sim.url + self.path, data=body,
                                        headers=headers, timeout=10)
                self.send_response(resp.status_code)
                for name in ("Content-Type", "Retry-After"):
                    if name in resp.headers:
                        self.send_header(name, resp.headers[name])
                self.send_header("Content-Length", str(len(resp.content)))
                self.end_headers()
                self.wfile.write(resp.content)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def tests_answer(self, authorization: str | None) -> tuple[int | None, str, bytes]:
        good = [*self.sim.catalog(), *self.extra]
        as_json = "application/json"
        if authorization != f"Bearer {self.sim.token}":
            return 401, as_json, b'{"message": "Token ausente ou inv\\u00e1lido"}'
        if self.mode == "ok":
            return 200, as_json, json.dumps({"tests": good}).encode()
        if self.mode == "500":
            return 500, as_json, b'{"message": "Internal Server Error"}'
        if self.mode == "html":
            return 200, "text/html", b"<!DOCTYPE html><html><body>Entrar no portal</body></html>"
        if self.mode == "notjson":
            return 200, as_json, b'{"tests": [{"id": "FE", "name": "FERRO'
        if self.mode == "empty":
            return 200, as_json, b'{"tests": []}'
        if self.mode == "noids":
            return 200, as_json, json.dumps({"tests": [{"codigo": "FE"}, {"codigo": "GLI"}]}
                                            ).encode()
        if self.mode == "timeout":
            self.release.wait(5)  # longer than the client's timeout; released at teardown
            return None, "", b""
        raise AssertionError(self.mode)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def front(sim: Simulator) -> Iterator[Front]:
    f = Front(sim)
    yield f
    f.close()


def _sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{(tmp_path / 'lis.db').as_posix()}"


def _saved(sim: Simulator) -> list[str]:
    return sorted(t["support_test_id"] for t in sim.saved_tests())


# --- the real client: every bad answer keeps the last good copy ---------------------------


@pytest.mark.parametrize(("mode", "fragment"), [
    ("500", "HTTP 500"),
    ("html", "HTML em vez de JSON"),
    ("notjson", "não é JSON válido"),
    ("empty", "catálogo vazio"),
    ("noids", 'nenhum dos 2 itens tem "id" e "specimen.id"'),
    ("timeout", "sem resposta da Bemsoft"),
])
def test_a_bad_catalogue_answer_keeps_the_last_good_copy_and_says_why(
        tmp_path: Path, front: Front, mode: str, fragment: str,
        caplog: pytest.LogCaptureFixture) -> None:
    sim = front.sim
    settings = make_settings(_sqlite(tmp_path), tmp_path, sim, bemsoft_base_url=front.url,
                             bemsoft_timeout=0.5)
    path = tmp_path / "catalogo.json"
    cache = CatalogCache(fetch=build_client(settings).fetch_catalog, path=path,
                         ttl_s=3600, min_refresh_s=0)
    assert cache.refresh() is True
    saved_copy = path.read_bytes()
    good = cache.catalog
    assert good is not None and len(good) == len(sim.catalog())

    front.mode = mode
    with caplog.at_level(logging.WARNING, logger="bemsoft_monitor.catalog"):
        assert cache.refresh() is False
    assert cache.catalog is good  # the copy in memory is untouched
    assert path.read_bytes() == saved_copy  # and so is the one on disk
    assert cache.last_error is not None
    assert cache.last_error.startswith("falha ao atualizar o catálogo /tests")
    assert fragment in cache.last_error
    assert "catálogo não atualizado; usando cópia de" in caplog.text
    assert sim.token not in caplog.text and sim.token not in cache.last_error

    # A new process on the same file starts with the same good copy.
    again = CatalogCache(fetch=build_client(settings).fetch_catalog, path=path,
                         ttl_s=3600, min_refresh_s=0)
    assert again.catalog is not None and set(again.catalog) == set(good)


def test_rows_without_ids_and_repeats_are_named_and_the_rest_is_used(
        tmp_path: Path, front: Front, sim: Simulator,
        caplog: pytest.LogCaptureFixture) -> None:
    fe = next(t for t in sim.catalog() if t["id"] == "FE")
    front.extra = [
        {"id": "SEMMAT", "name": "SEM MATERIAL"},
        {"name": "SEM ID", "specimen": {"id": "SORO"}},
        dict(fe),  # the very same row twice
        {**fe, "name": "FERRO (NOME NOVO)"},  # same id and specimen, another name
        NOVO,
    ]
    settings = make_settings(_sqlite(tmp_path), tmp_path, sim, bemsoft_base_url=front.url)
    cache = CatalogCache(fetch=build_client(settings).fetch_catalog,
                         path=tmp_path / "catalogo.json", ttl_s=3600, min_refresh_s=0)
    with caplog.at_level(logging.WARNING, logger="bemsoft_monitor.catalog"):
        assert cache.refresh() is True
    catalog = cache.catalog
    assert catalog is not None
    assert len(catalog) == len(sim.catalog()) + 1  # only NOVO is new
    assert [(v.name, v.specimen_id) for v in catalog.variants("FE")] == [
        (fe["name"], fe["specimen"]["id"])]  # one variant, not an ambiguity
    assert catalog.variants("NOVO")
    text = caplog.text
    assert "2 itens sem id ou specimen.id ignorados" in text
    assert f'posição {len(sim.catalog()) + 1}: "id": "SEMMAT" sem "specimen"' in text
    assert f"posição {len(sim.catalog()) + 2}: sem \"id\"" in text
    assert "2 itens repetidos (mesmo id e specimen.id) ignorados" in text
    assert f"FE/{fe['specimen']['id']}" in text


# --- the real monitor ------------------------------------------------------------------------


def test_a_restart_while_get_tests_fails_still_sends_with_the_saved_copy(
        tmp_path: Path, front: Front, sim: Simulator, clock: FakeClock,
        caplog: pytest.LogCaptureFixture) -> None:
    lis = Lis(_sqlite(tmp_path))
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE")
    settings = make_settings(_sqlite(tmp_path), tmp_path, sim, bemsoft_base_url=front.url,
                             bemsoft_tests_ttl=0.001, bemsoft_tests_min_refresh=0)
    monitor, _parts = make_monitor(settings, clock)
    drive(monitor, clock)
    monitor.close()
    assert _saved(sim) == ["FE"]
    assert (tmp_path / "catalogo.json").is_file()

    front.mode = "500"
    gets_before = front.gets
    lis.requisition(2)
    lis.item(2, "TSH")
    lis.item(2, "GLI")  # two variants in the saved copy too: still refused, not guessed
    with caplog.at_level(logging.WARNING):
        monitor, parts = make_monitor(settings, clock)  # the restart
        drive(monitor, clock)
    assert front.gets > gets_before  # it did try GET /tests (the copy is past its TTL)
    assert _saved(sim) == ["FE", "TSH"]
    assert "catálogo não atualizado; usando cópia de" in caplog.text
    refused = parts.store.items_by_state("refused")
    assert len(refused) == 1 and "variantes" in (refused[0].reason or "")
    monitor.close()
    lis.dispose()


def test_with_no_copy_and_get_tests_down_items_wait_then_go_when_it_answers(
        tmp_path: Path, front: Front, sim: Simulator, clock: FakeClock) -> None:
    lis = Lis(_sqlite(tmp_path))
    lis.patient()
    lis.requisition(1)
    fe = lis.item(1, "FE")
    front.mode = "500"
    settings = make_settings(_sqlite(tmp_path), tmp_path, sim, bemsoft_base_url=front.url,
                             bemsoft_tests_min_refresh=0)
    monitor, parts = make_monitor(settings, clock)
    drive(monitor, clock)
    assert sim.saved_tests() == []
    waiting = parts.store.items_by_state("refused")
    assert [r.item_id for r in waiting] == [fe]
    assert "catálogo /tests da Bemsoft indisponível" in (waiting[0].reason or "")
    assert parts.store.counts()["items"]["refused"] == 1

    front.mode = "ok"
    drive(monitor, clock)
    drive(monitor, clock)
    assert _saved(sim) == ["FE"]
    assert parts.store.items_by_state("refused") == []
    assert (tmp_path / "catalogo.json").is_file()
    drive(monitor, clock)
    assert _saved(sim) == ["FE"]  # once
    monitor.close()
    lis.dispose()


def test_a_code_missing_from_the_copy_refreshes_once_per_min_refresh(
        tmp_path: Path, front: Front, sim: Simulator, clock: FakeClock) -> None:
    """BEMSOFT_TESTS_MIN_REFRESH: a miss fetches /tests again, but not on every miss."""
    # A fresh copy (well inside the TTL) that does not know NOVO yet.
    (tmp_path / "catalogo.json").write_text(json.dumps(
        {"format": 1, "fetched_at": time.time(), "tests": load_catalog_sample()}),
        encoding="utf-8")
    front.extra = [NOVO]  # Bemsoft added NOVO since the copy was taken
    lis = Lis(_sqlite(tmp_path))
    lis.patient()
    lis.requisition(1)
    lis.item(1, "NOVO")
    settings = make_settings(_sqlite(tmp_path), tmp_path, sim, bemsoft_base_url=front.url,
                             bemsoft_tests_ttl=86400, bemsoft_tests_min_refresh=3600)
    monitor, parts = make_monitor(settings, clock)
    drive(monitor, clock)
    assert front.gets == 1  # the miss fetched the catalogue once...
    assert _saved(sim) == ["NOVO"]  # ...and the item went without being refused
    assert parts.store.items_by_state("refused") == []

    front.extra = [NOVO, {**NOVO, "id": "NOVO2", "name": "OUTRO EXAME NOVO"}]
    lis.requisition(2)
    lis.item(2, "NOVO2")
    drive(monitor, clock)
    assert front.gets == 1  # a second miss within the hour does not fetch again
    refused = parts.store.items_by_state("refused")
    assert len(refused) == 1 and "NOVO2" in (refused[0].reason or "")
    monitor.close()
    lis.dispose()


# --- a sync by hand reaches the running monitor ----------------------------------------------


def test_a_second_cache_on_the_same_file_takes_up_a_newer_copy(tmp_path: Path) -> None:
    path = tmp_path / "catalogo.json"
    fe = parse_catalog([load_catalog_sample()[0]], source="x")
    novo = parse_catalog([NOVO], source="x")
    service = CatalogCache(fetch=lambda: fe, path=path, ttl_s=86400, min_refresh_s=3600)
    assert service.refresh() is True
    assert service.refresh_if_stale() is False  # its own write is not "newer"
    by_hand = CatalogCache(fetch=lambda: fe + novo, path=path, ttl_s=86400, min_refresh_s=3600)
    time.sleep(0.01)  # the second fetch is later on the wall clock
    assert by_hand.refresh() is True
    assert service.refresh_if_stale() is True  # no GET /tests: the file is newer
    assert service.catalog is not None and service.catalog.variants("NOVO")
    assert service.loaded_at == by_hand.loaded_at
    assert service.refresh_if_stale() is False


def test_catalog_sync_in_another_process_sends_items_refused_by_the_running_monitor(
        tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis = Lis(_sqlite(tmp_path))
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE")
    novo = lis.item(1, "NOVO")
    settings = make_settings(_sqlite(tmp_path), tmp_path, sim, bemsoft_tests_ttl=86400,
                             bemsoft_tests_min_refresh=3600)
    monitor, parts = make_monitor(settings, clock)
    drive(monitor, clock)
    assert _saved(sim) == ["FE"]
    assert [r.item_id for r in parts.store.items_by_state("refused")] == [novo]

    sim.set_catalog([*load_catalog_sample(), NOVO])  # Bemsoft adds the exam
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BEMSOFT_", "DB_"))}
    (tmp_path / "vazio.env").write_text("", encoding="utf-8")
    env.update(BEMSOFT_ENV_FILE=str(tmp_path / "vazio.env"), DB_URL=_sqlite(tmp_path),
               TERCEIROS=LAB, BEMSOFT_BASE_URL=sim.url, BEMSOFT_TOKEN=sim.token,
               BEMSOFT_CATALOG_CACHE=str(tmp_path / "catalogo.json"),
               FAILED_DIR=str(tmp_path / "failed"), PYTHONIOENCODING="utf-8")
    synced = subprocess.run([sys.executable, "-m", "bemsoft_monitor", "catalog", "sync"],
                            env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=60, check=False)
    assert synced.returncode == 0, synced.stdout + synced.stderr

    drive(monitor, clock)  # no retry command, no restart, no TTL: the new copy is enough
    drive(monitor, clock)
    assert _saved(sim) == ["FE", "NOVO"]
    assert parts.store.items_by_state("refused") == []
    monitor.close()
    lis.dispose()


def test_a_catalogue_cut_to_less_than_half_is_refused_unless_a_person_syncs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    full = parse_catalog(load_catalog_sample(), source="x")
    first_page = full[:10]  # what a paginated /tests would give
    answers = [full, first_page]
    cache = CatalogCache(fetch=lambda: answers[0], path=tmp_path / "catalogo.json",
                         ttl_s=3600, min_refresh_s=0)
    assert cache.refresh() is True
    answers.pop(0)
    with caplog.at_level(logging.WARNING, logger="bemsoft_monitor.catalog"):
        assert cache.refresh() is False  # the monitor's own refreshes
    assert cache.catalog is not None and len(cache.catalog) == len(full)
    assert cache.last_error is not None and "parece incompleta" in cache.last_error
    assert "catalog sync" in cache.last_error
    assert cache.refresh_on_miss() is False
    assert cache.refresh(accept_shrink=True) is True  # `catalog sync` accepts it
    assert cache.catalog is not None and len(cache.catalog) == 10
    # Back to the full catalogue, then removing a few tests is an ordinary change.
    answers[0] = full
    assert cache.refresh() is True
    answers[0] = full[:-3]
    assert cache.refresh() is True
    assert cache.catalog is not None and len(cache.catalog) == len(full) - 3
