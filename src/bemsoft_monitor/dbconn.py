r"""Database URLs and SQLAlchemy engines for the LIS and the state store.

The LIS is SQL Server reached through pyodbc (Microsoft's ODBC driver or FreeTDS) or
Microsoft's mssql-python; ``DB_URL`` replaces all of that with any SQLAlchemy URL
(SQLite and PostgreSQL in tests and in the demo). Passwords never reach a log or an
exception text: errors are passed through :func:`redact.redact_secrets`.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from .config import Settings, parse_odbc_attributes, split_server
from .errors import ConfigError
from .redact import redact_secrets

__all__ = [
    "APP_NAME",
    "is_freetds",
    "lis_schema",
    "lis_url",
    "make_engine",
    "odbc_connection_string",
    "odbc_quote",
    "state_url",
]

log = logging.getLogger(__name__)

APP_NAME = "BemsoftMonitor"
FREETDS_TDS_VERSION = "7.4"  # SQL Server 2012+, the oldest the LIS runs on
SQLITE_BUSY_TIMEOUT_S = 30.0
POOL_RECYCLE_S = 1800
DEFAULT_LOGIN_TIMEOUT_S = 15

# DB_ENCRYPT (ODBC Driver 18 words) → FreeTDS "Encryption". Driver 18's "no"/"optional"
# still encrypt when the server demands it, which is FreeTDS's "request"; "strict" needs
# FreeTDS 1.4+ and fails loudly on older ones rather than silently encrypting less.
_FREETDS_ENCRYPTION = {
    "yes": "require",
    "mandatory": "require",
    "no": "request",
    "optional": "request",
    "strict": "strict",
}


def odbc_quote(value: str) -> str:
    """Brace an ODBC attribute value when needed, doubling ``}`` (the ODBC rule)."""
    needs = any(c in value for c in ";{}=") or value != value.strip()
    return "{" + value.replace("}", "}}") + "}" if needs else value


def is_freetds(driver: str) -> bool:
    """True for the FreeTDS driver, by registered name or library path."""
    lowered = driver.lower()
    return "freetds" in lowered or "libtdsodbc" in lowered


def odbc_connection_string(settings: Settings, *, include_password: bool = True) -> str:
    """The pyodbc connection string for DB_SERVER/DB_NAME/DB_USER/DB_PASS/ODBC_DRIVER.

    ``include_password=False`` leaves PWD out (lis_url keeps it in the URL's password).
    """
    server, database = settings.db_server, settings.db_name
    if not server or not database:
        raise ConfigError("DB_SERVER e DB_NAME: obrigatórios para conectar ao SQL Server")
    driver = settings.odbc_driver.strip()
    freetds = is_freetds(driver)
    host, instance, port = split_server(server)

    attrs: list[tuple[str, str]] = [("DRIVER", "{" + driver.replace("}", "}}") + "}")]
    if freetds:
        # FreeTDS takes the port as its own attribute, not as "host,port"; with both a
        # port and an instance the port wins (no SQL Browser lookup needed).
        bare_host = host[4:] if host.lower().startswith("tcp:") else host
        if port is not None:
            attrs += [("SERVER", odbc_quote(bare_host)), ("Port", str(port))]
        else:
            named = f"{bare_host}\\{instance}" if instance else bare_host
            attrs.append(("SERVER", odbc_quote(named)))
    else:
        named = f"{host}\\{instance}" if instance else host
        attrs.append(("SERVER", odbc_quote(f"{named},{port}" if port is not None else named)))
    attrs.append(("DATABASE", odbc_quote(database)))

    if settings.db_user:
        attrs.append(("UID", odbc_quote(settings.db_user)))
        if include_password:
            attrs.append(("PWD", odbc_quote(settings.db_password)))
    else:
        # Windows authentication. On Linux it works only with a Kerberos ticket (kinit),
        # with Microsoft's driver or a FreeTDS built with GSSAPI; FreeTDS can also do NTLM
        # when DB_USER is given as DOMINIO\usuario with DB_PASS.
        attrs.append(("Trusted_Connection", "yes"))

    if freetds:
        attrs.append(("TDS_Version", FREETDS_TDS_VERSION))
        # The LIS stores VARCHAR as CP1252; FreeTDS must hand it to pyodbc as UTF-8 or
        # accented names (e.g. 'DIAGNÓSTICO') arrive garbled.
        attrs.append(("ClientCharset", "UTF-8"))
        if settings.db_encrypt:
            attrs.append(("Encryption", _FREETDS_ENCRYPTION[settings.db_encrypt]))
        # TrustServerCertificate has no FreeTDS counterpart: FreeTDS checks the server
        # certificate only when "ca file" is set in freetds.conf, so it already "trusts".
    else:
        if settings.db_encrypt:
            attrs.append(("Encrypt", settings.db_encrypt))
        if settings.db_trust_server_certificate:
            attrs.append(("TrustServerCertificate", "yes"))
    attrs.append(("APP", APP_NAME))
    # The login timeout is not a keyword here: ODBC Driver 18 knows ConnectTimeout only
    # from 18.7 and FreeTDS names it differently; make_engine passes pyodbc's timeout=,
    # which sets SQL_ATTR_LOGIN_TIMEOUT on every driver.

    if settings.db_odbc_extra:
        attrs = _merge_attributes(attrs, parse_odbc_attributes(settings.db_odbc_extra))
    return ";".join(f"{key}={value}" for key, value in attrs)


def _merge_attributes(
    base: list[tuple[str, str]], extra: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """DB_ODBC_EXTRA wins over generated attributes with the same (case-insensitive) key."""
    merged = list(base)
    for key, value in extra:
        for i, (existing, _) in enumerate(merged):
            if existing.lower() == key.lower():
                merged[i] = (existing, value)
                break
        else:
            merged.append((key, value))
    return merged


def _unbrace(value: str) -> str:
    if len(value) >= 2 and value.startswith("{") and value.endswith("}"):
        return value[1:-1].replace("}}", "}")
    return value


def _mssql_python_url(settings: Settings) -> URL:
    server, database = settings.db_server, settings.db_name
    if not server or not database:
        raise ConfigError("DB_SERVER e DB_NAME: obrigatórios para conectar ao SQL Server")
    host, instance, port = split_server(server)
    query: dict[str, str] = {}
    if not settings.db_user:
        query["Trusted_Connection"] = "yes"
    if settings.db_encrypt:
        query["Encrypt"] = settings.db_encrypt
    if settings.db_trust_server_certificate:
        query["TrustServerCertificate"] = "yes"
    # mssql-python reserves DRIVER and APP (it always sends its own) and accepts only its
    # allow-list of keywords; anything else in DB_ODBC_EXTRA fails at connect time.
    if settings.db_odbc_extra:
        for key, value in parse_odbc_attributes(settings.db_odbc_extra):
            query[key] = _unbrace(value)
    return URL.create(
        "mssql+mssqlpython",
        username=settings.db_user or None,
        password=(settings.db_password or None) if settings.db_user else None,
        host=f"{host}\\{instance}" if instance else host,
        port=port,
        database=database,
        query=query,
    )


def lis_url(settings: Settings) -> URL | str:
    """DB_URL as given, else the SQL Server URL for DB_DRIVER."""
    if settings.db_url:
        return settings.db_url
    if settings.db_driver == "mssql-python":
        return _mssql_python_url(settings)
    # The password travels in the URL's own password field, which SQLAlchemy hides in
    # str()/repr(); make_engine adds it to the ODBC string only when connecting.
    return URL.create(
        "mssql+pyodbc",
        username=settings.db_user or None,
        password=(settings.db_password or None) if settings.db_user else None,
        query={"odbc_connect": odbc_connection_string(settings, include_password=False)},
    )


def state_url(settings: Settings) -> URL | str:
    """STATE_DB_URL, or the LIS database itself."""
    return settings.state_db_url or lis_url(settings)


def lis_schema(settings: Settings, dialect_name: str) -> str | None:
    """DB_SCHEMA; without it ``dbo`` on SQL Server and the default schema elsewhere."""
    if settings.db_schema:
        return settings.db_schema
    return "dbo" if dialect_name == "mssql" else None


def make_engine(
    url: URL | str, *, settings: Settings | None = None, for_state: bool = False
) -> Engine:
    """An engine with the per-dialect settings the monitor relies on.

    ``for_state`` makes SQLite transactions start with ``BEGIN IMMEDIATE`` so that
    writers to the state store queue up instead of failing on lock upgrades.
    """
    secrets = settings.secrets if settings else ()
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except (ArgumentError, ValueError):
        raise ConfigError("URL de banco inválida (não é uma URL SQLAlchemy)") from None
    backend, driver = parsed.get_backend_name(), parsed.get_driver_name()

    # No ping on every checkout: it would double the round trips of an idle poll. A
    # connection the server closed fails its statement, SQLAlchemy discards the pool, and
    # the monitor repeats that step once on a fresh connection (engine.Monitor).
    kwargs: dict[str, Any] = {}
    connect_args: dict[str, Any] = {}
    if backend != "sqlite":
        # Lab networks and firewalls drop idle connections; recycle before they do.
        kwargs["pool_recycle"] = POOL_RECYCLE_S
    if backend == "sqlite":
        # The engine is shared by the loop's threads; SQLite itself serializes writers.
        connect_args["check_same_thread"] = False
        connect_args["timeout"] = SQLITE_BUSY_TIMEOUT_S
    elif backend == "mssql":
        # Login timeout for pyodbc and mssql-python alike (SQL_ATTR_LOGIN_TIMEOUT).
        connect_args["timeout"] = settings.db_login_timeout if settings else (
            DEFAULT_LOGIN_TIMEOUT_S
        )
        if driver == "pyodbc":
            # fast_executemany is unreliable with FreeTDS and with VARCHAR(MAX)
            # parameters; the monitor writes few rows to SQL Server, so keep it off.
            kwargs["fast_executemany"] = False
    try:
        engine = create_engine(parsed, connect_args=connect_args, **kwargs)
    except (ImportError, NoSuchModuleError, ArgumentError) as exc:
        raise ConfigError(_driver_problem(parsed, exc, secrets)) from None
    if driver == "pyodbc" and "odbc_connect" in parsed.query and parsed.password:
        _add_password_on_connect(engine, parsed.password)
    if backend == "sqlite" and driver == "pysqlite":
        _configure_sqlite(engine, parsed, for_state=for_state)
    return engine


_PWD_ATTRIBUTE = re.compile(r"(?:^|;)\s*PWD\s*=", re.IGNORECASE)


def _add_password_on_connect(engine: Engine, password: str) -> None:
    @event.listens_for(engine, "do_connect")
    def _with_password(_dialect: Any, _record: Any, cargs: list[Any], _params: Any) -> None:
        if cargs and isinstance(cargs[0], str) and not _PWD_ATTRIBUTE.search(cargs[0]):
            cargs[0] = f"{cargs[0]};PWD={odbc_quote(password)}"


def _driver_problem(url: URL, exc: Exception, secrets: tuple[str, ...]) -> str:
    detail = redact_secrets(str(exc), secrets)
    hint = ""
    if url.get_driver_name() == "pyodbc":
        hint = (
            "; instale o pyodbc e, no Linux, o unixODBC (apt-get install unixodbc) e o "
            "driver ODBC, ou use DB_DRIVER=mssql-python"
        )
    elif url.get_driver_name() == "mssqlpython":
        hint = "; instale com: pip install 'bemsoft-monitor[mssql-python]'"
    return f"Driver de banco {url.drivername} indisponível ({detail}){hint}"


def _is_file_database(url: URL) -> bool:
    database = url.database or ""
    if database in ("", ":memory:"):
        return False
    return not (database.startswith("file::memory:") or "mode=memory" in database)


def _configure_sqlite(engine: Engine, url: URL, *, for_state: bool) -> None:
    """SQLAlchemy's recipe: take BEGIN away from pysqlite so transactions really begin."""
    begin_sql = "BEGIN IMMEDIATE" if for_state else "BEGIN"
    wal = _is_file_database(url)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        if not wal:
            return
        cursor = dbapi_connection.cursor()
        try:
            # WAL lets the LIS reader and the state writer work without blocking each
            # other; a read-only file cannot switch and keeps its journal mode.
            cursor.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as exc:
            log.debug("sqlite_wal_unavailable", extra={"reason": str(exc)})
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Reads of the state store (execution option bm_read_only) must not take the write
        # lock that BEGIN IMMEDIATE takes; in WAL mode they never block the writer.
        read_only = connection.get_execution_options().get("bm_read_only", False)
        connection.exec_driver_sql("BEGIN" if read_only else begin_sql)
