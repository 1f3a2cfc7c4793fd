"""Commands ``retry``, ``status`` and ``check`` (registered on ``cli.app``).

The logic lives in :mod:`ops`; here are only the options, the printing (Rich, Portuguese)
and the exit codes: 0 fine, 1 something was not delivered / could not be read, 2 bad
usage or configuration, 3 a ``check`` failed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import sqlalchemy as sa
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from . import ops
from .cli import (
    RET_CHECK_FAILED,
    RET_CONFIG,
    RET_DB_UNAVAILABLE,
    RET_ERROR,
    RET_OK,
    app,
    configure_logging,
    err_console,
    install_stop_handlers,
    settings_or_exit,
)
from .config import Settings
from .errors import ConfigError

try:  # recent Typer vendors Click; older ones depend on it
    from typer._click import exceptions as click
except ImportError:  # pragma: no cover - depends on the installed Typer
    from click import exceptions as click  # type: ignore[no-redef]

log = logging.getLogger(__name__)
out = Console(highlight=False, soft_wrap=True)  # one line per result, never wrapped

RET_INTERRUPTED = 130

#: From this many files on, ``retry`` shows a progress bar instead of one line per file.
PROGRESS_FROM = 10
#: At most this many files are listed one by one in the final table.
TABLE_ROWS = 50

RESULT_STYLE = {
    ops.R_WOULD_SEND: "cyan", ops.R_DELIVERED: "green", ops.R_ALREADY: "green",
    ops.R_QUEUED: "blue", ops.R_RETRY_LATER: "yellow", ops.R_FAILED: "red",
    ops.R_CONFERIR: "magenta", ops.R_INVALID: "yellow", ops.R_NOT_SENT: "red",
}


def _fail(message: str, code: int = RET_CONFIG) -> typer.Exit:
    """Print one ✗ line on stderr; return the Exit to raise."""
    err_console.print(f"✗ {message}", highlight=False, markup=False)
    return typer.Exit(code)


def _db_problem(settings: Settings, exc: BaseException) -> typer.Exit:
    return _fail("banco de estado inacessível: "
                 f"{ops.db_error_text(exc, settings.secrets)}; rode 'bemsoft-monitor check' "
                 "para o diagnóstico completo", RET_DB_UNAVAILABLE)


# --- retry ---------------------------------------------------------------------------------


def _retry_files_to_process(settings: Settings, folder: Path | None, files: list[Path] | None,
                            limit: int | None) -> tuple[list[Path], Path]:
    """The files to handle (and the folder named in messages); bad input exits 2."""
    if files:
        missing = [f for f in files if not f.is_file()]
        for f in missing:
            problem = (f"{f} é uma pasta (use --dir {f})" if f.is_dir() else
                       f"arquivo não encontrado: {f} (confira o caminho em --file)")
            err_console.print(f"✗ {problem}", highlight=False, markup=False, soft_wrap=True)
        if missing:
            raise typer.Exit(RET_CONFIG)
        chosen = list(files)
        return (chosen[:limit] if limit else chosen), chosen[0].parent
    explicit = folder is not None
    folder = Path(folder) if folder is not None else Path(settings.failed_dir)
    if not folder.exists():
        if explicit:
            raise _fail(f"pasta não encontrada: {folder} (confira o caminho em --dir)")
        return [], folder
    if not folder.is_dir():
        raise _fail(f"{folder} não é uma pasta (use --file para um arquivo só)")
    return ops.select_files(folder, limit), folder


def _prepare_move_ok(move_ok: Path | None) -> None:
    if move_ok is None:
        return
    problem = ops.writable_dir_problem(move_ok)
    if problem:
        raise _fail(f"--move-ok: não foi possível usar a pasta {move_ok} ({problem})")


def _print_row(row: ops.RetryRow) -> None:
    style = RESULT_STYLE.get(row.result, "")
    # File names, Bemsoft's messages and LIS text may hold "[...]": never read as markup.
    text = (f"{row.file.name} (solicitação {row.requisition}): {row.detail}"
            + (f" → movido para {row.moved_to}" if row.moved_to else ""))
    out.print(f"[{style}]{row.result:>13}[/] {escape(text)}", highlight=False)
    for block in row.verbose:
        out.print(block, markup=False, highlight=False)


def _summary(summary: ops.RetrySummary, *, send: bool, shown_one_by_one: bool) -> None:
    if not shown_one_by_one and summary.rows:
        table = Table(title="Arquivos processados", show_lines=False)
        for col in ("Arquivo", "Solicitação", "Resultado", "Detalhe"):
            table.add_column(col, overflow="fold")
        for row in summary.rows[:TABLE_ROWS]:
            style = RESULT_STYLE.get(row.result, "")
            table.add_row(escape(row.file.name), escape(row.requisition),
                          f"[{style}]{row.result}[/]", escape(row.detail))
        if len(summary.rows) > TABLE_ROWS:
            table.add_row("…", "", "", f"e mais {len(summary.rows) - TABLE_ROWS} arquivo(s); "
                                       "use --limit ou --verbose")
        out.print(table)
    counts = Table(title="Resumo" + ("" if send else " (simulação: nada foi enviado)"))
    counts.add_column("Resultado")
    counts.add_column("Arquivos", justify="right")
    for result, n in sorted(summary.counts.items(), key=lambda kv: (-kv[1], kv[0])):
        style = RESULT_STYLE.get(result, "")
        counts.add_row(f"[{style}]{result}[/]", str(n))
    counts.add_row("[bold]total[/]", f"[bold]{len(summary.rows)}[/]")
    out.print(counts)


def _retry_refused(settings: Settings, *, send: bool, verbose: bool) -> None:
    from .app import build_monitor, build_parts

    try:
        parts = build_parts(settings, state_in_memory=False)
    except ConfigError as exc:
        raise _fail("; ".join(exc.problems)) from None
    monitor = build_monitor(parts, show_payload=False)
    try:
        if not ops.state_initialized(parts.store):
            out.print("Nenhum item recusado: o monitor ainda não rodou neste banco de estado.")
            raise typer.Exit(RET_OK)
        result = ops.retry_refused(monitor, send=send)
    except sa.exc.SQLAlchemyError as exc:
        raise _db_problem(settings, exc) from None
    finally:
        monitor.close(grace_s=0)
        parts.store.dispose()
        parts.lis_engine.dispose()
    if not result.refused:
        out.print("Nenhum item recusado para reprocessar.")
        raise typer.Exit(RET_OK)
    if not send:
        out.print(_refused_table(f"Itens recusados ({len(result.refused)})", result.refused,
                                 verbose))
        out.print("Simulação: nada foi enviado. Corrija o mapeamento (BEMSOFT_TEST_MAP_PATH, "
                  "BEMSOFT_MATERIAL_MAP_PATH), o catálogo ou o cadastro no LIS e rode de novo "
                  "com --send para reprocessar e enviar estes itens.")
        raise typer.Exit(RET_OK)
    out.print(f"Reprocessados: {result.requeued}; entregues: [green]{result.delivered}[/]; "
              f"ainda recusados: [yellow]{result.still_refused}[/]; aguardando envio: "
              f"{result.waiting}; com falha: [red]{result.failed}[/]")
    if not result.lease_held:
        out.print("Outro monitor está ativo neste banco de estado: os itens voltaram para a "
                  "fila dele, que fará o envio.")
    if result.still:
        out.print(_refused_table(f"Ainda recusados ({len(result.still)})", result.still,
                                 verbose))
        out.print(f"Motivos também em {escape(str(settings.refused_report))}. Corrija e rode "
                  "de novo.")
    raise typer.Exit(RET_ERROR if result.failed else RET_OK)


def _refused_table(title: str, rows: list[Any], verbose: bool) -> Table:
    table = Table(title=title)
    for col in ("Solicitação", "Item", "Exame", "Motivo"):
        table.add_column(col, overflow="fold")
    for row in rows[:None if verbose else TABLE_ROWS]:
        code = (row.snapshot.conv_code or "").strip() if row.snapshot else ""
        table.add_row(str(row.requisition_id), str(row.item_id),
                      escape(code) if code else "(sem código)", escape(row.reason or ""))
    if not verbose and len(rows) > TABLE_ROWS:
        table.add_row("…", "", "", f"e mais {len(rows) - TABLE_ROWS}; use --verbose")
    return table


@app.command()
def retry(
    *,
    folder: Annotated[Path | None, typer.Option(
        "--dir", metavar="PASTA",
        help="Pasta com os eventos com falha (padrão: FAILED_DIR do .env).")] = None,
    files: Annotated[list[Path] | None, typer.Option(
        "--file", metavar="ARQUIVO", help="Um arquivo específico (pode repetir).")] = None,
    send: Annotated[bool, typer.Option(
        "--send", help="Envia de fato (ignora BEMSOFT_DRY_RUN neste processo). Sem ele, "
                       "só mostra o que seria feito.")] = False,
    move_ok: Annotated[Path | None, typer.Option(
        "--move-ok", metavar="PASTA",
        help="Move para esta pasta os arquivos entregues (ou que já estavam entregues).")]
    = None,
    limit: Annotated[int | None, typer.Option(
        "--limit", min=1, metavar="N",
        help="Processa no máximo N arquivos, os mais antigos primeiro (pela data no nome do "
             "arquivo ou, sem ela, pela data de modificação).")] = None,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Mostra payload e resposta de cada envio (dados do paciente "
                                "mascarados, salvo LOG_PII=1).")] = False,
    refused: Annotated[bool, typer.Option(
        "--refused", help="Reprocessa os itens recusados (após corrigir o mapeamento ou o "
                          "catálogo) em vez dos arquivos de FAILED_DIR.")] = False,
    conferir: Annotated[bool, typer.Option(
        "--conferir", help="Reenvia também os pedidos em CONFERIR, com nova Idempotency-Key. "
                           "Use só depois de confirmar no portal da Bemsoft que o pedido NÃO "
                           "está lá (senão ele seria cobrado duas vezes).")] = False,
) -> None:
    """Reenvia eventos com falha (FAILED_DIR) ou itens recusados; simulação por padrão."""
    if refused and (folder is not None or files or move_ok is not None or limit is not None
                    or conferir):
        raise _fail("--refused não se combina com --dir, --file, --move-ok, --limit ou "
                    "--conferir")
    if folder is not None and files:
        raise _fail("use --dir ou --file, não os dois")
    settings = settings_or_exit(**({"bemsoft_dry_run": False} if send else {}))
    configure_logging(settings, verbose=verbose)
    if refused:
        _retry_refused(settings, send=send, verbose=verbose)
        return
    paths, where = _retry_files_to_process(settings, folder, files, limit)
    if not paths:
        out.print(f"Nenhum evento com falha em {escape(str(where))}: nada a reenviar.")
        raise typer.Exit(RET_OK)
    if send:
        _prepare_move_ok(move_ok)
    from .app import build_monitor, build_parts

    try:
        parts = build_parts(settings, state_in_memory=False)
    except ConfigError as exc:
        raise _fail("; ".join(exc.problems)) from None
    monitor = build_monitor(parts, show_payload=False)
    stop = threading.Event()
    install_stop_handlers(stop)
    try:
        try:
            ready = ops.state_initialized(parts.store)
        except sa.exc.SQLAlchemyError as exc:
            raise _db_problem(settings, exc) from None
        retrier = ops.FileRetrier(monitor=monitor, send=send, move_ok=move_ok if send else None,
                                  verbose=verbose, state_ready=ready, conferir=conferir)
        log.info("reenvio iniciado: %d arquivo(s) de %s (%s)", len(paths), where,
                 "envio real" if send else "simulação")
        one_by_one = verbose or len(paths) < PROGRESS_FROM
        if not send:
            out.print(f"Simulação (nada será enviado): {len(paths)} arquivo(s) de "
                      f"{escape(str(where))}. "
                      "Use --send para enviar"
                      + (" (--move-ok só move arquivos com --send)." if move_ok else "."))
        try:
            if one_by_one:
                summary = ops.retry_files(paths, retrier, on_row=_print_row, stop=stop)
            else:
                with Progress(TextColumn("Reenviando" if send else "Analisando"), BarColumn(),
                              MofNCompleteColumn(), TimeElapsedColumn(), console=err_console,
                              transient=True) as progress:
                    task = progress.add_task("retry", total=len(paths))
                    summary = ops.retry_files(
                        paths, retrier, stop=stop,
                        on_row=lambda _row: progress.advance(task))
        except sa.exc.SQLAlchemyError as exc:
            raise _db_problem(settings, exc) from None
    finally:
        monitor.close(grace_s=0)
        parts.store.dispose()
        parts.lis_engine.dispose()
    _summary(summary, send=send, shown_one_by_one=one_by_one)
    if stop.is_set():
        out.print(f"Interrompido: {len(paths) - len(summary.rows)} arquivo(s) não processado(s).")
    if retrier.token_problem:
        err_console.print(f"✗ token recusado pela Bemsoft: {retrier.token_problem}; corrija "
                          "BEMSOFT_TOKEN no .env", highlight=False, markup=False)
    if send and summary.failed:
        raise typer.Exit(RET_ERROR)
    raise typer.Exit(RET_OK)


# --- status --------------------------------------------------------------------------------


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} dias"


def _when(iso: str | None) -> str:
    """An ISO-8601 UTC time as this computer's local time, to the second."""
    if not iso:
        return "—"
    try:
        moment = dt.datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


