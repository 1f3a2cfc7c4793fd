"""scripts/start_*.sh and stop_*.sh: PID files, safe to run twice, graceful stop; systemd unit."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from bemsoft_monitor.demo import demo_settings, seed_lis, write_demo_files
from bemsoft_monitor.simulator import Simulator

from .test_ops import write_env

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="scripts .sh (Linux/macOS)")


@pytest.fixture
def project(tmp_path: Path, sim: Simulator) -> Iterator[Path]:
    """A project folder as installed: the scripts, main.py, retry_failed.py, .venv and .env."""
    root = tmp_path / "bemsoft-monitor"
    (root / "scripts").mkdir(parents=True)
    for name in ("start_monitor.sh", "stop_monitor.sh", "start_retry.sh", "stop_retry.sh"):
        shutil.copy2(REPO / "scripts" / name, root / "scripts" / name)
    for name in ("main.py", "retry_failed.py"):
        shutil.copy2(REPO / name, root / name)
    (root / ".venv").symlink_to(Path(sys.prefix))  # the test's own venv plays the project's
    data = root / "dados"
    data.mkdir()
    write_demo_files(data)
    settings = demo_settings(data, base_url=sim.url, token=sim.token)
    engine = sa.create_engine(settings.db_url or "")
    seed_lis(engine, dt.date(2026, 7, 1))
    engine.dispose()
    write_env(root, settings)
    yield root
    for pid_file in (root / "run").glob("*.pid"):  # never leave a process behind
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text().strip()), 9)


def sh(root: Path, script: str, *args: str, cwd: Path | None = None,
       timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "BEMSOFT_ENV_FILE"}
    env["BEMSOFT_STOP_TIMEOUT_S"] = "20"
    return subprocess.run(["bash", str(root / "scripts" / script), *args], cwd=cwd or root,
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


def wait_for(predicate, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_first_start_on_a_fresh_copy_is_silent_and_logs_are_owner_only(project: Path) -> None:
    assert not (project / "logs").exists()  # a fresh copy: no log yet
    for start, stop, log in (("start_monitor.sh", "stop_monitor.sh", "monitor.log"),
                             ("start_retry.sh", "stop_retry.sh", "retry.log")):
        proc = sh(project, start)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stderr == "", proc.stderr  # no "No such file or directory" from the shell
        assert mode(project / "logs" / log) == 0o600
        assert sh(project, stop).returncode == 0
    assert mode(project / "logs") == 0o700 and mode(project / "run") == 0o700


def test_stop_when_nothing_is_running(project: Path) -> None:
    for script in ("stop_monitor.sh", "stop_retry.sh"):
        proc = sh(project, script)
        assert proc.returncode == 0, proc.stderr
        assert "não está em execução" in proc.stdout


def test_start_twice_then_stop_twice(project: Path, sim: Simulator) -> None:
    first = sh(project, "start_monitor.sh", cwd=project.parent)  # from any folder
    assert first.returncode == 0, first.stdout + first.stderr
    pid_file = project / "run" / "monitor.pid"
    pid = int(pid_file.read_text())
    assert alive(pid) and f"PID {pid}" in first.stdout
    assert wait_for(lambda: len(sim.saved_tests()) > 0)  # it really runs and sends

    second = sh(project, "start_monitor.sh")
    assert second.returncode == 0
    assert f"já está em execução (PID {pid})" in second.stdout
    assert int(pid_file.read_text()) == pid

    stop = sh(project, "stop_monitor.sh")
    assert stop.returncode == 0, stop.stderr
    assert "parado" in stop.stdout and "SIGKILL" not in stop.stderr
    assert wait_for(lambda: not alive(pid))
    assert not pid_file.exists()
    log = (project / "logs" / "monitor.log").read_text(encoding="utf-8")
    assert "monitor parado" in log  # SIGTERM was a graceful stop
    again = sh(project, "stop_monitor.sh")
    assert again.returncode == 0 and "não está em execução" in again.stdout


def test_stale_pid_file_is_replaced(project: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    (project / "run").mkdir()
    (project / "run" / "monitor.pid").write_text(str(dead.pid))
    proc = sh(project, "start_monitor.sh")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PID antigo" in proc.stdout
    pid = int((project / "run" / "monitor.pid").read_text())
    assert pid != dead.pid and alive(pid)
    assert sh(project, "stop_monitor.sh").returncode == 0


def test_start_with_a_bad_env_reports_the_error(project: Path) -> None:
    (project / ".env").write_text("POLL_SECONDS=muito\n", encoding="utf-8")
    proc = sh(project, "start_monitor.sh")
    assert proc.returncode == 1
    assert "ERRO" in proc.stderr and "POLL_SECONDS" in proc.stderr
    assert not (project / "run" / "monitor.pid").exists()


def test_retry_scripts_send_and_stop_between_files(project: Path, sim: Simulator) -> None:
    failed = project / "falhas_antigas"
    failed.mkdir()
    payload = {"batch": {"externalId": "X"}}  # rejected by the simulator: slow enough to stop
    for i in range(40):
        body = json.dumps({"reason": "teste", "event": {"payload": dict(payload, n=i)}})
        (failed / f"2024010{i // 10}T1200{i:02d}Z_{i}.json").write_text(body, encoding="utf-8")
    sim.set_faults([{"kind": "delay", "seconds": 0.3}] * 40)
    start = sh(project, "start_retry.sh", "falhas_antigas", cwd=project)
    assert start.returncode == 0, start.stdout + start.stderr
    pid = int((project / "run" / "retry.pid").read_text())
    assert wait_for(lambda: len(sim.calls()) >= 2)
    assert "já está em execução" in sh(project, "start_retry.sh").stdout
    stop = sh(project, "stop_retry.sh")
    assert stop.returncode == 0 and "parado" in stop.stdout
    assert wait_for(lambda: not alive(pid))
    assert len(sim.calls()) < 40  # stopped between files, not after all of them
    log = (project / "logs" / "retry.log").read_text(encoding="utf-8")
    assert "Interrompido" in log


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze não disponível nesta máquina")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = tmp_path / "bemsoft-monitor.service"
    text = (REPO / "deploy" / "bemsoft-monitor.service").read_text(encoding="utf-8")
    # verify checks that ExecStart exists: point it at an executable that does here.
    unit.write_text(text.replace("/opt/bemsoft-monitor/.venv/bin/bemsoft-monitor",
                                 sys.executable), encoding="utf-8")
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60, check=False)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines()
                if "bemsoft-monitor.service" in line]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr
    for option in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                   "UMask=0077", "RestartPreventExitStatus=2"):
        assert option in text
