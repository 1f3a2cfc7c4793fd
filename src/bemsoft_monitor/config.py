"""Settings: the one place that reads the environment and ``.env``.

``.env`` is looked for beside the executable (or ``main.py``) and in the working
directory (the working directory wins); ``BEMSOFT_ENV_FILE`` names one explicit file
instead. Real environment variables override any file.
"""

from __future__ import annotations

import datetime as dt
import difflib
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote_plus, urlsplit

from dotenv import dotenv_values
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from .errors import ConfigError
from .redact import redact_secrets, redact_url

SECRET_FIELDS = frozenset({"db_pass", "bemsoft_token", "painel_token", "painel_password",
                           "painel_pii_token", "smtp_password", "alert_webhook_url",
                           "bemsoft_proxy"})
URL_FIELDS = frozenset({"db_url", "state_db_url"})
# Free-form ODBC attributes may carry a PWD=...; shown only after redaction.
ODBC_FIELDS = frozenset({"db_odbc_extra"})
ENV_FILE_VAR = "BEMSOFT_ENV_FILE"

_TRUE_WORDS = frozenset({"1", "true", "sim", "s", "yes", "y", "on"})
_FALSE_WORDS = frozenset({"0", "false", "não", "nao", "n", "no", "off"})
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_@#$]{0,127}$")
_UF = re.compile(r"^[A-Za-z]{2}$")
_GENDER_WORDS = {"MASCULINO": "M", "MASC": "M", "FEMININO": "F", "FEM": "F"}
# python-dotenv turns \t, \n, \r... inside double quotes into control characters, so
# DB_SERVER="srv\teste" silently becomes "srv<TAB>este".
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# Read by the start/stop scripts and the process itself, not by Settings.
_NON_SETTING_VARIABLES = frozenset({"BEMSOFT_ENV_FILE", "BEMSOFT_NO_PAUSE",
                                    "BEMSOFT_START_WAIT_S", "BEMSOFT_STOP_TIMEOUT_S"})


def app_dir() -> Path:
    """Folder of the executable (PyInstaller) or of the project checkout."""
    if getattr(sys, "frozen", False):
        return Path(sys.executable).resolve().parent
    main = sys.modules.get("__main__")
    main_file = getattr(main, "__file__", None)
    if main_file and Path(main_file).name in ("main.py", "retry_failed.py"):
        return Path(main_file).resolve().parent
    return Path.cwd()


def env_files() -> tuple[Path, ...]:
    """``.env`` candidates, lowest priority first (pydantic-settings: later wins)."""
    explicit = os.environ.get(ENV_FILE_VAR, "").strip()
    if explicit:
        return (Path(explicit),)
    beside = app_dir() / ".env"
    here = Path.cwd() / ".env"
    if beside.resolve() == here.resolve():
        return (here,)
    return (beside, here)


