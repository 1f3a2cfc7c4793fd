"""Alerts: pure rules with plain data, then real delivery to a loopback webhook and SMTP sink."""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import signal
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from bemsoft_monitor.alerts import (
    KIND_DEAD_LETTER,
    KIND_NO_POLL,
    KIND_OLDEST_WAITING,
    KIND_TOKEN,
    Alert,
    Alerter,
    AlertState,
    EmailChannel,
    Rules,
    Snapshot,
    WebhookChannel,
    build_alerter,
    commit,
    evaluate,
    monitor_snapshot,
)
from bemsoft_monitor.simulator import Simulator

from .conftest import T0, FakeClock, Lis, drive, make_monitor, make_settings
from .test_cli_run import cli, env_for, write_env

RULES = Rules(no_poll_s=600, oldest_waiting_s=1800, repeat_s=3600)
MIN = dt.timedelta(minutes=1)


def snap(**kw: Any) -> Snapshot:
    values: dict[str, Any] = {"auth_paused": None, "last_poll": T0, "dead": {},
                              "oldest_waiting": None}
    values.update(kw)
    return Snapshot(**values)


def due(state: AlertState, s: Snapshot, at: dt.datetime, rules: Rules = RULES) -> list[Alert]:
    """The alerts due at ``at``, each then delivered (committed) as a working channel would."""
    alerts = evaluate(state, s, now=at, rules=rules)
    for alert in alerts:
        commit(state, alert)
    return alerts


def run(state: AlertState, s: Snapshot, at: dt.datetime) -> list[tuple[str, bool]]:
    return [(a.kind, a.recovered) for a in due(state, s, at)]


# --- pure rules ---------------------------------------------------------------------------------


def test_token_rejected_alerts_once_repeats_after_the_window_and_recovers() -> None:
    st = AlertState(started_at=T0)
    paused = snap(auth_paused="HTTP 401: token recusado")
    assert run(st, paused, T0) == [(KIND_TOKEN, False)]
    assert run(st, snap(auth_paused="HTTP 401", last_poll=T0 + 30 * MIN), T0 + 30 * MIN) == []
    again = due(st, snap(auth_paused="x", last_poll=T0 + 61 * MIN), T0 + 61 * MIN)
    assert [(a.kind, a.recovered) for a in again] == [(KIND_TOKEN, False)]
    assert "(continua)" in again[0].title
    [rec] = due(st, snap(last_poll=T0 + 62 * MIN), T0 + 62 * MIN)
    assert rec.recovered and rec.kind == KIND_TOKEN and "Resolvido" in rec.title
    assert run(st, snap(last_poll=T0 + 63 * MIN), T0 + 63 * MIN) == []


def test_a_flapping_condition_is_rate_limited_per_kind() -> None:
    st = AlertState(started_at=T0)
    assert run(st, snap(auth_paused="x"), T0) == [(KIND_TOKEN, False)]
    assert run(st, snap(), T0 + MIN) == [(KIND_TOKEN, True)]
    # Back inside the window: no new alert, and so no recovery either.
    assert run(st, snap(auth_paused="x", last_poll=T0 + 2 * MIN), T0 + 2 * MIN) == []
    assert run(st, snap(last_poll=T0 + 3 * MIN), T0 + 3 * MIN) == []
    # Still on when the window has passed: announced then.
    assert run(st, snap(auth_paused="x", last_poll=T0 + 4 * MIN), T0 + 4 * MIN) == []
    assert run(st, snap(auth_paused="x", last_poll=T0 + 60 * MIN), T0 + 60 * MIN) == [
        (KIND_TOKEN, False)]


def test_no_successful_poll_counts_from_start_and_recovers_on_the_next_poll() -> None:
    st = AlertState(started_at=T0)
    assert run(st, snap(last_poll=None), T0 + 9 * MIN) == []
    [alert] = due(st, snap(last_poll=None), T0 + 10 * MIN)
    assert alert.kind == KIND_NO_POLL and "10 min" in alert.title
    assert run(st, snap(last_poll=T0 + 11 * MIN), T0 + 11 * MIN) == [(KIND_NO_POLL, True)]


def test_alert_times_are_the_labs_clock() -> None:
    rules = Rules(no_poll_s=600, oldest_waiting_s=1800, repeat_s=3600,
                  tz=ZoneInfo("America/Sao_Paulo"))
    st = AlertState(started_at=T0)
    [alert] = due(st, snap(last_poll=T0), T0 + 10 * MIN, rules)
    assert "desde 01/07/2026 08:00:00 (limite: 10 min)" in alert.message  # T0 is 11:00 UTC
    assert alert.as_json()["quando"] == "2026-07-01T08:10:00-03:00"


