"""``bemsoft-monitor demo``: nothing to configure, nothing from the machine leaks in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bemsoft_monitor.demo import DEMO_MARKER, DemoOutcome
from bemsoft_monitor.models import LisItem
from bemsoft_monitor.store import ItemRow


def run_demo_cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "BEMSOFT_ENV_FILE"}
    base.update(COLUMNS="200", PYTHONIOENCODING="utf-8", **env)
    return subprocess.run([sys.executable, "-m", "bemsoft_monitor", "demo", *args], cwd=cwd,
                          env=base, capture_output=True, text=True, timeout=180, check=False)


def test_demo_settles_every_item_even_with_a_configured_machine(tmp_path: Path) -> None:
    # A lab machine: a real .env in the working folder and settings in the environment.
    (tmp_path / ".env").write_text("DB_SERVER=srv\\PRODUCAO\nDB_NAME=LIS\nTERCEIROS=X\n",
                                   encoding="utf-8")
    production_state = tmp_path / "estado_producao.db"
    proc = run_demo_cli(tmp_path, STATE_DB_URL=f"sqlite:///{production_state.as_posix()}",
                        DEFAULT_GENDER="M", BEMSOFT_EXTID_MAX="8", BEMSOFT_DRY_RUN="1",
                        BEMSOFT_BASE_URL="https://bemsoft.ws.wiselab.com.br")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = " ".join(proc.stdout.split())
    assert "Itens entregues: 8 recusados com motivo: 4 testes salvos no simulador: 8" in out
    assert "sol-4497, sol-4497-2" in out  # the late item went in an order of its own
    assert "'LABORATÓRIO NÃO CONFIGURADO', que não está em TERCEIROS" in out
    # Every refusal says what to fix; DEFAULT_GENDER from the machine did not hide one.
    for reason in ("BEMSOFT_MATERIAL_MAP_PATH", "BEMSOFT_TEST_MAP_PATH",
                   "ItemSol.CodConvExames", "DEFAULT_GENDER=M ou F"):
        assert reason in out, reason
    assert not production_state.exists()
    demo = tmp_path / "demo_run"
    assert (demo / "lis_demo.db").is_file() and (demo / ".env").is_file()
    assert "Traceback" not in proc.stderr


def test_demo_never_deletes_a_folder_that_is_not_a_demo(tmp_path: Path) -> None:
    precious = tmp_path / "laudos"
    precious.mkdir()
    (precious / "importante.txt").write_text("não apague", encoding="utf-8")
    proc = run_demo_cli(tmp_path, "--dir", str(precious))
    assert proc.returncode == 2
    assert "não é de uma demonstração anterior" in proc.stderr and "--dir" in proc.stderr
    assert (precious / "importante.txt").read_text(encoding="utf-8") == "não apague"
    assert sorted(p.name for p in precious.iterdir()) == ["importante.txt"]


def test_demo_run_twice_replaces_its_own_folder(tmp_path: Path) -> None:
    assert run_demo_cli(tmp_path, "--dir", "d").returncode == 0
    (tmp_path / "d" / "sobra.txt").write_text("x", encoding="utf-8")
    again = run_demo_cli(tmp_path, "--dir", "d")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "d" / DEMO_MARKER).is_file()
    assert not (tmp_path / "d" / "sobra.txt").exists()


def _row(item_id: int, state: str, reason: str | None = None) -> ItemRow:
    return ItemRow(item_id=item_id, requisition_id=1, state=state, order_id=None, reason=reason,
                   snapshot=LisItem(item_id=item_id, requisition_id=1))


def test_demo_outcome_is_a_failure_unless_every_item_is_settled() -> None:
    good = DemoOutcome((_row(1, "delivered"), _row(2, "refused", "sem código")), {1: ("sol-1",)},
                       saved_tests=1, ignored_labs=())
    assert good.ok and good.unsettled == []
    for bad in (
        DemoOutcome((_row(1, "delivered"), _row(2, "pending")), {}, 1, ()),
        DemoOutcome((_row(1, "dead"),), {}, 0, ()),
        DemoOutcome((_row(1, "refused", "  "),), {}, 0, ()),  # a refusal needs its reason
        DemoOutcome((_row(1, "delivered"),), {}, saved_tests=0, ignored_labs=()),  # dropped
        DemoOutcome((), {}, 0, ()),  # nothing read at all
    ):
        assert not bad.ok, bad