def parse_bool(value: object) -> bool | None:
    """1/0, true/false, sim/não (also yes/no, on/off); None when not a boolean."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    return None


def split_server(server: str) -> tuple[str, str | None, int | None]:
    r"""Split DB_SERVER (``host``, ``host\INSTANCE``, ``host,port``) into its parts.

    A ``tcp:`` prefix is kept in the host. Raises ValueError on an empty host or a bad port.
    """
    text = server.strip()
    port: int | None = None
    if "," in text:
        text, _, port_text = text.partition(",")
        port_text = port_text.strip()
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError("porta deve ser um número de 1 a 65535")
        port = int(port_text)
    host, _, instance = text.strip().partition("\\")
    host, instance = host.strip(), instance.strip()
    if not host or host.lower() == "tcp:":
        raise ValueError("nome do servidor vazio")
    if "\\" in text and not instance:
        raise ValueError("nome da instância vazio após a barra invertida")
    return host, instance or None, port


def parse_odbc_attributes(text: str) -> list[tuple[str, str]]:
    """Split ``KEY=value;KEY={va;lue}`` into pairs; values keep their ODBC braces."""
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] in "; \t":
            i += 1
            continue
        eq = text.find("=", i)
        if eq < 0:
            raise ValueError(f"falta '=' em {text[i:]!r}")
        key = text[i:eq].strip()
        if not key or ";" in key:
            raise ValueError("atributo sem nome")
        j = eq + 1
        if text[j:j + 1] == "{":
            k = j + 1
            while True:
                close = text.find("}", k)
                if close < 0:
                    raise ValueError(f"chave '{{' sem '}}' no valor de {key}")
                if text[close + 1:close + 2] == "}":
                    k = close + 2
                    continue
                break
            value = text[j:close + 1]
            i = close + 1
            if text[i:].lstrip(" \t")[:1] not in ("", ";"):
                raise ValueError(f"texto após '}}' no valor de {key}")
        else:
            end = text.find(";", j)
            end = n if end < 0 else end
            value = text[j:end].strip()
            i = end
        pairs.append((key, value))
    return pairs


class Settings(BaseSettings):
    """Frozen configuration of one monitor process.

    Invalid input raises :class:`ConfigError` (not pydantic's ValidationError) with one
    Portuguese line per problem: field errors and cross-field rules together.
    """

    model_config = SettingsConfigDict(
        env_file_encoding="utf-8-sig",  # Notepad writes a BOM
        env_ignore_empty=True,
        extra="ignore",
        frozen=True,
        case_sensitive=False,
    )

    # --- LIS database -------------------------------------------------------
    db_url: str | None = Field(None, description="URL SQLAlchemy completa, ex.: sqlite:///lis.db")
    db_server: str | None = Field(None, description=r"host, host\INSTANCIA ou host,porta")
    db_name: str | None = Field(None, description="nome do banco do LIS")
    db_user: str | None = Field(None, description="usuário SQL (vazio = autenticação do Windows)")
    db_pass: SecretStr | None = Field(None, description="senha do usuário SQL")
    db_driver: Literal["pyodbc", "mssql-python"] = Field(
        "pyodbc", description="pyodbc ou mssql-python"
    )
    odbc_driver: str = Field(
        "ODBC Driver 18 for SQL Server",
        description="nome do driver ODBC instalado ou caminho do arquivo .so/.dll",
    )
    db_encrypt: Literal["yes", "no", "strict", "mandatory", "optional"] | None = Field(
        None, description="yes, no ou strict"
    )
    db_trust_server_certificate: bool = Field(False, description="1 ou 0 (sim/não)")
    db_schema: str | None = Field(None, description="schema das tabelas do LIS (padrão dbo)")
    db_login_timeout: int = Field(15, ge=1, le=600, description="segundos, 1 a 600")
    db_odbc_extra: str | None = Field(
        None, description="atributos ODBC extras CHAVE=valor;CHAVE=valor, ex.: TDS_Version=7.3"
    )
    state_db_url: str | None = Field(
        None, description="URL SQLAlchemy do banco de estado (padrão: o próprio LIS)"
    )

    # --- reading --------------------------------------------------------------
    poll_seconds: float = Field(5.0, ge=0.05, le=3600, description="segundos entre leituras")
    debounce_seconds: float = Field(300.0, ge=0, le=86400, description="segundos (0 desliga)")
    batch_size: int = Field(500, ge=1, le=50000, description="itens por leitura, 1 a 50000")
    terceiros: str | None = Field(None, description="nomes separados por vírgula")
    terceiro: str | None = Field(None, description="um nome (opção legada)")
    initial_item_id: str = Field(
        "max", description="max (só itens novos), 0 (tudo) ou um CodItemSol"
    )
    out_of_order_grace_seconds: float = Field(
        600.0, ge=0, le=86400, description="segundos de espera por commits fora de ordem"
    )
    failed_dir: Path = Field(Path("completo/failed_events"), description="pasta")
    refused_report: Path = Field(
        Path("completo/itens_recusados.csv"), description="arquivo CSV de itens recusados"
    )

    # --- Bemsoft -----------------------------------------------------------------
    bemsoft_base_url: str = Field(
        "https://bemsoft.ws.wiselab.com.br", description="URL http(s)://host[:porta]"
    )
    bemsoft_endpoint: str = Field("/requests", description="caminho, ex.: /requests")
    bemsoft_tests_endpoint: str = Field("/tests", description="caminho, ex.: /tests")
    bemsoft_token: SecretStr | None = Field(None, description="token Bearer")
    bemsoft_timeout: float = Field(30.0, gt=0, le=600, description="segundos")
    bemsoft_retries: int = Field(
        0, ge=0, le=10000,
        description="novas tentativas após a primeira, antes do FAILED_DIR (0 = só o horizonte)"
    )
    bemsoft_backoff: float = Field(2.0, gt=0, le=3600, description="segundos (base do backoff)")
    bemsoft_backoff_max: float = Field(600.0, gt=0, le=86400, description="segundos")
    bemsoft_retry_horizon_seconds: float = Field(
        86400.0, gt=0, le=30 * 86400, description="segundos de novas tentativas"
    )
    bemsoft_verify: str = Field("1", description="1, 0 ou caminho de um arquivo CA")
    bemsoft_proxy: str | None = Field(None, description="URL http(s)://[usuário:senha@]proxy:porta")
    bemsoft_dry_run: bool = Field(False, description="1 ou 0 (sim/não)")
    bemsoft_extid_max: int = Field(20, ge=8, le=200, description="caracteres, 8 a 200")
    bemsoft_concurrency: int = Field(4, ge=1, le=64, description="1 a 64")
    bemsoft_breaker_seconds: float = Field(
        30.0, gt=0, le=3600, description="segundos entre sondagens durante uma queda"
    )
    bemsoft_tests_ttl: float = Field(86400.0, gt=0, description="segundos")
    bemsoft_tests_min_refresh: float = Field(300.0, ge=0, description="segundos")
    bemsoft_catalog_cache: Path = Field(
        Path("completo/catalogo_bemsoft.json"), description="arquivo"
    )
    bemsoft_test_map_path: Path | None = Field(None, description="arquivo JSON")
    bemsoft_material_map_path: Path | None = Field(None, description="arquivo CSV ou JSON")
    bemsoft_variant_policy: Literal["refuse", "first"] = Field(
        "refuse", description="refuse ou first"
    )
    test_code_source: Literal["convexames", "codigoexame"] = Field(
        "convexames", description="convexames ou codigoexame"
    )

    # --- data defaults ----------------------------------------------------------------
    default_gender: Literal["M", "F"] | None = Field(None, description="M ou F")
    default_birthdate: dt.date | None = Field(None, description="AAAA-MM-DD")
    lab_utc_offset: str = Field("-03:00", description="±HH:MM, ex.: -03:00")
    physician_name: str | None = Field(None, description="nome do médico")
    physician_council: str | None = Field(None, description="conselho, ex.: CRM")
    physician_number: str | None = Field(None, description="número no conselho")
    physician_uf: str | None = Field(None, description="UF com duas letras, ex.: SE")

    # --- process ------------------------------------------------------------------
    lease_seconds: float = Field(30.0, ge=2, le=3600, description="segundos")
    shutdown_grace_seconds: float = Field(15.0, ge=0, le=600, description="segundos")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="DEBUG, INFO, WARNING ou ERROR"
    )
    log_format: Literal["text", "json"] = Field("text", description="text ou json")
    log_file: Path | None = Field(None, description="arquivo de log")
    log_max_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="bytes")
    log_backup_count: int = Field(5, ge=0, le=1000, description="0 a 1000")
    log_pii: bool = Field(False, description="1 ou 0 (sim/não)")
    http_addr: str | None = Field(
        None, description="host:porta ou só a porta, ex.: 127.0.0.1:8765 ou 8765"
    )

    # --- painel ---------------------------------------------------------------------
    painel_token: SecretStr | None = Field(
        None, description="texto secreto de no mínimo 12 caracteres"
    )
    painel_user: str | None = Field(None, description="nome de usuário do painel")
    painel_password: SecretStr | None = Field(
        None, description="senha de no mínimo 12 caracteres"
    )
    painel_pii: bool = Field(False, description="1 ou 0 (sim/não)")
    # A second credential: only sessions opened with it see patient data unmasked.
    painel_pii_token: SecretStr | None = Field(
        None, description="texto secreto de no mínimo 12 caracteres, diferente de PAINEL_TOKEN"
    )

    # --- alerts ---------------------------------------------------------------------
    alert_webhook_url: str | None = Field(None, description="URL http(s)://...")
    alert_email_to: str | None = Field(None, description="e-mails separados por vírgula")
    smtp_host: str | None = Field(None, description="servidor SMTP, ex.: smtp.empresa.com.br")
    smtp_port: int = Field(587, ge=1, le=65535, description="porta, 1 a 65535")
    smtp_user: str | None = Field(None, description="usuário SMTP (vazio = sem login)")
    smtp_password: SecretStr | None = Field(None, description="senha SMTP")
    smtp_from: str | None = Field(None, description="remetente, ex.: monitor@lab.com.br")
    smtp_security: Literal["starttls", "ssl", "none"] = Field(
        "starttls", description="starttls, ssl ou none"
    )
    alert_no_poll_minutes: float = Field(
        10.0, gt=0, le=10080, description="minutos sem leitura do LIS antes do alerta"
    )
    alert_oldest_waiting_minutes: float = Field(
        60.0, gt=0, le=43200, description="minutos de espera do pedido mais antigo"
    )
    alert_repeat_minutes: float = Field(
        60.0, ge=1, le=10080, description="minutos entre alertas do mesmo tipo"
    )
    alert_check_seconds: float = Field(
        30.0, ge=1, le=3600, description="segundos entre verificações"
    )

    # --- field validators ---------------------------------------------------------
    @field_validator("db_trust_server_certificate", "bemsoft_dry_run", "log_pii", "painel_pii",
                     mode="before")
    @classmethod
    def _bool(cls, value: Any) -> Any:
        parsed = parse_bool(value)
        if parsed is None:
            raise ValueError("não é 1/0, sim/não ou true/false")
        return parsed

    @field_validator("default_gender", mode="before")
    @classmethod
    def _upper_gender(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        word = value.strip().upper()
        return _GENDER_WORDS.get(word, word)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator(
        "bemsoft_variant_policy", "test_code_source", "log_format", "smtp_security", mode="before"
    )
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("db_driver", mode="before")
    @classmethod
    def _driver(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower()
            return "mssql-python" if value in ("mssql_python", "mssqlpython") else value
        return value

    @field_validator("db_encrypt", mode="before")
    @classmethod
    def _encrypt(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        word = value.strip().lower()
        if word in ("yes", "no", "strict", "mandatory", "optional"):
            return word
        flag = parse_bool(word)
        return word if flag is None else ("yes" if flag else "no")

    @field_validator("db_url", "state_db_url")
    @classmethod
    def _db_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        check_db_url(value)
        return value

    @field_validator("db_server")
    @classmethod
    def _server(cls, value: str | None) -> str | None:
        if value is None:
            return None
        split_server(value)
        return value.strip()

    @field_validator("odbc_driver")
    @classmethod
    def _odbc_driver(cls, value: str) -> str:
        value = value.strip().strip("{}").strip()
        if not value:
            raise ValueError("nome do driver vazio")
        looks_like_path = "/" in value or "\\" in value
        if looks_like_path and not Path(value).is_file():
            raise ValueError("arquivo do driver não encontrado")
        return value

    @field_validator("db_schema")
    @classmethod
    def _schema(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if not _SCHEMA_NAME.match(value):
            raise ValueError("use só letras, números e _ (ex.: dbo)")
        return value

    @field_validator("db_odbc_extra")
    @classmethod
    def _odbc_extra(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parse_odbc_attributes(value)
        return value.strip()

    @field_validator("terceiros", "terceiro", "db_name", "db_user", "painel_user", "smtp_host",
                     "smtp_user", "smtp_from", "alert_email_to")
    @classmethod
    def _strip(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return value.strip() or None

    @field_validator("initial_item_id")
    @classmethod
    def _initial(cls, value: str) -> str:
        value = value.strip().lower()
        if value != "max" and not value.isdigit():
            raise ValueError("use max ou um número inteiro")
        return value

    @field_validator("lab_utc_offset")
    @classmethod
    def _offset(cls, value: str) -> str:
        parse_offset(value)
        return value.strip()

    @field_validator("bemsoft_base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        value = value.strip()
        if not value.startswith(("http://", "https://")):
            raise ValueError("deve começar com http:// ou https://")
        try:
            host = urlsplit(value).hostname
        except ValueError:
            host = None
        if not host:
            raise ValueError("falta o nome do servidor")
        return value.rstrip("/")

    @field_validator("bemsoft_endpoint", "bemsoft_tests_endpoint")
    @classmethod
    def _path(cls, value: str) -> str:
        value = value.strip()
        if "://" in value:
            # BASE_URL + ENDPOINT is the URL: a full URL here would become "/https://...".
            raise ValueError("informe só o caminho (ex.: /requests); o endereço do servidor "
                             "vai em BEMSOFT_BASE_URL")
        if not value or any(c.isspace() or c in "?#" for c in value):
            raise ValueError("caminho vazio ou com espaço, ? ou #")
        return value if value.startswith("/") else "/" + value

    @field_validator("bemsoft_verify")
    @classmethod
    def _verify(cls, value: str) -> str:
        value = value.strip()
        if value and parse_bool(value) is None and not Path(value).exists():
            raise ValueError("arquivo CA não encontrado")
        return value

    @field_validator("default_birthdate")
    @classmethod
    def _birthdate(cls, value: dt.date | None) -> dt.date | None:
        if value is not None and not dt.date(1900, 1, 2) <= value <= dt.date.today():
            raise ValueError("data fora do intervalo 1900-01-02 a hoje")
        return value

    @field_validator("physician_uf")
    @classmethod
    def _uf(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not _UF.match(value.strip()):
            raise ValueError("use a sigla com duas letras")
        return value.strip().upper()

    @field_validator("http_addr")
    @classmethod
    def _http_addr(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        host, _sep, port = value.rpartition(":")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError("use host:porta ou só a porta (1 a 65535), ex.: 127.0.0.1:8765")
        # Only the port ("8765" or ":8765"): this computer alone, as the default promises.
        return value if host else f"127.0.0.1:{int(port)}"

    @field_validator("painel_token", "painel_password", "painel_pii_token")
    @classmethod
    def _painel_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        if len(value.get_secret_value().strip()) < 12:
            raise ValueError("curto demais: use no mínimo 12 caracteres")
        return value

    @field_validator("bemsoft_proxy", "alert_webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        if not value.startswith(("http://", "https://")):
            raise ValueError("deve começar com http:// ou https://")
        try:
            host = urlsplit(value).hostname
        except ValueError:
            host = None
        if not host:
            raise ValueError("falta o nome do servidor")
        return value

    @field_validator("alert_email_to")
    @classmethod
    def _emails(cls, value: str | None) -> str | None:
        if value is None:
            return None
        for address in split_labs(value):
            if "@" not in address.strip("@"):
                raise ValueError(f"{address!r} não é um e-mail")
        return value

    # --- whole-model validation -----------------------------------------------------
    @model_validator(mode="wrap")
    @classmethod
    def _validate_all(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # Cross-field rules run on the raw values, so that they are reported together
        # with field errors (an after-validator would be skipped when a field fails).
        cross = cross_field_problems(data) if isinstance(data, Mapping) else []
        try:
            settings = handler(data)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc) + cross) from None
        if cross:
            raise ConfigError(cross)
        return settings

    # --- derived values -----------------------------------------------------------
    @property
    def support_labs(self) -> tuple[str, ...]:
        """TERCEIROS (or, when it names nobody, the legacy TERCEIRO), trimmed."""
        return split_labs(self.terceiros or "") or split_labs(self.terceiro or "")

    @property
    def physician(self) -> dict[str, str] | None:
        """The four physician settings, or None unless all are filled."""
        values = (self.physician_name, self.physician_council, self.physician_number,
                  self.physician_uf)
        if not all(v and v.strip() for v in values):
            return None
        name, council, number, uf = (v.strip() for v in values if v)
        return {"name": name, "council": council, "number": number, "uf": uf.upper()}

    @property
    def lab_tz(self) -> dt.timezone:
        """The lab's fixed UTC offset."""
        return parse_offset(self.lab_utc_offset)

    @property
    def verify(self) -> bool | str:
        """``requests``' verify argument from BEMSOFT_VERIFY."""
        v = self.bemsoft_verify.strip()
        if not v:
            return True
        parsed = parse_bool(v)
        return v if parsed is None else parsed

    @property
    def token(self) -> str:
        """The bearer token's text ('' when unset)."""
        return self.bemsoft_token.get_secret_value() if self.bemsoft_token else ""

    @property
    def db_password(self) -> str:
        """DB_PASS's text ('' when unset)."""
        return self.db_pass.get_secret_value() if self.db_pass else ""

    @property
    def secrets(self) -> tuple[str, ...]:
        """Secret values to strip from any text shown to people (see redact_secrets)."""
        extra = tuple(v.get_secret_value() for v in (self.painel_token, self.painel_password,
                                                     self.painel_pii_token, self.smtp_password)
                      if v is not None)
        return tuple(s for s in (self.token, self.db_password, *extra,
                                 self.alert_webhook_url or "", self.bemsoft_proxy or "") if s)

    @property
    def alert_emails(self) -> tuple[str, ...]:
        """ALERT_EMAIL_TO as a list of addresses."""
        return split_labs(self.alert_email_to or "")


def split_labs(raw: str) -> tuple[str, ...]:
    """Comma-separated support lab names, trimmed, empties and repeats dropped."""
    return tuple(dict.fromkeys(p.strip() for p in raw.split(",") if p.strip()))


def parse_offset(value: str) -> dt.timezone:
    """Parse ``-03:00`` into a timezone; raise ValueError otherwise."""
    text = value.strip()
    sign = -1 if text.startswith("-") else 1
    body = text.lstrip("+-")
    try:
        hours, minutes = (int(p) for p in body.split(":"))
    except ValueError:
        raise ValueError("use ±HH:MM, ex.: -03:00") from None
    if not (0 <= hours <= 14 and 0 <= minutes < 60):
        raise ValueError("use ±HH:MM, ex.: -03:00")
    return dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))


