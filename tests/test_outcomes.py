"""Each Bemsoft response maps to one outcome and one outbox state (bemsoft-api.md table)."""

# ruff: noqa: S105, S106  # fake tokens are the subject under test

from __future__ import annotations

import base64
import datetime as dt
import http.server
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from bemsoft_monitor.bemsoft import BemsoftClient, Kind, classify
from bemsoft_monitor.simulator import Simulator, load_catalog_sample
from bemsoft_monitor.store import idempotency_key, item_set_hash

from .conftest import FakeClock, Lis, drive, make_monitor, make_settings

NOW = dt.datetime(2026, 7, 1, tzinfo=dt.timezone.utc)


@pytest.fixture
def lis_sqlite(tmp_path: Path) -> Lis:
    helper = Lis(f"sqlite:///{(tmp_path / 'lis.db').as_posix()}")
    helper.patient()
    helper.requisition(1)
    helper.item(1, "FE", item_id=1)
    return helper


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{(tmp_path / 'lis.db').as_posix()}"


@pytest.mark.parametrize(
    ("status", "body", "headers", "kind"),
    [
        (201, '{"id": "x"}', {}, Kind.DELIVERED),
        (200, "", {}, Kind.DELIVERED),
        (201, '{"error": "Não foi possível salvar os dados recebidos no lote sol-1."}', {},
         Kind.NOT_SAVED),
        (201, '{"mensagemErro": "falhou"}', {}, Kind.NOT_SAVED),
        (201, '{"errors": ["a", "b"]}', {}, Kind.NOT_SAVED),
        (201, '{"error": null, "id": 1}', {}, Kind.DELIVERED),
        (200, "<html><body>Proxy</body></html>", {"Content-Type": "text/html"}, Kind.NO_ANSWER),
        (200, "[1, 2]", {}, Kind.NO_ANSWER),
        (301, "", {"Location": "https://x/requests"}, Kind.UNREACHABLE),
        (404, "<html>Not Found</html>", {}, Kind.UNREACHABLE),
        (405, "", {}, Kind.UNREACHABLE),
        (407, "", {"Proxy-Authenticate": "Basic"}, Kind.UNREACHABLE),
        (408, "", {}, Kind.UNREACHABLE),
        (418, '{"message": "?"}', {}, Kind.REJECTED),
        (409, '{"message": "dup"}', {}, Kind.ALREADY),
        (400, '{"message": "campo X"}', {}, Kind.REJECTED),
        (422, "", {}, Kind.REJECTED),
        (401, "", {}, Kind.AUTH),
        (403, "", {}, Kind.AUTH),
        (429, "", {"Retry-After": "7"}, Kind.RATE_LIMITED),
        (500, "<html>erro</html>", {}, Kind.SERVER_ERROR),
        (503, "", {}, Kind.SERVER_ERROR),
    ],
)
def test_every_response_maps_to_exactly_one_outcome(
        status: int, body: str, headers: dict[str, str], kind: Kind) -> None:
    got, message, retry_after = classify(status, headers, body, now=NOW)
    assert got == kind
    assert message
    if status == 429:
        assert retry_after == 7


def test_redirect_message_says_what_to_fix() -> None:
    _, message, _ = classify(302, {"Location": "https://b/requests"}, "", now=NOW)
    assert "BEMSOFT_BASE_URL" in message


def _order(monitor, req: int = 1):  # type: ignore[no-untyped-def]
    return monitor.store.orders_of_requisition(req)[0]


