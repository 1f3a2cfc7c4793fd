"""The painel over real HTTP on loopback: health, metrics, login, CSRF, actions, bad input."""

# ruff: noqa: S113, S105, S106  (loopback test servers answer at once; test-only credentials)

from __future__ import annotations

import logging
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bemsoft_monitor.bemsoft import Kind
from bemsoft_monitor.config import Settings
from bemsoft_monitor.engine import Monitor
from bemsoft_monitor.errors import ConfigError
from bemsoft_monitor.metrics import Metrics
from bemsoft_monitor.simulator import Simulator, load_catalog_sample
from bemsoft_monitor.web import (
    HttpBindError,
    Painel,
    PainelServer,
    exposure_warning,
    is_loopback,
    parse_addr,
)

from .conftest import FakeClock, Lis, drive, make_monitor, make_settings
from .test_cli_run import cli, env_for, write_env

PAINEL_TOKEN = "painel-segredo-123456"
PII_TOKEN = "pii-segredo-do-painel-654"
BEMSOFT_TOKEN = "bemsoft-token-secreto-987"
PATIENT = "MARIA DA SILVA"


@dataclass
class Env:
    server: PainelServer
    monitor: Monitor
    clock: FakeClock
    sim: Simulator
    lis: Lis
    tmp: Path

    @property
    def url(self) -> str:
        return self.server.url

    def drive(self) -> None:
        drive(self.monitor, self.clock)


def start_env(tmp_path: Path, sim: Simulator, db_url: str | None = None,
              **settings: Any) -> Iterator[Env]:
    """LIS with requisition 1 (dead letter: 422) and 2 (delivered); painel on a free port."""
    url = db_url or f"sqlite:///{(tmp_path / 'lis.db').as_posix()}"
    lis = Lis(url)
    lis.patient()  # MARIA DA SILVA, CPF 123.456.789-09
    lis.requisition(1)
    lis.item(1, "FE")
    lis.requisition(2)
    lis.item(2, "FE")
    sim.set_token(BEMSOFT_TOKEN)
    sim.set_faults([{"kind": "status", "status": 422}])
    # One sender, so requisition 1 is the first POST and meets the 422.
    values: dict[str, Any] = {"painel_token": PAINEL_TOKEN, "bemsoft_concurrency": 1}
    values.update(settings)
    s = make_settings(url, tmp_path, sim, **values)
    clock = FakeClock()
    monitor, _parts = make_monitor(s, clock)
    drive(monitor, clock)
    server = PainelServer(Painel(s, monitor), host="127.0.0.1", port=0).start()
    try:
        yield Env(server, monitor, clock, sim, lis, tmp_path)
    finally:
        server.stop()
        monitor.close()
        lis.dispose()


@pytest.fixture
def env(tmp_path: Path, sim: Simulator) -> Iterator[Env]:
    yield from start_env(tmp_path, sim)


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "formulário sem csrf"
    return m.group(1)


def login(base: str, **form: str) -> requests.Session:
    h = requests.Session()
    page = h.get(base + "/login")
    assert page.status_code == 200
    data = {"csrf": csrf_of(page.text), "proximo": "/"}
    data.update(form or {"token": PAINEL_TOKEN})
    r = h.post(base + "/login", data=data, allow_redirects=False)
    assert r.status_code == 303, r.text
    return h


def dead_order_id(e: Env) -> int:
    [order] = e.monitor.store.orders_by_state("dead")
    return order.order_id


def saved_for(sim: Simulator, req: int) -> int:
    return sum(1 for t in sim.saved_tests()
               if t["order_external_id"] in (f"order-{req}", f"o{req}"))


# --- health, readiness, metrics ------------------------------------------------------------


def test_health_readiness_and_metrics_answer_without_login(env: Env) -> None:
    assert requests.get(env.url + "/healthz").json()["status"] == "ok"
    ready = requests.get(env.url + "/readyz")
    assert ready.status_code == 200
    assert {c["nome"]: c["ok"] for c in ready.json()["verificacoes"]} == {
        "banco_de_estado": True, "leitura_lis": True, "bemsoft": True, "trava": True}
    metrics = requests.get(env.url + "/metrics")
    assert metrics.status_code == 200
    text = metrics.text
    assert "bemsoft_items_read_total 2.0" in text
    assert "bemsoft_dead_letters_total 1.0" in text
    assert 'bemsoft_queue_depth{state="dead"} 1.0' in text
    assert 'bemsoft_queue_depth{state="delivered"} 1.0' in text
    assert 'bemsoft_orders_total{outcome="rejected"} 1.0' in text
    assert "bemsoft_send_latency_seconds_count 2.0" in text
    assert "bemsoft_oldest_waiting_age_seconds 0.0" in text
    assert "bemsoft_last_successful_poll_timestamp_seconds" in text
    assert "bemsoft_catalog_age_seconds" in text