def check_db_url(value: str) -> None:
    """Raise ValueError (without echoing the URL) unless SQLAlchemy understands it."""
    try:
        url = make_url(value)
    except (ArgumentError, ValueError):
        raise ValueError("não é uma URL SQLAlchemy, ex.: sqlite:///lis.db") from None
    try:
        url.get_dialect()
    except NoSuchModuleError:
        raise ValueError(f"tipo de banco desconhecido: {url.drivername}") from None


def redact_db_url(text: str) -> str:
    """A database URL fit to show: URL and ODBC passwords replaced by ***."""
    try:
        url = make_url(text)
        if url.password:
            text = url.render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # unparsable: the regexes still apply
        pass
    return redact_secrets(unquote_plus(redact_url(text)))


def mask(field: str, value: object) -> str:
    """Show a bad value in an error message, hiding secrets and URL passwords."""
    if value is None:
        return "(vazio)"
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    text = str(value)
    if field in SECRET_FIELDS:
        return "****" if text else "(vazio)"
    if field in URL_FIELDS:
        text = redact_db_url(text)
    elif field in ODBC_FIELDS:
        text = redact_secrets(text)
    return repr(text) if len(text) <= 80 else repr(text[:77] + "...")


def load_settings(**overrides: Any) -> Settings:
    """Read settings; raise ConfigError listing every problem at once."""
    files = env_files()
    problems = _env_file_problems(files)
    try:
        settings = Settings(_env_file=files, **overrides)  # type: ignore[call-arg]
    except ConfigError as exc:
        # A misspelt name (DB_PASSWORD for DB_PASS) is often why a variable is "ausente".
        raise ConfigError(problems + exc.problems + unknown_env_keys(files)) from None
    except UnicodeDecodeError:  # already described by _env_file_problems
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return settings


