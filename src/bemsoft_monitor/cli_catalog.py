"""Commands ``catalog sync|search|show`` and ``mapping check`` (registered on ``cli.app``)."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections import Counter
from pathlib import Path
from typing import Annotated

import sqlalchemy as sa
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .catalog import Catalog, CatalogCache, Resolver, load_material_map, load_test_map
from .cli import (
    RET_CONFIG,
    RET_ERROR,
    RET_OK,
    app,
    configure_logging,
    err_console,
    settings_or_exit,
)
from .config import Settings
from .errors import ConfigError
from .mapping import (
    STATUS_LABELS,
    CodeReport,
    MapFiles,
    check_codes,
    count_by_status,
    describe_entry,
    explain_code,
    has_problems,
    merge_code_rows,
    render_csv,
    summary_line,
)
from .models import CatalogEntry
from .oserrors import os_error_fix, os_error_text

out = Console(highlight=False)

_SUB_APP = {
    "no_args_is_help": True,
    "add_completion": False,
    "rich_markup_mode": None,
    "context_settings": {"help_option_names": ["-h", "--help"]},
}
catalog_app = typer.Typer(
    help="Catálogo GET /tests da Bemsoft: baixar (sync), buscar (search), ver um exame (show).",
    **_SUB_APP,  # type: ignore[arg-type]
)
mapping_app = typer.Typer(
    help="Confere se os códigos de exame do LIS têm correspondente na Bemsoft.",
    **_SUB_APP,  # type: ignore[arg-type]
)
app.add_typer(catalog_app, name="catalog")
app.add_typer(mapping_app, name="mapping")

_STATUS_STYLE = {"ok": "green", "ambiguous": "yellow", "not_in_catalog": "red",
                 "missing_code": "red", "no_catalog": "magenta"}


# --- helpers --------------------------------------------------------------------------------


def _fail(message: str, code: int = RET_ERROR) -> typer.Exit:
    err_console.print(f"✗ {message}", highlight=False, markup=False)
    return typer.Exit(code)


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "data desconhecida"
    return dt.datetime.fromtimestamp(timestamp).strftime("%d/%m/%Y %H:%M:%S")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "idade desconhecida"
    seconds = max(seconds, 0.0)
    if seconds < 90:
        return "agora há pouco"
    minutes = seconds / 60
    if minutes < 90:
        return f"há {minutes:.0f} min"
    hours = minutes / 60
    if hours < 36:
        return f"há {hours:.0f} h"
    return f"há {hours / 24:.0f} dias"


def _cache(settings: Settings) -> CatalogCache:
    """The persisted copy (loaded now) with the configured client as its source."""
    from .app import build_client

    return CatalogCache(
        fetch=build_client(settings).fetch_catalog,
        path=Path(settings.bemsoft_catalog_cache),
        ttl_s=settings.bemsoft_tests_ttl,
        min_refresh_s=settings.bemsoft_tests_min_refresh,
        log_refresh_failures=False,  # each command prints last_error once itself
    )


#: LIS settings the catalogue commands never read, filled in so that their absence (a folder
#: without .env, a .env for another machine) does not stop a look at the catalogue. The
#: token is checked where it is used: only a download needs it.
_LIS_NOT_USED = {"db_url": "sqlite://", "terceiros": "-", "bemsoft_dry_run": True}


def _catalog_settings() -> Settings:
    """Settings for ``catalog sync|search|show``: only the Bemsoft and file settings count."""
    return settings_or_exit(**_LIS_NOT_USED)


def _require_token(settings: Settings, why: str) -> None:
    if not settings.token:
        raise _fail(f"BEMSOFT_TOKEN: ausente; {why} (informe-o no .env ou como variável de "
                    "ambiente)", RET_CONFIG)


def _tests_with_variants(catalog: Catalog) -> int:
    per_test = Counter(e.test_id.strip().casefold() for e in catalog.entries)
    return sum(1 for n in per_test.values() if n > 1)


def _catalog_or_sync(settings: Settings) -> tuple[CatalogCache, Catalog]:
    """The cached copy; without one, a single GET /tests (exit 1 when that fails too)."""
    cache = _cache(settings)
    if cache.catalog is None:
        _require_token(settings, f"não há cópia local do catálogo em {cache.path} e é "
                                 "preciso baixá-lo de GET /tests")
        err_console.print(f"Nenhuma cópia local do catálogo em {cache.path}; baixando agora "
                          "de GET /tests…", highlight=False, markup=False)
        if not cache.refresh():
            raise _fail(f"{cache.last_error}; sem catálogo não há o que consultar (rode "
                        "'bemsoft-monitor catalog sync' quando a Bemsoft responder)")
    catalog = cache.catalog
    assert catalog is not None  # refresh() succeeded or a copy was loaded
    age = cache.age_s()
    note = ""
    if age is not None and age > settings.bemsoft_tests_ttl:
        note = " — cópia antiga; rode 'bemsoft-monitor catalog sync' para atualizar"
    out.print(f"Catálogo de {_when(cache.loaded_at)} ({_age(age)}), {len(catalog)} itens"
              f"{note}", markup=False)
    return cache, catalog


def _maps(settings: Settings) -> tuple[dict[str, str], dict[str, str]]:
    """The test map and the material map; exit 2 naming the file when one is unusable."""
    try:
        test_map = load_test_map(Path(settings.bemsoft_test_map_path)) \
            if settings.bemsoft_test_map_path else {}
        material_map = load_material_map(Path(settings.bemsoft_material_map_path)) \
            if settings.bemsoft_material_map_path else {}
    except ConfigError as exc:
        for line in exc.problems:
            err_console.print(f"✗ {line}", highlight=False, markup=False)
        raise typer.Exit(RET_CONFIG) from None
    return test_map, material_map


def _resolver(settings: Settings, catalog: Catalog | None) -> Resolver:
    test_map, material_map = _maps(settings)
    # dry_run=False: a check must never pass because of DRY_RUN's dummy specimen.
    return Resolver(catalog=catalog, test_map=test_map, material_map=material_map,
                    code_source=settings.test_code_source,
                    variant_policy=settings.bemsoft_variant_policy, dry_run=False,
                    material_map_path=settings.bemsoft_material_map_path)


def _entries_table(entries: list[CatalogEntry], *, title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left", show_lines=False)
    for column in ("id", "nome", "material id", "material nome"):
        table.add_column(column, overflow="fold")
    for e in entries:
        table.add_row(Text(e.test_id), Text(e.name), Text(e.specimen_id), Text(e.specimen_name))
    return table


def _persisted_at(path: Path) -> float | None:
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (OSError, ValueError):
        return None
    value = data.get("fetched_at") if isinstance(data, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


# --- catalog ----------------------------------------------------------------------------------


@catalog_app.command("sync")
def catalog_sync() -> None:
    """Baixa agora o catálogo GET /tests e grava a cópia local (BEMSOFT_CATALOG_CACHE).

    Se a Bemsoft não responder ou responder algo inválido, a cópia anterior é mantida e o
    código de saída é 1. Um catálogo bem menor que o anterior, que o monitor recusa como
    incompleto, é aceito aqui (o resumo mostra quantos exames saíram).
    """
    settings = _catalog_settings()
    configure_logging(settings)
    _require_token(settings, "é preciso para baixar o catálogo GET /tests")
    cache = _cache(settings)
    previous, previous_at = cache.catalog, cache.loaded_at
    started = time.monotonic()
    if not cache.refresh(accept_shrink=True):
        if previous is not None:
            kept = (f"cópia anterior mantida, de {_when(previous_at)} ({len(previous)} itens, "
                    f"{cache.path})")
        else:
            kept = f"nenhuma cópia anterior em {cache.path}; o catálogo segue indisponível"
        raise _fail(f"{cache.last_error}; {kept}")
    catalog = cache.catalog
    assert catalog is not None
    if _persisted_at(cache.path) != cache.loaded_at:
        raise _fail(f"catálogo baixado ({len(catalog)} itens), mas a cópia não pôde ser gravada "
                    f"em {cache.path}; verifique BEMSOFT_CATALOG_CACHE e as permissões da pasta")
    tests = len({e.test_id.strip().casefold() for e in catalog.entries})
    out.print(f"Catálogo sincronizado em {time.monotonic() - started:.1f} s: "
              f"{len(catalog)} itens, {tests} exames, {_tests_with_variants(catalog)} exame(s) "
              "com mais de um material (variantes)", markup=False)
    out.print(f"Cópia gravada em {cache.path} ({_when(cache.loaded_at)})", markup=False)
    if previous is not None:
        old, new = set(previous.entries), set(catalog.entries)
        out.print(f"Antes: {len(previous)} itens, de {_when(previous_at)} "
                  f"({_age(time.time() - previous_at if previous_at else None)}); "
                  f"{len(new - old)} novo(s), {len(old - new)} removido(s)", markup=False)
    raise typer.Exit(RET_OK)


@catalog_app.command("search")
def catalog_search(
    text: Annotated[str, typer.Argument(metavar="TEXTO",
                                        help="Parte do id ou do nome (sem acento, tanto faz).")],
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Máximo de linhas.")] = 50,
) -> None:
    """Busca exames na cópia local do catálogo por id ou nome (sem diferenciar acentos).

    Só acessa a Bemsoft se ainda não houver cópia local. Sai com 1 se nada for encontrado.
    """
    settings = _catalog_settings()
    configure_logging(settings)
    catalog = _catalog_or_sync(settings)[1]
    found = catalog.search(text, limit=limit + 1)
    if not found:
        raise _fail(f"nenhum exame do catálogo com id ou nome contendo {text!r}")
    shown = found[:limit]
    out.print(_entries_table(shown))
    if len(found) > limit:
        out.print(f"Mostrando os primeiros {limit}; há mais resultados (use --limit).",
                  markup=False)
    else:
        out.print(f"{len(shown)} resultado(s) para {text!r}.", markup=False)
    raise typer.Exit(RET_OK)


@catalog_app.command("show")
def catalog_show(
    code: Annotated[str, typer.Argument(metavar="CODIGO",
                                        help="Código do exame: id na Bemsoft ou código local.")],
) -> None:
    """Mostra as variantes (materiais) de um exame e como um código LOCAL seria enviado.

    O código local passa pelo mapa de exames (BEMSOFT_TEST_MAP_PATH) e pelo mapa de
    materiais (BEMSOFT_MATERIAL_MAP_PATH), como o monitor faz. Sai com 1 se o código local
    não puder ser enviado.
    """
    settings = _catalog_settings()
    configure_logging(settings)
    catalog = _catalog_or_sync(settings)[1]
    resolver = _resolver(settings, catalog)
    wanted = code.strip()
    mapped = resolver.test_map.get(wanted.casefold())
    shown_any = False
    for test_id in dict.fromkeys(t for t in (wanted, mapped) if t):
        variants = catalog.variants(test_id)
        if variants:
            shown_any = True
            label = "variante" if len(variants) == 1 else "variantes"
            out.print(_entries_table(
                variants, title=f"{variants[0].test_id} no catálogo: {len(variants)} {label}"))
    if not shown_any:
        similar = catalog.search(wanted, limit=5)
        names = ", ".join(f"{e.test_id} ({e.name})" for e in similar)
        out.print(Text(f"{wanted} não é um id do catálogo da Bemsoft"
                       + (f"; parecidos: {names}" if names else "")))
    line, resolution = explain_code(wanted, resolver)
    out.print(Text(line, style="green" if resolution.ok else "yellow"))
    raise typer.Exit(RET_OK if resolution.ok else RET_ERROR)


# --- mapping ----------------------------------------------------------------------------------


def _since(settings: Settings, days: int) -> dt.datetime | None:
    """Midnight ``days`` days ago in the lab's time (the LIS keeps naive local times)."""
    if days <= 0:
        return None
    today = dt.datetime.now(settings.lab_tz).date()
    return dt.datetime.combine(today - dt.timedelta(days=days), dt.time.min)