def test_oldest_waiting_order_alerts_past_the_threshold() -> None:
    st = AlertState(started_at=T0)
    old = T0 - 29 * MIN
    assert run(st, snap(oldest_waiting=old), T0) == []
    assert run(st, snap(oldest_waiting=old), T0 + MIN) == [(KIND_OLDEST_WAITING, False)]
    assert run(st, snap(oldest_waiting=T0, last_poll=T0 + 2 * MIN), T0 + 2 * MIN) == [
        (KIND_OLDEST_WAITING, True)]


def test_dead_letters_are_grouped_rate_limited_and_recover_when_none_is_left() -> None:
    st = AlertState(started_at=T0)
    [first] = due(st, snap(dead={(1, 1): 501}), T0)
    assert first.kind == KIND_DEAD_LETTER and "501" in first.message
    # Two more inside the window: held back, then sent together.
    two_more = {(1, 1): 501, (2, 1): 502, (3, 4): 503}
    assert run(st, snap(dead=two_more, last_poll=T0 + 5 * MIN), T0 + 5 * MIN) == []
    [grouped] = due(st, snap(dead=two_more, last_poll=T0 + 60 * MIN), T0 + 60 * MIN)
    assert "2 pedido(s)" in grouped.title and "502, 503" in grouped.message
    assert "total aguardando ação: 3" in grouped.message
    # Order 1 requeued and dead again (one more attempt): a new dead letter.
    again = {(1, 2): 501, (2, 1): 502, (3, 4): 503}
    assert run(st, snap(dead=again, last_poll=T0 + 121 * MIN), T0 + 121 * MIN) == [
        (KIND_DEAD_LETTER, False)]
    assert run(st, snap(dead={}, last_poll=T0 + 122 * MIN), T0 + 122 * MIN) == [
        (KIND_DEAD_LETTER, True)]


def test_an_alert_not_delivered_is_due_again_until_a_channel_takes_it() -> None:
    st = AlertState(started_at=T0)
    dead = snap(dead={(1, 1): 501}, auth_paused="401")
    first = evaluate(st, dead, now=T0, rules=RULES)  # no channel took them
    assert [(a.kind, a.dead) for a in first] == [(KIND_TOKEN, frozenset()),
                                                 (KIND_DEAD_LETTER, frozenset({(1, 1)}))]
    again = evaluate(st, dead, now=T0 + MIN, rules=RULES)
    assert [(a.kind, a.message) for a in again] == [(a.kind, a.message) for a in first]
    assert "(continua)" not in again[0].title  # nothing of this episode was announced yet
    for alert in again:
        commit(st, alert)
    assert evaluate(st, dead, now=T0 + 2 * MIN, rules=RULES) == []
    # A recovery that no channel took is due again too.
    clear = snap(last_poll=T0 + 3 * MIN)
    assert run(st, clear, T0 + 3 * MIN) == [(KIND_TOKEN, True), (KIND_DEAD_LETTER, True)]
    st2 = AlertState(started_at=T0)
    run(st2, dead, T0)
    assert len(evaluate(st2, clear, now=T0 + 3 * MIN, rules=RULES)) == 2
    assert len(evaluate(st2, clear, now=T0 + 4 * MIN, rules=RULES)) == 2


def test_an_unreadable_store_neither_alerts_nor_recovers_its_conditions() -> None:
    st = AlertState(started_at=T0)
    assert run(st, snap(dead={(1, 1): 7}), T0) == [(KIND_DEAD_LETTER, False)]
    blind = snap(dead=None, oldest_waiting=None, store_ok=False, last_poll=T0 + MIN)
    assert run(st, blind, T0 + MIN) == []
    assert st.kinds[KIND_DEAD_LETTER].active


def test_a_standby_monitor_stays_quiet_and_counts_no_poll_from_its_takeover() -> None:
    st = AlertState(started_at=T0)
    standby = snap(last_poll=None, dead={(1, 1): 9}, oldest_waiting=T0 - 600 * MIN,
                   sending=False)
    assert run(st, standby, T0 + 120 * MIN) == []
    took_over = snap(last_poll=None, dead={}, sending=True)
    assert run(st, took_over, T0 + 125 * MIN) == []
    assert run(st, took_over, T0 + 130 * MIN) == [(KIND_NO_POLL, False)]


# --- real channels ------------------------------------------------------------------------------


