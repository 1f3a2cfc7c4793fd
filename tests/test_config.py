"""Settings: .env discovery and precedence, validation messages, derived values."""

# ruff: noqa: S105, S106  # fake passwords and tokens are the subject under test

from __future__ import annotations

import datetime as dt
import re
import sys
from pathlib import Path

import pytest

from bemsoft_monitor import config
from bemsoft_monitor.config import (
    ENV_FILE_VAR,
    Settings,
    config_warnings,
    load_settings,
    mask,
    parse_odbc_attributes,
    split_server,
)
from bemsoft_monitor.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
ENV_EXAMPLE = REPO / ".env.example"

MINIMAL = (
    "DB_SERVER=localhost\\SQLEXPRESS\n"
    "DB_NAME=MinhaBase\n"
    "DB_USER=usuario\n"
    "DB_PASS=senha\n"
    "TERCEIROS=DIAGNÓSTICO DO BRASIL - DB,AME-SE - PARDINI\n"
    "BEMSOFT_DRY_RUN=1\n"
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No setting leaks in from the machine; cwd is an empty folder; not frozen."""
    for name in [*Settings.model_fields, "terceiro", ENV_FILE_VAR.lower()]:
        monkeypatch.delenv(name.upper(), raising=False)
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delattr(sys, "frozen", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def write_env(folder: Path, text: str, name: str = ".env") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(**env: str) -> list[str]:
    """Run load_settings with these variables set and return the problem lines."""
    mp = pytest.MonkeyPatch()
    try:
        for key, value in env.items():
            mp.setenv(key, value)
        with pytest.raises(ConfigError) as info:
            load_settings()
    finally:
        mp.undo()
    return info.value.problems


def lines_for(problems: list[str], variable: str) -> list[str]:
    return [p for p in problems if p.startswith(variable + ":")]


# --- .env discovery, encoding, precedence ------------------------------------------------


def test_minimal_env_file_in_working_directory_is_enough(clean_env: Path) -> None:
    write_env(clean_env, MINIMAL)
    s = load_settings()
    assert s.db_server == r"localhost\SQLEXPRESS"
    assert s.db_name == "MinhaBase"
    assert s.db_password == "senha"
    assert s.support_labs == ("DIAGNÓSTICO DO BRASIL - DB", "AME-SE - PARDINI")
    assert s.bemsoft_dry_run is True
    assert s.odbc_driver == "ODBC Driver 18 for SQL Server"
    assert s.poll_seconds == 5.0
    assert s.debounce_seconds == 300.0
    assert s.failed_dir == Path("completo/failed_events")
    assert s.bemsoft_base_url == "https://bemsoft.ws.wiselab.com.br"
    assert s.bemsoft_endpoint == "/requests"


def test_env_file_with_bom_and_crlf_is_read_like_a_plain_one(clean_env: Path) -> None:
    data = "\ufeff" + MINIMAL.replace("\n", "\r\n") + "PHYSICIAN_UF=se\r\n"
    (clean_env / ".env").write_bytes(data.encode("utf-8"))
    s = load_settings()
    assert s.db_server == r"localhost\SQLEXPRESS"  # first line, right after the BOM
    assert s.support_labs == ("DIAGNÓSTICO DO BRASIL - DB", "AME-SE - PARDINI")
    assert s.bemsoft_dry_run is True
    assert s.physician_uf == "SE"
    assert all("\r" not in str(v) for v in s.model_dump().values())


def test_env_file_not_in_utf8_is_reported_with_how_to_fix(clean_env: Path) -> None:
    (clean_env / ".env").write_bytes(MINIMAL.encode("cp1252"))
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert any("UTF-8" in p for p in info.value.problems)


def test_environment_overrides_env_file(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_env(clean_env, MINIMAL + "POLL_SECONDS=5\n")
    monkeypatch.setenv("POLL_SECONDS", "7.5")
    monkeypatch.setenv("DB_NAME", "OutraBase")
    s = load_settings()
    assert s.poll_seconds == 7.5
    assert s.db_name == "OutraBase"
    assert s.db_user == "usuario"  # untouched values still come from the file


def _fake_executable(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "executable", str(folder / "BemsoftMonitor.exe"))


def test_env_beside_executable_is_used_when_working_directory_has_none(
    clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Windows service starts in C:\Windows\System32: only the file beside the exe exists.
    exe_dir = tmp_path / "servico"
    _fake_executable(monkeypatch, exe_dir)
    write_env(exe_dir, MINIMAL)
    assert config.app_dir() == exe_dir.resolve()
    assert load_settings().db_name == "MinhaBase"


def test_working_directory_env_wins_over_the_one_beside_executable(
    clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exe_dir = tmp_path / "servico"
    _fake_executable(monkeypatch, exe_dir)
    write_env(exe_dir, MINIMAL + "BATCH_SIZE=100\n")
    write_env(clean_env, "DB_NAME=BaseDaPasta\n")
    s = load_settings()
    assert s.db_name == "BaseDaPasta"
    assert s.batch_size == 100  # what only the exe's file sets still applies


def test_bemsoft_env_file_names_the_only_file_read(
    clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_env(clean_env, MINIMAL + "BATCH_SIZE=100\n")
    other = write_env(tmp_path, MINIMAL.replace("MinhaBase", "Explicita"), name="lab.env")
    monkeypatch.setenv(ENV_FILE_VAR, str(other))
    s = load_settings()
    assert s.db_name == "Explicita"
    assert s.batch_size == 500


def test_missing_bemsoft_env_file_is_reported(
    clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_FILE_VAR, str(tmp_path / "nao-existe.env"))
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert lines_for(info.value.problems, ENV_FILE_VAR)
    assert lines_for(info.value.problems, "TERCEIROS")  # and the rest is still checked


def test_empty_value_counts_as_unset(clean_env: Path) -> None:
    write_env(clean_env, MINIMAL.replace("DB_USER=usuario\nDB_PASS=senha\n", "DB_USER=\n"))
    s = load_settings()
    assert s.db_user is None  # Windows authentication


# --- .env.example ---------------------------------------------------------------------------


def _example_keys() -> set[str]:
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    return {m.group(1) for m in re.finditer(r"^#?\s*([A-Z][A-Z0-9_]*)=", text, re.MULTILINE)}


def test_env_example_documents_every_setting() -> None:
    missing = {name.upper() for name in Settings.model_fields} - _example_keys()
    assert not missing, f".env.example não documenta: {sorted(missing)}"


def test_env_example_names_only_real_settings() -> None:
    unknown = _example_keys() - {name.upper() for name in Settings.model_fields}
    assert not unknown


def test_env_example_every_setting_has_a_comment_above() -> None:
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^#?\s*[A-Z][A-Z0-9_]*=", line):
            above = lines[i - 1]
            assert above.startswith("# ") and "=" not in above.split()[1], line


def test_env_example_copied_as_is_is_a_valid_dry_run_configuration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV_FILE_VAR, str(ENV_EXAMPLE))
    s = load_settings()
    assert s.db_server == r"localhost\SQLEXPRESS"
    assert s.bemsoft_dry_run is True
    assert "DIAGNÓSTICO DO BRASIL - DB" in s.support_labs
    assert s.default_gender == "M"
    assert s.default_birthdate == dt.date(1970, 1, 1)


def test_every_setting_says_its_expected_form() -> None:
    assert all(info.description for info in Settings.model_fields.values())


# --- validation: everything at once, secrets masked ---------------------------------------


def test_all_problems_are_listed_at_once_with_secrets_masked() -> None:
    secret_pass = "Pa55-VERY-secret"
    secret_token = "tok-ULTRA-secret-123"
    url_pass = "urlpw-SECRET-9"
    problems = problems_of(
        DB_SERVER="srv,99999",
        DB_PASS=secret_pass,
        BEMSOFT_TOKEN=secret_token,
        BEMSOFT_DRY_RUN="talvez",
        POLL_SECONDS="abc",
        DEBOUNCE_SECONDS="-1",
        DB_LOGIN_TIMEOUT="0",
        STATE_DB_URL=f"nope://user:{url_pass}@host/db",
        DEFAULT_GENDER="X",
        DEFAULT_BIRTHDATE="1970-13-01",
        LAB_UTC_OFFSET="3h",
        BEMSOFT_BASE_URL="ftp://bemsoft",
        LOG_LEVEL="VERBOSE",
    )
    text = "\n".join(problems)
    for variable in (
        "DB_SERVER", "DB_NAME", "DB_USER", "BEMSOFT_DRY_RUN", "POLL_SECONDS",
        "DEBOUNCE_SECONDS", "DB_LOGIN_TIMEOUT", "STATE_DB_URL", "DEFAULT_GENDER",
        "DEFAULT_BIRTHDATE", "LAB_UTC_OFFSET", "BEMSOFT_BASE_URL", "LOG_LEVEL", "TERCEIROS",
    ):
        assert lines_for(problems, variable), f"{variable} ausente em:\n{text}"
    for secret in (secret_pass, secret_token, url_pass):
        assert secret not in text
    # Each field line names the bad value and the expected form.
    (poll,) = lines_for(problems, "POLL_SECONDS")
    assert "'abc'" in poll and "não é um número" in poll and "esperado:" in poll
    (timeout,) = lines_for(problems, "DB_LOGIN_TIMEOUT")
    assert "mínimo 1" in timeout
    (state,) = lines_for(problems, "STATE_DB_URL")
    assert "nope://user:***@host/db" in state


def test_cross_field_problem_is_not_hidden_by_a_field_error() -> None:
    problems = problems_of(
        DB_SERVER="srv", DB_NAME="lis", POLL_SECONDS="abc", BEMSOFT_DRY_RUN="0"
    )
    assert lines_for(problems, "POLL_SECONDS")
    assert lines_for(problems, "TERCEIROS")
    assert lines_for(problems, "BEMSOFT_TOKEN")


def test_secret_values_never_shown_even_when_they_are_the_bad_value() -> None:
    assert mask("db_pass", "hunter2") == "****"
    assert mask("bemsoft_token", "abc") == "****"
    assert mask("db_pass", "") == "(vazio)"


def test_database_urls_are_shown_without_passwords() -> None:
    shown = mask("db_url", "postgresql://lab:s3cr%40t@db:5432/lis")
    assert "s3cr" not in shown and "lab:***@db" in shown
    odbc = "mssql+pyodbc:///?odbc_connect=DRIVER%3D%7BX%7D%3BUID%3Dsa%3BPWD%3Dodbc-secret"
    assert "odbc-secret" not in mask("state_db_url", odbc)
    assert "odbc-secret" not in mask("db_odbc_extra", "TDS_Version=7.3;PWD=odbc-secret")


def test_unparsable_db_url_is_reported_without_its_password() -> None:
    problems = problems_of(DB_URL="postgresql://u:pw-SECRET-1@h:notaport/db", TERCEIROS="A",
                           BEMSOFT_DRY_RUN="1")
    (line,) = lines_for(problems, "DB_URL")
    assert "pw-SECRET-1" not in line
    assert "URL SQLAlchemy" in line


def test_db_url_with_unknown_database_type_is_reported() -> None:
    problems = problems_of(DB_URL="sqllite:///lis.db", TERCEIROS="A", BEMSOFT_DRY_RUN="1")
    (line,) = lines_for(problems, "DB_URL")
    assert "sqllite" in line


def test_db_url_replaces_server_name_user_and_password() -> None:
    s = Settings(db_url="sqlite:///lis.db", terceiros="A", bemsoft_dry_run=True)
    assert s.db_server is None
    assert s.db_url == "sqlite:///lis.db"


def test_without_db_url_server_and_name_are_required() -> None:
    problems = problems_of(TERCEIROS="A", BEMSOFT_DRY_RUN="1")
    assert lines_for(problems, "DB_SERVER")
    assert lines_for(problems, "DB_NAME")
    assert len(problems) == 2


def test_sql_user_needs_a_password_and_a_password_needs_a_user() -> None:
    base = {"DB_SERVER": "srv", "DB_NAME": "lis", "TERCEIROS": "A", "BEMSOFT_DRY_RUN": "1"}
    assert lines_for(problems_of(**base, DB_USER="sa"), "DB_PASS")
    assert lines_for(problems_of(**base, DB_PASS="orphan-pw"), "DB_USER")


@pytest.mark.parametrize("server", ["srv,", "srv,abc", "srv,0", ",1433", "srv\\", "  "])
def test_bad_db_server_forms_are_rejected(server: str) -> None:
    problems = problems_of(DB_SERVER=server, DB_NAME="lis", TERCEIROS="A", BEMSOFT_DRY_RUN="1")
    assert lines_for(problems, "DB_SERVER")


def test_token_required_only_when_sending(monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"DB_SERVER": "srv", "DB_NAME": "lis", "TERCEIROS": "A"}
    assert lines_for(problems_of(**base), "BEMSOFT_TOKEN")  # default: DRY_RUN=0
    assert lines_for(problems_of(**base, BEMSOFT_DRY_RUN="não"), "BEMSOFT_TOKEN")
    for key, value in base.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("BEMSOFT_TOKEN", "tok")
    assert load_settings().token == "tok"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("0", False), ("true", True), ("False", False), ("sim", True),
     ("não", False), ("NÃO", False), ("nao", False), (" Sim ", True), ("yes", True)],
)
def test_booleans_accept_portuguese_and_numbers(
    raw: str, expected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BEMSOFT_DRY_RUN", "1")
    monkeypatch.setenv("LOG_PII", raw)
    s = Settings(db_url="sqlite://", terceiros="A")
    assert s.log_pii is expected


def test_unknown_boolean_word_is_rejected() -> None:
    problems = problems_of(DB_URL="sqlite://", TERCEIROS="A", BEMSOFT_DRY_RUN="1",
                           DB_TRUST_SERVER_CERTIFICATE="talvez")
    (line,) = lines_for(problems, "DB_TRUST_SERVER_CERTIFICATE")
    assert "'talvez'" in line


def test_choices_are_case_insensitive_and_driver_has_aliases() -> None:
    s = Settings(db_url="sqlite://", terceiros="A", bemsoft_dry_run=True, db_encrypt="Sim",
                 db_driver="MSSQL_PYTHON", log_level="debug", default_gender="f")
    assert (s.db_encrypt, s.db_driver, s.log_level, s.default_gender) == (
        "yes", "mssql-python", "DEBUG", "F"
    )


def test_birthdate_in_the_future_is_rejected() -> None:
    future = (dt.date.today() + dt.timedelta(days=2)).isoformat()
    problems = problems_of(DB_URL="sqlite://", TERCEIROS="A", BEMSOFT_DRY_RUN="1",
                           DEFAULT_BIRTHDATE=future)
    assert lines_for(problems, "DEFAULT_BIRTHDATE")


def test_backoff_cap_below_base_is_rejected() -> None:
    problems = problems_of(DB_URL="sqlite://", TERCEIROS="A", BEMSOFT_DRY_RUN="1",
                           BEMSOFT_BACKOFF="10", BEMSOFT_BACKOFF_MAX="5")
    assert lines_for(problems, "BEMSOFT_BACKOFF_MAX")


def test_verify_accepts_flags_or_an_existing_ca_file(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    common = {"db_url": "sqlite://", "terceiros": "A", "bemsoft_dry_run": True}
    assert Settings(**common, bemsoft_verify="não").verify is False
    assert Settings(**common, bemsoft_verify="1").verify is True
    assert Settings(**common, bemsoft_verify=str(ca)).verify == str(ca)
    problems = problems_of(DB_URL="sqlite://", TERCEIROS="A", BEMSOFT_DRY_RUN="1",
                           BEMSOFT_VERIFY=str(tmp_path / "missing.pem"))
    assert lines_for(problems, "BEMSOFT_VERIFY")


@pytest.mark.parametrize("addr", ["localhost:", "host:70000", "127.0.0.1:abc"])
def test_http_addr_needs_host_and_port(addr: str) -> None:
    problems = problems_of(DB_URL="sqlite://", TERCEIROS="A", BEMSOFT_DRY_RUN="1",
                           HTTP_ADDR=addr)
    assert lines_for(problems, "HTTP_ADDR")


def test_odbc_driver_path_must_exist(tmp_path: Path) -> None:
    lib = tmp_path / "libmsodbcsql-18.so"
    lib.write_bytes(b"")
    s = Settings(db_server="srv", db_name="lis", terceiros="A", bemsoft_dry_run=True,
                 odbc_driver=str(lib))
    assert s.odbc_driver == str(lib)
    problems = problems_of(DB_SERVER="srv", DB_NAME="lis", TERCEIROS="A", BEMSOFT_DRY_RUN="1",
                           ODBC_DRIVER=str(tmp_path / "nope.so"))
    assert lines_for(problems, "ODBC_DRIVER")


def test_malformed_odbc_extra_is_rejected() -> None:
    problems = problems_of(DB_SERVER="srv", DB_NAME="lis", TERCEIROS="A", BEMSOFT_DRY_RUN="1",
                           DB_ODBC_EXTRA="TDS_Version")
    assert lines_for(problems, "DB_ODBC_EXTRA")


def test_schema_name_must_be_an_identifier() -> None:
    problems = problems_of(DB_SERVER="srv", DB_NAME="lis", TERCEIROS="A", BEMSOFT_DRY_RUN="1",
                           DB_SCHEMA="dbo; DROP TABLE x")
    assert lines_for(problems, "DB_SCHEMA")


# --- derived values -------------------------------------------------------------------------


def test_terceiros_trimmed_deduplicated_and_empties_dropped() -> None:
    s = Settings(db_url="sqlite://", terceiros=" A , ,B,A ", bemsoft_dry_run=True)
    assert s.support_labs == ("A", "B")


def test_legacy_terceiro_is_the_fallback() -> None:
    s = Settings(db_url="sqlite://", terceiro="AME-SE - PARDINI", bemsoft_dry_run=True)
    assert s.support_labs == ("AME-SE - PARDINI",)


def test_terceiros_wins_over_legacy_terceiro_with_a_warning() -> None:
    s = Settings(db_url="sqlite://", terceiros="A,B", terceiro="C", bemsoft_dry_run=True)
    assert s.support_labs == ("A", "B")
    assert any(w.startswith("TERCEIRO:") for w in config_warnings(s))


def test_blank_terceiros_falls_back_to_terceiro() -> None:
    s = Settings(db_url="sqlite://", terceiros=" , ", terceiro="C", bemsoft_dry_run=True)
    assert s.support_labs == ("C",)


def test_physician_only_when_all_four_are_filled() -> None:
    common = {"db_url": "sqlite://", "terceiros": "A", "bemsoft_dry_run": True}
    full = {"physician_name": " Maria ", "physician_council": "CRM",
            "physician_number": "123", "physician_uf": "se"}
    assert Settings(**common, **full).physician == {
        "name": "Maria", "council": "CRM", "number": "123", "uf": "SE"
    }
    for missing in full:
        partial = {k: v for k, v in full.items() if k != missing}
        s = Settings(**common, **partial)
        assert s.physician is None
        assert any(w.startswith("PHYSICIAN_") for w in config_warnings(s))
    assert Settings(**common, **{**full, "physician_number": "  "}).physician is None


def test_physician_uf_must_be_two_letters() -> None:
    problems = problems_of(DB_URL="sqlite://", TERCEIROS="A", BEMSOFT_DRY_RUN="1",
                           PHYSICIAN_UF="Sergipe")
    assert lines_for(problems, "PHYSICIAN_UF")


def test_lab_offset_and_endpoint_normalisation() -> None:
    s = Settings(db_url="sqlite://", terceiros="A", bemsoft_dry_run=True,
                 lab_utc_offset="-03:00", bemsoft_endpoint="requests",
                 bemsoft_base_url="https://h.example/")
    assert s.lab_tz == dt.timezone(dt.timedelta(hours=-3))
    assert s.bemsoft_endpoint == "/requests"
    assert s.bemsoft_base_url == "https://h.example"


def test_settings_are_frozen() -> None:
    s = Settings(db_url="sqlite://", terceiros="A", bemsoft_dry_run=True)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        s.poll_seconds = 1  # type: ignore[misc]


def test_secrets_lists_password_and_token_for_redaction() -> None:
    s = Settings(db_server="srv", db_name="lis", db_user="sa", db_pass="pw1234",
                 bemsoft_token="tok5678", terceiros="A")
    assert set(s.secrets) == {"pw1234", "tok5678"}
    assert "pw1234" not in repr(s) and "tok5678" not in repr(s)


# --- small parsers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "parts"),
    [
        ("srv", ("srv", None, None)),
        ("10.0.0.5\\SQLEXPRESS", ("10.0.0.5", "SQLEXPRESS", None)),
        ("srv,1433", ("srv", None, 1433)),
        (" srv , 1533 ", ("srv", None, 1533)),
        ("srv\\INST,1533", ("srv", "INST", 1533)),
        ("tcp:srv,1433", ("tcp:srv", None, 1433)),
    ],
)
def test_split_server(raw: str, parts: tuple[str, str | None, int | None]) -> None:
    assert split_server(raw) == parts


def test_parse_odbc_attributes_keeps_braced_values() -> None:
    assert parse_odbc_attributes("TDS_Version=7.3; PWD={a;b}}c} ;X=1;") == [
        ("TDS_Version", "7.3"), ("PWD", "{a;b}}c}"), ("X", "1")
    ]
    for bad in ("X", "=1", "PWD={abc", "PWD={a}b"):
        with pytest.raises(ValueError):
            parse_odbc_attributes(bad)


# --- mistakes a lab's IT person makes in the .env ---------------------------------------------


def test_decimal_comma_is_reported_with_the_fix() -> None:
    problems = problems_of(DB_URL="sqlite://", TERCEIROS="A", BEMSOFT_DRY_RUN="1",
                           POLL_SECONDS="0,5")
    (line,) = lines_for(problems, "POLL_SECONDS")
    assert "'0,5'" in line and "use ponto" in line


def test_default_gender_accepts_the_portuguese_words() -> None:
    common = {"db_url": "sqlite://", "terceiros": "A", "bemsoft_dry_run": True}
    assert Settings(**common, default_gender="Masculino").default_gender == "M"
    assert Settings(**common, default_gender=" feminino ").default_gender == "F"
    problems = problems_of(DB_URL="sqlite://", TERCEIROS="A", BEMSOFT_DRY_RUN="1",
                           DEFAULT_GENDER="I")
    (line,) = lines_for(problems, "DEFAULT_GENDER")
    assert "'I'" in line and "M ou F" in line


@pytest.mark.parametrize("endpoint", ["https://bemsoft.ws.wiselab.com.br/requests",
                                      "/requests?x=1", "/req uests"])
def test_endpoint_must_be_a_plain_path(endpoint: str) -> None:
    problems = problems_of(DB_URL="sqlite://", TERCEIROS="A", BEMSOFT_DRY_RUN="1",
                           BEMSOFT_ENDPOINT=endpoint)
    (line,) = lines_for(problems, "BEMSOFT_ENDPOINT")
    assert "esperado: caminho" in line


def test_backslash_escape_inside_double_quotes_is_reported(clean_env: Path) -> None:
    # python-dotenv reads "srv\teste" as srv<TAB>este: the monitor would reach instance "este".
    write_env(clean_env, MINIMAL.replace("DB_SERVER=localhost\\SQLEXPRESS",
                                         'DB_SERVER="srv\\teste"'))
    with pytest.raises(ConfigError) as info:
        load_settings()
    (line,) = lines_for(info.value.problems, "DB_SERVER")
    assert "caractere de controle" in line and "aspas" in line
    write_env(clean_env, MINIMAL.replace("DB_SERVER=localhost\\SQLEXPRESS",
                                         "DB_SERVER=srv\\teste"))
    assert load_settings().db_server == "srv\\teste"  # unquoted: kept as written


def test_control_character_in_a_secret_is_reported_masked(clean_env: Path) -> None:
    write_env(clean_env, MINIMAL.replace("DB_PASS=senha", 'DB_PASS="se\\nnha-SECRETA"'))
    with pytest.raises(ConfigError) as info:
        load_settings()
    (line,) = lines_for(info.value.problems, "DB_PASS")
    assert "****" in line and "SECRETA" not in line


def test_misspelt_variable_is_named_with_a_suggestion(clean_env: Path) -> None:
    write_env(clean_env, MINIMAL.replace("DB_PASS=senha", "DB_PASSWORD=senha"))
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert lines_for(info.value.problems, "DB_PASS")  # the required variable is missing...
    (hint,) = lines_for(info.value.problems, "DB_PASSWORD")  # ...and why
    assert "quis dizer DB_PASS?" in hint and "senha" not in hint


def test_unknown_variable_of_a_valid_file_is_a_warning(clean_env: Path) -> None:
    write_env(clean_env, MINIMAL + "BEMSOFT_TOKN=abc\nBEMSOFT_STOP_TIMEOUT_S=20\n")
    s = load_settings()
    warnings = config_warnings(s)
    assert any(w.startswith("BEMSOFT_TOKN:") and "BEMSOFT_TOKEN" in w for w in warnings)
    assert not any(w.startswith("BEMSOFT_STOP_TIMEOUT_S") for w in warnings)  # scripts use it


def test_settings_from_values_ignore_the_machine_environment_and_env_file(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_env(clean_env, MINIMAL + "DEFAULT_GENDER=F\n")
    monkeypatch.setenv("STATE_DB_URL", "sqlite:///producao.db")
    monkeypatch.setenv("BEMSOFT_EXTID_MAX", "50")
    s = config.settings_from_values(db_url="sqlite://", terceiros="A", bemsoft_dry_run=True)
    assert (s.state_db_url, s.default_gender, s.bemsoft_extid_max) == (None, None, 20)
    assert isinstance(s, Settings)
    with pytest.raises(ConfigError):
        config.settings_from_values(db_url="sqlite://", terceiros="A", poll_seconds="abc")
    write_env(clean_env, MINIMAL + "DB_PASSWORD=x\n")
    assert not any("DB_PASSWORD" in w for w in config_warnings(s))  # it read no .env
