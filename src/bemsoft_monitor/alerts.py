"""Alerts by webhook and e-mail: token rejected, dead letters, no poll, an order waiting too long.

The decision of what to send is :func:`evaluate`, a pure function of the previous state, a
snapshot of the monitor and the time; the channels only deliver. What an alert announced is
recorded by :func:`commit` only once a channel delivered it, so an alert that no channel
took is produced again at the next check. Each kind is rate-limited (``ALERT_REPEAT_MINUTES``)
and a recovery message follows an alert whose condition cleared.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import logging
import smtplib
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import requests
import sqlalchemy as sa

from .procutil import hostname
from .redact import redact_secrets
from .store import ORDER_DEAD

if TYPE_CHECKING:
    from .config import Settings
    from .engine import Monitor

__all__ = [
    "KIND_DEAD_LETTER",
    "KIND_NO_POLL",
    "KIND_OLDEST_WAITING",
    "KIND_TOKEN",
    "Alert",
    "AlertState",
    "Alerter",
    "EmailChannel",
    "Rules",
    "Snapshot",
    "WebhookChannel",
    "build_alerter",
    "commit",
    "evaluate",
    "monitor_snapshot",
]

log = logging.getLogger(__name__)

KIND_TOKEN = "token"  # noqa: S105 - an alert kind, not a secret
KIND_DEAD_LETTER = "dead_letter"
KIND_NO_POLL = "no_poll"
KIND_OLDEST_WAITING = "oldest_waiting"
KINDS = (KIND_TOKEN, KIND_DEAD_LETTER, KIND_NO_POLL, KIND_OLDEST_WAITING)
PREFIX = "[Bemsoft Monitor]"


@dataclass(frozen=True)
class Rules:
    """Thresholds and the per-kind repeat interval, in seconds."""

    no_poll_s: float
    oldest_waiting_s: float
    repeat_s: float
    # The lab's time zone: times in the messages are the lab's clock, not UTC.
    tz: dt.tzinfo = dt.timezone.utc


@dataclass(frozen=True)
class Snapshot:
    """What the alert rules look at; ``None`` in a store field means 'could not be read'."""

    auth_paused: str | None
    last_poll: dt.datetime | None
    # (order id, attempts) -> requisition, for every order in the dead-letter state.
    dead: dict[tuple[int, int], int] | None
    oldest_waiting: dt.datetime | None
    store_ok: bool = True
    # False on a standby monitor (another one holds the lease): it neither reads nor sends,
    # and the active one reports the shared conditions.
    sending: bool = True


@dataclass(frozen=True)
class Alert:
    """One message to deliver."""

    kind: str
    recovered: bool
    title: str
    message: str
    at: dt.datetime
    # The dead letters (order id, attempts) a dead-letter alert announces.
    dead: frozenset[tuple[int, int]] = frozenset()

    def as_json(self) -> dict[str, Any]:
        """Body of the webhook POST (``text`` also suits Slack/Teams/Google Chat hooks)."""
        return {
            "tipo": self.kind,
            "situacao": "recuperado" if self.recovered else "alerta",
            "titulo": self.title,
            "mensagem": self.message,
            "quando": self.at.isoformat(timespec="seconds"),
            "monitor": hostname(),
            "text": f"{self.title}\n{self.message}",
        }


@dataclass
class KindState:
    """Per kind: is the condition on, was this episode announced, when was the last message.

    ``notified`` and ``last_sent`` change only through :func:`commit` (a delivered alert).
    """

    active: bool = False
    notified: bool = False
    last_sent: dt.datetime | None = None


@dataclass
class AlertState:
    """Everything :func:`evaluate` remembers between checks."""

    started_at: dt.datetime
    kinds: dict[str, KindState] = field(default_factory=lambda: {k: KindState() for k in KINDS})
    # Dead letters already announced by a delivered alert.
    seen_dead: set[tuple[int, int]] = field(default_factory=set)


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value


def _when(value: dt.datetime, tz: dt.tzinfo) -> str:
    """A time as the lab reads it: 01/07/2026 08:00:00."""
    return value.astimezone(tz).strftime("%d/%m/%Y %H:%M:%S")


def _minutes(seconds: float) -> str:
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes >= 1 else f"{seconds:.0f} s"


def _may_send(ks: KindState, now: dt.datetime, rules: Rules) -> bool:
    return ks.last_sent is None or (now - ks.last_sent).total_seconds() >= rules.repeat_s


def _level(
    ks: KindState, *, active: bool, now: dt.datetime, rules: Rules,
    alert: Callable[[bool], Alert], recovery: Callable[[], Alert],
) -> list[Alert]:
    """A condition that is on or off: alert (rate-limited, repeated while on), then recovery.

    Until a channel delivers it, the same alert (or recovery) is due again at every check.
    """
    ks.active = active
    if active:
        return [alert(ks.notified)] if _may_send(ks, now, rules) else []
    return [recovery()] if ks.notified else []


def commit(state: AlertState, alert: Alert) -> None:
    """Record in ``state`` that ``alert`` reached someone (called after a successful delivery)."""
    ks = state.kinds[alert.kind]
    if alert.recovered:
        ks.notified = False
        return
    ks.notified = True
    ks.last_sent = alert.at
    state.seen_dead |= alert.dead


def evaluate(state: AlertState, snap: Snapshot, *, now: dt.datetime, rules: Rules) -> list[Alert]:
    """The alerts and recoveries due now.

    ``state`` only follows the conditions here; what was announced is recorded by
    :func:`commit` once an alert is delivered.
    """
    now = _aware(now) or now
    out: list[Alert] = []
    if not snap.sending:
        state.started_at = now  # the no-poll clock starts when this monitor takes over
        return out

    def make(kind: str, title: str, message: str, *, recovered: bool = False,
             dead: frozenset[tuple[int, int]] = frozenset()) -> Alert:
        word = "Resolvido" if recovered else "ALERTA"
        return Alert(kind, recovered, f"{PREFIX} {word}: {title}", message,
                     now.astimezone(rules.tz), dead)

    # Token rejected: sending is paused until the token works again.
    reason = snap.auth_paused
    out += _level(
        state.kinds[KIND_TOKEN], active=reason is not None, now=now, rules=rules,
        alert=lambda again: make(KIND_TOKEN, "token recusado pela Bemsoft" + (
            " (continua)" if again else ""),
            f"{redact_secrets(reason or '')}. O envio está PAUSADO; os pedidos ficam guardados "
            "e o envio volta sozinho quando o token for aceito. Corrija BEMSOFT_TOKEN no .env "
            "e reinicie o monitor."),
        recovery=lambda: make(KIND_TOKEN, "token aceito novamente",
                              "A Bemsoft voltou a aceitar o token; os envios foram retomados.",
                              recovered=True),
    )

    # No successful poll of the LIS for too long (counted from start when none yet).
    last = _aware(snap.last_poll) or state.started_at
    quiet_s = (now - last).total_seconds()
    out += _level(
        state.kinds[KIND_NO_POLL], active=quiet_s >= rules.no_poll_s, now=now, rules=rules,
        alert=lambda again: make(KIND_NO_POLL, "o LIS não é lido há " + _minutes(quiet_s) + (
            " (continua)" if again else ""),
            f"Nenhuma leitura bem-sucedida do banco do LIS desde "
            f"{_when(last, rules.tz)} (limite: {_minutes(rules.no_poll_s)}). "
            "Verifique se o SQL Server está acessível e veja o log do monitor."),
        recovery=lambda: make(KIND_NO_POLL, "leitura do LIS normalizada",
                              "O monitor voltou a ler o banco do LIS.", recovered=True),
    )

    if snap.store_ok:
        oldest = _aware(snap.oldest_waiting)
        wait_s = (now - oldest).total_seconds() if oldest is not None else 0.0
        out += _level(
            state.kinds[KIND_OLDEST_WAITING], active=oldest is not None
            and wait_s >= rules.oldest_waiting_s, now=now, rules=rules,
            alert=lambda again: make(
                KIND_OLDEST_WAITING,
                "pedido esperando envio há " + _minutes(wait_s) + (" (continua)" if again else ""),
                f"O pedido mais antigo da fila espera há {_minutes(wait_s)} (limite: "
                f"{_minutes(rules.oldest_waiting_s)}). A Bemsoft pode estar fora do ar ou "
                "recusando os envios; veja o painel e o log."),
            recovery=lambda: make(KIND_OLDEST_WAITING, "fila de envio normalizada",
                                  "Nenhum pedido espera além do limite.", recovered=True),
        )
        if snap.dead is not None:
            out += _dead_letters(state, snap.dead, now=now, rules=rules, make=make)
    return out


def _dead_letters(
    state: AlertState, dead: dict[tuple[int, int], int], *, now: dt.datetime, rules: Rules,
    make: Callable[..., Alert],
) -> list[Alert]:
    """Event-like: new dead letters (rate-limited, grouped); recovery when none is left.

    A dead letter counts as announced only once an alert naming it was delivered.
    """
    ks = state.kinds[KIND_DEAD_LETTER]
    ks.active = bool(dead)
    state.seen_dead &= set(dead)
    new = sorted(set(dead) - state.seen_dead)
    if new and _may_send(ks, now, rules):
        reqs = sorted({dead[k] for k in new})
        shown = ", ".join(str(r) for r in reqs[:20]) + (" …" if len(reqs) > 20 else "")
        return [make(
            KIND_DEAD_LETTER, f"{len(new)} pedido(s) não enviado(s) (FAILED_DIR)",
            f"{len(new)} pedido(s) foram recusados ou esgotaram as tentativas e estão em "
            f"FAILED_DIR (solicitações: {shown}); total aguardando ação: {len(dead)}. Corrija "
            "a causa e use Reenviar no painel ou o comando retry.", dead=frozenset(new))]
    if not dead and ks.notified:
        return [make(KIND_DEAD_LETTER, "nenhum pedido em FAILED_DIR aguardando ação",
                     "Todos os pedidos não enviados foram reenviados ou marcados como "
                     "resolvidos.", recovered=True)]
    return []


# --- snapshot of a running monitor ---------------------------------------------------


def monitor_snapshot(monitor: Monitor) -> Snapshot:
    """Read the monitor's own state and the store (a store error leaves its part unknown)."""
    store = monitor.store
    o = store.orders
    try:
        with store.engine.connect() as conn:
            rows = conn.execute(sa.select(o.c.OrderId, o.c.Attempts, o.c.RequisitionId)
                                .where(o.c.State == ORDER_DEAD)).all()
        dead = {(int(r.OrderId), int(r.Attempts)): int(r.RequisitionId) for r in rows}
        oldest = store.oldest_waiting()
        ok = True
    except sa.exc.SQLAlchemyError:
        dead, oldest, ok = None, None, False
    return Snapshot(auth_paused=monitor.auth_paused, last_poll=monitor.last_successful_poll,
                    dead=dead, oldest_waiting=oldest, store_ok=ok,
                    sending=monitor.lease_held)


