"""The CLI as a real subprocess: run --once, the loop and its signals, configuration errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bemsoft_monitor.cli import RET_DB_UNAVAILABLE
from bemsoft_monitor.simulator import Simulator

from .conftest import LAB, Lis

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "bemsoft_monitor", *args]


def write_env(folder: Path, sim: Simulator | None, **extra: str) -> Path:
    values = {
        "DB_URL": f"sqlite:///{(folder / 'lis.db').as_posix()}",
        "TERCEIROS": LAB,
        "POLL_SECONDS": "0.1",
        "DEBOUNCE_SECONDS": "0",
        "INITIAL_ITEM_ID": "0",
        "BEMSOFT_BASE_URL": sim.url if sim else "http://127.0.0.1:9",
        "BEMSOFT_TOKEN": sim.token if sim else "x" * 12,
        "BEMSOFT_DRY_RUN": "0",
        "DEFAULT_BIRTHDATE": "1970-01-01",
        "BEMSOFT_BACKOFF": "0.1",
    }
    values.update(extra)
    text = "\n".join(f"{k}={v}" for k, v in values.items()) + "\n"
    path = folder / ".env"
    path.write_text(text, encoding="utf-8")
    return path


def env_for(folder: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "BEMSOFT_ENV_FILE"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def seed(folder: Path, n: int = 3) -> Lis:
    lis = Lis(f"sqlite:///{(folder / 'lis.db').as_posix()}")
    lis.patient()
    for req in range(1, n + 1):
        lis.requisition(req)
        lis.item(req, "FE")
    return lis


def test_run_once_reads_settles_sends_and_exits_zero(tmp_path: Path, sim: Simulator) -> None:
    seed(tmp_path).dispose()
    write_env(tmp_path, sim)
    proc = subprocess.run(cli("run", "--once"), cwd=tmp_path, env=env_for(tmp_path),
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert len(sim.saved_tests()) == 3
    assert "ciclo concluído" in proc.stderr


def test_env_variables_override_the_env_file(tmp_path: Path, sim: Simulator) -> None:
    seed(tmp_path, 1).dispose()
    write_env(tmp_path, sim, TERCEIROS="OUTRO LAB")
    env = env_for(tmp_path)
    env["TERCEIROS"] = LAB
    proc = subprocess.run(cli("run", "--once"), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert len(sim.saved_tests()) == 1


def test_run_loop_stops_on_sigterm_with_exit_zero(tmp_path: Path, sim: Simulator) -> None:
    seed(tmp_path).dispose()
    write_env(tmp_path, sim)
    proc = subprocess.Popen(cli("run"), cwd=tmp_path, env=env_for(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(sim.saved_tests()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(sim.saved_tests()) == 3
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "parando com segurança" in err
    assert "monitor parado" in err


def test_sigint_also_stops_gracefully(tmp_path: Path, sim: Simulator) -> None:
    seed(tmp_path, 1).dispose()
    write_env(tmp_path, sim)
    proc = subprocess.Popen(cli("run"), cwd=tmp_path, env=env_for(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not sim.saved_tests() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "SIGINT" in err


def test_invalid_configuration_lists_every_problem_and_exits_2(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "POLL_SECONDS=abc\nDEFAULT_GENDER=X\nDEFAULT_BIRTHDATE=15/05/1990\n"
        "BEMSOFT_DRY_RUN=0\nDB_PASS=SenhaSecreta!\nDB_SERVER=srv\\SQLEXPRESS\n",
        encoding="utf-8")
    proc = subprocess.run(cli("run", "--once"), cwd=tmp_path, env=env_for(tmp_path),
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    err = proc.stderr
    for name in ("POLL_SECONDS", "DEFAULT_GENDER", "DEFAULT_BIRTHDATE", "TERCEIROS",
                 "BEMSOFT_TOKEN", "DB_NAME"):
        assert name in err, name
    assert "SenhaSecreta" not in err
    assert "abc" in err


#: English that must never reach a person (library tracebacks and messages).
ENGLISH_TRACES = ("Traceback", "OperationalError", "Connection refused", "HTTPConnectionPool",
                  "Max retries", "Errno", "Caused by")


@pytest.mark.parametrize("entry", ["bemsoft-monitor", "main.py"])
def test_run_once_with_the_database_down_is_one_portuguese_line(
        tmp_path: Path, entry: str) -> None:
    pytest.importorskip("psycopg")
    write_env(tmp_path, None, DB_URL="postgresql+psycopg://postgres:senha-do-lis@127.0.0.1:1/test",
              DB_LOGIN_TIMEOUT="2")
    args = cli("run", "--once") if entry == "bemsoft-monitor" else \
        [sys.executable, str(REPO / "main.py"), "--once"]
    proc = subprocess.run(args, cwd=tmp_path, env=env_for(tmp_path), capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == RET_DB_UNAVAILABLE == 1, proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("✗ banco de dados inacessível: conexão recusada"), lines[0]
    assert "rode 'bemsoft-monitor check'" in lines[0]
    assert "Traceback" not in proc.stderr and "senha-do-lis" not in proc.stderr
    assert "iniciado" not in proc.stderr  # the start scripts would take it for a good start


def test_run_with_bemsoft_down_warns_in_portuguese_naming_host_and_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    seed(tmp_path, 1).dispose()
    write_env(tmp_path, None, BEMSOFT_BASE_URL=f"http://127.0.0.1:{port}")
    proc = subprocess.run(cli("run", "--once"), cwd=tmp_path, env=env_for(tmp_path),
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    failures = [line for line in proc.stderr.splitlines()
                if f"conexão recusada por 127.0.0.1:{port}" in line]
    assert len(failures) == 1, proc.stderr  # said once, by the catalogue refresh
    assert "catálogo não atualizado" in failures[0]
    for english in ENGLISH_TRACES:
        assert english not in proc.stderr, english


def test_invalid_map_file_stops_the_start_with_path_line_and_column(
        tmp_path: Path, sim: Simulator) -> None:
    seed(tmp_path, 1).dispose()
    bad = tmp_path / "tests_map.json"
    bad.write_text('{\n  "FE": "FE",\n  "TSH" "TSH"\n}\n', encoding="utf-8")
    write_env(tmp_path, sim, BEMSOFT_TEST_MAP_PATH=str(bad))
    proc = subprocess.run(cli("run", "--once"), cwd=tmp_path, env=env_for(tmp_path),
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "tests_map.json" in proc.stderr
    assert "linha 3" in proc.stderr and "coluna" in proc.stderr
    assert sim.calls() == []


def test_simulator_command_serves_the_sample_catalogue(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(cli("simulator", "--port", str(port)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        import requests

        deadline = time.monotonic() + 20
        body = None
        while time.monotonic() < deadline:
            try:
                r = requests.get(f"http://127.0.0.1:{port}/tests", timeout=2,
                                 headers={"Authorization": "Bearer sim-token"})
                body = r.json()
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        assert body is not None
        ids = [t["id"] for t in body["tests"]]
        assert ids.count("GLI") == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_version_flag() -> None:
    proc = subprocess.run(cli("--version"), capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0
    assert proc.stdout.strip() == "bemsoft-monitor 0.1.0"


def test_unknown_flag_is_one_clear_line_and_exit_2() -> None:
    proc = subprocess.run(cli("run", "--nao-existe"), capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 2
    assert "--nao-existe" in proc.stderr


@pytest.mark.parametrize("encoding,newline", [("utf-8-sig", "\r\n"), ("utf-8", "\r\n")])
def test_env_file_with_bom_and_windows_line_endings_works(
        tmp_path: Path, sim: Simulator, encoding: str, newline: str) -> None:
    seed(tmp_path, 1).dispose()
    path = write_env(tmp_path, sim)
    text = path.read_text(encoding="utf-8").replace("\n", newline)
    path.write_bytes(text.encode(encoding))
    proc = subprocess.run(cli("run", "--once"), cwd=tmp_path, env=env_for(tmp_path),
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert len(sim.saved_tests()) == 1


def test_demo_command_runs_end_to_end(tmp_path: Path) -> None:
    proc = subprocess.run(cli("demo", "--dir", str(tmp_path / "demo")), capture_output=True,
                          text=True, timeout=120, env=env_for(tmp_path), check=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Resultado da demonstração" in out
    assert "Itens entregues" in out
    report = (tmp_path / "demo" / "itens_recusados.csv").read_text(encoding="utf-8-sig")
    assert "GLI" in report.upper()
    data = json.loads((tmp_path / "demo" / "catalogo_bemsoft.json").read_text(encoding="utf-8"))
    assert data
