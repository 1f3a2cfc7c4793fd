"""A Bemsoft that cannot be talked to: one short Portuguese reason naming host and port.

Each case is a real failure on loopback (a closed port, a server that never answers, one
that hangs up, a proxy that refuses), met by the project's own client. The text must carry
no urllib3/requests English, no token and no proxy password.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
import requests
import urllib3

from bemsoft_monitor.bemsoft import BemsoftClient, Kind, describe_request_error
from bemsoft_monitor.errors import CatalogUnavailable

TOKEN = "tok-SEGREDO-123456"  # noqa: S105 - a test token, to prove it never shows
ENGLISH = ("HTTPConnectionPool", "HTTPSConnectionPool", "Max retries", "Caused by", "Errno",
           "Connection refused", "NewConnectionError", "timed out", "Remote end", "Tunnel",
           "Failed to", "EOF occurred")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Loopback:
    """A TCP server on 127.0.0.1 that does ``handle(conn)`` with every connection."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = int(self.sock.getsockname()[1])
        self.handle = handle
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self.handle(conn)

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.fixture
def loopback() -> Iterator[Callable[[Callable[[socket.socket], None]], Loopback]]:
    servers: list[Loopback] = []

    def start(handle: Callable[[socket.socket], None]) -> Loopback:
        servers.append(Loopback(handle))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def client(base_url: str, *, proxy: str | None = None, timeout_s: float = 5.0) -> BemsoftClient:
    return BemsoftClient(base_url=base_url, token=TOKEN, timeout_s=timeout_s, proxy=proxy)


def assert_clean(text: str, *secrets: str) -> None:
    for word in ENGLISH:
        assert word not in text, (word, text)
    for secret in (TOKEN, *secrets):
        assert secret not in text


def test_a_closed_port_is_connection_refused_by_host_and_port() -> None:
    port = closed_port()
    bemsoft = client(f"http://127.0.0.1:{port}")
    outcome = bemsoft.post_order({"batch": {}}, key="k")
    assert outcome.kind == Kind.NO_ANSWER
    assert outcome.message == (f"erro de conexão com a Bemsoft: conexão recusada por "
                               f"127.0.0.1:{port}")
    with pytest.raises(CatalogUnavailable) as info:
        bemsoft.fetch_catalog()
    assert str(info.value) == f"Bemsoft inacessível: conexão recusada por 127.0.0.1:{port}"
    assert bemsoft.check_token().message.endswith(f"conexão recusada por 127.0.0.1:{port}")


def test_no_answer_in_time_names_the_timeout_setting(loopback) -> None:  # type: ignore[no-untyped-def]
    release = threading.Event()
    server = loopback(lambda conn: (conn.recv(65536), release.wait(10)))
    try:
        outcome = client(f"http://127.0.0.1:{server.port}", timeout_s=0.5).post_order(
            {"batch": {}}, key="k")
    finally:
        release.set()
    assert outcome.kind == Kind.NO_ANSWER
    assert outcome.message == (f"sem resposta da Bemsoft (127.0.0.1:{server.port}) em 0.5 s "
                               "(BEMSOFT_TIMEOUT)")


def test_a_server_that_hangs_up_without_answering(loopback) -> None:  # type: ignore[no-untyped-def]
    server = loopback(lambda conn: conn.recv(65536))
    outcome = client(f"http://127.0.0.1:{server.port}").post_order({"batch": {}}, key="k")
    assert outcome.message == (f"erro de conexão com a Bemsoft: 127.0.0.1:{server.port} fechou "
                               "a conexão sem responder")
    assert_clean(outcome.message)


def test_an_answer_cut_in_the_middle(loopback) -> None:  # type: ignore[no-untyped-def]
    def cut(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n40\r\n{\"id\": ")

    server = loopback(cut)
    outcome = client(f"http://127.0.0.1:{server.port}").post_order({"batch": {}}, key="k")
    assert outcome.kind == Kind.NO_ANSWER
    assert f"resposta de 127.0.0.1:{server.port} interrompida no meio" in outcome.message
    assert_clean(outcome.message)


def test_tls_failure_names_host_and_the_setting(loopback) -> None:  # type: ignore[no-untyped-def]
    server = loopback(lambda conn: conn.recv(65536))  # not TLS: hangs up on the handshake
    outcome = client(f"https://127.0.0.1:{server.port}").post_order({"batch": {}}, key="k")
    assert outcome.message.startswith(f"falha de TLS com 127.0.0.1:{server.port}: ")
    assert outcome.message.endswith("confira BEMSOFT_VERIFY e o certificado")
    assert_clean(outcome.message)


def test_a_proxy_that_refuses_is_named_without_its_password() -> None:
    proxy_port = closed_port()
    proxy = f"http://usuario:senha-do-proxy@127.0.0.1:{proxy_port}"
    bemsoft = client("http://bemsoft.example:8799", proxy=proxy)
    outcome = bemsoft.post_order({"batch": {}}, key="k")
    assert outcome.message == (f"conexão recusada pelo proxy 127.0.0.1:{proxy_port} "
                               "(BEMSOFT_PROXY)")
    with pytest.raises(CatalogUnavailable) as info:
        bemsoft.fetch_catalog()
    assert_clean(str(info.value), "senha-do-proxy", "usuario")


def test_a_proxy_asking_for_credentials(loopback) -> None:  # type: ignore[no-untyped-def]
    def ask(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                     b"Proxy-Authenticate: Basic realm=\"x\"\r\nContent-Length: 0\r\n\r\n")

    proxy = loopback(ask)
    bemsoft = client("https://bemsoft.example", proxy=f"http://u:errada@127.0.0.1:{proxy.port}")
    outcome = bemsoft.post_order({"batch": {}}, key="k")
    assert outcome.message == (f"o proxy 127.0.0.1:{proxy.port} pede autenticação (HTTP 407); "
                               "confira usuário e senha em BEMSOFT_PROXY")
    assert_clean(outcome.message, "errada")


def test_a_name_the_dns_does_not_know() -> None:
    # Built from the exceptions urllib3 raises, so no DNS server is asked during the test.
    resolve = urllib3.exceptions.NameResolutionError(
        "bemsoft.x", None, socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    exc = requests.exceptions.ConnectionError(
        urllib3.exceptions.MaxRetryError(None, "/tests", resolve))  # type: ignore[arg-type]
    assert describe_request_error(exc, url="https://bemsoft.x", timeout_s=30) == \
        "nome bemsoft.x não encontrado (DNS)"
