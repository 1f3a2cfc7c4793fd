"""HTTP client for the Bemsoft API; maps each response to exactly one outcome. No retry loops."""

from __future__ import annotations

import datetime as dt
import enum
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import requests

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


def classify(status: int, headers: Any, text: str, *, now: dt.datetime) -> tuple[Kind, str, float | None]:
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
        return Kind.SERVER_ERROR, f"HTTP {status}: erro no servidor da Bemsoft ({message})", retry_after
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
        except requests.exceptions.SSLError as exc:
            return Outcome(Kind.NO_ANSWER, None,
                           f"falha de TLS com a Bemsoft: {self._scrub(_short(exc))}; confira "
                           "BEMSOFT_VERIFY e o certificado", elapsed_s=time.monotonic() - started)
        except requests.exceptions.Timeout:
            return Outcome(Kind.NO_ANSWER, None,
                           f"sem resposta da Bemsoft em {self.timeout_s:g} s (BEMSOFT_TIMEOUT)",
                           elapsed_s=time.monotonic() - started)
        except requests.exceptions.RequestException as exc:
            return Outcome(Kind.NO_ANSWER, None,
                           f"erro de conexão com a Bemsoft: {self._scrub(_short(exc))}",
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
        except requests.exceptions.SSLError as exc:
            raise CatalogUnavailable(
                f"catálogo {self.tests_endpoint}: falha de TLS com a Bemsoft: "
                f"{self._scrub(_short(exc))}; confira BEMSOFT_VERIFY e o certificado") from None
        except requests.exceptions.Timeout:
            raise CatalogUnavailable(
                f"catálogo {self.tests_endpoint}: sem resposta da Bemsoft em "
                f"{self.timeout_s:g} s (BEMSOFT_TIMEOUT)") from None
        except requests.exceptions.RequestException as exc:
            raise CatalogUnavailable(
                f"catálogo {self.tests_endpoint} indisponível: {self._scrub(_short(exc))}"
            ) from None
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
            return Outcome(Kind.NO_ANSWER, None, self._scrub(_short(exc)),
                           elapsed_s=time.monotonic() - started)
        kind, message, retry_after = classify(resp.status_code, resp.headers, "",
                                              now=dt.datetime.now(dt.timezone.utc))
        return Outcome(kind, resp.status_code, message, retry_after,
                       time.monotonic() - started)


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
