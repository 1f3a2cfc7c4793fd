"""Connection strings, URLs and engines for the LIS and the state store."""

# ruff: noqa: S105, S106  # fake passwords and tokens are the subject under test

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, event, select, text
from sqlalchemy.engine import URL, make_url

from bemsoft_monitor import dbconn
from bemsoft_monitor.config import Settings, parse_odbc_attributes
from bemsoft_monitor.dbconn import (
    lis_schema,
    lis_url,
    make_engine,
    odbc_connection_string,
    odbc_quote,
    state_url,
)
from bemsoft_monitor.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "db_server": "srv",
        "db_name": "LIS",
        "db_user": "sa",
        "db_pass": "pw",
        "terceiros": "A",
        "bemsoft_dry_run": True,
    }
    values.update(overrides)
    return Settings(**{k: v for k, v in values.items() if v is not None})


def attributes(conn_str: str) -> dict[str, str]:
    """Parse a connection string back into unbraced values."""
    out = {}
    for key, raw in parse_odbc_attributes(conn_str):
        out[key] = raw[1:-1].replace("}}", "}") if raw.startswith("{") else raw
    return out


class _CapturedError(Exception):
    """Raised by a do_connect hook to stop before any network access."""


def connect_arguments(engine: Any) -> tuple[list[Any], dict[str, Any]]:
    """What the engine would hand to the DBAPI's connect(), without connecting."""
    seen: dict[str, Any] = {}

    @event.listens_for(engine, "do_connect")
    def _capture(_dialect: Any, _rec: Any, cargs: list[Any], cparams: dict[str, Any]) -> None:
        seen["cargs"], seen["cparams"] = list(cargs), dict(cparams)
        raise _CapturedError

    with pytest.raises(_CapturedError):
        engine.connect()
    return seen["cargs"], seen["cparams"]


def require_pyodbc() -> None:
    try:
        import pyodbc  # noqa: F401
    except ImportError as exc:  # libodbc.so.2 missing (apt-get install unixodbc)
        print(f"pyodbc indisponível: {exc}")
        pytest.skip(f"pyodbc indisponível: {exc}")


def require_mssql_python() -> None:
    try:
        import mssql_python  # noqa: F401
    except ImportError as exc:
        print(f"mssql-python indisponível: {exc}")
        pytest.skip(f"mssql-python indisponível: {exc}")


# --- ODBC connection string -------------------------------------------------------------


def test_named_instance_with_sql_login() -> None:
    conn = odbc_connection_string(settings(db_server=r"localhost\SQLEXPRESS"))
    assert conn == (
        r"DRIVER={ODBC Driver 18 for SQL Server};SERVER=localhost\SQLEXPRESS;DATABASE=LIS;"
        "UID=sa;PWD=pw;APP=BemsoftMonitor"
    )


def test_host_and_port_stay_together_for_microsoft_driver() -> None:
    attrs = attributes(odbc_connection_string(settings(db_server="10.0.0.5, 1533")))
    assert attrs["SERVER"] == "10.0.0.5,1533"
    assert "Port" not in attrs


def test_empty_user_means_windows_authentication() -> None:
    attrs = attributes(odbc_connection_string(settings(db_user=None, db_pass=None)))
    assert attrs["Trusted_Connection"] == "yes"
    assert "UID" not in attrs and "PWD" not in attrs


def test_encrypt_and_trust_server_certificate() -> None:
    attrs = attributes(
        odbc_connection_string(settings(db_encrypt="strict", db_trust_server_certificate=True))
    )
    assert attrs["Encrypt"] == "strict"
    assert attrs["TrustServerCertificate"] == "yes"
    plain = attributes(odbc_connection_string(settings()))
    assert "Encrypt" not in plain and "TrustServerCertificate" not in plain


def test_special_characters_are_braced_with_closing_brace_doubled() -> None:
    conn = odbc_connection_string(settings(db_pass="p;w}d", db_name="Lab=1"))
    assert "PWD={p;w}}d}" in conn
    assert "DATABASE={Lab=1}" in conn
    assert attributes(conn)["PWD"] == "p;w}d"