def test_readyz_is_503_while_the_token_is_rejected(env: Env) -> None:
    env.sim.set_token("outro-token")
    env.lis.requisition(3)
    env.lis.item(3, "FE")
    env.monitor.cycle(drain=True)
    assert env.monitor.auth_paused
    r = requests.get(env.url + "/readyz")
    assert r.status_code == 503
    bemsoft = next(c for c in r.json()["verificacoes"] if c["nome"] == "bemsoft")
    assert not bemsoft["ok"] and "token" in bemsoft["detalhe"]
    assert BEMSOFT_TOKEN not in r.text


def test_readyz_is_503_without_the_lease(env: Env) -> None:
    env.monitor.close()  # releases the lease
    r = requests.get(env.url + "/readyz")
    assert r.status_code == 503
    assert not next(c for c in r.json()["verificacoes"] if c["nome"] == "trava")["ok"]


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a /metrics page, parsed with prometheus-client's own parser."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"{name} {labels} ausente de /metrics")


def test_metrics_follow_the_running_monitor(env: Env) -> None:
    text = requests.get(env.url + "/metrics").text
    assert metric(text, "bemsoft_last_successful_poll_timestamp_seconds") == \
        env.monitor.last_successful_poll.timestamp()  # type: ignore[union-attr]
    assert metric(text, "bemsoft_catalog_age_seconds") >= 0  # fetched from the simulator
    assert metric(text, "bemsoft_retries_total") == 0
    assert metric(text, "bemsoft_lease_held") == 1
    # A 503 then a success: one retry, one server_error, one more delivered.
    env.lis.requisition(3)
    env.lis.item(3, "FE")
    env.sim.set_faults([{"kind": "status", "status": 503}])
    env.drive()
    text = requests.get(env.url + "/metrics").text
    assert metric(text, "bemsoft_items_read_total") == 3
    assert metric(text, "bemsoft_retries_total") == 1
    assert metric(text, "bemsoft_orders_total", outcome="server_error") == 1
    assert metric(text, "bemsoft_orders_total", outcome="delivered") == 2
    assert metric(text, "bemsoft_queue_depth", state="delivered") == 2
    assert metric(text, "bemsoft_queue_depth", state="pending") == 0
    assert metric(text, "bemsoft_send_latency_seconds_count") == 4
    assert metric(text, "bemsoft_dead_letters_total") == 1


def test_oldest_waiting_age_grows_while_an_order_waits(env: Env) -> None:
    env.lis.requisition(4)
    env.lis.item(4, "FE")
    env.sim.set_faults([{"kind": "status", "status": 503}] * 5)
    env.monitor.cycle(drain=True)  # created and refused once: waits for its retry
    env.clock.advance(90)
    text = requests.get(env.url + "/metrics").text
    assert metric(text, "bemsoft_queue_depth", state="pending") == 1
    assert metric(text, "bemsoft_oldest_waiting_age_seconds") >= 90


def test_readyz_is_503_when_the_lis_has_not_been_read_recently(env: Env) -> None:
    painel = env.server.painel
    env.clock.advance(painel.lis_stale_after_s() + 1)
    r = requests.get(env.url + "/readyz")
    assert r.status_code == 503
    lis = next(c for c in r.json()["verificacoes"] if c["nome"] == "leitura_lis")
    assert not lis["ok"] and "nenhuma leitura bem-sucedida do LIS" in lis["detalhe"]
    env.monitor.cycle(drain=True)  # the LIS is read again
    assert requests.get(env.url + "/readyz").status_code == 200


def test_every_order_outcome_is_a_metric_series_from_the_start(env: Env) -> None:
    outcomes = [k.value for k in Kind]
    fresh = generate_latest(Metrics().registry).decode()
    assert [metric(fresh, "bemsoft_orders_total", outcome=o) for o in outcomes] == \
        [0.0] * len(outcomes)
    # The running monitor answered "delivered" and "rejected" only; the rest are 0, not absent.
    text = requests.get(env.url + "/metrics").text
    seen = {o: metric(text, "bemsoft_orders_total", outcome=o) for o in outcomes}
    assert seen == {**dict.fromkeys(outcomes, 0.0), "delivered": 1.0, "rejected": 1.0}


def bemsoft_check(url: str) -> tuple[int, dict[str, Any]]:
    r = requests.get(url + "/readyz")
    return r.status_code, next(c for c in r.json()["verificacoes"] if c["nome"] == "bemsoft")


def test_readyz_notices_bemsoft_is_down_while_nothing_is_being_sent(env: Env) -> None:
    painel = env.server.painel
    status, check = bemsoft_check(env.url)  # orders were just answered
    assert status == 200 and "última resposta da Bemsoft há" in check["detalhe"]
    # Idle past the freshness window: /readyz asks GET /tests itself...
    env.clock.advance(painel.bemsoft_fresh_s() + 1)
    status, check = bemsoft_check(env.url)
    assert status == 200 and "a Bemsoft respondeu HTTP 200" in check["detalhe"]
    # ...at most once per interval: with the simulator gone, the answer is the cached one.
    env.sim.stop()
    env.clock.advance(painel.bemsoft_fresh_s() / 2)
    status, check = bemsoft_check(env.url)
    assert status == 200 and "sondagem GET /tests há" in check["detalhe"]
    # Next interval: the probe finds nobody there.
    env.clock.advance(painel.bemsoft_fresh_s() / 2 + 1)
    env.monitor.cycle(drain=True)  # the LIS is still read: only Bemsoft is down
    r = requests.get(env.url + "/readyz")
    assert r.status_code == 503
    checks = {c["nome"]: c for c in r.json()["verificacoes"]}
    assert not checks["bemsoft"]["ok"] and "a Bemsoft não respondeu" in checks["bemsoft"]["detalhe"]
    assert checks["leitura_lis"]["ok"] and checks["banco_de_estado"]["ok"]
    assert BEMSOFT_TOKEN not in r.text
    # Back up: the next probe (one interval later) says so.
    env.sim.start()
    env.clock.advance(painel.bemsoft_fresh_s() + 1)
    env.monitor.cycle(drain=True)
    assert requests.get(env.url + "/readyz").status_code == 200