# --- channels ----------------------------------------------------------------------------


class Channel(Protocol):
    """Somewhere an alert is delivered; raises on failure."""

    name: str

    def send(self, alert: Alert) -> None: ...


class WebhookChannel:
    """POST the alert as JSON."""

    name = "webhook"

    def __init__(self, url: str, *, timeout_s: float = 10.0) -> None:
        self.url = url
        self.timeout_s = timeout_s

    def send(self, alert: Alert) -> None:
        # The URL may carry a secret (chat hooks do): errors name only the host.
        host = urlsplit(self.url).hostname
        try:
            resp = requests.post(self.url, json=alert.as_json(), timeout=self.timeout_s,
                                 allow_redirects=False)
        except requests.RequestException as exc:
            raise RuntimeError(f"{type(exc).__name__} ao chamar {host}") from None
        if resp.status_code >= 300:
            raise RuntimeError(f"{host} respondeu HTTP {resp.status_code}")


class EmailChannel:
    """Send the alert by SMTP (STARTTLS, SSL or plain, with optional login)."""

    name = "e-mail"

    def __init__(
        self, *, host: str, port: int, recipients: Sequence[str], sender: str,
        security: str = "starttls", user: str | None = None, password: str | None = None,
        timeout_s: float = 15.0,
    ) -> None:
        self.host, self.port = host, port
        self.recipients = list(recipients)
        self.sender = sender
        self.security = security
        self.user, self.password = user, password
        self.timeout_s = timeout_s

    def send(self, alert: Alert) -> None:
        msg = EmailMessage()
        msg["Subject"] = alert.title
        msg["From"] = self.sender
        msg["To"] = ", ".join(self.recipients)
        # Without these, many mail servers score the message as spam.
        msg["Date"] = email.utils.format_datetime(alert.at)
        msg["Message-ID"] = email.utils.make_msgid(domain=self.sender.rpartition("@")[2] or None)
        msg.set_content(f"{alert.message}\n\nMonitor: {hostname()}\nQuando: "
                        f"{alert.at.strftime('%d/%m/%Y %H:%M:%S')} (horário do "
                        "laboratório)\n")
        context = ssl.create_default_context()
        smtp: smtplib.SMTP
        if self.security == "ssl":
            smtp = smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout_s, context=context)
        else:
            smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout_s)
        with smtp:
            if self.security == "starttls":
                smtp.starttls(context=context)
            if self.user:
                smtp.login(self.user, self.password or "")
            smtp.send_message(msg)