class Hook:
    """A loopback webhook receiver (a real HTTP server).

    ``statuses``: the answers to the first POSTs, in order; 200 after them.
    """

    def __init__(self, statuses: tuple[int, ...] = ()) -> None:
        received: list[dict[str, Any]] = []
        self.received = received
        plan = list(statuses)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append(json.loads(body))
                self.send_response(plan.pop(0) if plan else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerta?chave=s3gr3d0"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


class SmtpSink:
    """A minimal SMTP server on loopback that keeps each message and the AUTH PLAIN login."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.logins: list[str] = []
        sink = self

        class Handler(socketserver.StreamRequestHandler):
            def reply(self, line: str) -> None:
                self.wfile.write(line.encode() + b"\r\n")

            def handle(self) -> None:
                self.reply("220 sink ESMTP")
                while True:
                    line = self.rfile.readline()
                    if not line:
                        return
                    cmd = line.decode().strip()
                    verb = cmd.split(" ", 1)[0].upper()
                    if verb == "EHLO":
                        self.reply("250-sink")
                        self.reply("250 AUTH PLAIN")
                    elif verb == "AUTH":
                        raw = base64.b64decode(cmd.split()[2]).split(b"\0")
                        sink.logins.append(f"{raw[1].decode()}:{raw[2].decode()}")
                        self.reply("235 ok")
                    elif verb == "DATA":
                        self.reply("354 go")
                        data = b""
                        while not data.endswith(b"\r\n.\r\n"):
                            chunk = self.rfile.readline()
                            if not chunk:
                                return
                            data += chunk
                        sink.messages.append(message_from_bytes(data[:-5]))
                        self.reply("250 queued")
                    elif verb == "QUIT":
                        self.reply("221 bye")
                        return
                    else:  # MAIL, RCPT, RSET, NOOP
                        self.reply("250 ok")

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    s = SmtpSink()
    yield s
    s.close()


def an_alert() -> Alert:
    return Alert(KIND_TOKEN, False, "[Bemsoft Monitor] ALERTA: token recusado pela Bemsoft",
                 "O envio está PAUSADO.", T0)


def test_webhook_receives_the_alert_as_json(hook: Hook) -> None:
    WebhookChannel(hook.url).send(an_alert())
    [body] = hook.received
    assert body["tipo"] == "token" and body["situacao"] == "alerta"
    assert body["titulo"].startswith("[Bemsoft Monitor] ALERTA")
    assert "PAUSADO" in body["text"]


def test_email_is_sent_through_smtp_with_login(smtp: SmtpSink) -> None:
    EmailChannel(host="127.0.0.1", port=smtp.port, recipients=["ti@lab.com.br", "b@lab.com.br"],
                 sender="monitor@lab.com.br", security="none", user="monitor",
                 password="senha-smtp").send(an_alert())  # noqa: S106
    [msg] = smtp.messages
    assert msg["Subject"] == "[Bemsoft Monitor] ALERTA: token recusado pela Bemsoft"
    assert msg["To"] == "ti@lab.com.br, b@lab.com.br"
    assert "PAUSADO" in msg.get_payload(decode=True).decode()  # type: ignore[union-attr]
    assert smtp.logins == ["monitor:senha-smtp"]
    assert msg["Date"] == "Wed, 01 Jul 2026 11:00:00 +0000"
    assert msg["Message-ID"].endswith("@lab.com.br>")


def test_a_failing_channel_is_logged_without_its_secret_and_the_others_still_get_it(
    hook: Hook, caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    secret_url = f"http://127.0.0.1:{dead_port}/hook?token=muito-secreto-42"
    alerter = Alerter(rules=RULES, channels=[WebhookChannel(secret_url, timeout_s=2),
                                              WebhookChannel(hook.url)],
                      now=lambda: T0, snapshot=lambda: snap(auth_paused="401"),
                      secrets=(secret_url,))
    with caplog.at_level(logging.INFO, logger="bemsoft_monitor.alerts"):
        assert [a.kind for a in alerter.check()] == [KIND_TOKEN]
    assert len(hook.received) == 1
    assert "alerta não entregue por webhook" in caplog.text
    assert "muito-secreto-42" not in caplog.text


def test_monitor_conditions_reach_the_webhook_and_the_recovery_follows(
    tmp_path: Path, sim: Simulator, hook: Hook, smtp: SmtpSink,
) -> None:
    url = f"sqlite:///{(tmp_path / 'lis.db').as_posix()}"
    lis = Lis(url)
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE")
    sim.set_faults([{"kind": "status", "status": 422}])
    s = make_settings(url, tmp_path, sim, alert_webhook_url=hook.url,
                      smtp_host="127.0.0.1", smtp_port=smtp.port, smtp_security="none",
                      alert_email_to="ti@lab.com.br", alert_repeat_minutes=60)
    clock = FakeClock()
    monitor, _ = make_monitor(s, clock)
    alerter = build_alerter(s, monitor)
    assert alerter is not None
    drive(monitor, clock)
    alerter.check()
    assert [(b["tipo"], b["situacao"]) for b in hook.received] == [("dead_letter", "alerta")]
    assert "solicitações: 1" in hook.received[0]["mensagem"]
    assert "MARIA" not in json.dumps(hook.received)
    assert smtp.messages[0]["Subject"].startswith("[Bemsoft Monitor] ALERTA: 1 pedido")
    # The token is revoked: sending pauses and the alert says so.
    sim.set_token("novo-token")
    lis.requisition(2)
    lis.item(2, "FE")
    monitor.cycle(drain=True)
    assert monitor.auth_paused
    assert monitor_snapshot(monitor).auth_paused
    alerter.check()
    assert hook.received[-1]["tipo"] == "token"
    # Dead letter requeued and delivered, token fixed: both recover.
    [dead] = monitor.store.orders_by_state("dead")
    monitor.store.requeue_order(dead.order_id, now=clock.now(), new_generation=False)
    sim.set_token(s.token)
    clock.advance(s.bemsoft_breaker_seconds + 1)
    drive(monitor, clock)
    assert not monitor.auth_paused
    alerter.check()
    recovered = {b["tipo"] for b in hook.received if b["situacao"] == "recuperado"}
    assert recovered == {"dead_letter", "token"}
    assert len(smtp.messages) == len(hook.received)
    monitor.close()
    lis.dispose()


def test_a_dead_letter_alert_the_webhook_refused_is_sent_again_at_the_next_check(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hook = Hook(statuses=(503,))
    clock = FakeClock()
    try:
        alerter = Alerter(rules=RULES, channels=[WebhookChannel(hook.url)], now=clock.now,
                          snapshot=lambda: snap(dead={(7, 3): 1234}, last_poll=clock.now()))
        with caplog.at_level(logging.WARNING, logger="bemsoft_monitor.alerts"):
            alerter.check()  # answered 503: nobody was told
        assert [b["tipo"] for b in hook.received] == ["dead_letter"]
        assert alerter.sent == []
        assert "alerta dead_letter não entregue por nenhum canal" in caplog.text
        clock.advance(30)  # the next check, well inside ALERT_REPEAT_MINUTES
        alerter.check()
        assert [b["tipo"] for b in hook.received] == ["dead_letter", "dead_letter"]
        assert hook.received[1]["mensagem"] == hook.received[0]["mensagem"]
        assert "solicitações: 1234" in hook.received[1]["mensagem"]
        assert [a.kind for a in alerter.sent] == ["dead_letter"]
        clock.advance(30)
        alerter.check()  # delivered once: not repeated
        assert len(hook.received) == 2
    finally:
        hook.close()


def test_no_alerter_without_webhook_or_smtp(tmp_path: Path) -> None:
    s = make_settings("sqlite://", tmp_path)
    monitor, _ = make_monitor(s)
    assert build_alerter(s, monitor) is None


def test_the_alerter_thread_checks_periodically_and_stops(hook: Hook) -> None:
    checked = threading.Event()

    def snapshot() -> Snapshot:
        checked.set()
        return snap(auth_paused="401")

    alerter = Alerter(rules=RULES, channels=[WebhookChannel(hook.url)], now=lambda: T0,
                      snapshot=snapshot, check_s=0.02)
    alerter.start()
    assert checked.wait(5)
    alerter.stop()
    assert len(hook.received) == 1  # rate-limited: the clock does not move


def test_cli_run_sends_the_dead_letter_alert_to_the_webhook(
    tmp_path: Path, sim: Simulator, hook: Hook,
) -> None:
    lis = Lis(f"sqlite:///{(tmp_path / 'lis.db').as_posix()}")
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE")
    lis.dispose()
    sim.set_faults([{"kind": "status", "status": 422}])
    write_env(tmp_path, sim, ALERT_WEBHOOK_URL=hook.url, ALERT_CHECK_SECONDS="1")
    proc = subprocess.Popen(cli("run"), cwd=tmp_path, env=env_for(tmp_path),
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not hook.received and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert [(b["tipo"], b["situacao"]) for b in hook.received] == [("dead_letter", "alerta")]
    assert "alerta dead_letter" in err
    assert "s3gr3d0" not in err  # the webhook URL's secret never reaches the log