class _ValuesOnlySettings(Settings):
    """Settings whose only source is the constructor's arguments."""

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def settings_from_values(**values: Any) -> Settings:
    """Settings from these values and the defaults only: no .env, no environment variable.

    For self-contained tools (the demo) that must not pick up a lab's real STATE_DB_URL
    or DEFAULT_GENDER from the machine they run on.
    """
    return _ValuesOnlySettings(**values)


def unknown_env_keys(files: tuple[Path, ...] | None = None) -> list[str]:
    """One Portuguese line per name in the .env files that is no setting, with a suggestion."""
    known = {name.upper() for name in Settings.model_fields} | {"TERCEIRO"}
    lines: list[str] = []
    for path in env_files() if files is None else files:
        if not path.is_file():
            continue
        try:
            keys = dotenv_values(path, encoding="utf-8-sig").keys()
        except (OSError, UnicodeDecodeError):
            continue  # reported by _env_file_problems
        for key in keys:
            name = key.strip().upper()
            if not name or name in known or name in _NON_SETTING_VARIABLES:
                continue
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
            hint = f"; quis dizer {close[0]}?" if close else "; veja os nomes em .env.example"
            lines.append(f"{name}: variável desconhecida em {path}, ignorada{hint}")
    return lines


def config_warnings(settings: Settings) -> list[str]:
    """Legal but suspicious settings, in Portuguese, for the log at start."""
    out: list[str] = []
    phys = (settings.physician_name, settings.physician_council, settings.physician_number,
            settings.physician_uf)
    if any(v and v.strip() for v in phys) and settings.physician is None:
        out.append(
            "PHYSICIAN_*: preenchido só em parte; o médico só é enviado com PHYSICIAN_NAME, "
            "PHYSICIAN_COUNCIL, PHYSICIAN_NUMBER e PHYSICIAN_UF preenchidos"
        )
    if split_labs(settings.terceiros or "") and settings.terceiro:
        out.append("TERCEIRO: ignorado porque TERCEIROS está preenchido")
    if settings.db_url and (settings.db_server or settings.db_name or settings.db_user):
        out.append("DB_SERVER/DB_NAME/DB_USER/DB_PASS: ignorados porque DB_URL está preenchido")
    if settings.verify is False:
        out.append("BEMSOFT_VERIFY=0: certificado TLS da Bemsoft não é verificado")
    if settings.painel_pii and settings.painel_pii_token:
        out.append("PAINEL_PII=1: todo o painel mostra dados de pacientes sem máscara, e "
                   "PAINEL_PII_TOKEN não faz diferença; use PAINEL_PII=0 para mostrá-los só "
                   "a quem entra com PAINEL_PII_TOKEN")
    if not isinstance(settings, _ValuesOnlySettings):  # those read no .env at all
        out.extend(unknown_env_keys())
    return out


