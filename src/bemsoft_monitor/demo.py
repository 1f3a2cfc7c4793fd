"""The demo: a SQLite LIS with realistic sample data, the simulator, the monitor, a summary."""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

from .app import build_monitor, build_parts
from .config import Settings, settings_from_values
from .logsetup import setup_logging
from .simulator import Simulator
from .source import LisTables, lis_tables
from .store import ITEM_DELIVERED, ITEM_REFUSED, ORDER_DELIVERED, ORDER_PENDING, ItemRow

log = logging.getLogger(__name__)

LAB_DB = "DIAGNÓSTICO DO BRASIL - DB"
LAB_PARDINI = "AME-SE - PARDINI"
LAB_OTHER = "LABORATÓRIO NÃO CONFIGURADO"
DEMO_TERCEIROS = f"{LAB_DB},{LAB_PARDINI}"
MAX_CYCLES = 50
DEMO_MARKER = ".bemsoft-demo"
ITEM_STATES = ("pending", "ordered", "delivered", "refused", "cancelled", "dead", "conferir")


def create_lis(engine: sa.Engine) -> LisTables:
    """Create the four LIS tables (for the demo and tests)."""
    tables = lis_tables(None)
    tables.item.metadata.create_all(engine)
    return tables


def _patients() -> list[dict[str, Any]]:
    return [
        {"codpaciente": 3384, "nome": "MARIA JOSÉ DA CONCEIÇÃO", "cpf": "123.456.789-09",
         "datanasc": dt.datetime(1990, 5, 15), "sexo": "F", "fone": "(79) 99876-5432",
         "EmailPac": "maria.conceicao@example.com", "cidade": "Aracaju", "uf": "SE"},
        {"codpaciente": 3385, "nome": "JOÃO  D'ÁVILA NETO", "cpf": "98765432100",
         "datanasc": dt.datetime(1958, 11, 2), "sexo": "Masculino", "fone": None,
         "EmailPac": None, "cidade": "Lagarto", "uf": "SE"},
        {"codpaciente": 3386, "nome": "ANA LÚCIA SANT'ANNA", "cpf": None,
         "datanasc": None, "sexo": "feminino", "fone": "79 3211-0000",
         "EmailPac": None, "cidade": "Itabaiana", "uf": "SE"},
        {"codpaciente": 3387, "nome": "PEDRO HENRIQUE  SOUZA", "cpf": "111.222.333-44",
         "datanasc": dt.datetime(1900, 1, 1), "sexo": "I", "fone": None,
         "EmailPac": None, "cidade": "Estância", "uf": "SE"},
        {"codpaciente": 3388, "nome": "CLÁUDIA REGINA ALVES", "cpf": "22233344455",
         "datanasc": dt.datetime(1975, 3, 30), "sexo": "F", "fone": None,
         "EmailPac": None, "cidade": "Aracaju", "uf": "SE"},
    ]


def _requisitions(today: dt.date) -> list[dict[str, Any]]:
    day = dt.datetime(today.year, today.month, today.day)
    return [
        {"codsolicitacao": 4497, "codpaciente": 3384, "dtaentrada": day, "Hora": "08:00"},
        {"codsolicitacao": 4498, "codpaciente": 3385, "dtaentrada": day, "Hora": "8:15"},
        {"codsolicitacao": 4499, "codpaciente": 3386, "dtaentrada": None, "Hora": None},
        {"codsolicitacao": 4500, "codpaciente": 3387, "dtaentrada": day, "Hora": "xx"},
        {"codsolicitacao": 4501, "codpaciente": 3388, "dtaentrada": day, "Hora": "22:40:00"},
    ]