def _read_codes(settings: Settings, since: dt.datetime | None) -> list[dict[str, object]]:
    # Database drivers load only for the command that reads the LIS.
    from .dbconn import lis_schema, lis_url, make_engine
    from .source import LisSource, install_sqlite_functions, lis_tables

    try:
        engine = make_engine(lis_url(settings), settings=settings)
    except ConfigError as exc:
        for line in exc.problems:
            err_console.print(f"✗ {line}", highlight=False, markup=False)
        raise typer.Exit(RET_CONFIG) from None
    install_sqlite_functions(engine)
    source = LisSource(tables=lis_tables(lis_schema(settings, engine.dialect.name)),
                       support_labs=settings.support_labs)
    try:
        with engine.connect() as conn:
            rows = source.fetch_distinct_codes(conn, since, code_source=settings.test_code_source)
            conn.rollback()  # read-only: nothing to keep
        return rows
    except sa.exc.SQLAlchemyError as exc:
        from .ops import db_error_text

        reason = db_error_text(exc, settings.secrets)
        raise _fail(f"não foi possível ler os exames do LIS: {reason}; confira DB_URL ou "
                    "DB_SERVER/DB_NAME e se as tabelas ItemSol, solicitacao e texame existem"
                    ) from None
    finally:
        engine.dispose()


