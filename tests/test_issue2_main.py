"""``python main.py`` as the specification runs it: from the project folder, .env beside it."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from bemsoft_monitor.simulator import Simulator

from .conftest import LAB, Lis

REPO = Path(__file__).resolve().parents[1]


def load_main_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bemsoft_main_script", REPO / "main.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def project(tmp_path: Path, sim: Simulator, **extra: str) -> Path:
    """A project folder as the spec's service notes describe: main.py and .env side by side."""
    root = tmp_path / "bemsoft-monitor"
    root.mkdir()
    shutil.copy2(REPO / "main.py", root / "main.py")
    lis = Lis(f"sqlite:///{(root / 'lis.db').as_posix()}")
    lis.patient()
    for req in (1, 2):
        lis.requisition(req)
        lis.item(req, "FE")
    lis.dispose()
    values = {
        "DB_URL": f"sqlite:///{(root / 'lis.db').as_posix()}",
        "TERCEIRO": LAB,  # the legacy single-name variable, TERCEIROS left out
        "POLL_SECONDS": "0.1",
        "DEBOUNCE_SECONDS": "0",
        "INITIAL_ITEM_ID": "0",
        "FAILED_DIR": (root / "completo" / "failed_events").as_posix(),
        "REFUSED_REPORT": (root / "completo" / "recusados.csv").as_posix(),
        "BEMSOFT_CATALOG_CACHE": (root / "completo" / "catalogo.json").as_posix(),
        "BEMSOFT_BASE_URL": sim.url,
        "BEMSOFT_ENDPOINT": "requests",  # without the slash, as people type it
        "BEMSOFT_TOKEN": sim.token,
        "BEMSOFT_DRY_RUN": "0",
        "DEFAULT_BIRTHDATE": "1970-01-01",
    }
    values.update(extra)
    (root / ".env").write_text("".join(f"{k}={v}\n" for k, v in values.items()),
                               encoding="utf-8")
    return root


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "BEMSOFT_ENV_FILE"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_cli_args_mean_run_unless_a_command_is_given() -> None:
    main = load_main_module()
    assert main.cli_args([]) == ["run"]
    assert main.cli_args(["--once"]) == ["run", "--once"]
    assert main.cli_args(["--verbose", "--once"]) == ["run", "--verbose", "--once"]
    assert main.cli_args(["status"]) == ["status"]
    assert main.cli_args(["--version"]) == ["--version"]
    assert main.cli_args(["--help"]) == ["--help"]


def test_main_py_once_reads_env_beside_it_from_any_working_folder(
        tmp_path: Path, sim: Simulator) -> None:
    root = project(tmp_path, sim)
    elsewhere = tmp_path / "outra-pasta"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, str(root / "main.py"), "--once"], cwd=elsewhere,
                          env=clean_env(), capture_output=True, text=True, timeout=90,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert sorted(t["batch_external_id"] for t in sim.saved_tests()) == ["sol-1", "sol-2"]
    assert "ciclo concluído" in proc.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM não existe no Windows")
def test_main_py_without_arguments_runs_until_sigterm(tmp_path: Path, sim: Simulator) -> None:
    root = project(tmp_path, sim)
    proc = subprocess.Popen([sys.executable, "main.py"], cwd=root, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(sim.saved_tests()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(sim.saved_tests()) == 2
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "monitor parado" in err


def test_main_py_dry_run_shows_the_payload_and_sends_nothing(
        tmp_path: Path, sim: Simulator) -> None:
    root = project(tmp_path, sim, BEMSOFT_DRY_RUN="1", BEMSOFT_TOKEN="")
    proc = subprocess.run([sys.executable, "main.py", "--once"], cwd=root, env=clean_env(),
                          capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("[DRY_RUN]") == 2
    assert '"externalId": "sol-1"' in proc.stderr
    assert '"supportSpecimenId": "SPECIMEN-TEST"' in proc.stderr  # no catalogue, no HTTP
    assert sim.calls() == []


def test_main_py_without_configuration_lists_the_problems_and_exits_2(tmp_path: Path) -> None:
    root = tmp_path / "vazio"
    root.mkdir()
    shutil.copy2(REPO / "main.py", root / "main.py")
    proc = subprocess.run([sys.executable, "main.py"], cwd=root, env=clean_env(),
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    for name in ("DB_SERVER", "DB_NAME", "TERCEIROS", "BEMSOFT_TOKEN"):
        assert name in proc.stderr, name
    assert "Traceback" not in proc.stderr
