"""Command line: ``bemsoft-monitor run | retry | status | check | catalog | mapping | simulator
| demo``."""

from __future__ import annotations

import logging
import re
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.main
from rich.console import Console

from . import __version__
from .config import Settings, load_settings
from .errors import ConfigError

try:  # recent Typer vendors Click; older ones depend on it
    from typer import _click as click_api
except ImportError:  # pragma: no cover - depends on the installed Typer
    import click as click_api  # type: ignore[no-redef]

RET_OK = 0
RET_ERROR = 1
RET_CONFIG = 2
RET_CHECK_FAILED = 3
#: The database (LIS or state) cannot be reached: ``run --once``, ``status``, ``retry``.
RET_DB_UNAVAILABLE = RET_ERROR
RET_NOTHING_TO_DO = 0

log = logging.getLogger("bemsoft_monitor")
err_console = Console(stderr=True, soft_wrap=True)  # one message, one line

app = typer.Typer(
    name="bemsoft-monitor",
    help="Monitor SQL → Bemsoft: lê itens de exames do LIS e envia pedidos à API Bemsoft.",
    no_args_is_help=False,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_show_locals=False,  # locals may hold the token or patient data
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bemsoft-monitor {__version__}")
        raise typer.Exit(RET_OK)


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Mostra a versão e sai.")] = False,
) -> None:
    """Sem comando, equivale a ``run`` (como ``python main.py``)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(run)


def settings_or_exit(**overrides: Any) -> Settings:
    """Load settings or print every problem in Portuguese and exit 2."""
    try:
        return load_settings(**overrides)
    except ConfigError as exc:
        err_console.print("[bold red]Configuração inválida[/] (arquivo .env ou variáveis de "
                          "ambiente):", highlight=False)
        from .ops import missing_env_file_line

        no_env = missing_env_file_line()
        if no_env:
            err_console.print(f"  ✗ {no_env}; copie .env.example para .env e preencha",
                              highlight=False, markup=False)
        for line in exc.problems:
            err_console.print(f"  ✗ {line}", highlight=False, markup=False)
        err_console.print("Corrija os itens acima (veja .env.example) e rode de novo.",
                          highlight=False)
        raise typer.Exit(RET_CONFIG) from None


def configure_logging(settings: Settings, *, verbose: bool = False) -> None:
    """Logging from the settings; ``--verbose`` means DEBUG (payloads shown, masked)."""
    from .logsetup import setup_logging

    try:
        setup_logging(
            level="DEBUG" if verbose else settings.log_level, fmt=settings.log_format,
            log_file=settings.log_file, max_bytes=settings.log_max_bytes,
            backup_count=settings.log_backup_count,
            secrets=settings.secrets,
            show_pii=settings.log_pii,
        )
    except ConfigError as exc:
        for line in exc.problems:
            err_console.print(f"✗ {line}", highlight=False, markup=False)
        raise typer.Exit(RET_CONFIG) from None


def install_stop_handlers(stop: threading.Event) -> None:
    """SIGINT/SIGTERM (and SIGBREAK, a Windows service stop) end the loop gracefully."""

    def handler(signum: int, _frame: object) -> None:
        if stop.is_set():
            return
        log.info("sinal %s recebido: parando com segurança", signal.Signals(signum).name)
        stop.set()

    for name in ("SIGINT", "SIGTERM", "SIGBREAK"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, handler)


@app.command()
def run(
    once: Annotated[bool, typer.Option("--once", help="Faz um ciclo completo e sai.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                          help="Mostra os payloads (dados do paciente "
                                               "mascarados, salvo LOG_PII=1).")] = False,
    http: Annotated[str | None, typer.Option(
        "--http", metavar="HOST:PORTA",
        help="Liga o painel, /healthz, /readyz e /metrics neste endereço (padrão: HTTP_ADDR), "
             "ex.: 127.0.0.1:8765.")] = None,
) -> None:
    """Roda o monitor: lê o LIS, espera a solicitação assentar e envia à Bemsoft."""
    settings = settings_or_exit(**({"http_addr": http} if http else {}))
    configure_logging(settings, verbose=verbose)
    from .app import build_monitor, build_parts
    from .ops import writable_dir_problem

    problem = writable_dir_problem(Path(settings.failed_dir))
    if problem:
        err_console.print(f"✗ FAILED_DIR: não foi possível usar a pasta {settings.failed_dir} "
                          f"({problem} ou aponte FAILED_DIR para outra pasta)", highlight=False,
                          markup=False, soft_wrap=True)
        raise typer.Exit(RET_CONFIG)

    try:
        parts = build_parts(settings)
    except ConfigError as exc:
        for line in exc.problems:
            err_console.print(f"✗ {line}", highlight=False, markup=False)
        raise typer.Exit(RET_CONFIG) from None
    monitor = build_monitor(parts)
    if once:
        _run_once(settings, parts, monitor)
    services = _start_services(settings, monitor)
    _log_started(settings)
    stop = threading.Event()
    install_stop_handlers(stop)
    try:
        monitor.run(stop)
    finally:
        _stop_services(services)
    log.info("monitor parado")
    raise typer.Exit(RET_OK)


def _log_started(settings: Settings) -> None:
    # The start scripts wait for "iniciado" in the log before saying the monitor is up.
    log.info("Bemsoft Monitor %s iniciado (%s; terceiros: %s)", __version__,
             "DRY_RUN, nada será enviado" if settings.bemsoft_dry_run else "envio real",
             ", ".join(settings.support_labs))


def _database_down(settings: Settings, exc: BaseException) -> typer.Exit:
    """One ✗ line (passwords masked) for a database that cannot be reached; the exit."""
    from .ops import db_error_text

    err_console.print(f"✗ banco de dados inacessível: {db_error_text(exc, settings.secrets)}; "
                      "nada foi lido nem enviado — rode 'bemsoft-monitor check' para o "
                      "diagnóstico completo", highlight=False, markup=False, soft_wrap=True)
    return typer.Exit(RET_DB_UNAVAILABLE)


def _run_once(settings: Settings, parts: Any, monitor: Any) -> None:
    """``run --once``: one full cycle; a database that cannot be reached is one line, exit 1.

    The loop (``run``) waits for the database instead; one cycle has nothing to wait for.
    """
    import sqlalchemy as sa

    try:
        monitor.start()  # creates the state tables: the first thing that needs the database
    except sa.exc.SQLAlchemyError as exc:
        monitor.close(grace_s=0)
        parts.lis_engine.dispose()
        raise _database_down(settings, exc) from None
    services = _start_services(settings, monitor)
    _log_started(settings)
    try:
        stats = monitor.cycle(drain=True)
    except sa.exc.SQLAlchemyError as exc:
        raise _database_down(settings, exc) from None
    finally:
        monitor.close()
        _stop_services(services)
    if stats.lease_held and monitor.last_successful_poll is None:
        # The cycle met an outage while reading (already logged as ERROR by the engine).
        err_console.print("✗ ciclo incompleto: o banco de dados ficou inacessível durante a "
                          "leitura; nada foi perdido — rode de novo quando ele voltar",
                          highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(RET_DB_UNAVAILABLE)
    log.info("ciclo concluído: %d lido(s), %d novo(s), %d pedido(s) criado(s), %d "
             "enviado(s), %d recusado(s)", stats.read, stats.new, stats.orders_created,
             stats.sent, stats.refused)
    raise typer.Exit(RET_OK)


def _start_services(settings: Settings, monitor: Any) -> list[Any]:
    """The HTTP endpoint (HTTP_ADDR / --http) and the alerter, when configured."""
    services: list[Any] = []
    if settings.http_addr:
        from .web import HttpBindError, Painel, start_http

        try:
            services.append(start_http(Painel(settings, monitor), settings.http_addr))
        except HttpBindError as exc:
            err_console.print(f"✗ HTTP_ADDR/--http: {exc}", highlight=False, markup=False)
            raise typer.Exit(RET_CONFIG) from None
    from .alerts import build_alerter

    alerter = build_alerter(settings, monitor)
    if alerter is not None:
        alerter.start()
        services.append(alerter)
    return services


def _stop_services(services: list[Any]) -> None:
    for service in reversed(services):
        try:
            service.stop()
        except Exception:
            log.exception("erro ao parar %s", type(service).__name__)


@app.command()
def simulator(
    *,
    port: Annotated[int, typer.Option(metavar="PORTA", help="Porta (0 = livre).")] = 8080,
    host: Annotated[str, typer.Option(metavar="ENDEREÇO", help="Endereço de escuta.")]
    = "127.0.0.1",
    token: Annotated[str, typer.Option(metavar="TOKEN", help="Token Bearer aceito.")]
    = "sim-token",  # noqa: S107 - the simulator's documented test token, not a secret
    catalog: Annotated[Path | None, typer.Option(
        "--catalog", metavar="ARQUIVO", help="Arquivo JSON no formato de GET /tests.")] = None,
    extid_max: Annotated[int, typer.Option("--extid-max", metavar="N",
                                           help="Tamanho máximo de externalId.")] = 20,
    latency: Annotated[float, typer.Option(metavar="SEGUNDOS",
                                           help="Latência fixa por POST, em segundos.")] = 0.0,
) -> None:
    """Simulador local da API Bemsoft (GET /tests, POST /requests, GET /saved)."""
    from .simulator import serve

    if catalog is not None and not catalog.is_file():
        err_console.print(f"✗ arquivo de catálogo não encontrado: {catalog}", highlight=False,
                          markup=False)
        raise typer.Exit(RET_CONFIG)
    serve(host=host, port=port, token=token, catalog_path=catalog, extid_max=extid_max,
          latency_s=latency)


@app.command()
def demo(
    folder: Annotated[Path, typer.Option("--dir", metavar="PASTA",
                                         help="Pasta da demonstração.")] =
    Path("demo_run"),
) -> None:
    """Demonstração completa: LIS SQLite de exemplo + simulador local, nada a configurar."""
    from .demo import run_demo

    raise typer.Exit(run_demo(folder))


# --- help in Portuguese ---------------------------------------------------------------------
# Click and Typer write a few fixed English words into every help page ("Usage:", "Options",
# "Show this message and exit.", "[default: 8080]", type names as metavars). They offer no
# catalogue for pt-BR, but Click lets a command choose its help formatter: this one writes
# the same layout with those words in Portuguese.

_SECTIONS = {"Options": "Opções", "Commands": "Comandos", "Arguments": "Argumentos"}
_USAGE_WORDS = (("[OPTIONS]", "[OPÇÕES]"), ("COMMAND [ARGS]...", "COMANDO [ARGS]..."))
_HELP_TEXT = {"Show this message and exit.": "Mostra esta ajuda e sai."}
#: Metavars Typer (``<int>``) or Click (``INTEGER``) derive from a type, in Portuguese.
_TYPE_METAVARS = {
    "<int range>": "N", "<float range>": "NÚMERO", "<int>": "N", "<float>": "NÚMERO",
    "<str>": "TEXTO", "<path>": "CAMINHO", "<bool>": "SIM/NÃO",
    "INTEGER RANGE": "N", "FLOAT RANGE": "NÚMERO", "INTEGER": "N", "FLOAT": "NÚMERO",
    "TEXT": "TEXTO", "PATH": "CAMINHO", "FILE": "ARQUIVO", "DIRECTORY": "PASTA",
    "BOOLEAN": "SIM/NÃO",
}
_METAVAR = re.compile("|".join(re.escape(k) for k in sorted(_TYPE_METAVARS, key=len,
                                                               reverse=True)))
_EXTRAS = re.compile(r"\s*\[(?P<extras>[^\[\]]*)\]\s*$")
_RANGE = re.compile(r"^(?:(?P<lo>[-\d.]+)(?P<lo_op><=?))?x"
                    r"(?:(?P<hi_op>[<>]=?)(?P<hi>[-\d.]+))?$")


def _range_pt(text: str) -> str | None:
    """'x>=1' → 'mínimo 1', '1<=x<=5' → 'de 1 a 5'; None when ``text`` is not a range."""
    m = _RANGE.match(text)
    if m is None or (m["lo"] is None and m["hi"] is None):
        return None
    lo, hi, op = m["lo"], m["hi"], m["hi_op"]
    if lo is not None and hi is not None:
        return f"de {lo} a {hi}"
    if lo is not None:
        return f"mínimo {lo}" if m["lo_op"] == "<=" else f"maior que {lo}"
    return {">=": f"mínimo {hi}", ">": f"maior que {hi}", "<=": f"máximo {hi}",
            "<": f"menor que {hi}"}.get(op, text)


def _extra_pt(part: str) -> str:
    for english, portuguese in (("default: ", "padrão: "), ("env var: ", "variável: ")):
        if part.startswith(english):
            value = part[len(english):]
            return portuguese + ("(calculado)" if value == "(dynamic)" else value)
    if part == "required":
        return "obrigatório"
    return _range_pt(part) or part


def help_text_pt(text: str) -> str:
    """One option's help with Click's fixed words (and its ``[extras]``) in Portuguese."""
    text = _HELP_TEXT.get(text, text)
    m = _EXTRAS.search(text)
    if m is None:
        return text
    extras = "; ".join(_extra_pt(p.strip()) for p in m["extras"].split(";"))
    return f"{text[:m.start()]}  [{extras}]"


def metavars_pt(text: str) -> str:
    """Type-derived metavars (``<int>``, ``PATH``) in Portuguese."""
    return _METAVAR.sub(lambda m: _TYPE_METAVARS[m.group(0)], text)


class PtHelpFormatter(click_api.HelpFormatter):
    """Click's help layout with its fixed English words in Portuguese."""

    def write_usage(self, prog: str, args: str = "", prefix: str | None = None) -> None:
        for english, portuguese in _USAGE_WORDS:
            args = args.replace(english, portuguese)
        super().write_usage(prog, metavars_pt(args), "Uso: " if prefix is None else prefix)

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        with super().section(_SECTIONS.get(name, name)):
            yield

    def write_dl(self, rows: Sequence[tuple[str, str]], col_max: int = 30,
                 col_spacing: int = 2) -> None:
        super().write_dl([(metavars_pt(term), help_text_pt(text)) for term, text in rows],
                         col_max=col_max, col_spacing=col_spacing)


class PtContext(click_api.Context):
    """A context whose help pages are written by :class:`PtHelpFormatter`."""

    formatter_class = PtHelpFormatter


def localized_command(command: Any) -> Any:
    """The Click command tree of the app with every command's help in Portuguese."""
    command.context_class = PtContext
    for sub in getattr(command, "commands", {}).values():
        localized_command(sub)
    return command


def cli_command() -> Any:
    """The app as a Click command, help in Portuguese (what the entry points run)."""
    return localized_command(typer.main.get_command(app))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (usage errors: one Portuguese line, exit 2)."""
    from .cli_ops import run_app

    run_app(argv)


# Sub-commands defined in their own modules register themselves on ``app`` when imported.
from . import cli_catalog, cli_ops  # noqa: E402, F401