def _report_table(reports: list[CodeReport]) -> Table:
    table = Table(show_lines=False)
    for column in ("código", "descrição (exemplo)", "itens", "supportTestId", "situação",
                   "material / variantes", "correção"):
        table.add_column(column, overflow="fold", justify="right" if column == "itens" else "left")
    for r in reports:
        u = r.usage
        support = "" if r.support_id is None else r.support_id + (" (mapa)" if r.from_map else "")
        table.add_row(
            Text(u.code or "(sem código)"),
            Text(u.description or u.exam_description or ""),
            str(u.items),
            Text(support),
            Text(STATUS_LABELS.get(r.status, r.status), style=_STATUS_STYLE.get(r.status, "")),
            Text(r.material if r.ok and not r.detail else
                 (f"{r.material}; {r.detail}" if r.material else r.detail)),
            Text(r.fix),
        )
    return table


def _write_csv(path: Path, reports: list[CodeReport]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # BOM: Excel opens a ';' CSV in UTF-8 only when it starts with one.
        path.write_bytes(render_csv(reports).encode("utf-8-sig"))
    except OSError as exc:
        raise _fail(f"não foi possível gravar o relatório {path} ({os_error_text(exc)}); "
                    f"{os_error_fix(exc)}") from None


@mapping_app.command("check")
def mapping_check(
    days: Annotated[int, typer.Option("--days", min=0,
                                      help="Itens dos últimos N dias (0 = todo o histórico).")]
    = 30,
    csv_path: Annotated[Path | None, typer.Option("--csv", help="Grava o relatório em CSV "
                                                  "(separado por ';', abre no Excel).")] = None,
    sync: Annotated[bool, typer.Option(
        "--sync", help="Baixa o catálogo antes de conferir (sem esta opção, só baixa quando "
                       "não há cópia local ou ela passou de BEMSOFT_TESTS_TTL).")] = False,
) -> None:
    """Lista cada código de exame dos TERCEIROS no LIS e se ele tem correspondente na Bemsoft.

    Para cada código: um exemplo de descrição, quantos itens, o supportTestId (pelo mapa
    BEMSOFT_TEST_MAP_PATH ou o próprio código), a situação e a correção. Sai com 0 quando
    todos estão ok e com 1 quando há algum problema (ou nenhum item no período), para usar
    em scripts antes de entrar em produção. Itens sem ItemSol.DataEntrada contam pela data
    da solicitação; sem nenhuma das duas datas, contam sempre.
    """
    settings = settings_or_exit()
    configure_logging(settings)
    test_map, material_map = _maps(settings)  # bad files stop here, before any network
    cache = _cache(settings)
    # As the monitor would: a copy older than BEMSOFT_TESTS_TTL is fetched again first.
    fresh = cache.refresh() if sync else (cache.refresh_if_stale() or cache.catalog is not None)
    if not fresh:
        kept = (f"usando a cópia de {_when(cache.loaded_at)}" if cache.catalog is not None
                else "sem catálogo, nenhum código pode ser conferido")
        err_console.print(f"! {cache.last_error}; {kept}", highlight=False, markup=False)
    resolver = Resolver(catalog=cache.catalog, test_map=test_map, material_map=material_map,
                        code_source=settings.test_code_source,
                        variant_policy=settings.bemsoft_variant_policy, dry_run=False,
                        material_map_path=settings.bemsoft_material_map_path)
    since = _since(settings, days)
    rows = _read_codes(settings, since)
    reports = check_codes(
        merge_code_rows(rows), resolver,
        files=MapFiles(test_map=settings.bemsoft_test_map_path,
                       material_map=settings.bemsoft_material_map_path))
    period = f"desde {since:%d/%m/%Y}" if since else "em todo o histórico"
    column = resolver.code_column
    catalog_text = (f"catálogo de {_when(cache.loaded_at)} ({len(cache.catalog)} itens)"
                    if cache.catalog is not None else "sem catálogo")
    out.print(Text(f"Códigos de exame no LIS {period} — TERCEIROS: "
                   f"{', '.join(settings.support_labs)}; código de {column}; {catalog_text}"))
    if csv_path is not None:
        _write_csv(csv_path, reports)
    if not reports:
        if csv_path is not None:
            out.print(Text(f"Relatório (vazio) gravado em {csv_path}"))
        raise _fail(f"nenhum item dos TERCEIROS configurados {period}; confira TERCEIROS (deve "
                    "ser igual a ItemSol.NomeTerceirizado) ou aumente --days")
    out.print(_report_table(reports))
    counts = count_by_status(reports)
    out.print(Text(f"Resumo: {summary_line(reports)}",
                   style="bold green" if not has_problems(reports) else "bold yellow"))
    if csv_path is not None:
        out.print(Text(f"Relatório gravado em {csv_path}"))
    if has_problems(reports):
        problems = sum(n for s, n in counts.items() if s != "ok")
        out.print(Text(f"{problems} código(s) com problema: os itens desses códigos seriam "
                       "recusados até a correção indicada."))
        raise typer.Exit(RET_ERROR)
    raise typer.Exit(RET_OK)


__all__ = ["catalog_app", "describe_entry", "mapping_app", "out"]
