"""The PyInstaller executable, built once per test run from bemsoft_monitor.spec.

The same spec build.bat uses on Windows; on Linux the result is ``dist/BemsoftMonitor``.
The smoke tests prove the executable carries what is only loaded by name at run time:
pyodbc, the SQLAlchemy dialects (mssql, sqlite, postgresql), the simulator's catalogue file,
and that it reads the ``.env`` beside itself.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from bemsoft_monitor import __version__
from bemsoft_monitor.demo import DEMO_TERCEIROS, seed_lis

from .conftest import IN_CI

REPO = Path(__file__).resolve().parents[1]
EXE_NAME = "BemsoftMonitor.exe" if sys.platform == "win32" else "BemsoftMonitor"
BUILD_TIMEOUT_S = 1200


@pytest.fixture(scope="module")
def exe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Build the spec once for this run (a few minutes) into a temporary folder."""
    try:
        import PyInstaller  # noqa: F401 - only to know whether the build can run
    except ImportError:
        reason = "PyInstaller não instalado (extra 'build')"
        if IN_CI:  # the executable's smoke test is part of the test command
            pytest.fail(reason + " (obrigatório em CI)")
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("pyinstaller")
    proc = subprocess.run(
        [sys.executable, "-m", "PyInstaller", "--noconfirm", "--distpath", str(work / "dist"),
         "--workpath", str(work / "build"), str(REPO / "bemsoft_monitor.spec")],
        cwd=REPO, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    path = work / "dist" / EXE_NAME
    assert path.is_file()
    yield path
    shutil.rmtree(work, ignore_errors=True)


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "BEMSOFT_ENV_FILE"}
    env["COLUMNS"] = "200"
    return env


def install(exe: Path, folder: Path, env_text: str) -> Path:
    """The executable and its .env side by side, as on the lab's server."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / exe.name
    shutil.copy2(exe, target)
    (folder / ".env").write_text(env_text, encoding="utf-8")
    return target


def test_version(exe: Path, tmp_path: Path) -> None:
    proc = subprocess.run([str(exe), "--version"], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"bemsoft-monitor {__version__}"
    page = subprocess.run([str(exe), "retry", "--help"], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=60, check=False)
    assert page.returncode == 0, page.stderr
    assert page.stdout.startswith("Uso: bemsoft-monitor retry") and "Opções:" in page.stdout


def test_check_offline_finds_env_beside_itself_and_every_bundled_driver(
        exe: Path, tmp_path: Path) -> None:
    server = tmp_path / "servidor"
    server.mkdir()
    engine = sa.create_engine(f"sqlite:///{(server / 'lis.db').as_posix()}")
    seed_lis(engine, dt.date(2026, 7, 1))
    engine.dispose()
    binary = install(exe, server, (
        f"DB_URL=sqlite:///{(server / 'lis.db').as_posix()}\n"
        f"TERCEIROS={DEMO_TERCEIROS}\nBEMSOFT_DRY_RUN=1\n"
        f"FAILED_DIR={(server / 'falhas').as_posix()}\n"))
    elsewhere = tmp_path / "outra_pasta"  # the service's working folder may be anywhere
    elsewhere.mkdir()
    proc = subprocess.run([str(binary), "check", "--offline"], cwd=elsewhere, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("✓ configuração válida") and str(server / ".env") in line
               for line in lines)
    components = next(line for line in lines if "componentes" in line)
    assert components.startswith("✓"), components
    for dialect in ("mssql.pyodbc", "sqlite.pysqlite", "postgresql.psycopg"):
        assert dialect in components
    assert "catálogo de exemplo com" in components
    assert any(line.startswith("✓ tabelas do LIS") for line in lines)
    assert not any(line.startswith(("✗", "!")) for line in lines), proc.stdout


def test_pyodbc_native_driver_loads_in_the_executable(exe: Path, tmp_path: Path) -> None:
    pyodbc = pytest.importorskip("pyodbc")
    installed = pyodbc.drivers()
    if not installed:
        pytest.skip("nenhum driver ODBC instalado nesta máquina (instale tdsodbc)")
    binary = install(exe, tmp_path / "srv", (
        f"DB_SERVER=127.0.0.1,9\nDB_NAME=LIS\nDB_USER=u\nDB_PASS=x\n"
        f"ODBC_DRIVER={installed[0]}\nDB_LOGIN_TIMEOUT=2\nTERCEIROS=LAB\nBEMSOFT_DRY_RUN=1\n"
        f"FAILED_DIR={(tmp_path / 'f').as_posix()}\n"))
    proc = subprocess.run([str(binary), "check", "--offline"], cwd=binary.parent,
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    lines = proc.stdout.splitlines()
    driver = next(line for line in lines if "driver do SQL Server" in line)
    assert driver.startswith("✓") and installed[0] in driver
    # Nothing listens on port 9: the failure comes from the ODBC driver, not a missing module.
    db = next(line for line in lines if line.startswith("✗ banco do LIS"))
    assert "sem conexão" in db and "No module named" not in proc.stdout
    assert proc.returncode == 3


def test_demo_runs_inside_the_executable(exe: Path, tmp_path: Path) -> None:
    """The whole pipeline with the bundled simulator catalogue, SQLite and HTTP on loopback."""
    proc = subprocess.run([str(exe), "demo", "--dir", str(tmp_path / "demo")], cwd=tmp_path,
                          env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Itens entregues:" in proc.stdout
    assert (tmp_path / "demo" / "catalogo_bemsoft.json").is_file()