def test_readyz_probe_reports_a_token_rejected_by_get_tests(env: Env) -> None:
    env.sim.set_token("outro-token-qualquer")
    env.clock.advance(env.server.painel.bemsoft_fresh_s() + 1)
    env.monitor.cycle(drain=True)
    status, check = bemsoft_check(env.url)
    assert status == 503 and "token recusado pela Bemsoft (HTTP 401)" in check["detalhe"]


# --- authentication and CSRF -------------------------------------------------------------------


def test_pages_need_a_login_and_a_wrong_token_is_401(env: Env) -> None:
    r = requests.get(env.url + "/pendencias", allow_redirects=False)
    assert r.status_code == 303 and r.headers["Location"].startswith("/login")
    h = requests.Session()
    page = h.get(env.url + "/login")
    r = h.post(env.url + "/login", data={"csrf": csrf_of(page.text), "token": "errado-errado-1"},
               allow_redirects=False)
    assert r.status_code == 401
    assert "Token inválido" in r.text
    assert "bm_sessao" not in h.cookies
    assert h.get(env.url + "/pendencias", allow_redirects=False).status_code == 303


def test_login_sets_a_strict_httponly_session_cookie(env: Env) -> None:
    h = requests.Session()
    page = h.get(env.url + "/login")
    r = h.post(env.url + "/login", data={"csrf": csrf_of(page.text), "token": PAINEL_TOKEN,
                                         "proximo": "/pendencias"}, allow_redirects=False)
    assert r.status_code == 303 and r.headers["Location"] == "/pendencias"
    cookie = r.headers["Set-Cookie"]
    assert "bm_sessao=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert h.get(env.url + "/pendencias").status_code == 200


def test_login_form_without_its_csrf_is_403(env: Env) -> None:
    r = requests.post(env.url + "/login", data={"token": PAINEL_TOKEN}, allow_redirects=False)
    assert r.status_code == 403


def test_actions_without_or_with_a_wrong_csrf_are_403_and_change_nothing(env: Env) -> None:
    order_id = dead_order_id(env)
    h = login(env.url)
    r = h.post(f"{env.url}/pedido/{order_id}/reenviar", data={}, allow_redirects=False)
    assert r.status_code == 403
    assert "CSRF" in r.text
    r = h.post(f"{env.url}/pedido/{order_id}/reenviar", data={"csrf": "x" * 43},
               allow_redirects=False)
    assert r.status_code == 403
    anonymous = requests.post(f"{env.url}/pedido/{order_id}/reenviar", data={"csrf": "x"},
                              allow_redirects=False)
    assert anonymous.status_code == 401
    assert env.monitor.store.get_order(order_id).state == "dead"  # type: ignore[union-attr]


def test_user_and_password_login(tmp_path: Path, sim: Simulator) -> None:
    for e in start_env(tmp_path, sim, painel_token=None, painel_user="ana",
                       painel_password="senha-forte-do-painel"):
        h = requests.Session()
        page = h.get(e.url + "/login")
        assert 'name="usuario"' in page.text and 'name="token"' not in page.text
        bad = h.post(e.url + "/login", data={"csrf": csrf_of(page.text), "usuario": "ana",
                                             "senha": "errada-errada"}, allow_redirects=False)
        assert bad.status_code == 401 and "Usuário ou senha inválido" in bad.text
        h = login(e.url, usuario="ana", senha="senha-forte-do-painel")
        assert "Sair (ana)" in h.get(e.url + "/").text


def test_repeated_wrong_logins_are_throttled(env: Env) -> None:
    h = requests.Session()
    codes = []
    for _ in range(11):
        page = h.get(env.url + "/login")
        codes.append(h.post(env.url + "/login", data={"csrf": csrf_of(page.text),
                                                      "token": "errado-errado-1"}).status_code)
    assert codes[:10] == [401] * 10 and codes[10] == 429