ORDER_LABELS = {"pending": "na fila", "sending": "enviando", "delivered": "entregues",
                "dead": "falharam (FAILED_DIR)", "conferir": "conferir", "resolved": "resolvidos"}
ITEM_LABELS = {"pending": "aguardando", "ordered": "em pedido", "delivered": "entregues",
               "refused": "recusados", "cancelled": "cancelados", "dead": "falharam",
               "conferir": "conferir"}


def _status_table(data: dict[str, Any]) -> Table:
    table = Table(title=f"Bemsoft Monitor {data['version']}: situação", show_header=False)
    table.add_column("O quê", style="bold")
    table.add_column("Valor", overflow="fold")
    table.add_row("Banco de estado", escape(data["state_db"]))
    table.add_row("Modo", "DRY_RUN (nada é enviado)" if data["dry_run"] else "envio real")
    if not data["initialized"]:
        table.add_row("Situação", "o monitor ainda não rodou neste banco de estado")
    table.add_row("Checkpoint (LastItemId)", str(data["checkpoint"]) if data["checkpoint"]
                  is not None else "—")
    poll = data["last_successful_poll"]
    table.add_row("Última leitura do LIS", f"{_when(poll)} (há {_age(data['last_poll_age_s'])})"
                  if poll else "—")
    table.add_row("Pedidos", ", ".join(f"{ORDER_LABELS[k]}: {v}"
                                       for k, v in data["orders"].items()))
    table.add_row("Itens", ", ".join(f"{ITEM_LABELS[k]}: {v}" for k, v in data["items"].items()))
    table.add_row("Mais antigo na fila", _age(data["oldest_waiting_age_s"]))
    table.add_row("Falhas (FAILED_DIR)", f"{data['dead_letters']} pedido(s); "
                  f"{data['failed_files']} arquivo(s) em {escape(data['failed_dir'])}")
    table.add_row("Recusados / conferir", f"{data['refused_items']} item(ns) / "
                  f"{data['conferir']} pedido(s)")
    entries = data["catalog_entries"]
    table.add_row("Catálogo /tests", f"{entries} entrada(s), baixado há "
                  f"{_age(data['catalog_age_s'])}" if entries is not None else "nunca baixado")
    lease = data["lease"]
    if lease:
        state = "expirada" if lease["expired"] else f"válida até {_when(lease['expires_at'])}"
        table.add_row("Trava (lease)", f"{escape(lease['holder'])} ({state})")
    else:
        table.add_row("Trava (lease)", "livre")
    table.add_row("Envio pausado (token)", f"SIM: {escape(data['auth_paused'])}"
                  if data["auth_paused"] else "não")
    return table


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Saída em JSON (chaves estáveis).")]
    = False,
) -> None:
    """Mostra a situação do monitor: checkpoint, fila, falhas, recusados, catálogo, trava."""
    settings = settings_or_exit()
    try:
        data = ops.collect_status(settings)
    except ConfigError as exc:
        raise _fail("; ".join(exc.problems)) from None
    except sa.exc.SQLAlchemyError as exc:
        raise _db_problem(settings, exc) from None
    if as_json:
        typer.echo(json.dumps(data, ensure_ascii=False, indent=2))
    else:
        out.print(_status_table(data))
    raise typer.Exit(RET_OK)


