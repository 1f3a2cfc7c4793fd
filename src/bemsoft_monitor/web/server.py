"""The HTTP endpoint: /healthz, /readyz, /metrics and the painel, on a stdlib threading server.

Security: the painel needs ``PAINEL_TOKEN`` (or ``PAINEL_USER``/``PAINEL_PASSWORD``);
without them only the health and metrics endpoints answer. ``PAINEL_PII_TOKEN`` is a second
credential whose sessions see patient data unmasked. A login gives an HttpOnly,
SameSite=Strict session cookie; every POST carries the session's CSRF token; secrets are
compared in constant time and never rendered. Wrong logins are slowed down per address, but
the right credential always gets in (behind a reverse proxy every browser shares one address).
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import sqlalchemy as sa
from jinja2 import Environment, FileSystemLoader, select_autoescape
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__
from ..oserrors import os_error_text
from .views import Painel, item_exists

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent
SESSION_COOKIE = "bm_sessao"
LOGIN_COOKIE = "bm_login"
SESSION_TTL_S = 8 * 3600
MAX_FORM_BYTES = 64 * 1024
LOGIN_FAILURES_MAX = 10
LOGIN_FAILURE_WINDOW_S = 300.0
# Past LOGIN_FAILURES_MAX, an address's logins are checked one at a time after this pause:
# at most one guess per pause, however many connections a guesser opens.
LOGIN_THROTTLE_DELAY_S = 1.0
PII_TOKEN_USER = "token-pii"  # noqa: S105 - the name shown for PAINEL_PII_TOKEN sessions
_DIGITS = re.compile(r"^[0-9]{1,18}$")
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class HttpBindError(Exception):
    """The HTTP address cannot be bound (port taken, address not on this machine)."""


def parse_addr(addr: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:port`` for IPv6), ``:port`` or ``port`` → (host, port).

    Without a host the painel stays on this computer (127.0.0.1).
    """
    host, _, port = addr.strip().rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise HttpBindError(f"endereço {addr.strip()!r} inválido; use host:porta ou só a porta "
                            "(1 a 65535), ex.: 127.0.0.1:8765 ou 8765")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and 'localhost' are loopback; anything else is exposed."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, url: str) -> str | None:
    """The log warning for a painel reachable from the network (None on loopback)."""
    if is_loopback(host):
        return None
    return (f"painel exposto na rede em {url} sem TLS: o token e os dados trafegam sem "
            "criptografia; prefira 127.0.0.1 ou coloque um proxy reverso com HTTPS na frente")


@dataclass
class Session:
    """One logged-in browser."""

    user: str
    csrf: str
    expires: float
    flash: list[tuple[str, str]] = field(default_factory=list)
    # Opened with PAINEL_PII_TOKEN: this session sees patient data unmasked.
    pii: bool = False


@dataclass(frozen=True)
class Credential:
    """Who logged in, and whether that credential grants patient data."""

    user: str
    pii: bool = False