def test_the_right_token_still_logs_in_after_many_wrong_ones_from_the_same_address(
    env: Env,
) -> None:
    # Behind a reverse proxy every browser comes from one address: a guesser there must not
    # lock the lab out, but their guesses must get slow.
    env.server.auth.throttle_delay_s = 0.2
    h = requests.Session()

    def attempt(token: str) -> requests.Response:
        page = h.get(env.url + "/login")
        return h.post(env.url + "/login", data={"csrf": csrf_of(page.text), "token": token},
                      allow_redirects=False)

    assert [attempt("errado-errado-1").status_code for _ in range(10)] == [401] * 10
    started = time.monotonic()
    slowed = attempt("errado-errado-1")
    assert slowed.status_code == 429 and "Token inválido" in slowed.text
    assert time.monotonic() - started >= 0.2
    ok = attempt(PAINEL_TOKEN)
    assert ok.status_code == 303 and "bm_sessao=" in ok.headers["Set-Cookie"]
    assert h.get(env.url + "/pendencias").status_code == 200
    # A success clears the address's record: the next typo is an ordinary 401 again.
    h.cookies.clear()
    assert attempt("errado-errado-1").status_code == 401


def test_without_painel_token_only_health_and_metrics_answer(tmp_path: Path,
                                                             sim: Simulator) -> None:
    for e in start_env(tmp_path, sim, painel_token=None):
        assert requests.get(e.url + "/healthz").status_code == 200
        assert requests.get(e.url + "/metrics").status_code == 200
        for path in ("/", "/login", "/pendencias"):
            r = requests.get(e.url + path, allow_redirects=False)
            assert r.status_code == 503 and "PAINEL_TOKEN" in r.text
        r = requests.post(e.url + "/login", data={"token": "qualquer-coisa-1"})
        assert r.status_code == 503


def test_login_never_redirects_off_site_even_with_hidden_characters(env: Env) -> None:
    for proximo in ("/\t/evil.example/", "/\r\nSet-Cookie: x=1", "https://evil.example/",
                    "//evil.example/", "/\\evil.example"):
        h = requests.Session()
        page = h.get(env.url + "/login")
        r = h.post(env.url + "/login", data={"csrf": csrf_of(page.text), "token": PAINEL_TOKEN,
                                             "proximo": proximo}, allow_redirects=False)
        assert r.status_code == 303 and r.headers["Location"] == "/", proximo
        assert "x=1" not in r.headers.get("Set-Cookie", "")


