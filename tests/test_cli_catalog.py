"""``catalog sync | search | show`` and ``mapping check`` as real subprocesses on the demo LIS.

The demo database and its ``.env`` are created by the project's own demo code; the Bemsoft
side is the simulator on a loopback port (``BEMSOFT_BASE_URL`` in the environment overrides
the demo's ``.env``, as it does in production).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from bemsoft_monitor.demo import demo_settings, seed_lis, write_demo_env, write_demo_files
from bemsoft_monitor.simulator import Simulator
from bemsoft_monitor.source import lis_tables

DEMO_CODES = {"(sem código)", "XYZ9", "gli", "CREA", "FE", "HEMOGRAMA", "PSA", "TGO", "TGP",
              "TSH", "VITD"}


def cli(folder: Path, *args: str, base_url: str,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BEMSOFT_", "DB_", "LOG_"))}
    env.update(BEMSOFT_BASE_URL=base_url, COLUMNS="250", PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "bemsoft_monitor", *args], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator() as s:
        yield s


@pytest.fixture
def demo(tmp_path: Path, sim: Simulator) -> Path:
    """The demo LIS, map files and ``.env`` in ``tmp_path`` (no monitor run yet)."""
    write_demo_files(tmp_path)
    settings = demo_settings(tmp_path, base_url=sim.url, token=sim.token)
    engine = sa.create_engine(settings.db_url or "")
    seed_lis(engine, dt.date.today())
    engine.dispose()
    write_demo_env(tmp_path, settings)
    return tmp_path


def test_catalog_sync_writes_the_local_copy_and_counts_variants(demo: Path, sim: Simulator) -> None:
    res = cli(demo, "catalog", "sync", base_url=sim.url)
    print(res.stdout, res.stderr)
    assert res.returncode == 0, res.stderr
    cache = demo / "catalogo_bemsoft.json"
    assert cache.is_file()
    assert "Catálogo sincronizado" in res.stdout
    assert "com mais de um material (variantes)" in res.stdout


def test_a_failed_sync_keeps_the_previous_copy_and_says_so(demo: Path, sim: Simulator) -> None:
    assert cli(demo, "catalog", "sync", base_url=sim.url).returncode == 0
    cache = demo / "catalogo_bemsoft.json"
    before = cache.read_bytes()
    res = cli(demo, "catalog", "sync", base_url=closed_port_url())
    print(res.stdout, res.stderr)
    assert res.returncode == 1
    assert "cópia anterior mantida" in res.stderr
    assert cache.read_bytes() == before
    # The kept copy still answers searches without Bemsoft.
    found = cli(demo, "catalog", "search", "ferro", base_url=closed_port_url())
    assert found.returncode == 0, found.stderr
    assert "FERRO SERICO" in found.stdout


def test_search_ignores_case_and_accents_and_fails_when_nothing_matches(
        demo: Path, sim: Simulator) -> None:
    res = cli(demo, "catalog", "search", "GLICOSE", base_url=sim.url)
    assert res.returncode == 0, res.stderr
    assert "PLASMA" in res.stdout and "URINA" in res.stdout
    none = cli(demo, "catalog", "search", "nãoexisteexame", base_url=sim.url)
    assert none.returncode == 1
    assert "nenhum exame do catálogo" in none.stderr


def test_show_lists_the_variants_of_an_ambiguous_code_and_the_fix(demo: Path,
                                                                   sim: Simulator) -> None:
    res = cli(demo, "catalog", "show", "GLI", base_url=sim.url)
    print(res.stdout)
    assert res.returncode == 1  # the local code GLI would be refused
    assert "2 variantes" in res.stdout
    assert "BEMSOFT_MATERIAL_MAP_PATH" in res.stdout
    ok = cli(demo, "catalog", "show", "CREA", base_url=sim.url)
    assert ok.returncode == 0, ok.stdout
    assert "material" in ok.stdout
    mapped = cli(demo, "catalog", "show", "HEMOGRAMA", base_url=sim.url)
    assert mapped.returncode == 0, mapped.stdout
    assert "HMG" in mapped.stdout


def _csv_rows(path: Path) -> list[dict[str, str]]:
    text = path.read_bytes().decode("utf-8-sig")
    return list(csv.DictReader(io.StringIO(text), delimiter=";"))


def test_mapping_check_lists_every_demo_exam_with_its_resolution(demo: Path,
                                                                  sim: Simulator) -> None:
    report = demo / "mapeamento.csv"
    res = cli(demo, "mapping", "check", "--csv", str(report), base_url=sim.url)
    print(res.stdout, res.stderr)
    assert res.returncode == 1  # the demo has problems on purpose
    for code in DEMO_CODES:
        assert code in res.stdout, code
    rows = _csv_rows(report)
    assert len(rows) == len(DEMO_CODES)
    by_code = {r["código"]: r for r in rows}
    assert set(by_code) == DEMO_CODES
    status = {code: row["situação"] for code, row in by_code.items()}
    assert {status[c] for c in ("FE", "TSH", "CREA", "HEMOGRAMA", "PSA", "VITD")} == {"ok"}
    assert status["gli"] == "ambíguo"
    assert status["XYZ9"] == "fora do catálogo"
    assert status["(sem código)"] == "sem código"
    assert "PLASMA" in by_code["gli"]["detalhe"] + by_code["gli"]["correção"]
    assert by_code["HEMOGRAMA"]["supportTestId"] == "HMG"
    assert by_code["HEMOGRAMA"]["origem do supportTestId"] == "mapa de exames"
    assert by_code["CREA"]["material (supportSpecimenId)"].startswith("SORO")


def test_mapping_check_is_green_once_the_mapping_is_fixed(demo: Path, sim: Simulator) -> None:
    (demo / "materiais.csv").write_text("codigo;material\nCREA;Soro\nGLI;Plasma\n",
                                        encoding="cp1252")
    (demo / "tests_map.json").write_text(json.dumps({"HEMOGRAMA": "HMG", "XYZ9": "TSH"}),
                                         encoding="utf-8")
    engine = sa.create_engine(f"sqlite:///{(demo / 'lis_demo.db').as_posix()}")
    item = lis_tables(None).item
    with engine.begin() as conn:
        conn.execute(sa.delete(item).where(item.c.CodConvExames.is_(None)))
    engine.dispose()
    res = cli(demo, "mapping", "check", base_url=sim.url)
    print(res.stdout, res.stderr)
    assert res.returncode == 0
    assert "ambíguo" not in res.stdout.split("Resumo:")[1]


def test_mapping_check_days_limits_the_period(demo: Path, sim: Simulator) -> None:
    engine = sa.create_engine(f"sqlite:///{(demo / 'lis_demo.db').as_posix()}")
    t = lis_tables(None)
    old = dt.datetime.now() - dt.timedelta(days=90)
    with engine.begin() as conn:
        conn.execute(sa.insert(t.requisition), [{"codsolicitacao": 9001, "codpaciente": 3384,
                                                 "dtaentrada": old, "Hora": "07:00"}])
        conn.execute(sa.insert(t.item), [{
            "CodItemSol": 9001, "CodSolicitacao": 9001, "DataEntrada": old,
            "DescExames": "EXAME ANTIGO", "CodConvExames": "OLD1",
            "NomeTerceirizado": "AME-SE - PARDINI"}])
    engine.dispose()
    recent = cli(demo, "mapping", "check", "--days", "30", base_url=sim.url)
    assert "OLD1" not in recent.stdout
    everything = cli(demo, "mapping", "check", "--days", "0", base_url=sim.url)
    assert "OLD1" in everything.stdout
    assert "em todo o histórico" in everything.stdout


def test_mapping_check_names_file_and_line_of_a_broken_material_map(
        demo: Path, sim: Simulator) -> None:
    (demo / "materiais.csv").write_text("codigo;material\nCREA;Soro\nGLI\n", encoding="utf-8")
    res = cli(demo, "mapping", "check", base_url=sim.url)
    print(res.stdout, res.stderr)
    assert res.returncode == 2
    assert "materiais.csv" in res.stderr
    assert "linha 3" in res.stderr


def test_mapping_check_without_any_catalogue_says_so(demo: Path) -> None:
    res = cli(demo, "mapping", "check", base_url=closed_port_url())
    print(res.stdout, res.stderr)
    assert res.returncode == 1
    assert "sem catálogo" in res.stdout


def test_sync_of_a_large_catalogue_with_variants(tmp_path: Path) -> None:
    tests = []
    for n in range(3000):
        tests.append({"id": f"T{n:04d}", "name": f"EXAME {n}",
                      "specimen": {"id": "SORO", "name": "Soro"}})
        if n % 3 == 0:
            tests.append({"id": f"T{n:04d}", "name": f"EXAME {n} (URINA)",
                          "specimen": {"id": "URINA", "name": "Urina"}})
    with Simulator(catalog=tests) as big:
        write_demo_files(tmp_path)
        settings = demo_settings(tmp_path, base_url=big.url, token=big.token)
        engine = sa.create_engine(settings.db_url or "")
        seed_lis(engine, dt.date.today())
        engine.dispose()
        write_demo_env(tmp_path, settings)
        res = cli(tmp_path, "catalog", "sync", base_url=big.url)
        print(res.stdout, res.stderr)
        assert res.returncode == 0, res.stderr
        assert f"{len(tests)} itens, 3000 exames, 1000 exame(s) com mais de um material" in (
            res.stdout.replace("\n", " "))
        show = cli(tmp_path, "catalog", "show", "T0003", base_url=big.url)
        assert "2 variantes" in show.stdout
        assert show.returncode == 1
        single = cli(tmp_path, "catalog", "show", "T0004", base_url=big.url)
        assert single.returncode == 0, single.stdout


def test_demo_done_when_mapping_check_then_fix_then_retry_refused(tmp_path: Path,
                                                                   sim: Simulator) -> None:
    """The issue's acceptance path, entirely through the CLI on the demo's own folder."""
    made = cli(tmp_path, "demo", "--dir", "demo_run", base_url=sim.url, timeout=180)
    assert made.returncode == 0, made.stdout + made.stderr
    folder = tmp_path / "demo_run"
    assert (folder / ".env").is_file()

    check = cli(folder, "mapping", "check", base_url=sim.url)
    print(check.stdout)
    assert check.returncode == 1
    for code in DEMO_CODES | {"B12"}:
        assert code in check.stdout, code

    dry = cli(folder, "retry", "--refused", base_url=sim.url)
    print(dry.stdout, dry.stderr)
    assert dry.returncode == 0
    assert "nada foi enviado" in dry.stdout.replace("\n", " ")
    assert sim.saved_tests() == []

    # The fixes mapping check proposed: a material for GLI, a code for XYZ9, a default gender.
    with (folder / "materiais.csv").open("a", encoding="utf-8") as fh:
        fh.write("GLI;Plasma\n")
    (folder / "tests_map.json").write_text(
        json.dumps({"HEMOGRAMA": "HMG", "12345": "TSH", "XYZ9": "TSH"}), encoding="utf-8")
    with (folder / ".env").open("a", encoding="utf-8") as fh:
        fh.write("DEFAULT_GENDER=M\n")

    sent = cli(folder, "retry", "--refused", "--send", base_url=sim.url)
    print(sent.stdout, sent.stderr)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    saved = sorted(t["support_test_id"] for t in sim.saved_tests())
    assert saved == ["GLI", "PSA", "TSH"]  # XYZ9 goes as TSH through the map
    again = cli(folder, "retry", "--refused", "--send", base_url=sim.url)
    assert again.returncode == 0
    assert len(sim.saved_tests()) == 3  # nothing is sent twice

    status = cli(folder, "status", "--json", base_url=sim.url)
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    print(data)
    assert data["refused_items"] == 1  # only the item without any exam code is left



def test_catalog_sync_accepts_a_much_smaller_catalogue_and_shows_what_left(
        demo: Path, sim: Simulator) -> None:
    assert cli(demo, "catalog", "sync", base_url=sim.url).returncode == 0
    before = len(sim.catalog())
    sim.set_catalog(sim.catalog()[:10])  # the monitor itself would refuse this as cut short
    res = cli(demo, "catalog", "sync", base_url=sim.url)
    print(res.stdout, res.stderr)
    assert res.returncode == 0, res.stderr
    assert f"0 novo(s), {before - 10} removido(s)" in res.stdout.replace("\n", " ")
    saved = json.loads((demo / "catalogo_bemsoft.json").read_text(encoding="utf-8"))
    assert len(saved["tests"]) == 10


# --- what a person reads when something is wrong -----------------------------------------------

ENGLISH = ("HTTPConnectionPool", "Max retries", "Caused by", "Errno", "Connection refused",
           "File exists", "Not a directory", "Expecting")


def test_a_sync_with_bemsoft_down_says_why_once_in_portuguese(demo: Path) -> None:
    url = closed_port_url()
    res = cli(demo, "catalog", "sync", base_url=url)
    assert res.returncode == 1
    where = url.removeprefix("http://")
    said = [line for line in (res.stdout + res.stderr).splitlines()
            if f"conexão recusada por {where}" in line]
    assert len(said) == 1, res.stdout + res.stderr  # not a log line and a ✗ line
    assert said[0].startswith("✗ falha ao atualizar o catálogo /tests: Bemsoft inacessível")
    for english in ENGLISH:
        assert english not in res.stdout + res.stderr, english

    check = cli(demo, "mapping", "check", base_url=url)
    assert check.returncode == 1
    said = [line for line in (check.stdout + check.stderr).splitlines()
            if f"conexão recusada por {where}" in line]
    assert len(said) == 1 and said[0].startswith("! falha ao atualizar o catálogo"), said


def test_mapping_check_csv_under_a_file_is_one_portuguese_line(demo: Path, sim: Simulator) -> None:
    blocker = demo / "relatorios"
    blocker.write_text("não é uma pasta", encoding="utf-8")
    res = cli(demo, "mapping", "check", "--csv", str(blocker / "mapeamento.csv"),
              base_url=sim.url)
    assert res.returncode == 1
    lines = [line for line in res.stderr.splitlines() if line.startswith("✗")]
    assert lines == [f"✗ não foi possível gravar o relatório {blocker / 'mapeamento.csv'} (já "
                     "existe um arquivo com esse nome onde deveria haver uma pasta: "
                     f"{blocker}); confira o caminho"], res.stderr
    assert "Excel" not in res.stderr  # only a Windows sharing/permission error suggests it
    for english in ENGLISH:
        assert english not in res.stderr, english


def bare_cli(folder: Path, *args: str, **env_vars: str) -> subprocess.CompletedProcess[str]:
    """The CLI in ``folder`` with no .env and only ``env_vars`` of the monitor's settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BEMSOFT_", "DB_", "LOG_", "TERCEIRO", "STATE_"))}
    env.update(env_vars, COLUMNS="250", PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "bemsoft_monitor", *args], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=60, check=False)