# --- check ---------------------------------------------------------------------------------

CHECK_STYLE = {"ok": "green", "fail": "red", "warn": "yellow", "skip": "dim"}


@app.command()
def check(
    offline: Annotated[bool, typer.Option(
        "--offline", help="Não acessa a Bemsoft (só configuração, banco e pastas).")] = False,
) -> None:
    """Diagnóstico da instalação: configuração, driver ODBC, banco, tabelas, Bemsoft, relógio."""
    from .config import load_settings

    try:
        settings = load_settings()
    except ConfigError as exc:
        no_env = ops.missing_env_file_line()
        if no_env:
            out.print(f"[red]✗[/] configuração: {escape(no_env)} → copie .env.example para "
                      ".env na pasta do programa e preencha", highlight=False)
        for problem in exc.problems:
            out.print(f"[red]✗[/] configuração: {escape(problem)}", highlight=False)
        out.print("Corrija o .env (veja .env.example) e rode de novo.")
        raise typer.Exit(RET_CHECK_FAILED) from None
    failed = 0
    for item in ops.Checker(settings, offline=offline).run():
        style = CHECK_STYLE[item.status]
        line = item.line()
        out.print(Text.assemble((line[0], style), line[1:]), highlight=False)
        failed += item.status == "fail"
    if failed:
        out.print(f"{failed} verificação(ões) falharam: corrija os itens marcados com ✗.")
        raise typer.Exit(RET_CHECK_FAILED)
    out.print("Tudo certo.")
    raise typer.Exit(RET_OK)