class Auth:
    """Credentials, sessions and login throttling (in memory: a restart logs everyone out)."""

    def __init__(self, *, token: str | None, user: str | None, password: str | None,
                 pii_token: str | None = None,
                 throttle_delay_s: float = LOGIN_THROTTLE_DELAY_S) -> None:
        self.token = token
        self.user = user
        self.password = password
        self.pii_token = pii_token
        self.throttle_delay_s = throttle_delay_s
        self.sessions: dict[str, Session] = {}
        self.failures: dict[str, list[float]] = {}
        self.lock = threading.Lock()
        self._slow_lane = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.token or self.pii_token or (self.user and self.password))

    @property
    def uses_token(self) -> bool:
        """The login form asks for a token (PAINEL_TOKEN or PAINEL_PII_TOKEN)."""
        return bool(self.token or self.pii_token)

    def check(self, form: dict[str, str]) -> Credential | None:
        """Who the form's credentials name when they are right, else None."""
        given_token = form.get("token", "")
        if self.uses_token and given_token:
            given = given_token.encode()
            # Both compared every time so that timing tells nothing about which one matched.
            plain = hmac.compare_digest(given, (self.token or "").encode()) and bool(self.token)
            pii = (hmac.compare_digest(given, (self.pii_token or "").encode())
                   and bool(self.pii_token))
            if pii:
                return Credential(PII_TOKEN_USER, pii=True)
            return Credential("token") if plain else None
        if self.user and self.password:
            u, p = form.get("usuario", ""), form.get("senha", "")
            ok_u = hmac.compare_digest(u.encode(), self.user.encode())
            ok_p = hmac.compare_digest(p.encode(), self.password.encode())
            return Credential(self.user) if ok_u and ok_p else None
        return None

    def login(self, form: dict[str, str], client: str) -> tuple[Credential | None, bool]:
        """Check a login form: (the credential or None, whether ``client`` is over the limit).

        The right credential always gets in; past the limit, the address's attempts wait
        their turn and a pause, so wrong guesses stay slow without locking anyone out.
        """
        over = self.throttled(client)
        if over:
            with self._slow_lane:
                time.sleep(self.throttle_delay_s)
                credential = self.check(form)
        else:
            credential = self.check(form)
        if credential is None:
            self.failed(client)
        else:
            with self.lock:
                self.failures.pop(client, None)
        return credential, over

    def throttled(self, client: str) -> bool:
        now = time.monotonic()
        with self.lock:
            recent = [t for t in self.failures.get(client, []) if now - t < LOGIN_FAILURE_WINDOW_S]
            self.failures[client] = recent
            return len(recent) >= LOGIN_FAILURES_MAX

    def failed(self, client: str) -> None:
        with self.lock:
            self.failures.setdefault(client, []).append(time.monotonic())

    def open(self, user: str, *, pii: bool = False) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        session = Session(user=user, csrf=secrets.token_urlsafe(32),
                          expires=time.monotonic() + SESSION_TTL_S, pii=pii)
        with self.lock:
            now = time.monotonic()
            for key in [k for k, s in self.sessions.items() if s.expires < now]:
                del self.sessions[key]
            self.sessions[sid] = session
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        with self.lock:
            session = self.sessions.get(sid)
            if session is None or session.expires < time.monotonic():
                self.sessions.pop(sid, None)
                return None
            return session

    def close(self, sid: str | None) -> None:
        if sid:
            with self.lock:
                self.sessions.pop(sid, None)


def _templates() -> Environment:
    # A plain folder loader: it also works inside the PyInstaller executable.
    env = Environment(loader=FileSystemLoader(str(WEB_DIR / "templates")),
                      autoescape=select_autoescape(["html"]), trim_blocks=True,
                      lstrip_blocks=True)
    env.globals["versao"] = __version__
    return env


