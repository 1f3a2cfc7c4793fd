"""Logs as the operator sees them: JSON lines, rotating owner-only file, LGPD masking, no token."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from bemsoft_monitor.demo import demo_settings, seed_lis, write_demo_files
from bemsoft_monitor.logsetup import SafetyFilter, mask_text
from bemsoft_monitor.models import LisItem
from bemsoft_monitor.simulator import Simulator

from .test_ops import dead_letter_demo, run_cli, write_env

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")

PATIENT_NAME = "CONCEI"  # part of "MARIA JOSÉ DA CONCEIÇÃO", the demo's first patient
PATIENT_CPF = "123.456.789-09"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def run_once(folder: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli(folder, "run", "--once", *extra)


def fresh_demo(folder: Path, sim: Simulator, **env: str) -> Path:
    """The demo's LIS, never processed, and a .env (with ``env`` added) for the subprocess."""
    folder.mkdir(parents=True, exist_ok=True)
    write_demo_files(folder)
    settings = demo_settings(folder, base_url=sim.url, token=sim.token)
    engine = sa.create_engine(settings.db_url or "")
    seed_lis(engine, dt.datetime.now(dt.timezone(dt.timedelta(hours=-3))).date())
    engine.dispose()
    write_env(folder, settings, **env)
    return folder


def test_json_lines_in_a_rotating_file_created_owner_only(tmp_path: Path, sim: Simulator) -> None:
    log_file = tmp_path / "logs_que_nao_existem" / "sub" / "monitor.log"
    work = fresh_demo(tmp_path, sim, LOG_FORMAT="json", LOG_FILE=str(log_file))
    proc = run_once(work)
    assert proc.returncode == 0, proc.stderr
    assert log_file.is_file() and mode(log_file) == 0o600  # the missing folder was created
    records = [json.loads(line) for line in log_file.read_text(encoding="utf-8").splitlines()]
    assert records and all(set(r) == {"ts", "level", "logger", "msg"} for r in records)
    assert any("entregue" in r["msg"] for r in records)
    assert [json.loads(line) for line in proc.stderr.splitlines()] == records  # console too
    text = log_file.read_text(encoding="utf-8")
    assert sim.token not in text and PATIENT_CPF not in text and PATIENT_NAME not in text


def test_payloads_only_with_verbose_masked_unless_log_pii(tmp_path: Path,
                                                          sim: Simulator) -> None:
    quiet = run_once(fresh_demo(tmp_path / "a", sim))
    assert quiet.returncode == 0, quiet.stderr
    assert '"supportTestId"' not in quiet.stderr

    verbose = run_once(fresh_demo(tmp_path / "b", sim), "--verbose")
    assert verbose.returncode == 0, verbose.stderr
    assert '"supportTestId"' in verbose.stderr  # the payload is shown
    assert PATIENT_NAME not in verbose.stderr and PATIENT_CPF not in verbose.stderr
    assert '"birthDate": "***"' in verbose.stderr
    assert sim.token not in verbose.stderr

    pii = run_once(fresh_demo(tmp_path / "c", sim, LOG_PII="1"), "--verbose")
    assert pii.returncode == 0, pii.stderr
    assert PATIENT_NAME in pii.stderr and '"birthDate": "1990-05-15"' in pii.stderr
    assert sim.token not in pii.stderr  # LOG_PII never shows the token


def test_log_file_rotates_by_size_and_count(tmp_path: Path, sim: Simulator) -> None:
    log_file = tmp_path / "logs" / "monitor.log"
    work = fresh_demo(tmp_path, sim, LOG_FILE=str(log_file), LOG_MAX_BYTES="1024",
                      LOG_BACKUP_COUNT="2")
    assert run_once(work, "--verbose").returncode == 0
    names = sorted(p.name for p in log_file.parent.iterdir())
    assert names == ["monitor.log", "monitor.log.1", "monitor.log.2"]
    for path in log_file.parent.iterdir():
        assert path.stat().st_size <= 1024 + 4096  # one record may exceed the limit
        assert mode(path) == 0o600


def test_log_folder_that_cannot_be_created_is_one_line_and_exit_2(tmp_path: Path,
                                                                   sim: Simulator) -> None:
    blocker = tmp_path / "arquivo"
    blocker.write_text("x", encoding="utf-8")
    work = fresh_demo(tmp_path, sim, LOG_FILE=str(blocker / "logs" / "monitor.log"))
    proc = run_once(work)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("✗ LOG_FILE:"), proc.stderr
    assert "uma parte do caminho é um arquivo, não uma pasta" in lines[0]
    assert "Not a directory" not in lines[0] and "Errno" not in lines[0]
    assert sim.saved_tests() == []  # nothing ran


