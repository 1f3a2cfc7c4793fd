"""HTTP client for the Bemsoft API; maps each response to exactly one outcome. No retry loops."""

from __future__ import annotations

import datetime as dt
import enum
import errno
import http.client
import json
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3

from . import __version__
from .backoff import parse_retry_after
from .catalog import parse_catalog
from .errors import CatalogUnavailable
from .models import CatalogEntry
from .redact import redact_secrets

ERROR_FIELDS = ("error", "errors", "erro", "erros", "message_error", "mensagemErro")


class Kind(enum.Enum):
    """What one POST /requests came to."""

    DELIVERED = "delivered"  # 2xx, no error in the body
    ALREADY = "already"  # 409: the key was already processed
    REJECTED = "rejected"  # 400/422 and other 4xx: payload refused, nothing saved
    AUTH = "auth"  # 401/403: token problem, not the event's fault
    RATE_LIMITED = "rate_limited"  # 429
    NOT_SAVED = "not_saved"  # 201 with an error field: definitely not saved
    # Never reached the order handler (redirect, 404/405, proxy 407, 408/425): nothing saved,
    # and every order would meet the same; retried like an outage (circuit breaker).
    UNREACHABLE = "unreachable"
    SERVER_ERROR = "server_error"  # 5xx answered: maybe saved, maybe not
    NO_ANSWER = "no_answer"  # timeout, connection/TLS error, unreadable 2xx: unknown


#: Outcomes after which Bemsoft definitely saved nothing: the next try may use a new key.
DEFINITELY_NOT_SAVED = frozenset({Kind.REJECTED, Kind.AUTH, Kind.RATE_LIMITED, Kind.NOT_SAVED,
                                  Kind.UNREACHABLE})
#: Statuses that mean the request never reached the order handler (see Kind.UNREACHABLE).
_NOT_REACHED = {404: "endereço não encontrado", 405: "método não aceito neste endereço",
                407: "o proxy pede autenticação (confira usuário e senha em BEMSOFT_PROXY)",
                408: "a Bemsoft desistiu de esperar o pedido", 425: "cedo demais"}


@dataclass(frozen=True)
class Outcome:
    """One response (or its absence) classified."""

    kind: Kind
    status: int | None
    message: str  # Portuguese, for logs, FAILED_DIR and the painel
    retry_after_s: float | None = None
    elapsed_s: float = 0.0
    body_excerpt: str = ""


def find_error(body: Any) -> str | None:
    """The error text of a 2xx body, if it carries one of the known error fields."""
    if not isinstance(body, dict):
        return None
    for name in ERROR_FIELDS:
        value = body.get(name)
        if value in (None, "", [], {}, False):
            continue
        if isinstance(value, (list, tuple)):
            return "; ".join(str(v) for v in value)
        if isinstance(value, dict):
            return json.dumps(value, ensure_ascii=False)
        return str(value)
    return None


def _api_message(body: Any, text: str) -> str:
    if isinstance(body, dict):
        for name in ("message", "mensagem", "detail", "title", *ERROR_FIELDS):
            value = body.get(name)
            if value:
                return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split())
    return text[:300] if text else "(corpo vazio)"