@pytest.mark.parametrize(
    ("value", "quoted"),
    [("plain", "plain"), ("a;b", "{a;b}"), ("{x", "{{x}"), ("x}", "{x}}}"), (" lead", "{ lead}"),
     ("trail ", "{trail }"), ("k=v", "{k=v}"), ("", "")],
)
def test_odbc_quote(value: str, quoted: str) -> None:
    assert odbc_quote(value) == quoted


def test_freetds_gets_port_attribute_tds_version_and_utf8() -> None:
    conn = odbc_connection_string(settings(odbc_driver="FreeTDS", db_server="10.0.0.5,1433"))
    attrs = attributes(conn)
    assert attrs["SERVER"] == "10.0.0.5"
    assert attrs["Port"] == "1433"
    assert attrs["TDS_Version"] == "7.4"
    assert attrs["ClientCharset"] == "UTF-8"
    assert conn.startswith("DRIVER={FreeTDS};")


def test_freetds_keeps_named_instance_and_drops_tcp_prefix() -> None:
    attrs = attributes(odbc_connection_string(settings(odbc_driver="FreeTDS",
                                                       db_server=r"srv\SQLEXPRESS")))
    assert attrs["SERVER"] == r"srv\SQLEXPRESS"
    assert "Port" not in attrs
    attrs = attributes(odbc_connection_string(settings(odbc_driver="FreeTDS",
                                                       db_server="tcp:srv,1500")))
    assert (attrs["SERVER"], attrs["Port"]) == ("srv", "1500")


def test_freetds_maps_encryption_and_omits_driver18_keywords() -> None:
    attrs = attributes(odbc_connection_string(settings(
        odbc_driver="FreeTDS", db_encrypt="yes", db_trust_server_certificate=True
    )))
    assert attrs["Encryption"] == "require"
    assert "Encrypt" not in attrs and "TrustServerCertificate" not in attrs


def test_driver_given_as_library_path(tmp_path: Path) -> None:
    msodbc = tmp_path / "libmsodbcsql-18.so"
    msodbc.write_bytes(b"")
    conn = odbc_connection_string(settings(odbc_driver=str(msodbc)))
    assert conn.startswith("DRIVER={" + str(msodbc) + "};")
    assert "TDS_Version" not in conn

    tds = tmp_path / "libtdsodbc.so"
    tds.write_bytes(b"")
    attrs = attributes(odbc_connection_string(settings(odbc_driver=str(tds),
                                                       db_server="srv,1433")))
    assert attrs["DRIVER"] == str(tds)
    assert attrs["Port"] == "1433"  # recognised as FreeTDS by its library name


def test_extra_attributes_are_added_and_win_over_generated_ones() -> None:
    conn = odbc_connection_string(settings(
        odbc_driver="FreeTDS", db_odbc_extra="tds_version=7.3;MultiSubnetFailover=yes"
    ))
    attrs = attributes(conn)
    assert attrs["TDS_Version"] == "7.3"
    assert attrs["MultiSubnetFailover"] == "yes"
    assert conn.lower().count("tds_version") == 1


def test_connection_string_needs_server_and_name() -> None:
    with pytest.raises(ConfigError):
        odbc_connection_string(settings(db_server=None, db_url="sqlite://"))


# --- URLs ---------------------------------------------------------------------------------


def test_pyodbc_url_round_trips_and_keeps_password_out_of_text() -> None:
    s = settings(db_pass="p;w}d@:/%")
    url = lis_url(s)
    assert isinstance(url, URL)
    assert url.drivername == "mssql+pyodbc"
    for shown in (str(url), repr(url), url.render_as_string()):
        assert "p;w}d" not in shown and "PWD" not in shown
    back = make_url(url.render_as_string(hide_password=False))
    assert back.query["odbc_connect"] == odbc_connection_string(s, include_password=False)
    assert back.password == "p;w}d@:/%"


def test_db_url_is_used_as_given_and_state_defaults_to_lis() -> None:
    s = Settings(db_url="sqlite:///lis.db", terceiros="A", bemsoft_dry_run=True)
    assert lis_url(s) == "sqlite:///lis.db"
    assert state_url(s) == "sqlite:///lis.db"
    s2 = Settings(db_url="sqlite:///lis.db", state_db_url="sqlite:///estado.db",
                  terceiros="A", bemsoft_dry_run=True)
    assert state_url(s2) == "sqlite:///estado.db"
    assert state_url(settings()) == lis_url(settings())