# --- entry point ---------------------------------------------------------------------------


#: Pydantic's validation error types (Typer converts option values with it), in Portuguese.
_VALUE_PROBLEMS: dict[str, str] = {
    "int_parsing": "{input!r} não é um número inteiro",
    "int_from_float": "{input!r} não é um número inteiro",
    "int_type": "{input!r} não é um número inteiro",
    "float_parsing": "{input!r} não é um número (use ponto: 0.5)",
    "float_type": "{input!r} não é um número (use ponto: 0.5)",
    "bool_parsing": "{input!r} não é sim/não (use 1 ou 0)",
    "greater_than_equal": "precisa ser no mínimo {ge} (recebido: {input})",
    "greater_than": "precisa ser maior que {gt} (recebido: {input})",
    "less_than_equal": "precisa ser no máximo {le} (recebido: {input})",
    "less_than": "precisa ser menor que {lt} (recebido: {input})",
    "enum": "{input!r} não é uma das opções: {expected}",
    "literal_error": "{input!r} não é uma das opções: {expected}",
}


def _value_problem(exc: click.BadParameter) -> str:
    """Why a value was refused, from the structured validation error when there is one."""
    cause = exc.__cause__
    errors = getattr(cause, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            template = _VALUE_PROBLEMS.get(str(first.get("type")))
            if template is not None:
                return template.format(input=first.get("input"), **(first.get("ctx") or {}))
        except (IndexError, KeyError, TypeError, ValueError):
            pass
    return exc.message


def _param_name(param: Any) -> str:
    if param is None:
        return "parâmetro"
    if getattr(param, "param_type_name", "") == "argument":
        return str(param.metavar or param.name or "argumento").upper()
    return str(param.opts[0]) if param.opts else str(param.name)


def _quoted(text: str) -> list[str]:
    return re.findall(r"'([^']*)'", text)


def usage_message(exc: click.UsageError) -> str:
    """One Portuguese line for a command-line mistake (Click's text is English)."""
    text = exc.message
    if isinstance(exc, click.NoSuchOption):
        line = f"opção desconhecida: {exc.option_name}"
        if exc.possibilities:
            line += f" (quis dizer {' ou '.join(sorted(exc.possibilities))}?)"
        return line
    if isinstance(exc, click.BadOptionUsage):
        if "does not take a value" in text:
            return f"a opção {exc.option_name} não recebe valor (use só {exc.option_name})"
        if "requires" in text:
            return f"a opção {exc.option_name} precisa de um valor"
        return f"uso incorreto da opção {exc.option_name}"
    if isinstance(exc, click.MissingParameter):
        param = exc.param
        what = "o argumento" if getattr(param, "param_type_name", "") == "argument" \
            else "a opção"
        return f"falta {what} {_param_name(param)}"
    if isinstance(exc, click.BadParameter):
        hint = exc.param_hint
        if isinstance(hint, (list, tuple)):
            hint = " / ".join(hint)
        return f"valor inválido para {hint or _param_name(exc.param)}: {_value_problem(exc)}"
    if text.startswith("No such command"):
        names = _quoted(text)
        line = f"comando desconhecido: {names[0] if names else text}"
        if len(names) > 1:
            line += f" (quis dizer {' ou '.join(names[1:])}?)"
        return line
    if text.startswith("Missing command"):
        return "falta o comando"
    if text.startswith("Got unexpected extra argument"):
        found = re.search(r"\(([^()]*)\)\s*$", text)
        extra = found.group(1) if found else text
        return f"argumento a mais: {extra} (as opções começam com --)"
    return f"uso incorreto: {text}"


def _command_path(root: Any, argv: Sequence[str]) -> str:
    """The sub-command the arguments name (for errors Click raises without a context)."""
    parts = ["bemsoft-monitor"]
    command = root
    for token in argv:
        if token.startswith("-"):
            continue
        sub = getattr(command, "commands", {}).get(token)
        if sub is None:
            break
        parts.append(token)
        command = sub
    return " ".join(parts)


def run_app(argv: list[str] | None = None) -> None:
    """Run the CLI; usage mistakes give one Portuguese line and exit 2 (not click's 3 lines)."""
    from .cli import cli_command

    args = list(sys.argv[1:] if argv is None else argv)
    command = cli_command()
    try:
        rc = command.main(args=args, prog_name="bemsoft-monitor", standalone_mode=False)
    except click.NoArgsIsHelpError as exc:  # a group without its sub-command: its help
        err_console.print(exc.ctx.get_help() if exc.ctx is not None else exc.message,
                          highlight=False, markup=False, soft_wrap=True)
        sys.exit(RET_CONFIG)
    except click.UsageError as exc:
        path = exc.ctx.command_path if exc.ctx is not None else _command_path(command, args)
        err_console.print(f"✗ {usage_message(exc)}; veja '{path} --help'", highlight=False,
                          markup=False, soft_wrap=True)
        sys.exit(RET_CONFIG)
    except click.ClickException as exc:
        err_console.print(f"✗ {exc.format_message()}", highlight=False, markup=False,
                          soft_wrap=True)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        rc = RET_INTERRUPTED
    if rc == RET_INTERRUPTED:  # Typer turns Ctrl+C into exit code 130
        err_console.print("✗ interrompido (Ctrl+C)", highlight=False, markup=False)
    sys.exit(rc if isinstance(rc, int) else RET_OK)