class PainelServer:
    """The HTTP server in a daemon thread."""

    def __init__(self, painel: Painel, *, host: str, port: int) -> None:
        s = painel.settings
        self.painel = painel
        self.auth = Auth(
            token=s.painel_token.get_secret_value() if s.painel_token else None,
            user=s.painel_user,
            password=s.painel_password.get_secret_value() if s.painel_password else None,
            pii_token=s.painel_pii_token.get_secret_value() if s.painel_pii_token else None)
        self.templates = _templates()
        self.css = (WEB_DIR / "static" / "painel.css").read_bytes()
        self.gauges_stale = False
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_cls = type("_Server", (_Server,), {"address_family": family})
        try:
            self.httpd = server_cls((host, port), _Handler)
        except OSError as exc:
            raise HttpBindError(_bind_problem(host, port, exc)) from None
        self.httpd.painel_server = self
        self.host = host
        self.port = int(self.httpd.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> PainelServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever,
                                        kwargs={"poll_interval": 0.1}, name="painel",
                                        daemon=True)
        self._thread.start()
        log.info("painel e métricas em %s (/healthz, /readyz, /metrics)", self.url)
        if not self.auth.enabled:
            log.warning("painel DESLIGADO: defina PAINEL_TOKEN (ou PAINEL_USER e "
                        "PAINEL_PASSWORD) no .env; só /healthz, /readyz e /metrics respondem")
        warning = exposure_warning(self.host, self.url)
        if warning:
            log.warning(warning)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> PainelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _bind_problem(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (f"a porta {port} em {host} já está em uso (outro programa ou outro monitor); "
                "escolha outra porta em --http ou HTTP_ADDR, ex.: 127.0.0.1:8766")
    if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) or isinstance(exc, socket.gaierror):
        return (f"o endereço {host} não pertence a este computador; use 127.0.0.1 (só este "
                "computador) ou o IP de uma placa de rede local")
    if exc.errno == errno.EACCES:
        return (f"sem permissão para abrir a porta {port}; use uma porta acima de 1024, "
                "ex.: 8765")
    return f"não foi possível abrir {host}:{port}: {os_error_text(exc)}"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Linux refuses a second listener even with SO_REUSEADDR (it only skips TIME_WAIT);
    # Windows would let a second monitor steal the port, so it is off there.
    allow_reuse_address = os.name != "nt"
    painel_server: PainelServer


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "bemsoft-monitor"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = 30
    # The stdlib's own answers (malformed request, unsupported method) in Portuguese too.
    error_message_format = (
        '<!doctype html><html lang="pt-BR"><head><meta charset="utf-8"><title>Erro '
        '%(code)d</title></head><body><h1>Erro %(code)d</h1><p>O painel não entendeu esta '
        'requisição.</p><p><a href="/">Voltar à visão geral</a></p></body></html>')

    # --- plumbing ----------------------------------------------------------------------
    @property
    def app(self) -> PainelServer:
        return self.server.painel_server

    @property
    def painel(self) -> Painel:
        return self.app.painel

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in _SECURITY_HEADERS.items():
            self.send_header(k, v)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data, ensure_ascii=False).encode(),
                   "application/json; charset=utf-8")

    def _page(self, code: int, template: str, session: Session | None = None,
              headers: dict[str, str] | None = None, /, **ctx: Any) -> None:
        flash: list[tuple[str, str]] = []
        if session is not None:
            flash, session.flash = session.flash, []
        pii = self.painel.for_viewer(pii=session is not None and session.pii).show_pii
        html = self.app.templates.get_template(template).render(
            sessao=session, flash=flash, pii=pii,
            agora=self.painel.local(self.painel.now()), **ctx)
        self._send(code, html.encode("utf-8"), "text/html; charset=utf-8", headers)

    def _error(self, status: int, title: str, message: str,
               session: Session | None = None) -> None:
        self._page(status, "erro.html", session, titulo=title, mensagem=message,
                   codigo=status)

    def _redirect(self, location: str, headers: dict[str, str] | None = None) -> None:
        h = {"Location": location}
        h.update(headers or {})
        self._send(HTTPStatus.SEE_OTHER, b"", "text/plain; charset=utf-8", h)

    def _cookies(self) -> dict[str, str]:
        jar = SimpleCookie()
        try:
            jar.load(self.headers.get("Cookie", ""))
        except Exception:
            return {}
        return {k: v.value for k, v in jar.items()}

    def _session(self) -> Session | None:
        return self.app.auth.get(self._cookies().get(SESSION_COOKIE))

    def _form(self) -> dict[str, str] | int:
        """The posted form, or the HTTP status that refuses it (400 or 413)."""
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return HTTPStatus.BAD_REQUEST
        if length < 0:
            return HTTPStatus.BAD_REQUEST
        if length > MAX_FORM_BYTES:
            return HTTPStatus.REQUEST_ENTITY_TOO_LARGE
        raw = self.rfile.read(length).decode("utf-8", "replace")
        return {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}

    @staticmethod
    def _cookie(name: str, value: str, max_age: int | None = None) -> str:
        parts = [f"{name}={value}", "Path=/", "HttpOnly", "SameSite=Strict"]
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        return "; ".join(parts)

    # --- dispatch ------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def _answer(self, handle: Callable[[], None]) -> None:
        try:
            handle()
        except ConnectionError:
            # The browser went away (closed tab, client that stopped reading): nobody to tell.
            self.close_connection = True
        except Exception:
            log.exception("painel: erro ao responder %s", urlsplit(self.path).path)
            try:
                self._error(500, "Erro interno",
                            "O painel encontrou um erro; veja o log do monitor.")
            except ConnectionError:
                self.close_connection = True

    def _get(self) -> None:
        url = urlsplit(self.path)
        path = url.path
        if path == "/healthz":
            self._json(200, {"status": "ok", "versao": __version__})
            return
        if path == "/readyz":
            checks = self.painel.readiness()
            ok = all(c["ok"] for c in checks)
            self._json(200 if ok else 503, {"status": "pronto" if ok else "não pronto",
                                            "verificacoes": checks})
            return
        if path == "/metrics":
            self._metrics()
            return
        if path == "/static/painel.css":
            self._send(200, self.app.css, "text/css; charset=utf-8",
                       {"Cache-Control": "max-age=3600"})
            return
        if path == "/favicon.ico":
            self._send(404, b"", "text/plain; charset=utf-8")
            return
        if not self.app.auth.enabled:
            self._disabled()
            return
        if path == "/login":
            self._login_page(200)
            return
        session = self._session()
        if session is None:
            target = path + (f"?{url.query}" if url.query else "")
            self._redirect("/login?proximo=" + quote(target, safe=""))
            return
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        view = self.painel.for_viewer(pii=session.pii)
        if path == "/":
            self._page(200, "visao_geral.html", session, **view.overview())
        elif path == "/busca":
            numero = query.get("numero", "").strip()
            if not numero:
                self._error(400, "Número ausente",
                            "Informe o número da solicitação (CodSolicitacao), ex.: 12345.",
                            session)
                return
            if not _DIGITS.match(numero):
                self._error(400, "Número inválido",
                            f"“{numero}” não é um número de solicitação (CodSolicitacao); "
                            "use só algarismos, ex.: 12345.", session)
                return
            self._redirect(f"/requisicao/{int(numero)}")
        elif path.startswith("/requisicao/"):
            self._requisition(view, path.removeprefix("/requisicao/"), session)
        elif path == "/pendencias":
            self._page(200, "pendencias.html", session, **view.pending_work())
        elif path == "/catalogo":
            self._page(200, "catalogo.html", session, **view.catalog_problems())
        else:
            self._error(404, "Página não encontrada",
                        f"O endereço {path} não existe no painel.", session)

    def _disabled(self) -> None:
        self._error(503, "Painel desligado",
                    "Defina PAINEL_TOKEN (ou PAINEL_USER e PAINEL_PASSWORD) no .env e "
                    "reinicie o monitor. /healthz, /readyz e /metrics continuam respondendo.")

    def _metrics(self) -> None:
        monitor = self.painel.monitor
        try:
            monitor.refresh_gauges()
        except sa.exc.SQLAlchemyError:
            # Prometheus scrapes every few seconds: say it once per outage, not per scrape.
            if not self.app.gauges_stale:
                log.warning("métricas: banco de estado indisponível; os medidores da fila "
                            "mostram os últimos valores lidos")
            self.app.gauges_stale = True
        else:
            if self.app.gauges_stale:
                log.info("métricas: banco de estado disponível novamente")
            self.app.gauges_stale = False
        self._send(200, generate_latest(monitor.metrics.registry), CONTENT_TYPE_LATEST)

    def _requisition(self, view: Painel, raw: str, session: Session) -> None:
        if not _DIGITS.match(raw):
            self._error(400, "Número inválido",
                        f"“{raw}” não é um número de solicitação; use só algarismos.", session)
            return
        data = view.requisition(int(raw))
        if data is None:
            self._error(404, "Solicitação não encontrada",
                        f"A solicitação {int(raw)} não passou pelo monitor (nenhum item dela "
                        "foi lido para um laboratório de apoio).", session)
            return
        self._page(200, "requisicao.html", session, r=data)

    def _login_page(self, status: int, erro: str | None = None,
                    proximo: str | None = None) -> None:
        # Reuse the browser's nonce: a second tab (or the favicon request) must not
        # invalidate the form already on screen.
        nonce = self._cookies().get(LOGIN_COOKIE, "")
        if not re.fullmatch(r"[A-Za-z0-9_-]{32}", nonce):
            nonce = secrets.token_urlsafe(24)
        if proximo is None:
            proximo = parse_qs(urlsplit(self.path).query).get("proximo", ["/"])[0]
        auth = self.app.auth
        self._page(status, "login.html", None,
                   {"Set-Cookie": self._cookie(LOGIN_COOKIE, nonce, 600)},
                   csrf_login=nonce, erro=erro, proximo=_local_path(proximo),
                   usa_token=auth.uses_token, usa_pii=bool(auth.pii_token),
                   usa_usuario=bool(auth.user and auth.password))

    # --- POST --------------------------------------------------------------------------------
    def _post(self) -> None:
        path = urlsplit(self.path).path
        form = self._form()
        if isinstance(form, int):
            self.close_connection = True  # the unread body must not be taken for a request
            if form == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
                self._error(form, "Formulário grande demais",
                            f"O formulário passa de {MAX_FORM_BYTES // 1024} KB; o painel não "
                            "o aceita.")
            else:
                self._error(form, "Formulário inválido",
                            "O cabeçalho Content-Length do formulário é inválido.")
            return
        if not self.app.auth.enabled:
            self._disabled()
            return
        if path == "/login":
            self._login(form)
            return
        session = self._session()
        if session is None:
            self._error(401, "Sessão expirada", "Entre de novo no painel para continuar.")
            return
        if not hmac.compare_digest(form.get("csrf", "").encode(), session.csrf.encode()):
            self._error(403, "Formulário recusado",
                        "Falta o código de segurança do formulário (CSRF) ou ele não confere. "
                        "Recarregue a página e tente de novo.", session)
            return
        if path == "/logout":
            self.app.auth.close(self._cookies().get(SESSION_COOKIE))
            self._redirect("/login", {"Set-Cookie": self._cookie(SESSION_COOKIE, "", 0)})
            return
        m = re.fullmatch(r"/(pedido|item)/([^/]+)/(reenviar|resolver)", path)
        if m is None:
            self._error(404, "Ação desconhecida", f"O endereço {path} não existe.", session)
            return
        kind, raw, action = m.groups()
        if not _DIGITS.match(raw):
            self._error(400, "Número inválido", f"“{raw}” não é um número.", session)
            return
        target_id = int(raw)
        who = session.user
        if kind == "pedido" and self.painel.store.get_order(target_id) is None:
            self._error(404, "Pedido não encontrado", f"O pedido {target_id} não existe.",
                        session)
            return
        if kind == "item" and not item_exists(self.painel.store, target_id):
            self._error(404, "Item não encontrado", f"O item {target_id} não existe.", session)
            return
        if kind == "pedido" and action == "reenviar":
            ok, message = self.painel.requeue(target_id, who=who)
        elif kind == "pedido":
            ok, message = self.painel.resolve(target_id, who=who)
        elif action == "reenviar":
            ok, message = self.painel.requeue_refused(target_id, who=who)
        else:
            ok, message = self.painel.resolve_refused(target_id, who=who)
        session.flash.append(("ok" if ok else "aviso", message))
        self._redirect(_local_path(form.get("voltar", "/pendencias")))

    def _login(self, form: dict[str, str]) -> None:
        auth = self.app.auth
        client = self.client_address[0]
        proximo = form.get("proximo", "/")
        nonce = self._cookies().get(LOGIN_COOKIE, "")
        if not nonce or not hmac.compare_digest(form.get("csrf", "").encode(), nonce.encode()):
            self._error(403, "Formulário recusado",
                        "O formulário de entrada expirou ou veio de outro site. Abra /login e "
                        "tente de novo.")
            return
        credential, over = auth.login(form, client)
        if credential is None:
            log.warning("painel: tentativa de entrada recusada de %s", client)
            what = "Token" if auth.uses_token and form.get("token") else "Usuário ou senha"
            if over:
                self._login_page(429, f"{what} inválido. Tentativas erradas demais deste "
                                      "endereço: as próximas são respondidas mais devagar.",
                                 proximo)
            else:
                self._login_page(401, f"{what} inválido.", proximo)
            return
        sid, _session = auth.open(credential.user, pii=credential.pii)
        if credential.pii or self.painel.settings.painel_pii:
            log.info("painel: entrada de %s a partir de %s com acesso a dados de pacientes "
                     "(%s)", credential.user, client,
                     "PAINEL_PII_TOKEN" if credential.pii else "PAINEL_PII=1")
        else:
            log.info("painel: entrada de %s a partir de %s", credential.user, client)
        self.send_response(HTTPStatus.SEE_OTHER)
        self.send_header("Location", _local_path(proximo))
        self.send_header("Set-Cookie", self._cookie(SESSION_COOKIE, sid))
        self.send_header("Set-Cookie", self._cookie(LOGIN_COOKIE, "", 0))
        self.send_header("Content-Length", "0")
        for k, v in _SECURITY_HEADERS.items():
            self.send_header(k, v)
        self.end_headers()


def _local_path(value: str) -> str:
    """Only same-site paths are followed after a login or an action (no open redirect).

    Browsers drop tabs and newlines from a Location before reading it ("/\t/evil" is
    "//evil"), and a CR/LF would split the response: any whitespace or control character
    sends the user to the overview instead.
    """
    if (not value.startswith("/") or value.startswith("//") or "\\" in value
            or any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in value)):
        return "/"
    return value


def start_http(painel: Painel, addr: str) -> PainelServer:
    """Bind ``addr`` (``host:port``) and serve; raises :class:`HttpBindError` when it cannot."""
    host, port = parse_addr(addr)
    return PainelServer(painel, host=host, port=port).start()