def test_catalog_commands_need_only_bemsoft_settings_or_the_saved_copy(
        tmp_path: Path, sim: Simulator) -> None:
    assert not (tmp_path / ".env").exists()
    none = bare_cli(tmp_path, "catalog", "search", "glicose")
    assert none.returncode == 2
    assert none.stderr.strip() == (
        "✗ BEMSOFT_TOKEN: ausente; não há cópia local do catálogo em "
        "completo/catalogo_bemsoft.json e é preciso baixá-lo de GET /tests (informe-o no .env "
        "ou como variável de ambiente)")

    synced = bare_cli(tmp_path, "catalog", "sync", BEMSOFT_BASE_URL=sim.url,
                      BEMSOFT_TOKEN=sim.token)
    assert synced.returncode == 0, synced.stderr
    assert (tmp_path / "completo" / "catalogo_bemsoft.json").is_file()

    # No .env, no variable at all: the saved copy is enough to look things up.
    found = bare_cli(tmp_path, "catalog", "search", "glicose")
    assert found.returncode == 0, found.stderr
    assert "PLASMA" in found.stdout and "URINA" in found.stdout
    shown = bare_cli(tmp_path, "catalog", "show", "FE")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "SORO" in shown.stdout
    for proc in (found, shown, synced):
        for name in ("DB_SERVER", "DB_NAME", "TERCEIROS"):
            assert name not in proc.stdout + proc.stderr


def test_check_without_any_env_file_says_where_it_looked(tmp_path: Path) -> None:
    proc = bare_cli(tmp_path, "check")
    assert proc.returncode == 3
    first = proc.stdout.splitlines()[0]
    assert first == (f"✗ configuração: nenhum arquivo .env encontrado (procurado em: {tmp_path})"
                     " → copie .env.example para .env na pasta do programa e preencha")
    run = bare_cli(tmp_path, "run", "--once")
    assert run.returncode == 2
    assert f"nenhum arquivo .env encontrado (procurado em: {tmp_path})" in run.stderr