def _items(today: dt.date) -> list[dict[str, Any]]:
    day = dt.datetime(today.year, today.month, today.day)
    nxt = day + dt.timedelta(days=1)

    def item(  # noqa: PLR0917 - one positional call per sample row reads as a table
        cod: int, sol: int, code: str | None, desc: str, lab: str,
        at: dt.datetime | None, texame: int | None = None,
    ) -> dict[str, Any]:
        return {"CodItemSol": cod, "CodSolicitacao": sol, "CodTExame": texame, "DataEntrada": at,
                "DescExames": desc, "CodConvExames": code, "NomeTerceirizado": lab,
                "Valor": 10, "VlTerceirizado": 5, "SituacaoResultado": None, "Origem": "Sistema"}

    return [
        item(17065, 4497, "FE", "FERRO SERICO", LAB_DB, day.replace(hour=8, minute=10), 10),
        item(17066, 4497, "TSH", "TSH - HORMÔNIO TIREOESTIMULANTE", LAB_DB,
             day.replace(hour=8, minute=10), 11),
        item(17067, 4497, "HEMOGRAMA", "HEMOGRAMA COMPLETO", "diagnóstico do brasil - db  ",
             day.replace(hour=8, minute=12)),
        item(17068, 4498, " gli ", "GLICOSE", LAB_PARDINI, day.replace(hour=8, minute=20)),
        item(17069, 4498, "CREA", "CREATININA", LAB_PARDINI, day.replace(hour=8, minute=20)),
        item(17070, 4498, "XYZ9", "EXAME SEM CADASTRO", LAB_PARDINI, None),
        item(17071, 4499, "VITD", "VITAMINA D (25-HIDROXI)", LAB_DB, None),
        item(17072, 4499, None, "EXAME SEM CÓDIGO", LAB_DB, None),
        item(17073, 4500, "PSA", "PSA TOTAL", LAB_DB, day.replace(hour=9)),
        item(17074, 4501, "TGO", "TGO (AST)", LAB_DB, nxt.replace(hour=0, minute=20)),
        item(17075, 4501, "TGP", "TGP (ALT)", LAB_DB, day.replace(hour=22, minute=45)),
        item(17076, 4501, "COL", "COLESTEROL TOTAL", LAB_OTHER, day.replace(hour=22, minute=45)),
    ]


LATE_ITEM = {"CodItemSol": 17090, "CodSolicitacao": 4497, "CodTExame": None,
             "DescExames": "VITAMINA B12", "CodConvExames": "B12", "NomeTerceirizado": LAB_DB,
             "Valor": 10, "VlTerceirizado": 5, "SituacaoResultado": None, "Origem": "Sistema"}


def seed_lis(engine: sa.Engine, today: dt.date) -> LisTables:
    """Create the demo LIS with sample data."""
    t = create_lis(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(t.exam), [
            {"CodTexame": 10, "CodigoExame": "FE", "descricao": "FERRO SÉRICO"},
            {"CodTexame": 11, "CodigoExame": "TSH", "descricao": "TSH"},
        ])
        conn.execute(sa.insert(t.patient), _patients())
        conn.execute(sa.insert(t.requisition), _requisitions(today))
        conn.execute(sa.insert(t.item), _items(today))
    return t


def demo_settings(folder: Path, *, base_url: str, token: str) -> Settings:
    """Settings of the demo: everything inside ``folder``, nothing to configure.

    Nothing from the machine leaks in either: a lab's STATE_DB_URL, DEFAULT_GENDER or
    BEMSOFT_TOKEN in the environment or a .env must not reach the demo.
    """
    return settings_from_values(
        db_url=f"sqlite:///{(folder / 'lis_demo.db').as_posix()}",
        terceiros=DEMO_TERCEIROS,
        poll_seconds=0.2,
        debounce_seconds=0,
        initial_item_id="0",
        out_of_order_grace_seconds=0,
        failed_dir=folder / "failed_events",
        refused_report=folder / "itens_recusados.csv",
        bemsoft_base_url=base_url,
        bemsoft_token=token,
        bemsoft_dry_run=False,
        bemsoft_catalog_cache=folder / "catalogo_bemsoft.json",
        bemsoft_test_map_path=folder / "tests_map.json",
        bemsoft_material_map_path=folder / "materiais.csv",
        bemsoft_backoff=0.05,
        bemsoft_backoff_max=0.2,
        default_birthdate=dt.date(1970, 1, 1),
        physician_name="DRA. HELENA MACHADO",
        physician_council="CRM",
        physician_number="123456",
        physician_uf="SE",
        log_level="INFO",
    )