# --- cross-field rules on raw values ---------------------------------------------------


def _raw_text(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _raw_float(data: Mapping[str, Any], name: str) -> float | None:
    value = data.get(name)
    if value is None:
        default = Settings.model_fields[name].default
        return float(default) if isinstance(default, (int, float)) else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None  # reported as a field error


def cross_field_problems(data: Mapping[str, Any]) -> list[str]:
    """Rules spanning several variables, checked on the raw (unvalidated) values."""

    def text(name: str) -> str | None:
        return _raw_text(data, name)

    problems: list[str] = []
    for name, value in data.items():
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(raw, str) and _CONTROL_CHARS.search(raw.strip()):
            shown = "****" if name in SECRET_FIELDS else repr(raw.strip())
            problems.append(
                f"{str(name).upper()}: valor {shown} contém um caractere de controle "
                "(tabulação ou quebra de linha); no .env, tire as aspas duplas em volta de "
                r"valores com \ (ex.: DB_SERVER=srv\teste) ou use aspas simples"
            )
    if not text("db_url"):
        if not text("db_server"):
            problems.append(
                r"DB_SERVER: ausente; informe o servidor (ex.: localhost\SQLEXPRESS) "
                "ou DB_URL com a URL SQLAlchemy completa"
            )
        if not text("db_name"):
            problems.append("DB_NAME: ausente; informe o nome do banco do LIS (ou DB_URL)")
        if text("db_user") and not text("db_pass"):
            problems.append(
                "DB_PASS: ausente; obrigatório quando DB_USER está preenchido "
                "(deixe DB_USER vazio para usar a autenticação do Windows)"
            )
        if text("db_pass") and not text("db_user"):
            problems.append(
                "DB_USER: ausente; DB_PASS foi informado, mas sem DB_USER a conexão usaria "
                "a autenticação do Windows"
            )
    if not (split_labs(text("terceiros") or "") or split_labs(text("terceiro") or "")):
        problems.append(
            "TERCEIROS: ausente; informe os nomes de ItemSol.NomeTerceirizado separados por "
            "vírgula (ex.: DIAGNÓSTICO DO BRASIL - DB,AME-SE - PARDINI)"
        )
    dry_run = parse_bool(data.get("bemsoft_dry_run", False))
    if dry_run is False and not text("bemsoft_token"):
        problems.append(
            "BEMSOFT_TOKEN: ausente; obrigatório quando BEMSOFT_DRY_RUN=0 "
            "(use BEMSOFT_DRY_RUN=1 para testar sem enviar)"
        )
    if text("painel_user") and not text("painel_password"):
        problems.append("PAINEL_PASSWORD: ausente; obrigatória quando PAINEL_USER está "
                        "preenchido (ou apague PAINEL_USER e use PAINEL_TOKEN)")
    if text("painel_password") and not text("painel_user"):
        problems.append("PAINEL_USER: ausente; PAINEL_PASSWORD foi informada sem o usuário")
    pii_token = text("painel_pii_token")
    if pii_token and pii_token in (text("painel_token"), text("painel_password")):
        problems.append("PAINEL_PII_TOKEN: igual a PAINEL_TOKEN ou PAINEL_PASSWORD; use um "
                        "valor diferente, só para quem pode ver dados de pacientes")
    if text("smtp_host") and not text("alert_email_to"):
        problems.append("ALERT_EMAIL_TO: ausente; informe quem recebe os alertas por e-mail "
                        "(ou apague SMTP_HOST)")
    if text("alert_email_to") and not text("smtp_host"):
        problems.append("SMTP_HOST: ausente; ALERT_EMAIL_TO foi informado, mas sem servidor "
                        "SMTP o e-mail não pode ser enviado")
    if text("smtp_user") and not text("smtp_password"):
        problems.append("SMTP_PASSWORD: ausente; obrigatória quando SMTP_USER está preenchido")
    backoff, backoff_max = _raw_float(data, "bemsoft_backoff"), _raw_float(
        data, "bemsoft_backoff_max"
    )
    if backoff is not None and backoff_max is not None and backoff_max < backoff:
        problems.append(
            f"BEMSOFT_BACKOFF_MAX: valor {backoff_max:g} menor que BEMSOFT_BACKOFF "
            f"({backoff:g}); esperado: segundos, no mínimo BEMSOFT_BACKOFF"
        )
    return problems


# --- describing pydantic errors ---------------------------------------------------------


def describe_validation_error(exc: ValidationError) -> list[str]:
    """One Portuguese line per field error: variable, masked value, reason, expected form."""
    lines: list[str] = []
    fields = Settings.model_fields
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        ctx = err.get("ctx") or {}
        if not loc:
            lines.append(str(ctx.get("error", err.get("msg", ""))))
            continue
        name = loc[0]
        info = fields.get(name)
        expected = info.description if info and info.description else "valor válido"
        bad = mask(name, err.get("input"))
        reason = str(ctx.get("error", "")) or _pt(err.get("type", ""), ctx)
        lines.append(f"{name.upper()}: valor {bad} inválido ({reason}); esperado: {expected}")
    return lines


_PT_ERRORS = {
    "float_parsing": "não é um número; use ponto como separador decimal, ex.: 0.5",
    "float_type": "não é um número; use ponto como separador decimal, ex.: 0.5",
    "int_parsing": "não é um número inteiro",
    "int_from_float": "não é um número inteiro",
    "int_type": "não é um número inteiro",
    "bool_parsing": "não é 1/0",
    "literal_error": "opção desconhecida",
    "date_from_datetime_parsing": "não é uma data AAAA-MM-DD",
    "date_from_datetime_inexact": "não é uma data AAAA-MM-DD",
    "date_parsing": "não é uma data AAAA-MM-DD",
    "date_type": "não é uma data AAAA-MM-DD",
    "string_type": "não é um texto",
    "path_type": "não é um caminho",
}


def _pt(kind: str, ctx: Mapping[str, Any]) -> str:
    if kind == "greater_than_equal":
        return f"menor que o mínimo {ctx.get('ge')}"
    if kind == "greater_than":
        return f"deve ser maior que {ctx.get('gt')}"
    if kind == "less_than_equal":
        return f"maior que o máximo {ctx.get('le')}"
    if kind == "less_than":
        return f"deve ser menor que {ctx.get('lt')}"
    return _PT_ERRORS.get(kind, kind or "inválido")


def _env_file_problems(files: tuple[Path, ...]) -> list[str]:
    problems: list[str] = []
    explicit = os.environ.get(ENV_FILE_VAR, "").strip()
    for path in files:
        if not path.is_file():
            if explicit:
                problems.append(f"{ENV_FILE_VAR}: arquivo {str(path)!r} não encontrado")
            continue
        try:
            path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError:
            problems.append(
                f"{path}: o arquivo não está em UTF-8; salve-o como UTF-8 "
                "(Bloco de Notas: Salvar como → Codificação UTF-8)"
            )
        except OSError as exc:
            problems.append(f"{path}: não foi possível ler o arquivo ({exc.strerror})")
    return problems