def test_mssql_python_url_escapes_password_and_splits_port() -> None:
    password = "p@ss:/w;}{rd%"
    s = settings(db_driver="mssql-python", db_server="10.0.0.5,1533", db_pass=password,
                 db_encrypt="yes", db_trust_server_certificate=True)
    url = lis_url(s)
    assert isinstance(url, URL)
    rendered = url.render_as_string(hide_password=False)
    assert password not in rendered  # escaped, not raw
    back = make_url(rendered)
    assert back.drivername == "mssql+mssqlpython"
    assert (back.host, back.port, back.database) == ("10.0.0.5", 1533, "LIS")
    assert (back.username, back.password) == ("sa", password)
    assert back.query == {"Encrypt": "yes", "TrustServerCertificate": "yes"}


def test_mssql_python_named_instance_and_windows_authentication() -> None:
    url = lis_url(settings(db_driver="mssql-python", db_server=r"srv\SQLEXPRESS",
                           db_user=None, db_pass=None))
    assert isinstance(url, URL)
    back = make_url(url.render_as_string(hide_password=False))
    assert back.host == r"srv\SQLEXPRESS"
    assert back.port is None
    assert back.username is None
    assert back.query["Trusted_Connection"] == "yes"


def test_mssql_python_connection_string_built_by_sqlalchemy() -> None:
    require_mssql_python()
    s = settings(db_driver="mssql-python", db_server=r"srv\INST,1533", db_pass="p;w}d",
                 db_login_timeout=9)
    engine = make_engine(lis_url(s), settings=s)
    cargs, cparams = connect_arguments(engine)
    attrs = attributes(cargs[0])
    assert attrs["Server"] == r"srv\INST,1533"
    assert attrs["PWD"] == "p;w}d"
    assert cparams["timeout"] == 9
    engine.dispose()


# --- engines ---------------------------------------------------------------------------------


def test_pyodbc_engine_adds_password_only_when_connecting() -> None:
    require_pyodbc()
    s = settings(db_server=r"srv\SQLEXPRESS", db_pass="p;w}d", db_login_timeout=7)
    engine = make_engine(lis_url(s), settings=s)
    assert "p;w}d" not in repr(engine) and "p;w}d" not in str(engine.url)
    assert engine.dialect.fast_executemany is False
    assert engine.pool._recycle == dbconn.POOL_RECYCLE_S
    cargs, cparams = connect_arguments(engine)
    assert len(cargs) == 1
    assert attributes(cargs[0]) == attributes(odbc_connection_string(s))
    assert cparams["timeout"] == 7
    engine.dispose()


def test_pyodbc_url_from_text_works_too() -> None:
    require_pyodbc()
    s = settings(db_pass="p;w}d")
    url = lis_url(s)
    assert isinstance(url, URL)
    engine = make_engine(url.render_as_string(hide_password=False))
    cargs, cparams = connect_arguments(engine)
    assert attributes(cargs[0])["PWD"] == "p;w}d"
    assert cparams["timeout"] == dbconn.DEFAULT_LOGIN_TIMEOUT_S
    engine.dispose()


def test_windows_authentication_engine_sends_no_password() -> None:
    require_pyodbc()
    s = settings(db_user=None, db_pass=None)
    engine = make_engine(lis_url(s), settings=s)
    cargs, _ = connect_arguments(engine)
    assert "PWD" not in cargs[0] and "Trusted_Connection=yes" in cargs[0]
    engine.dispose()


def test_queries_compile_for_sql_server() -> None:
    require_pyodbc()
    s = settings()
    engine = make_engine(lis_url(s), settings=s)
    schema = lis_schema(s, engine.dialect.name)
    item = Table("ItemSol", MetaData(schema=schema), Column("CodItemSol", Integer),
                 Column("NomeTerceirizado", String(80)))
    stmt = select(item.c.CodItemSol).where(item.c.NomeTerceirizado == "X").limit(5)
    sql = str(stmt.compile(dialect=engine.dialect))
    assert "dbo.[ItemSol]" in sql and "TOP" in sql
    engine.dispose()


def test_lis_schema_defaults() -> None:
    assert lis_schema(settings(), "mssql") == "dbo"
    assert lis_schema(settings(), "sqlite") is None
    assert lis_schema(settings(), "postgresql") is None
    assert lis_schema(settings(db_schema="lab"), "mssql") == "lab"
    assert lis_schema(settings(db_schema="lab"), "postgresql") == "lab"