def write_demo_files(folder: Path) -> None:
    """Map files of the demo: a code map and a material map missing GLI on purpose."""
    (folder / "tests_map.json").write_text(
        json.dumps({"HEMOGRAMA": "HMG", "12345": "TSH"}, indent=2), encoding="utf-8")
    (folder / "materiais.csv").write_text("codigo;material\nCREA;Soro\n", encoding="utf-8")


DEMO_SIMULATOR_PORT = 8799


def write_demo_env(folder: Path, settings: Settings, *, port: int = DEMO_SIMULATOR_PORT) -> Path:
    """A ``.env`` beside the demo database so every command can be tried on it afterwards.

    It points at a simulator on ``port`` (``bemsoft-monitor simulator --port 8799``); the
    environment still overrides any line, as always.
    """
    def path(value: Path | None) -> str:
        return value.as_posix() if value is not None else ""

    birthdate = settings.default_birthdate

    lines = [
        "# Gerado por 'bemsoft-monitor demo': configuração da demonstração.",
        f"# Rode 'bemsoft-monitor simulator --port {port}' em outro terminal para ter a "
        "Bemsoft local.",
        f"DB_URL={settings.db_url}",
        f"TERCEIROS={settings.terceiros}",
        f"POLL_SECONDS={settings.poll_seconds}",
        f"DEBOUNCE_SECONDS={settings.debounce_seconds:g}",
        f"OUT_OF_ORDER_GRACE_SECONDS={settings.out_of_order_grace_seconds:g}",
        f"FAILED_DIR={path(settings.failed_dir)}",
        f"REFUSED_REPORT={path(settings.refused_report)}",
        f"BEMSOFT_BASE_URL=http://127.0.0.1:{port}",
        f"BEMSOFT_TOKEN={settings.token}",
        "BEMSOFT_DRY_RUN=0",
        f"BEMSOFT_CATALOG_CACHE={path(settings.bemsoft_catalog_cache)}",
        f"BEMSOFT_TEST_MAP_PATH={path(settings.bemsoft_test_map_path)}",
        f"BEMSOFT_MATERIAL_MAP_PATH={path(settings.bemsoft_material_map_path)}",
        f"BEMSOFT_BACKOFF={settings.bemsoft_backoff:g}",
        f"BEMSOFT_BACKOFF_MAX={settings.bemsoft_backoff_max:g}",
        f"DEFAULT_BIRTHDATE={birthdate.isoformat() if birthdate else ''}",
        f"PHYSICIAN_NAME={settings.physician_name or ''}",
        f"PHYSICIAN_COUNCIL={settings.physician_council or ''}",
        f"PHYSICIAN_NUMBER={settings.physician_number or ''}",
        f"PHYSICIAN_UF={settings.physician_uf or ''}",
    ]
    env = folder / ".env"
    env.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return env


def drive_until_quiet(monitor: Any, *, max_cycles: int = MAX_CYCLES) -> int:
    """Run cycles until nothing is due or in flight; return how many ran."""
    for n in range(1, max_cycles + 1):
        monitor.cycle(drain=True)
        pending = monitor.store.counts()["orders"].get(ORDER_PENDING, 0)
        due = monitor.store.next_due_at()
        if not pending and due is None:
            return n
    return max_cycles


@dataclass(frozen=True)
class DemoOutcome:
    """What the demo's monitor made of every LIS item it read."""

    items: tuple[ItemRow, ...]
    batches: dict[int, tuple[str, ...]]  # requisition -> batch externalIds sent
    saved_tests: int  # tests the simulator really saved
    ignored_labs: tuple[str, ...]  # NomeTerceirizado of items outside TERCEIROS

    @property
    def delivered(self) -> list[ItemRow]:
        return [i for i in self.items if i.state == ITEM_DELIVERED]

    @property
    def refused(self) -> list[ItemRow]:
        return [i for i in self.items if i.state == ITEM_REFUSED]

    @property
    def unsettled(self) -> list[ItemRow]:
        """Items neither delivered nor refused with a reason: the demo failed."""
        return [i for i in self.items
                if not (i.state == ITEM_DELIVERED
                        or (i.state == ITEM_REFUSED and (i.reason or "").strip()))]

    @property
    def ok(self) -> bool:
        """Every item delivered or refused, and every delivered test really saved."""
        return bool(self.items) and not self.unsettled \
            and self.saved_tests == len(self.delivered)