def test_201_with_error_is_retried_with_a_new_key_and_then_delivered(
        lis_sqlite: Lis, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    sim.set_faults([{"kind": "error201"}])
    monitor, _ = make_monitor(make_settings(_url(tmp_path), tmp_path, sim), clock)
    drive(monitor, clock)
    calls = sim.calls()
    assert [c["status"] for c in calls] == [201, 201]
    assert calls[0]["key"] != calls[1]["key"]  # generation changed: nothing had been saved
    assert len(sim.saved_tests()) == 1
    assert _order(monitor).state == "delivered"
    monitor.close()


def test_5xx_is_retried_with_the_same_key(
        lis_sqlite: Lis, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    sim.set_faults([{"kind": "status", "status": 503}, {"kind": "status", "status": 502}])
    monitor, _ = make_monitor(make_settings(_url(tmp_path), tmp_path, sim), clock)
    drive(monitor, clock)
    calls = sim.calls()
    assert [c["status"] for c in calls] == [503, 502, 201]
    assert len({c["key"] for c in calls}) == 1
    assert len(sim.saved_tests()) == 1
    monitor.close()


def test_409_after_a_server_error_goes_to_conferir_not_delivered(
        lis_sqlite: Lis, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    # The backend saved, then a proxy answered 502: the retry gets 409, which is ambiguous.
    sim.set_faults([{"kind": "status", "status": 502, "after_save": True}])
    monitor, parts = make_monitor(make_settings(_url(tmp_path), tmp_path, sim), clock)
    drive(monitor, clock)
    order = _order(monitor)
    assert order.state == "conferir"
    assert "Conferir" in (order.last_error or "")
    assert parts.store.requisition_items(1)[0].state == "conferir"
    monitor.close()


def test_409_after_a_lost_answer_means_delivered(
        lis_sqlite: Lis, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    sim.set_faults([{"kind": "reset", "after_save": True}])
    monitor, _ = make_monitor(make_settings(_url(tmp_path), tmp_path, sim), clock)
    drive(monitor, clock)
    assert [c["status"] for c in sim.calls()] == [None, 409]
    assert _order(monitor).state == "delivered"
    assert len(sim.saved_tests()) == 1
    monitor.close()


def test_409_on_the_first_use_of_a_key_goes_to_conferir(
        lis_sqlite: Lis, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    monitor, _ = make_monitor(make_settings(_url(tmp_path), tmp_path, sim), clock)
    key = idempotency_key(1, 1, item_set_hash([1]), 1)
    # Another tool used the key first: our first attempt meets a 409 it cannot explain.
    payload = {"batch": {"externalId": "x", "date": "2026-07-01", "time": "08:00:00", "order": {
        "externalId": "o", "date": "2026-07-01", "time": "08:00:00",
        "patient": {"externalId": "p", "name": "N", "birthDate": "1990-01-01", "gender": "F"},
        "tests": [{"externalId": "t", "collectionDate": "2026-07-01",
                   "collectionTime": "08:00:00", "supportTestId": "FE",
                   "supportSpecimenId": "SORO"}]}}}
    r = requests.post(sim.url + "/requests", json=payload, timeout=5,
                      headers={"Authorization": f"Bearer {sim.token}", "Idempotency-Key": key})
    assert r.status_code == 201
    drive(monitor, clock)
    order = _order(monitor)
    assert order.key == key
    assert order.state == "conferir"
    assert "sem nenhuma tentativa anterior sem resposta" in (order.last_error or "")
    monitor.close()


def test_400_goes_to_failed_dir_at_once_with_the_api_message(
        lis_sqlite: Lis, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    sim.set_faults([{"kind": "status", "status": 400}])
    monitor, _ = make_monitor(make_settings(_url(tmp_path), tmp_path, sim), clock)
    drive(monitor, clock)
    assert len(sim.calls()) == 1
    order = _order(monitor)
    assert order.state == "dead"
    assert "Falha simulada" in (order.last_error or "")
    assert order.failed_file and Path(order.failed_file).exists()
    monitor.close()


def test_401_pauses_all_sending_keeps_events_and_resumes_when_token_works(
        tmp_path: Path, sim: Simulator, clock: FakeClock,
        caplog: pytest.LogCaptureFixture) -> None:
    lis = Lis(_url(tmp_path))
    lis.patient()
    for req in (1, 2, 3):
        lis.requisition(req)
        lis.item(req, "FE")
    real_token = sim.token
    caplog.set_level(logging.INFO)
    settings = make_settings(_url(tmp_path), tmp_path, sim, bemsoft_concurrency=1,
                             bemsoft_breaker_seconds=30)
    monitor, parts = make_monitor(settings, clock)
    assert monitor.catalog is not None and monitor.catalog.refresh()
    sim.set_token("outro-token")  # the lab's token is revoked
    for _ in range(5):
        monitor.cycle()
        clock.advance(5)
    assert monitor.auth_paused is not None
    assert parts.store.get_flag("AuthPaused")[0]
    posts = [c for c in sim.calls()]
    assert len(posts) == 1  # one refused POST, then only GET /tests probes
    errors = [r for r in caplog.records if "PAUSADO" in r.getMessage()]
    assert len(errors) == 1 and errors[0].levelno == logging.ERROR
    assert parts.store.counts()["orders"].get("pending") == 3
    sim.set_token(real_token)
    clock.advance(31)
    drive(monitor, clock)
    assert monitor.auth_paused is None
    assert len(sim.saved_tests()) == 3
    assert parts.store.get_flag("AuthPaused")[0] is None
    monitor.close()


def test_429_waits_at_least_retry_after(
        lis_sqlite: Lis, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    sim.set_faults([{"kind": "429", "retry_after": 120}])
    monitor, _ = make_monitor(make_settings(_url(tmp_path), tmp_path, sim), clock)
    monitor.cycle()
    order = _order(monitor)
    assert order.state == "pending"
    clock.advance(60)
    monitor.cycle()
    assert len(sim.calls()) == 1
    clock.advance(61)
    monitor.cycle()
    assert _order(monitor).state == "delivered"
    monitor.close()


@pytest.mark.parametrize("fault", [
    {"kind": "html", "status": 502},
    {"kind": "empty", "status": 503},
    {"kind": "reset"},
    {"kind": "html", "status": 200},
])
def test_unreadable_answers_never_crash_and_never_lose_the_event(
        lis_sqlite: Lis, tmp_path: Path, sim: Simulator, clock: FakeClock,
        fault: dict) -> None:
    sim.set_faults([fault])
    monitor, _ = make_monitor(make_settings(_url(tmp_path), tmp_path, sim), clock)
    drive(monitor, clock)
    assert _order(monitor).state in ("delivered", "conferir")
    if fault.get("status") != 200:
        assert _order(monitor).state == "delivered"
    assert len(sim.saved_tests()) == 1
    monitor.close()


def test_retry_horizon_ends_in_failed_dir(
        lis_sqlite: Lis, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    sim.set_faults([{"kind": "status", "status": 500}] * 50)
    settings = make_settings(_url(tmp_path), tmp_path, sim, bemsoft_retry_horizon_seconds=20,
                             bemsoft_breaker_seconds=1)
    monitor, _ = make_monitor(settings, clock)
    drive(monitor, clock, cycles=60, step_s=2)
    order = _order(monitor)
    assert order.state == "dead"
    assert "BEMSOFT_RETRY_HORIZON_SECONDS" in (order.last_error or "")
    assert list((tmp_path / "failed").glob("*.json"))
    monitor.close()


def test_connection_refused_is_no_answer(tmp_path: Path) -> None:
    client = BemsoftClient(base_url="http://127.0.0.1:9", token="x", timeout_s=2)
    outcome = client.post_order({"batch": {}}, key="k")
    assert outcome.kind == Kind.NO_ANSWER
    assert "conexão" in outcome.message


def test_token_never_appears_in_outcome_messages(sim: Simulator) -> None:
    secret = "segredo-muito-secreto-123"
    client = BemsoftClient(base_url=sim.url, token=secret, timeout_s=2)
    outcome = client.post_order({"batch": {}}, key="k")
    assert outcome.kind == Kind.AUTH
    assert secret not in outcome.message and secret not in outcome.body_excerpt


def test_definite_refusal_after_an_uncertain_attempt_keeps_the_key_and_never_duplicates(
        lis_sqlite: Lis, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    # The first attempt was saved but its answer was lost; then the token is refused.
    # A fresh key now would create the order twice: the key must be kept.
    sim.set_faults([{"kind": "reset", "after_save": True}, {"kind": "error201"}])
    monitor, _ = make_monitor(make_settings(_url(tmp_path), tmp_path, sim), clock)
    drive(monitor, clock)
    calls = sim.calls()
    assert [c["status"] for c in calls] == [None, 201, 409]
    assert len({c["key"] for c in calls}) == 1
    assert len(sim.saved_tests()) == 1
    # 201-with-error may have recorded the key: the 409 cannot be read as delivered.
    assert _order(monitor).state == "conferir"
    monitor.close()


def test_a_401_after_a_lost_answer_keeps_the_key_and_409_then_means_delivered(
        lis_sqlite: Lis, tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    sim.set_faults([{"kind": "reset", "after_save": True}])
    settings = make_settings(_url(tmp_path), tmp_path, sim, bemsoft_breaker_seconds=5)
    monitor, _ = make_monitor(settings, clock)
    assert monitor.catalog is not None and monitor.catalog.refresh()
    real = sim.token
    monitor.cycle()  # reset: no answer
    sim.set_token("revogado")
    clock.advance(5)
    monitor.cycle()  # 401: paused
    assert monitor.auth_paused
    sim.set_token(real)
    clock.advance(6)
    drive(monitor, clock)
    posts = sim.calls()
    assert [c["status"] for c in posts] == [None, 401, 409]
    assert len({c["key"] for c in posts}) == 1
    assert _order(monitor).state == "delivered"
    assert len(sim.saved_tests()) == 1
    monitor.close()


def test_tls_failure_is_one_outcome_with_a_clear_reason(sim: Simulator) -> None:
    # The simulator speaks plain HTTP: an https:// URL makes the TLS handshake fail.
    client = BemsoftClient(base_url=sim.url.replace("http://", "https://"), token=sim.token,
                           timeout_s=3)
    outcome = client.post_order({"batch": {}}, key="k")
    assert outcome.kind == Kind.NO_ANSWER
    assert "TLS" in outcome.message and "BEMSOFT_VERIFY" in outcome.message
    assert sim.saved_tests() == []


def test_redirect_from_a_real_server_is_not_followed_and_not_lost(
        tmp_path: Path, clock: FakeClock) -> None:
    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(301)
            self.send_header("Location", "https://bemsoft.example/requests")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST  # noqa: N815

        def log_message(self, *args: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        lis = Lis(_url(tmp_path))
        lis.patient()
        lis.requisition(1)
        lis.item(1, "FE", item_id=1)
        # A good catalogue copy from yesterday: the redirect hits only the order.
        (tmp_path / "catalogo.json").write_text(json.dumps(
            {"format": 1, "fetched_at": time.time(), "tests": load_catalog_sample()}),
            encoding="utf-8")
        settings = make_settings(_url(tmp_path), tmp_path, None,
                                 bemsoft_base_url=f"http://127.0.0.1:{server.server_port}",
                                 bemsoft_dry_run=False)
        monitor, _ = make_monitor(settings, clock)
        monitor.cycle()
        order = _order(monitor)
        assert order.state == "pending"
        assert order.last_status == 301
        assert "BEMSOFT_BASE_URL" in (order.last_error or "")
        monitor.close()
    finally:
        server.shutdown()


class _ForwardProxy(http.server.ThreadingHTTPServer):
    """A plain HTTP forward proxy on loopback that counts what passes through it."""

    def __init__(self, user: str = "", password: str = "") -> None:
        self.seen: list[tuple[str, str, str | None]] = []
        self.expected_auth: str | None = None
        if user:
            self.expected_auth = "Basic " + base64.b64encode(
                f"{user}:{password}".encode()).decode()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: _ForwardProxy

    def log_message(self, *_args: object) -> None:
        pass

    def _forward(self) -> None:
        auth = self.headers.get("Proxy-Authorization")
        self.server.seen.append((self.command, self.path, auth))
        if self.server.expected_auth and auth != self.server.expected_auth:
            self.send_response(407)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("proxy-authorization", "connection", "host")}
        with requests.Session() as session:
            session.trust_env = False  # the test's fake system proxy is not ours to use
            resp = session.request(self.command, self.path, data=body, headers=headers,
                                   timeout=5, allow_redirects=False)
        self.send_response(resp.status_code)
        for k, v in resp.headers.items():
            if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(resp.content)))
        self.end_headers()
        self.wfile.write(resp.content)

    do_GET = _forward  # noqa: N815 - http.server's method names
    do_POST = _forward  # noqa: N815 - http.server's method names


@pytest.fixture
def proxy() -> Iterator[_ForwardProxy]:
    server = _ForwardProxy(user="lab", password="s3gredo;proxy")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_bemsoft_proxy_carries_every_call_and_the_system_proxy_is_ignored(  # noqa: PLR0917 - fixtures
        tmp_path: Path, lis_sqlite: Lis, sim: Simulator, clock: FakeClock, proxy: _ForwardProxy,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # A proxy from the environment that goes nowhere: it must not be used.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    proxy_url = proxy.url.replace("http://", "http://lab:s3gredo%3Bproxy@")
    settings = make_settings(_url(tmp_path), tmp_path, sim, bemsoft_proxy=proxy_url)
    monitor, _parts = make_monitor(settings, clock)
    with caplog.at_level(logging.DEBUG):
        drive(monitor, clock)
    monitor.close()
    paths = [(method, path.replace(sim.url, "")) for method, path, _auth in proxy.seen]
    print(f"\nchamadas pelo proxy: {paths}")
    assert ("GET", "/tests") in paths and ("POST", "/requests") in paths
    assert all(auth == proxy.expected_auth for _m, _p, auth in proxy.seen)
    assert [t["test_external_id"] for t in sim.saved_tests()] == ["item-1"]
    assert "s3gredo" not in caplog.text


def test_a_proxy_that_refuses_the_credentials_is_a_retry_with_a_clear_reason(
        tmp_path: Path, sim: Simulator, proxy: _ForwardProxy) -> None:
    client = BemsoftClient(base_url=sim.url, token=sim.token, timeout_s=5,
                           proxy=proxy.url.replace("http://", "http://lab:errada@"))
    outcome = client.post_order({"batch": {}}, key="k-1")
    print(f"\nresposta: {outcome.kind} {outcome.status} {outcome.message}")
    assert outcome.status == 407
    assert outcome.kind not in (Kind.DELIVERED, Kind.ALREADY)
    assert "errada" not in outcome.message
    assert sim.saved_tests() == []


def test_bemsoft_proxy_must_be_an_http_url(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="BEMSOFT_PROXY") as info:
        make_settings(_url(tmp_path), tmp_path, bemsoft_proxy="proxy.lab:3128")
    assert "http://" in str(info.value)


def test_a_wrong_endpoint_keeps_every_order_and_stops_hammering_until_it_is_fixed(
        tmp_path: Path, sim: Simulator, clock: FakeClock) -> None:
    lis = Lis(_url(tmp_path))
    lis.patient()
    for req in range(1, 7):
        lis.requisition(req)
        lis.item(req, "FE", item_id=req)
    wrong = make_settings(_url(tmp_path), tmp_path, sim, bemsoft_endpoint="/pedidos",
                          bemsoft_breaker_seconds=60, bemsoft_concurrency=1)
    monitor, parts = make_monitor(wrong, clock)
    for _ in range(10):
        monitor.cycle()
        clock.advance(5)
    pending = parts.store.orders_by_state("pending")
    attempts = sum(o.attempts for o in pending)
    states = parts.store.counts()["orders"]
    print(f"\nchamadas ao endereço errado: {attempts}; pedidos: {states}")
    assert {o.last_status for o in pending} <= {404, None}
    assert 3 <= attempts <= 4  # three failures open the breaker; then one probe per minute
    assert states == {"pending": 6}
    assert not (tmp_path / "failed").exists() or not any((tmp_path / "failed").iterdir())
    assert "BEMSOFT_ENDPOINT" in (pending[0].last_error or "")
    monitor.close()

    fixed = make_settings(_url(tmp_path), tmp_path, sim, bemsoft_concurrency=1)
    monitor, parts = make_monitor(fixed, clock)
    drive(monitor, clock, cycles=20)
    assert sorted(t["test_external_id"] for t in sim.saved_tests()) == [
        f"item-{i}" for i in range(1, 7)]
    assert parts.store.counts()["orders"] == {"delivered": 6}
    monitor.close()