def classify(
    status: int, headers: Any, text: str, *, now: dt.datetime
) -> tuple[Kind, str, float | None]:
    """Map an HTTP answer to (kind, Portuguese message, retry-after seconds)."""
    body: Any = None
    parsed = False
    if text.strip():
        try:
            body = json.loads(text)
            parsed = True
        except ValueError:
            parsed = False
    ctype = str(headers.get("Content-Type", "")).lower()
    if 200 <= status < 300:
        error = find_error(body)
        if error:
            return Kind.NOT_SAVED, f"HTTP {status} com erro no corpo: {error}", None
        if not text.strip():
            return Kind.DELIVERED, f"HTTP {status} (corpo vazio)", None
        if not parsed:
            kind = "HTML" if "html" in ctype or text.lstrip().startswith("<") else "não-JSON"
            return (Kind.NO_ANSWER,
                    f"HTTP {status} com corpo {kind} inesperado; resultado incerto, será "
                    "reenviado com a mesma Idempotency-Key", None)
        if not isinstance(body, dict):
            return (Kind.NO_ANSWER,
                    f"HTTP {status} com JSON de formato inesperado ({type(body).__name__}); "
                    "resultado incerto, será reenviado com a mesma Idempotency-Key", None)
        return Kind.DELIVERED, f"HTTP {status} criado", None
    if 300 <= status < 400:
        where = headers.get("Location", "?")
        return (Kind.UNREACHABLE,
                f"HTTP {status}: redirecionado para {where}; confira BEMSOFT_BASE_URL "
                "(https?) e BEMSOFT_ENDPOINT", None)
    message = _api_message(body, text)
    if status in _NOT_REACHED:
        hint = ("" if status == 407 else
                "; confira BEMSOFT_BASE_URL, BEMSOFT_ENDPOINT e BEMSOFT_PROXY")
        return (Kind.UNREACHABLE,
                f"HTTP {status}: {_NOT_REACHED[status]} ({message}); nada foi salvo{hint}",
                parse_retry_after(headers.get("Retry-After"), now=now))
    if status == 409:
        return Kind.ALREADY, f"HTTP 409: Idempotency-Key já processada ({message})", None
    if status in (401, 403):
        return (Kind.AUTH,
                f"HTTP {status}: token recusado pela Bemsoft ({message}); confira BEMSOFT_TOKEN",
                None)
    if status == 429:
        retry_after = parse_retry_after(headers.get("Retry-After"), now=now)
        return Kind.RATE_LIMITED, f"HTTP 429: limite de requisições ({message})", retry_after
    if status >= 500:
        retry_after = parse_retry_after(headers.get("Retry-After"), now=now)
        return (Kind.SERVER_ERROR, f"HTTP {status}: erro no servidor da Bemsoft ({message})",
                retry_after)
    return Kind.REJECTED, f"HTTP {status}: pedido recusado pela Bemsoft: {message}", None