def collect_outcome(store: Any, lis_engine: sa.Engine, *, saved_tests: int,
                    support_labs: tuple[str, ...]) -> DemoOutcome:
    """Read the fate of every item from the state store (and what the LIS left out)."""
    items: list[ItemRow] = []
    for state in ITEM_STATES:
        items.extend(store.items_by_state(state, limit=100_000))
    items.sort(key=lambda i: (i.requisition_id, i.item_id))
    batches: dict[int, tuple[str, ...]] = {}
    for req in sorted({i.requisition_id for i in items}):
        batches[req] = tuple(
            str(o.payload["batch"]["externalId"]) for o in store.orders_of_requisition(req)
            if o.state == ORDER_DELIVERED)
    wanted = {lab.strip().casefold() for lab in support_labs}
    t = lis_tables(None)
    with lis_engine.connect() as conn:
        labs = conn.execute(sa.select(t.item.c.NomeTerceirizado).distinct()).scalars().all()
    ignored = tuple(sorted({lab.strip() for lab in labs
                            if lab and lab.strip().casefold() not in wanted}))
    return DemoOutcome(tuple(items), batches, saved_tests, ignored)


_STATE_LABELS = {ITEM_DELIVERED: "[green]entregue[/]", ITEM_REFUSED: "[yellow]recusado[/]",
                 "dead": "[red]falhou (FAILED_DIR)[/]", "conferir": "[magenta]conferir[/]",
                 "cancelled": "cancelado", "pending": "[red]aguardando[/]",
                 "ordered": "[red]na fila[/]"}


def _exam(item: ItemRow) -> str:
    snap = item.snapshot
    code = (snap.conv_code or "").strip() if snap else ""
    description = " ".join((snap.description or "").split()) if snap else ""
    return f"{code or '(sem código)'} {description}".strip()


def summary_tables(outcome: DemoOutcome) -> tuple[Table, Table]:
    """Per requisition (orders sent, items delivered/refused) and per item."""
    per_req = Table(title="Solicitações", title_justify="left")
    for col in ("Solicitação", "Itens", "Entregues", "Recusados", "Pedido(s) enviado(s)"):
        per_req.add_column(col, overflow="fold")
    for req, batch_ids in outcome.batches.items():
        mine = [i for i in outcome.items if i.requisition_id == req]
        per_req.add_row(str(req), str(len(mine)),
                        str(sum(i.state == ITEM_DELIVERED for i in mine)),
                        str(sum(i.state == ITEM_REFUSED for i in mine)),
                        ", ".join(batch_ids) or "—")
    per_item = Table(title="Itens", title_justify="left")
    for col in ("Solicitação", "Item", "Exame", "Situação"):
        per_item.add_column(col, overflow="fold")
    for item in outcome.items:
        per_item.add_row(str(item.requisition_id), str(item.item_id), _exam(item),
                         _STATE_LABELS.get(item.state, item.state))
    return per_req, per_item


def print_summary(console: Console, outcome: DemoOutcome, settings: Settings) -> None:
    """The tables, the refusal reasons in full, totals and where to look next."""
    per_req, per_item = summary_tables(outcome)
    console.rule("[bold]Resultado da demonstração[/]")
    console.print(per_req)
    console.print(per_item)
    if outcome.refused:
        console.print("[bold]Motivo de cada recusa[/] (o monitor não adivinha: diz o que "
                      "corrigir):")
        for item in outcome.refused:
            console.print(f"  • {item.requisition_id}/{item.item_id}: {item.reason}",
                          highlight=False, markup=False)
    for lab in outcome.ignored_labs:
        console.print(f"Não lido, como esperado: itens de '{lab}', que não está em TERCEIROS.",
                      highlight=False, markup=False)
    console.print(f"\nItens entregues: [green]{len(outcome.delivered)}[/]   recusados com "
                  f"motivo: [yellow]{len(outcome.refused)}[/]   testes salvos no simulador: "
                  f"{outcome.saved_tests}")
    console.print(
        "\nOnde olhar:\n"
        f"  • itens recusados e o motivo (CSV): {settings.refused_report}\n"
        f"  • falhas de envio (se houver): {settings.failed_dir}", highlight=False)