def test_a_form_with_a_bad_length_is_refused(env: Env) -> None:
    with socket.create_connection(("127.0.0.1", env.server.port), timeout=5) as conn:
        conn.sendall(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
        assert conn.recv(200).startswith(b"HTTP/1.1 400")
    r = requests.post(env.url + "/login", data="a=" + "x" * 70000,
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413 and "Formulário grande demais" in r.text


# --- pages and bad input ------------------------------------------------------------------------


def test_overview_shows_queue_and_the_24h_chart(env: Env) -> None:
    h = login(env.url)
    html = h.get(env.url + "/").text
    assert "Visão geral" in html
    assert 'id="total-mortos">1<' in html
    assert "entregues: 1" in html and "com falha: 1" in html
    assert html.count('<rect class="enviado"') == 1 and html.count('<rect class="falha"') == 1
    assert "cdn" not in html.lower() and "https://" not in html


def test_the_chart_counts_orders_not_attempts(env: Env) -> None:
    env.lis.requisition(3)
    env.lis.item(3, "FE")
    env.sim.set_faults([{"kind": "status", "status": 503}] * 2)  # two failed attempts
    env.drive()
    assert env.monitor.store.counts()["orders"]["delivered"] == 2
    html = login(env.url).get(env.url + "/").text
    # Orders 1 (422) and 3 (503 twice, then delivered) failed; orders 2 and 3 were delivered.
    assert "entregues: 2" in html and "com falha: 2" in html
    assert "2 pedido(s) entregue(s), 2 pedido(s) com falha" in html


def test_unknown_requisition_is_404_and_non_numeric_is_400(env: Env) -> None:
    h = login(env.url)
    r = h.get(env.url + "/requisicao/424242")
    assert r.status_code == 404 and "Solicitação não encontrada" in r.text
    assert h.get(env.url + "/requisicao/12abc").status_code == 400
    r = h.get(env.url + "/busca?numero=abc")
    assert r.status_code == 400 and "“abc” não é um número de solicitação" in r.text
    r = h.get(env.url + "/busca?numero=")
    assert r.status_code == 400 and "Informe o número da solicitação" in r.text
    r = h.put(env.url + "/pendencias")
    assert r.status_code == 501 and "O painel não entendeu esta requisição" in r.text
    r = h.get(env.url + "/busca?numero=1", allow_redirects=False)
    assert r.status_code == 303 and r.headers["Location"] == "/requisicao/1"
    assert h.post(env.url + "/pedido/abc/reenviar",
                  data={"csrf": csrf_of(h.get(env.url + "/").text)}).status_code == 400
    assert h.post(env.url + "/pedido/999/reenviar",
                  data={"csrf": csrf_of(h.get(env.url + "/").text)}).status_code == 404


def test_requisition_detail_shows_items_payload_and_attempts(env: Env) -> None:
    h = login(env.url)
    html = h.get(env.url + "/requisicao/1").text
    assert "HTTP 422" in html  # the attempt's answer
    assert "POST /requests" in html and "&#34;tests&#34;" in html  # escaped payload JSON
    assert "não enviado (FAILED_DIR)" in html
    assert "Reenviar" in html and "Marcar como resolvido" in html


def test_patient_data_is_masked_unless_painel_pii(tmp_path: Path, sim: Simulator) -> None:
    for e in start_env(tmp_path, sim):
        html = login(e.url).get(e.url + "/requisicao/1").text
        assert PATIENT not in html and "M**** D* S****" in html
        assert "123.456.789-09" not in html and "12345678909" not in html


def test_painel_pii_shows_patient_data(tmp_path: Path, sim: Simulator) -> None:
    for e in start_env(tmp_path, sim, painel_pii=True):
        html = login(e.url).get(e.url + "/requisicao/1").text
        assert PATIENT in html


def test_pii_token_viewer_sees_patient_data_and_painel_token_viewer_does_not(
    tmp_path: Path, sim: Simulator, caplog: pytest.LogCaptureFixture,
) -> None:
    for e in start_env(tmp_path, sim, painel_pii_token=PII_TOKEN):
        with caplog.at_level(logging.INFO, logger="bemsoft_monitor.web.server"):
            masked = login(e.url)
            allowed = login(e.url, token=PII_TOKEN)
        html = masked.get(e.url + "/requisicao/1").text
        assert PATIENT not in html and "M**** D* S****" in html
        assert "dados de pacientes mascarados" in html
        html = allowed.get(e.url + "/requisicao/1").text
        assert PATIENT in html and "dados de pacientes visíveis nesta sessão" in html
        assert "Sair (token-pii)" in html
        # The same painel, at the same time, still masks for the other session.
        assert PATIENT not in masked.get(e.url + "/requisicao/1").text
        entries = [r for r in caplog.records if "painel: entrada" in r.getMessage()]
        assert [(r.levelno, "com acesso a dados de pacientes" in r.getMessage())
                for r in entries] == [(logging.INFO, False), (logging.INFO, True)]
        assert PII_TOKEN not in caplog.text


def test_pii_token_works_beside_a_user_and_password_login(tmp_path: Path,
                                                          sim: Simulator) -> None:
    for e in start_env(tmp_path, sim, painel_token=None, painel_user="ana",
                       painel_password="senha-forte-do-painel", painel_pii_token=PII_TOKEN):
        page = requests.get(e.url + "/login").text
        assert 'name="usuario"' in page and "PAINEL_PII_TOKEN" in page
        user = login(e.url, usuario="ana", senha="senha-forte-do-painel")
        assert PATIENT not in user.get(e.url + "/requisicao/1").text
        assert PATIENT in login(e.url, token=PII_TOKEN).get(e.url + "/requisicao/1").text


def test_pii_token_must_differ_from_the_painel_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PAINEL_PII_TOKEN: igual a PAINEL_TOKEN"):
        make_settings("sqlite://", tmp_path, painel_token=PAINEL_TOKEN,
                      painel_pii_token=PAINEL_TOKEN)
    with pytest.raises(ConfigError, match="PAINEL_PII_TOKEN"):
        make_settings("sqlite://", tmp_path, painel_pii_token="curto")


def test_the_physician_is_shown_while_the_patient_stays_masked(tmp_path: Path,
                                                               sim: Simulator) -> None:
    doctor = {"physician_name": "JOAO PEREIRA LIMA", "physician_council": "CRM",
              "physician_number": "12345", "physician_uf": "SE"}
    for e in start_env(tmp_path, sim, **doctor):
        html = login(e.url).get(e.url + "/requisicao/2").text
        assert "&#34;physician&#34;" in html
        assert "JOAO PEREIRA LIMA" in html
        assert PATIENT not in html and "M**** D* S****" in html
        assert "123.456.789-09" not in html and "1990-05-15" not in html


def test_an_api_answer_echoing_the_patient_name_is_masked(env: Env) -> None:
    # Bemsoft may repeat the name in free text, where no pattern can recognise it.
    order_id = dead_order_id(env)
    echo = "HTTP 422: paciente Maria da Silva nascido em 1990-05-15 sem convênio"
    store = env.monitor.store
    with store.engine.begin() as conn:
        conn.execute(sa.update(store.attempts).where(store.attempts.c.OrderId == order_id)
                     .values(Detail=echo))
        conn.execute(sa.update(store.orders).where(store.orders.c.OrderId == order_id)
                     .values(LastError=echo))
    h = login(env.url)
    for page in ("/requisicao/1", "/pendencias"):
        html = h.get(env.url + page).text
        assert "paciente M**** D* S**** nascido em *** sem convênio" in html, page
        assert "silva" not in html.lower() and "1990-05-15" not in html


def test_no_secret_is_ever_rendered(env: Env) -> None:
    h = login(env.url)
    bodies = [h.get(env.url + p).text for p in
              ("/", "/pendencias", "/catalogo", "/requisicao/1", "/requisicao/2", "/metrics",
               "/readyz", "/healthz", "/nada")]
    for body in bodies:
        assert BEMSOFT_TOKEN not in body and PAINEL_TOKEN not in body


DB_SECRET = "senha-do-banco-0042"
SMTP_SECRET = "senha-smtp-secreta-77"
HOOK_KEY = "T0KEN-SECRETO-DO-WEBHOOK"
HOOK_QUERY = "chave-secreta-99"


def test_no_configured_secret_is_rendered_even_when_stored_text_repeats_it(
    tmp_path: Path, sim: Simulator, pg_url: str,
) -> None:
    # The PostgreSQL test server trusts loopback, so any password in the URL is accepted.
    with_password = pg_url.replace("postgres@", f"postgres:{DB_SECRET}@", 1)
    assert DB_SECRET in with_password
    hook = f"http://127.0.0.1:9/hooks/{HOOK_KEY}?chave={HOOK_QUERY}"
    secrets = (DB_SECRET, SMTP_SECRET, HOOK_KEY, HOOK_QUERY, hook, PII_TOKEN, PAINEL_TOKEN,
               BEMSOFT_TOKEN)
    for e in start_env(tmp_path, sim, db_url=with_password, painel_pii_token=PII_TOKEN,
                       alert_webhook_url=hook, smtp_host="127.0.0.1",
                       alert_email_to="ti@lab.com.br", smtp_user="monitor",
                       smtp_password=SMTP_SECRET):
        # Free text from the API or the database may repeat any of them.
        echo = (f"HTTP 422: erro {DB_SECRET} / {SMTP_SECRET} / {HOOK_KEY} / {HOOK_QUERY} / "
                f"{hook} / {PII_TOKEN} / {with_password}")
        order_id = dead_order_id(e)
        store = e.monitor.store
        with store.engine.begin() as conn:
            conn.execute(sa.update(store.attempts).where(store.attempts.c.OrderId == order_id)
                         .values(Detail=echo))
            conn.execute(sa.update(store.orders).where(store.orders.c.OrderId == order_id)
                         .values(LastError=echo))
        anonymous = requests.Session()
        for viewer in (login(e.url), login(e.url, token=PII_TOKEN), anonymous):
            for path in ("/", "/pendencias", "/catalogo", "/requisicao/1", "/requisicao/2",
                         "/login", "/metrics", "/readyz", "/healthz", "/nada"):
                body = viewer.get(e.url + path).text
                leaked = [s for s in secrets if s in body]
                assert leaked == [], (path, leaked)
        assert "HTTP 422: erro *** / *** / *** / *** / ***" in \
            login(e.url).get(e.url + "/pendencias").text


# --- actions ------------------------------------------------------------------------------------


def test_reenviar_requeues_the_dead_letter_and_the_loop_delivers_it_once(env: Env) -> None:
    order_id = dead_order_id(env)
    [failed_file] = list((env.tmp / "failed").glob("*.json"))
    assert saved_for(env.sim, 1) == 0
    h = login(env.url)
    page = h.get(env.url + "/pendencias").text
    assert f'id="morto-{order_id}"' in page
    r = h.post(f"{env.url}/pedido/{order_id}/reenviar",
               data={"csrf": csrf_of(page), "voltar": "/pendencias"}, allow_redirects=False)
    assert r.status_code == 303 and r.headers["Location"] == "/pendencias"
    assert "voltou para a fila" in h.get(env.url + "/pendencias").text
    assert env.monitor.store.get_order(order_id).state == "pending"  # type: ignore[union-attr]
    # The dead-letter file leaves FAILED_DIR's top level, so `retry` never sends it again.
    assert not failed_file.exists()
    assert (env.tmp / "failed" / "reenviados_painel" / failed_file.name).is_file()
    env.drive()
    assert env.monitor.store.get_order(order_id).state == "delivered"  # type: ignore[union-attr]
    assert saved_for(env.sim, 1) == 1
    # A second click (stale page) changes nothing and sends nothing.
    r = h.post(f"{env.url}/pedido/{order_id}/reenviar", data={"csrf": csrf_of(page)})
    assert r.status_code == 200 and "nada a reenviar" in r.text
    env.drive()
    assert saved_for(env.sim, 1) == 1


def test_marcar_como_resolvido_closes_the_order_without_sending(env: Env) -> None:
    order_id = dead_order_id(env)
    calls = len(env.sim.calls())
    h = login(env.url)
    page = h.get(env.url + "/requisicao/1").text
    r = h.post(f"{env.url}/pedido/{order_id}/resolver",
               data={"csrf": csrf_of(page), "voltar": "/requisicao/1"})
    assert r.status_code == 200 and "marcado como resolvido" in r.text
    order = env.monitor.store.get_order(order_id)
    assert order is not None and order.state == "resolved"
    assert "resolvido no painel por token" in (order.last_error or "")
    env.drive()
    assert len(env.sim.calls()) == calls
    assert "Nenhum pedido em FAILED_DIR" in h.get(env.url + "/pendencias").text


def test_refused_item_can_be_sent_again_after_the_cause_is_fixed(env: Env) -> None:
    env.lis.requisition(5)
    item_id = env.lis.item(5, "ZZZ")
    env.drive()
    h = login(env.url)
    page = h.get(env.url + "/pendencias").text
    assert "ZZZ" in page
    assert "ZZZ" in h.get(env.url + "/catalogo").text
    r = h.post(f"{env.url}/item/{item_id}/reenviar", data={"csrf": csrf_of(page)})
    assert r.status_code == 200 and "voltou para a fila" in r.text
    state = {row.item_id: row.state for row in env.monitor.store.requisition_items(5)}
    assert state[item_id] == "pending"


ZZZ = {"id": "ZZZ", "name": "EXAME ZZZ", "specimen": {"id": "SORO", "name": "Soro"}}


def test_marcar_como_resolvido_closes_a_refused_item_for_good(tmp_path: Path,
                                                              sim: Simulator) -> None:
    # A TTL of one millisecond: every cycle reads the catalogue again from the simulator.
    for e in start_env(tmp_path, sim, bemsoft_tests_ttl=0.001):
        e.lis.requisition(5)
        resolved = e.lis.item(5, "ZZZ")
        e.lis.requisition(6)
        control = e.lis.item(6, "ZZZ")
        e.drive()
        h = login(e.url)
        page = h.get(e.url + "/pendencias").text
        assert f'id="resolver-item-{resolved}"' in page
        r = h.post(f"{e.url}/item/{resolved}/resolver", data={}, allow_redirects=False)
        assert r.status_code == 403  # CSRF like every other action
        r = h.post(f"{e.url}/item/{resolved}/resolver",
                   data={"csrf": csrf_of(page), "voltar": "/pendencias"})
        assert r.status_code == 200
        assert f"Item {resolved} marcado como resolvido; ele não será enviado." in r.text
        assert f'id="resolver-item-{resolved}"' not in r.text
        assert f'id="resolver-item-{control}"' in r.text
        # Bemsoft adds ZZZ: the other refused item goes out, the resolved one never does.
        e.sim.set_catalog([*load_catalog_sample(), ZZZ])
        e.drive()
        e.drive()
        assert saved_for(e.sim, 6) == 1
        assert saved_for(e.sim, 5) == 0
        e.monitor.retry_refused()  # `retry --refused` leaves it alone too
        e.drive()
        assert saved_for(e.sim, 5) == 0
        detail = h.get(e.url + "/requisicao/5").text
        assert '<span class="estado resolved">resolvido</span>' in detail
        assert "marcado como resolvido no painel por token em 01/07/2026" in detail
        again = h.post(f"{e.url}/item/{resolved}/resolver", data={"csrf": csrf_of(page)})
        assert again.status_code == 200 and "não está recusado; nada foi feito" in again.text


def test_catalog_page_groups_one_problem_across_requisitions(env: Env) -> None:
    env.lis.patient(2, nome="JOSE SANTOS", sexo=None)  # no DEFAULT_GENDER: refused
    for req in (5, 6, 7):
        env.lis.requisition(req, patient=2)
        env.lis.item(req, "FE")
    env.drive()
    html = login(env.url).get(env.url + "/catalogo").text
    assert html.count("sexo do paciente ausente") == 1
    assert "solicitação 5" not in html and "solicitação 6" not in html
    row = next(r for r in html.split("<tr>") if "sexo do paciente ausente" in r)
    assert re.findall(r'<td class="num">(\d+)</td>', row) == ["3", "3"]  # items, requisitions
    assert all(f'href="/requisicao/{req}"' in row for req in (5, 6, 7))


def test_actions_never_redirect_off_site(env: Env) -> None:
    order_id = dead_order_id(env)
    h = login(env.url)
    r = h.post(f"{env.url}/pedido/{order_id}/resolver",
               data={"csrf": csrf_of(h.get(env.url + "/").text), "voltar": "//evil.example/"},
               allow_redirects=False)
    assert r.status_code == 303 and r.headers["Location"] == "/"


# --- binding -----------------------------------------------------------------------------------


def test_loopback_detection_and_address_parsing() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0")  # noqa: S104
    assert not is_loopback("192.168.0.10") and not is_loopback("painel.lab.local")
    assert parse_addr("127.0.0.1:8765") == ("127.0.0.1", 8765)
    assert parse_addr("[::1]:9000") == ("::1", 9000)


def test_a_port_alone_means_this_computer_only(tmp_path: Path) -> None:
    assert parse_addr("8765") == ("127.0.0.1", 8765)
    assert parse_addr(":8765") == ("127.0.0.1", 8765)
    for addr in ("8765", ":8765", " 8765 "):
        s = Settings(_env_file=None, db_url="sqlite://", terceiros="A",  # type: ignore[call-arg]
                     bemsoft_dry_run=True, http_addr=addr)
        assert s.http_addr == "127.0.0.1:8765"
    for bad in ("localhost:", "abc", "host:70000", "0"):
        with pytest.raises(ConfigError, match="HTTP_ADDR"):
            Settings(_env_file=None, db_url="sqlite://", terceiros="A",  # type: ignore[call-arg]
                     bemsoft_dry_run=True, http_addr=bad)
        with pytest.raises(HttpBindError, match="use host:porta ou só a porta"):
            parse_addr(bad)


def test_a_non_loopback_address_is_warned_about_and_loopback_is_not() -> None:
    assert exposure_warning("127.0.0.1", "http://127.0.0.1:8765") is None
    text = exposure_warning("192.168.0.10", "http://192.168.0.10:8765")
    assert text is not None and "sem TLS" in text and "proxy reverso com HTTPS" in text


def test_binding_a_non_loopback_address_warns_in_the_log(
    env: Env, caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="bemsoft_monitor.web.server"):
        exposed = PainelServer(env.server.painel, host="0.0.0.0", port=0).start()  # noqa: S104
        exposed.stop()
        PainelServer(env.server.painel, host="127.0.0.1", port=0).start().stop()
    warnings = [r.getMessage() for r in caplog.records if "sem TLS" in r.getMessage()]
    assert warnings == [f"painel exposto na rede em http://0.0.0.0:{exposed.port} sem TLS: o "
                        "token e os dados trafegam sem criptografia; prefira 127.0.0.1 ou "
                        "coloque um proxy reverso com HTTPS na frente"]


def test_a_port_in_use_is_a_clear_error(env: Env) -> None:
    with pytest.raises(HttpBindError, match="já está em uso"):
        PainelServer(env.server.painel, host="127.0.0.1", port=env.server.port)


def test_an_address_not_on_this_machine_is_a_clear_error(env: Env) -> None:
    # 192.0.2.0/24 is reserved for documentation: no machine has it.
    with pytest.raises(HttpBindError, match="não pertence a este computador"):
        PainelServer(env.server.painel, host="192.0.2.1", port=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_run_with_a_busy_port_exits_with_a_portuguese_error(tmp_path: Path) -> None:
    Lis(f"sqlite:///{(tmp_path / 'lis.db').as_posix()}").dispose()
    write_env(tmp_path, None)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(cli("run", "--http", f"127.0.0.1:{port}"), cwd=tmp_path,
                              env=env_for(tmp_path), capture_output=True, text=True, timeout=60,
                              check=False)
    assert proc.returncode == 2
    assert f"a porta {port} em 127.0.0.1 já está em uso" in proc.stderr


def test_cli_run_serves_health_and_painel_and_stops_cleanly(tmp_path: Path,
                                                            sim: Simulator) -> None:
    lis = Lis(f"sqlite:///{(tmp_path / 'lis.db').as_posix()}")
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE")
    lis.dispose()
    port = _free_port()
    write_env(tmp_path, sim, PAINEL_TOKEN=PAINEL_TOKEN)
    # Only the port: the painel listens on 127.0.0.1.
    proc = subprocess.Popen(cli("run", "--http", str(port)), cwd=tmp_path,
                            env=env_for(tmp_path), stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(base + "/metrics", timeout=1).text.count(
                        'bemsoft_queue_depth{state="delivered"} 1.0'):
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail("painel não respondeu com o pedido entregue")
        assert requests.get(base + "/readyz", timeout=5).status_code == 200
        assert "Solicitação 1" in login(base).get(base + "/requisicao/1").text
    finally:
        if sys.platform == "win32":
            proc.send_signal(signal.CTRL_BREAK_EVENT)
        else:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"painel e métricas em http://127.0.0.1:{port}" in err
    assert PAINEL_TOKEN not in err and sim.token not in err
    assert len(sim.saved_tests()) == 1
    if sys.platform != "win32":
        with pytest.raises(requests.ConnectionError):
            requests.get(base + "/healthz", timeout=1)


def test_conferir_orders_are_listed_and_reenviar_uses_a_new_key(tmp_path: Path,
                                                                 sim: Simulator) -> None:
    for e in start_env(tmp_path, sim):
        e.lis.requisition(7)
        e.lis.item(7, "FE")
        # Saved, then a proxy answered 502: the retry meets a 409 that needs a person.
        e.sim.set_faults([{"kind": "status", "status": 502, "after_save": True}])
        e.drive()
        [order] = e.monitor.store.orders_by_state("conferir")
        h = login(e.url)
        page = h.get(e.url + "/pendencias").text
        assert "Conferir <span class=\"contagem\">1</span>" in page
        assert f'/pedido/{order.order_id}/reenviar' in page
        r = h.post(f"{e.url}/pedido/{order.order_id}/reenviar", data={"csrf": csrf_of(page)})
        assert r.status_code == 200 and "voltou para a fila" in r.text
        again = e.monitor.store.get_order(order.order_id)
        assert again is not None and again.state == "pending"
        assert again.generation == order.generation + 1 and again.key != order.key


def test_every_page_renders_on_sqlite_and_postgresql(tmp_path: Path, sim: Simulator,
                                                     db_url: str) -> None:
    for e in start_env(tmp_path, sim, db_url=db_url):
        h = login(e.url)
        assert "com falha: 1" in h.get(e.url + "/").text
        assert "HTTP 422" in h.get(e.url + "/requisicao/1").text
        assert h.get(e.url + "/pendencias").text.count('id="morto-') == 1
        assert h.get(e.url + "/catalogo").status_code == 200
        assert requests.get(e.url + "/readyz").status_code == 200