def test_missing_database_driver_is_a_config_error_without_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        make_engine("mssql+nosuchdriver://sa:pw-SECRET-7@srv/LIS")
    assert "pw-SECRET-7" not in str(info.value)
    with pytest.raises(ConfigError):
        make_engine("not a url")


def _sqlite_pragma(engine: Any, name: str) -> Any:
    with engine.connect() as conn:
        return conn.exec_driver_sql(f"PRAGMA {name}").scalar()


def test_sqlite_file_engine_uses_wal_and_a_busy_timeout(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'lis.db'}")
    assert _sqlite_pragma(engine, "journal_mode") == "wal"
    assert _sqlite_pragma(engine, "busy_timeout") == 30000
    engine.dispose()


def test_sqlite_memory_engine_works(tmp_path: Path) -> None:
    engine = make_engine("sqlite://", for_state=True)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 1
    engine.dispose()


def test_sqlite_rollback_undoes_ddl_and_dml(tmp_path: Path) -> None:
    # pysqlite's legacy mode would autocommit the CREATE TABLE; the recipe makes it atomic.
    engine = make_engine(f"sqlite:///{tmp_path / 'estado.db'}", for_state=True)
    with pytest.raises(RuntimeError), engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        raise RuntimeError
    with engine.connect() as conn:
        assert conn.exec_driver_sql(
            "SELECT count(*) FROM sqlite_master WHERE name = 't'"
        ).scalar() == 0
    engine.dispose()


def _try_write_lock(path: Path) -> bool:
    raw = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        raw.execute("BEGIN IMMEDIATE")
        raw.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        raw.close()


def test_state_engine_takes_the_write_lock_when_a_transaction_begins(tmp_path: Path) -> None:
    path = tmp_path / "estado.db"
    engine = make_engine(f"sqlite:///{path}", for_state=True)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT count(*) FROM t").scalar()  # a read, yet...
        assert not _try_write_lock(path)  # ...writers already queue behind it
        conn.rollback()
    assert _try_write_lock(path)
    engine.dispose()


def test_lis_engine_reads_in_a_transaction_without_blocking_writers(tmp_path: Path) -> None:
    path = tmp_path / "lis.db"
    engine = make_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT count(*) FROM t").scalar()
        assert conn.connection.dbapi_connection.in_transaction  # BEGIN was really sent
        assert _try_write_lock(path)  # plain BEGIN + WAL: the LIS writer is not held up
    engine.dispose()


def test_freetds_with_instance_and_port_connects_by_port() -> None:
    attrs = attributes(odbc_connection_string(settings(odbc_driver="FreeTDS",
                                                       db_server=r"srv\SQLEXPRESS,1500")))
    assert (attrs["SERVER"], attrs["Port"]) == ("srv", "1500")


def test_microsoft_driver_keeps_tcp_prefix_and_instance_with_port() -> None:
    assert attributes(odbc_connection_string(settings(db_server="tcp:srv,1433")))["SERVER"] == (
        "tcp:srv,1433")
    assert attributes(odbc_connection_string(settings(db_server=r"srv\INST,1533")))[
        "SERVER"] == r"srv\INST,1533"


def test_user_and_driver_path_with_special_characters_are_braced(tmp_path: Path) -> None:
    odd = tmp_path / "drv}x" / "libmsodbcsql-18.so"
    odd.parent.mkdir()
    odd.write_bytes(b"")
    conn = odbc_connection_string(settings(db_user="lab;user", db_pass="{pw}",
                                           odbc_driver=str(odd)))
    attrs = attributes(conn)
    assert (attrs["UID"], attrs["PWD"], attrs["DRIVER"]) == ("lab;user", "{pw}", str(odd))
    assert "UID={lab;user}" in conn and "PWD={{pw}}}" in conn


def test_mssql_python_passes_extra_attributes_unbraced_for_sqlalchemy_to_quote() -> None:
    url = lis_url(settings(db_driver="mssql-python", db_odbc_extra="ApplicationIntent=ReadOnly;"
                           "HostNameInCertificate={a;b}"))
    assert isinstance(url, URL)
    assert url.query["ApplicationIntent"] == "ReadOnly"
    assert url.query["HostNameInCertificate"] == "a;b"