def _prepare_folder(folder: Path) -> str | None:
    """Empty ``folder`` for a new demo; a problem text when it is not safe to."""
    if folder.exists() and not folder.is_dir():
        return f"{folder} existe e não é uma pasta; escolha outra com --dir"
    if folder.is_dir() and any(folder.iterdir()):
        if not ((folder / DEMO_MARKER).is_file() or (folder / "lis_demo.db").is_file()):
            return (f"a pasta {folder} já existe e não é de uma demonstração anterior; nada "
                    "foi apagado. Escolha uma pasta nova ou vazia com --dir")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DEMO_MARKER).write_text(
        "Pasta criada por 'bemsoft-monitor demo'; ela é apagada e recriada a cada demonstração.\n",
        encoding="utf-8")
    return None


def run_demo(folder: Path, *, console: Console | None = None) -> int:
    """Run the whole demo; 0 when every item ended delivered or refused with a reason."""
    console = console or Console()
    folder = folder.resolve()
    problem = _prepare_folder(folder)
    if problem:
        Console(stderr=True).print(f"✗ {problem}", highlight=False, markup=False)
        return 2
    setup_logging(level="INFO")
    write_demo_files(folder)
    today = dt.datetime.now(dt.timezone(dt.timedelta(hours=-3))).date()
    with Simulator() as sim:
        settings = demo_settings(folder, base_url=sim.url, token=sim.token)
        engine = sa.create_engine(settings.db_url or "")
        seed_lis(engine, today)
        console.print(f"[bold]LIS de demonstração:[/] {folder / 'lis_demo.db'}", highlight=False)
        console.print(f"[bold]Simulador Bemsoft:[/] {sim.url}   [bold]TERCEIROS:[/] "
                      f"{settings.terceiros}", highlight=False)
        parts = build_parts(settings)
        monitor = build_monitor(parts)
        try:
            drive_until_quiet(monitor)
            console.print("[bold]Chegou um exame novo (B12) na solicitação 4497, já enviada…[/]")
            with engine.begin() as conn:
                late = dict(LATE_ITEM,
                            DataEntrada=dt.datetime(today.year, today.month, today.day, 9))
                conn.execute(sa.insert(lis_tables(None).item), [late])
            drive_until_quiet(monitor)
        finally:
            monitor.close()
        outcome = collect_outcome(parts.store, engine, saved_tests=len(sim.saved_tests()),
                                  support_labs=settings.support_labs)
        print_summary(console, outcome, settings)
        engine.dispose()
        parts.store.dispose()
        parts.lis_engine.dispose()
    if not outcome.ok:
        stuck = ", ".join(f"{i.item_id} ({i.state})" for i in outcome.unsettled) or "nenhum"
        Console(stderr=True).print(
            f"✗ A demonstração não terminou como deveria: itens sem destino final: {stuck}; "
            f"{len(outcome.delivered)} entregue(s) e {outcome.saved_tests} teste(s) salvo(s) "
            "no simulador. Veja as mensagens acima e informe o suporte.",
            highlight=False, markup=False)
        return 1
    env = write_demo_env(folder, settings)
    material_map = settings.bemsoft_material_map_path
    material_file = material_map.name if material_map else "materiais.csv"
    console.print(
        f"\nPara continuar com esta demonstração, entre na pasta ({folder}) — o arquivo {env.name}"
        " já está pronto — e rode:\n"
        f"  1. bemsoft-monitor simulator --port {DEMO_SIMULATOR_PORT}   (em outro terminal)\n"
        "  2. bemsoft-monitor mapping check          (cada exame e como ele é resolvido)\n"
        f"  3. adicione a linha 'GLI;Plasma' em {material_file}"
        " (e, se quiser, \"XYZ9\": \"TSH\" em tests_map.json; DEFAULT_GENDER=M no .env)\n"
        "  4. bemsoft-monitor retry --refused --send (reenvia os recusados que agora resolvem)\n"
        "  5. bemsoft-monitor status\n"
        "Depois, configure o seu .env a partir de .env.example e rode 'bemsoft-monitor check'.",
        highlight=False)
    return 0