# --- the alerter ---------------------------------------------------------------------------


class Alerter:
    """Checks the rules every ``check_s`` seconds and delivers through every channel."""

    def __init__(
        self, *, rules: Rules, channels: Sequence[Channel], now: Callable[[], dt.datetime],
        snapshot: Callable[[], Snapshot], check_s: float = 30.0,
        secrets: tuple[str, ...] = (),
    ) -> None:
        self.rules = rules
        self.channels = list(channels)
        self.now = now
        self.snapshot = snapshot
        self.check_s = check_s
        self.secrets = secrets
        self.state = AlertState(started_at=_aware(now()) or now())
        self.sent: list[Alert] = []  # delivered by at least one channel
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def check(self) -> list[Alert]:
        """Evaluate once and deliver what is due; return the alerts produced.

        An alert is recorded as sent only when a channel took it; otherwise the next check
        produces it again.
        """
        try:
            snap = self.snapshot()
        except Exception as exc:
            log.warning("alertas: não foi possível ler o estado do monitor: %s", exc)
            return []
        alerts = evaluate(self.state, snap, now=self.now(), rules=self.rules)
        for alert in alerts:
            if self.deliver(alert):
                commit(self.state, alert)
        return alerts

    def deliver(self, alert: Alert) -> bool:
        """Send one alert through every channel; True when at least one channel took it.

        A failing channel is logged, not raised. Without channels the log line is the alert.
        """
        level = logging.INFO if alert.recovered else logging.WARNING
        log.log(level, "alerta %s: %s", alert.kind, alert.title)
        delivered = not self.channels
        for channel in self.channels:
            try:
                channel.send(alert)
            except Exception as exc:
                log.error("alerta não entregue por %s: %s", channel.name,
                          redact_secrets(str(exc) or type(exc).__name__, self.secrets)[:300])
            else:
                delivered = True
        if delivered:
            self.sent.append(alert)
        else:
            log.warning("alerta %s não entregue por nenhum canal; nova tentativa na próxima "
                        "verificação (em %.0f s)", alert.kind, self.check_s)
        return delivered

    def start(self) -> None:
        """Check in a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="alertas", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.check_s):
            self.check()

    def stop(self) -> None:
        """Stop the checking thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def build_alerter(settings: Settings, monitor: Monitor) -> Alerter | None:
    """The alerter configured by ALERT_WEBHOOK_URL / SMTP_*, or None when none is set."""
    channels: list[Channel] = []
    if settings.alert_webhook_url:
        channels.append(WebhookChannel(settings.alert_webhook_url))
    if settings.smtp_host and settings.alert_emails:
        channels.append(EmailChannel(
            host=settings.smtp_host, port=settings.smtp_port, recipients=settings.alert_emails,
            sender=settings.smtp_from or f"bemsoft-monitor@{hostname()}",
            security=settings.smtp_security, user=settings.smtp_user,
            password=settings.smtp_password.get_secret_value() if settings.smtp_password
            else None))
    if not channels:
        return None
    rules = Rules(no_poll_s=settings.alert_no_poll_minutes * 60,
                  oldest_waiting_s=settings.alert_oldest_waiting_minutes * 60,
                  repeat_s=settings.alert_repeat_minutes * 60, tz=settings.lab_tz)
    return Alerter(rules=rules, channels=channels, now=monitor.clock.now,
                   snapshot=lambda: monitor_snapshot(monitor),
                   check_s=settings.alert_check_seconds, secrets=settings.secrets)