def test_failed_dir_not_writable_is_one_line_and_exit_2(tmp_path: Path, sim: Simulator) -> None:
    blocker = tmp_path / "arquivo"
    blocker.write_text("x", encoding="utf-8")
    work = fresh_demo(tmp_path, sim, FAILED_DIR=str(blocker / "falhas"))
    proc = run_once(work)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("✗ FAILED_DIR:"), proc.stderr
    # Python's English ("Not a directory", "File exists") never reaches the person.
    assert "uma parte do caminho é um arquivo, não uma pasta" in lines[0]
    assert "confira o caminho ou aponte FAILED_DIR para outra pasta" in lines[0]
    for english in ("Not a directory", "File exists", "Errno"):
        assert english not in lines[0], lines[0]


def test_failed_dir_and_its_files_are_owner_only(tmp_path: Path, sim: Simulator) -> None:
    settings, files = dead_letter_demo(tmp_path, sim)
    assert mode(Path(settings.failed_dir)) == 0o700
    assert files and all(mode(f) == 0o600 for f in files)
    moved = tmp_path / "enviados"
    assert run_cli(tmp_path, "retry", "--send", "--move-ok", str(moved)).returncode == 0
    assert mode(moved) == 0o700


def test_token_never_appears_in_an_uncaught_exception(tmp_path: Path) -> None:
    token = "tok-SEGREDO-42"  # noqa: S105 - a test value
    code = (
        "from bemsoft_monitor.logsetup import setup_logging\n"
        f"setup_logging(secrets=({token!r},), log_file=__import__('pathlib').Path('x.log'))\n"
        f"raise RuntimeError('Authorization: Bearer {token} paciente cpf {PATIENT_CPF}')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=False,
                          capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 1
    both = proc.stderr + (tmp_path / "x.log").read_text(encoding="utf-8")
    assert "RuntimeError" in both and "erro inesperado" in both
    assert token not in both and PATIENT_CPF not in both


def test_token_not_in_a_refused_token_retry(tmp_path: Path, sim: Simulator) -> None:
    """401 from Bemsoft during retry --send --verbose: the problem is named, the token is not."""
    settings, _files = dead_letter_demo(tmp_path, sim)
    write_env(tmp_path, settings, BEMSOFT_TOKEN="token-antigo-expirado")  # noqa: S106
    proc = run_cli(tmp_path, "retry", "--send", "--verbose")
    assert proc.returncode == 1
    assert "token recusado pela Bemsoft" in proc.stderr
    assert "Authorization" not in proc.stdout  # headers are not part of --verbose
    assert "token-antigo-expirado" not in proc.stdout + proc.stderr


def test_console_lines_are_portuguese_text(tmp_path: Path, sim: Simulator) -> None:
    proc = run_once(fresh_demo(tmp_path, sim))
    assert proc.returncode == 0
    lines = proc.stderr.splitlines()
    assert any(" INFO " in line and "entregue" in line for line in lines)
    assert any(" AVISO " in line and "recusado" in line for line in lines)


def test_every_patient_field_is_masked_in_any_logged_form() -> None:
    """Name, CPF, birth date, phone and e-mail: as JSON, as a dict, as a dataclass, as text."""
    birth = dt.datetime(1990, 5, 15)
    item = LisItem(item_id=1, requisition_id=2, support_lab="LAB", conv_code="GLI",
                   patient_name="MARIA JOSÉ DA CONCEIÇÃO", patient_cpf="12345678909",
                   patient_birth=birth)
    texts = [
        json.dumps({"name": "MARIA JOSÉ DA CONCEIÇÃO", "birthDate": "1990-05-15"},
                   ensure_ascii=False),
        repr({"nome": "MARIA JOSÉ DA CONCEIÇÃO", "datanasc": birth, "cpf": PATIENT_CPF}),
        repr(item),
        f"ligar para (11) 98765-4321 ou 11987654321, e-mail maria.jose@example.com.br, "
        f"CPF {PATIENT_CPF}",
    ]
    for text in texts:
        masked = mask_text(text)
        for secret in (PATIENT_NAME, "1990", "98765", "maria.jose", "456.789", "45678909"):
            assert secret not in masked, (secret, masked)
    assert "M**** J*** D* C*******" in mask_text(texts[0])  # initials stay readable
    assert "GLICOSE" in mask_text("CatalogEntry(test_id='GLI', name='GLICOSE')")

    # The same through a real logger, inside an exception, and shown again with LOG_PII=1.
    for show_pii in (False, True):
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "falhou: %s", (item,), None)
        try:
            raise ValueError(f"item inválido {item!r} fone (11) 98765-4321")
        except ValueError:
            record.exc_info = sys.exc_info()
        SafetyFilter(secrets=("tok-123456",), show_pii=show_pii).filter(record)
        assert ("CONCEI" in record.msg and "98765" in record.msg) is show_pii, record.msg