class BemsoftClient:
    """Talks to Bemsoft; one ``requests.Session`` per sending thread."""

    def __init__(
        self,
        *,
        base_url: str,
        token: str,
        endpoint: str = "/requests",
        tests_endpoint: str = "/tests",
        timeout_s: float = 30.0,
        verify: bool | str = True,
        proxy: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.proxy = proxy
        self._token = token
        self.endpoint = endpoint
        self.tests_endpoint = tests_endpoint
        self.timeout_s = timeout_s
        self.verify = verify
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = f"BemsoftMonitor/{__version__}"
            session.trust_env = False  # a proxy from the environment must be explicit
            if self.proxy:
                session.proxies = {"http": self.proxy, "https": self.proxy}
            self._local.session = session
        return session

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}

    def _scrub(self, text: str) -> str:
        return redact_secrets(text, (self._token, self.proxy or ""))

    def _failure(self, exc: requests.exceptions.RequestException, *,
                 lead: str = "erro de conexão com a Bemsoft") -> str:
        """Why no answer came, in Portuguese, with the fix for TLS problems."""
        reason = describe_request_error(exc, url=self.base_url, timeout_s=self.timeout_s,
                                        proxy=self.proxy)
        if reason.startswith("falha de TLS"):
            reason += "; confira BEMSOFT_VERIFY e o certificado"
        elif not reason.startswith("sem resposta") and "BEMSOFT_PROXY" not in reason:
            reason = f"{lead}: {reason}"
        return self._scrub(reason)

    def post_order(self, payload: dict[str, Any], *, key: str) -> Outcome:
        """POST one order with its Idempotency-Key and classify the answer."""
        headers = {**self._headers(), "Content-Type": "application/json",
                   "Idempotency-Key": key}
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        started = time.monotonic()
        try:
            resp = self._session().post(
                self.base_url + self.endpoint, data=data, headers=headers,
                timeout=self.timeout_s, verify=self.verify, allow_redirects=False)
            text = resp.text
        except requests.exceptions.RequestException as exc:
            return Outcome(Kind.NO_ANSWER, None, self._failure(exc),
                           elapsed_s=time.monotonic() - started)
        elapsed = time.monotonic() - started
        kind, message, retry_after = classify(
            resp.status_code, resp.headers, text, now=dt.datetime.now(dt.timezone.utc))
        return Outcome(kind, resp.status_code, self._scrub(message), retry_after, elapsed,
                       self._scrub(text[:500]))

    def fetch_catalog(self) -> list[CatalogEntry]:
        """GET /tests parsed; raise CatalogUnavailable with a Portuguese reason."""
        url = self.base_url + self.tests_endpoint
        try:
            resp = self._session().get(url, headers=self._headers(), timeout=self.timeout_s,
                                       verify=self.verify, allow_redirects=False)
        except requests.exceptions.RequestException as exc:
            raise CatalogUnavailable(self._failure(exc, lead="Bemsoft inacessível")) from None
        if resp.status_code in (401, 403):
            raise CatalogUnavailable(
                f"catálogo {self.tests_endpoint}: HTTP {resp.status_code}, token recusado; "
                "confira BEMSOFT_TOKEN")
        if resp.status_code != 200:
            raise CatalogUnavailable(
                f"catálogo {self.tests_endpoint}: HTTP {resp.status_code} "
                f"({self._scrub(' '.join(resp.text.split())[:200])})")
        return parse_catalog(resp.content, source=f"GET {self.tests_endpoint}")

    def check_token(self) -> Outcome:
        """GET /tests only to see whether the token is accepted (used by check and probes)."""
        started = time.monotonic()
        try:
            resp = self._session().get(self.base_url + self.tests_endpoint,
                                       headers=self._headers(), timeout=self.timeout_s,
                                       verify=self.verify, allow_redirects=False)
        except requests.exceptions.RequestException as exc:
            return Outcome(Kind.NO_ANSWER, None, self._failure(exc),
                           elapsed_s=time.monotonic() - started)
        kind, message, retry_after = classify(resp.status_code, resp.headers, "",
                                              now=dt.datetime.now(dt.timezone.utc))
        return Outcome(kind, resp.status_code, message, retry_after,
                       time.monotonic() - started)


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and every one it wraps (urllib3 keeps them in args, reason, causes)."""
    found: list[BaseException] = []
    todo = [exc]
    while todo and len(found) < 20:
        current = todo.pop(0)
        if any(current is seen for seen in found):
            continue
        found.append(current)
        todo += [a for a in current.args if isinstance(a, BaseException)]
        for attr in ("reason", "original_error", "__cause__", "__context__"):
            inner = getattr(current, attr, None)
            if isinstance(inner, BaseException):
                todo.append(inner)
    return found


def host_port(url: str) -> str:
    """'host:port' of a URL, never its user or password ('?' when unreadable)."""
    try:
        parts = urlsplit(url if "//" in url else f"//{url}")
        host = parts.hostname or "?"
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: OpenSSL's verification codes a lab meets, in Portuguese.
_TLS_VERIFY = {
    10: "certificado expirado",
    18: "certificado autoassinado",
    19: "certificado autoassinado na cadeia",
    20: "autoridade certificadora desconhecida (cadeia da empresa não instalada?)",
    21: "autoridade certificadora desconhecida (cadeia da empresa não instalada?)",
    62: "o certificado não é deste endereço",
}
_SOCKET_ERRORS = {
    errno.ECONNREFUSED: "conexão recusada por {target}",
    errno.ECONNRESET: "conexão encerrada por {target} antes da resposta",
    errno.ECONNABORTED: "conexão encerrada por {target} antes da resposta",
    errno.EPIPE: "conexão encerrada por {target} antes da resposta",
    errno.ENETUNREACH: "rede inalcançável para {target} (sem rota ou sem internet)",
    errno.EHOSTUNREACH: "servidor {target} inalcançável (sem rota ou firewall)",
    errno.ETIMEDOUT: "sem resposta de {target} ao conectar (firewall?)",
}


#: A name the DNS does not know (urllib3 2 wraps socket.gaierror in NameResolutionError).
_NAME_ERRORS: tuple[type[BaseException], ...] = tuple(
    t for t in (socket.gaierror, getattr(urllib3.exceptions, "NameResolutionError", None))
    if t is not None
)


def _tls_reason(chain: list[BaseException]) -> str:
    for exc in chain:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return _TLS_VERIFY.get(exc.verify_code, "certificado não validado")
    for exc in chain:
        if isinstance(exc, ssl.SSLError):
            text = str(exc)
            if "WRONG_VERSION_NUMBER" in text or "record layer" in text:
                return "o servidor não responde com TLS nesta porta (http em vez de https?)"
            if isinstance(exc, ssl.SSLEOFError) or "EOF" in text:
                return "conexão encerrada durante a negociação TLS"
            return "negociação TLS recusada"
    return "negociação TLS falhou"


def _socket_reason(chain: list[BaseException], target: str, name: str) -> str | None:
    """The reason a socket failed ('conexão recusada por X'), or None when none applies."""
    for exc in chain:
        if isinstance(exc, _NAME_ERRORS):
            return f"nome {name} não encontrado (DNS)"
    for exc in chain:
        if isinstance(exc, OSError) and exc.errno in _SOCKET_ERRORS:
            return _SOCKET_ERRORS[exc.errno].format(target=target)
    for exc in chain:
        if isinstance(exc, http.client.RemoteDisconnected):
            return f"{target} fechou a conexão sem responder"
    return None


def describe_request_error(exc: BaseException, *, url: str, timeout_s: float,
                           proxy: str | None = None) -> str:
    """One short Portuguese reason for a failed HTTP call, naming host:port.

    Never urllib3's English text, the token or the proxy's password: 'conexão recusada por
    127.0.0.1:8799', 'nome bemsoft.x não encontrado (DNS)', 'sem resposta da Bemsoft
    (host:443) em 30 s (BEMSOFT_TIMEOUT)'.
    """
    target = host_port(url)
    try:
        name = urlsplit(url).hostname or target
    except ValueError:
        name = target
    chain = _chain(exc)
    if proxy and any(isinstance(e, (requests.exceptions.ProxyError,
                                    urllib3.exceptions.ProxyError)) for e in chain):
        where = host_port(proxy)
        tunnel = re.search(r"Tunnel connection failed: (\d{3})", " ".join(map(str, chain)))
        if tunnel and tunnel.group(1) == "407":
            return (f"o proxy {where} pede autenticação (HTTP 407); confira usuário e senha "
                    "em BEMSOFT_PROXY")
        if tunnel:
            return (f"o proxy {where} recusou a conexão com {target} (HTTP {tunnel.group(1)}); "
                    "confira BEMSOFT_PROXY")
        proxy_name = urlsplit(proxy).hostname or where
        inner = _socket_reason(chain, f"proxy {where}", f"do proxy {proxy_name}")
        if inner is None:
            return f"falha ao usar o proxy {where} (BEMSOFT_PROXY)"
        inner = inner.replace(" por proxy ", " pelo proxy ").replace(" de proxy ", " do proxy ")
        return f"{inner} (BEMSOFT_PROXY)"
    if isinstance(exc, requests.exceptions.SSLError) or any(
            isinstance(e, ssl.SSLError) for e in chain):
        return f"falha de TLS com {target}: {_tls_reason(chain)}"
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return f"sem resposta de {target} ao conectar, em {timeout_s:g} s (BEMSOFT_TIMEOUT)"
    if isinstance(exc, requests.exceptions.Timeout):
        return f"sem resposta da Bemsoft ({target}) em {timeout_s:g} s (BEMSOFT_TIMEOUT)"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return f"resposta de {target} interrompida no meio da transferência"
    if isinstance(exc, requests.exceptions.ContentDecodingError):
        return f"resposta de {target} com compressão ilegível"
    if isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                        requests.exceptions.InvalidSchema)):
        return "endereço inválido; confira BEMSOFT_BASE_URL"
    reason = _socket_reason(chain, target, name)
    if reason is not None:
        return reason
    return f"falha de comunicação com {target} ({type(exc).__name__})"
