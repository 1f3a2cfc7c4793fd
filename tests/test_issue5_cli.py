"""Operator commands as a lab's IT person meets them: help and mistakes in Portuguese, retry
never re-sending an order in CONFERIR on its own, check and status when something is down."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bemsoft_monitor import ops
from bemsoft_monitor.cli import cli_command, help_text_pt
from bemsoft_monitor.cli_ops import run_app
from bemsoft_monitor.simulator import Simulator

from .test_ops import _TlsFront, dead_letter_demo, demo, posts, run_cli, store_of, write_env

#: English words Click and Typer put in help pages and error lines.
ENGLISH = ("Usage", "Options", "Commands", "Arguments", "Show this message", "default:",
           "required", "[OPTIONS]", "COMMAND", "<int", "<str", "<path", "<list", "<float",
           "x>=", "Missing", "Got unexpected", "No such", "Input should", "requires an",
           "does not take", "Did you mean", "Error")


def command_paths(command: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    for name, sub in getattr(command, "commands", {}).items():
        out += command_paths(sub, (*prefix, name))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- help and command-line mistakes ------------------------------------------------------------


def test_every_help_page_is_portuguese(capsys: pytest.CaptureFixture[str]) -> None:
    root = cli_command()
    paths = command_paths(root)
    assert ("retry",) in paths and ("catalog", "sync") in paths
    for path in paths:
        assert root.main(args=[*path, "--help"], prog_name="bemsoft-monitor",
                         standalone_mode=False) == 0
        page = capsys.readouterr().out
        assert page.startswith("Uso: bemsoft-monitor"), (path, page)
        assert "Mostra esta ajuda e sai." in page, path
        for word in ENGLISH:
            assert word not in page, (path, word, page)
    retry_page = subprocess.run([sys.executable, "-m", "bemsoft_monitor", "retry", "-h"],
                                check=False, capture_output=True, text=True, timeout=60,
                                env={**os.environ, "COLUMNS": "200"}).stdout
    retry_page = " ".join(retry_page.split())  # Click wraps at 80 columns
    for line in ("--dir PASTA", "--file ARQUIVO", "--move-ok PASTA", "--limit N", "--send",
                 "--verbose", "[mínimo 1]", "Opções:"):
        assert line in retry_page, line


def test_click_fixed_words_in_option_help_are_translated() -> None:
    assert help_text_pt("Porta.  [default: 8080]") == "Porta.  [padrão: 8080]"
    assert help_text_pt("Linhas.  [default: 50; x>=1]") == "Linhas.  [padrão: 50; mínimo 1]"
    assert help_text_pt("Dias.  [0<=x<=90]") == "Dias.  [de 0 a 90]"
    assert help_text_pt("Texto.  [required]") == "Texto.  [obrigatório]"
    assert help_text_pt("Show this message and exit.") == "Mostra esta ajuda e sai."
    assert help_text_pt("Sem extras (padrão: FAILED_DIR).") == "Sem extras (padrão: FAILED_DIR)."


@pytest.mark.parametrize(("args", "expected"), [
    (("retry", "--limit", "abc"),
     "valor inválido para --limit: 'abc' não é um número inteiro; veja 'bemsoft-monitor retry"),
    (("retry", "--limit", "0"), "--limit: precisa ser no mínimo 1 (recebido: 0)"),
    (("retry", "--limit"), "a opção --limit precisa de um valor; veja 'bemsoft-monitor retry"),
    (("retry", "--send=1"), "a opção --send não recebe valor"),
    (("retry", "--file"), "a opção --file precisa de um valor"),
    (("retry", "--nao-existe"), "opção desconhecida: --nao-existe"),
    (("status", "--json", "demais"), "argumento a mais: demais"),
    (("retri",), "comando desconhecido: retri (quis dizer retry?)"),
    (("catalog", "search"), "falta o argumento TEXTO;"),
    (("catalog", "show"), "falta o argumento CODIGO;"),
    (("simulator", "--latency", "rapido"), "'rapido' não é um número"),
])
def test_a_command_line_mistake_is_one_portuguese_line_and_exit_2(
        tmp_path: Path, args: tuple[str, ...], expected: str) -> None:
    proc = run_cli(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("✗ ") and expected in lines[0], lines[0]
    for word in ENGLISH:
        assert word not in lines[0], word


def test_a_group_without_its_sub_command_shows_its_help(tmp_path: Path) -> None:
    proc = run_cli(tmp_path, "catalog")
    assert proc.returncode == 2
    assert proc.stderr.startswith("Uso: bemsoft-monitor catalog [OPÇÕES] COMANDO")
    assert "Comandos:" in proc.stderr and "sync" in proc.stderr
    assert "✗ uso incorreto" not in proc.stderr


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl+C in a command without its own stop handling (status, check) ends cleanly."""
    env = tmp_path / ".env"
    env.write_text(f"DB_URL=sqlite:///{(tmp_path / 'lis.db').as_posix()}\nTERCEIROS=LAB\n"
                   f"BEMSOFT_DRY_RUN=1\nFAILED_DIR={tmp_path / 'f'}\n", encoding="utf-8")
    monkeypatch.setenv("BEMSOFT_ENV_FILE", str(env))

    def interrupted(*_args: Any, **_kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(ops, "collect_status", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        run_app(["status"])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip() == "✗ interrompido (Ctrl+C)"


# --- retry: CONFERIR waits for a person -----------------------------------------------------


def order_of(settings: Any, path: Path) -> Any:
    event = json.loads(path.read_text(encoding="utf-8"))["event"]
    store = store_of(settings)
    try:
        return store.get_order(int(event["orderId"]))
    finally:
        store.dispose()


def test_retry_leaves_an_order_in_conferir_to_a_person_until_conferir_is_given(
        tmp_path: Path, sim: Simulator) -> None:
    settings, files = dead_letter_demo(tmp_path, sim)
    target = files[0]
    # Bemsoft answers 409 to the re-send: maybe saved, maybe not -> CONFERIR.
    sim.set_faults([{"kind": "status", "status": 409}])
    first = run_cli(tmp_path, "retry", "--file", str(target), "--send")
    assert first.returncode == 1, first.stdout
    assert "conferir" in first.stdout and "--conferir" in first.stdout
    order = order_of(settings, target)
    assert order.state == "conferir"
    key_in_conferir = order.key

    before = posts(sim)
    again = run_cli(tmp_path, "retry", "--send")  # the whole folder, as start_retry does
    assert again.returncode == 1
    assert "em CONFERIR, não reenviado" in again.stdout
    assert posts(sim) == before + 1  # only the other, plain dead order went out
    assert order_of(settings, target).state == "conferir"

    dry = run_cli(tmp_path, "retry", "--file", str(target), "--conferir")
    assert dry.returncode == 0 and "nova Idempotency-Key" in dry.stdout
    assert posts(sim) == before + 1

    confirmed = run_cli(tmp_path, "retry", "--file", str(target), "--send", "--conferir")
    assert confirmed.returncode == 0, confirmed.stdout
    last = sim.calls()[-1]
    assert last["status"] == 201 and last["key"] != key_in_conferir
    assert order_of(settings, target).state == "delivered"


def test_retry_of_an_external_file_in_conferir_is_not_sent_again(
        tmp_path: Path, sim: Simulator) -> None:
    _settings, files = dead_letter_demo(tmp_path, sim)
    payload = json.loads(files[0].read_text(encoding="utf-8"))["event"]["payload"]
    payload["batch"]["externalId"] = "EXT-9"
    folder = tmp_path / "externo"
    folder.mkdir()
    path = folder / "antigo.json"
    path.write_text(json.dumps({"reason": "x", "event": {"payload": payload}}), encoding="utf-8")
    # Saved, but answered 500: the re-send with the same key gets a real 409.
    sim.set_faults([{"kind": "status", "status": 500, "after_save": True}])
    assert run_cli(tmp_path, "retry", "--file", str(path), "--send").returncode == 1
    second = run_cli(tmp_path, "retry", "--file", str(path), "--send")
    assert second.returncode == 1 and "não é possível saber" in second.stdout
    n = posts(sim)
    third = run_cli(tmp_path, "retry", "--file", str(path), "--send")
    assert third.returncode == 1
    assert "em CONFERIR, não reenviado" in third.stdout and "já entregue" not in third.stdout
    assert posts(sim) == n


def test_retry_with_a_folder_given_as_file_says_so(tmp_path: Path, sim: Simulator) -> None:
    settings, _files = dead_letter_demo(tmp_path, sim)
    proc = run_cli(tmp_path, "retry", "--file", str(settings.failed_dir))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"✗ {settings.failed_dir} é uma pasta (use --dir " \
                                  f"{settings.failed_dir})"


def test_retry_dry_run_says_move_ok_needs_send(tmp_path: Path, sim: Simulator) -> None:
    settings, files = dead_letter_demo(tmp_path, sim)
    proc = run_cli(tmp_path, "retry", "--move-ok", str(tmp_path / "ok"))
    assert proc.returncode == 0
    assert "--move-ok só move arquivos com --send" in proc.stdout
    assert all(f.exists() for f in files) and not (tmp_path / "ok").exists()
    assert Path(settings.failed_dir).is_dir()


# --- check and status when something is down ------------------------------------------------


def check_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line[:1] in "✓✗!–"]


def test_check_names_an_unreachable_bemsoft_and_exits_3(tmp_path: Path, sim: Simulator) -> None:
    settings = demo(tmp_path, sim)
    port = free_port()
    write_env(tmp_path, settings, BEMSOFT_BASE_URL=f"http://127.0.0.1:{port}")
    proc = run_cli(tmp_path, "check")
    assert proc.returncode == 3
    lines = check_lines(proc)
    bad = [line for line in lines if line.startswith("✗")]
    assert len(bad) == 1 and bad[0].startswith("✗ Bemsoft acessível:"), proc.stdout
    assert "→ confira BEMSOFT_BASE_URL" in bad[0]
    assert f"/tests: conexão recusada por 127.0.0.1:{port} →" in bad[0], bad[0]
    for english in ("HTTPConnectionPool", "Max retries", "Errno", "Connection refused"):
        assert english not in proc.stdout, english
    assert "– token: não verificado (Bemsoft inacessível)" in lines
    assert any(line.startswith("✓ banco do LIS acessível") for line in lines)
    assert sim.token not in proc.stdout + proc.stderr


def test_check_in_dry_run_with_a_token_still_checks_bemsoft(tmp_path: Path,
                                                             sim: Simulator) -> None:
    settings = demo(tmp_path, sim)
    write_env(tmp_path, settings, BEMSOFT_DRY_RUN="1", BEMSOFT_TOKEN="token-que-nao-vale")  # noqa: S106
    proc = run_cli(tmp_path, "check")
    assert proc.returncode == 3
    bad = [line for line in check_lines(proc) if line.startswith("✗")]
    assert len(bad) == 1 and bad[0].startswith("✗ token: recusado"), proc.stdout


def test_check_and_status_with_an_unreachable_database(tmp_path: Path) -> None:
    pytest.importorskip("psycopg")
    url = f"postgresql+psycopg://postgres:senha-do-banco@127.0.0.1:{free_port()}/test"
    (tmp_path / ".env").write_text(
        f"DB_URL={url}\nTERCEIROS=LAB\nBEMSOFT_DRY_RUN=1\nFAILED_DIR={tmp_path / 'falhas'}\n"
        "DB_LOGIN_TIMEOUT=2\n", encoding="utf-8")
    check = run_cli(tmp_path, "check", "--offline")
    assert check.returncode == 3
    lines = check_lines(check)
    db = next(line for line in lines if line.startswith("✗ banco do LIS"))
    assert "sem conexão" in db and "→ confira DB_SERVER" in db
    assert any(line.startswith("– tabelas de estado do monitor: não verificadas") for line in
               lines)
    status = run_cli(tmp_path, "status", "--json")
    assert status.returncode == 1 and status.stdout == ""
    err = [line for line in status.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("✗ banco de estado inacessível:"), status.stderr
    assert "senha-do-banco" not in check.stdout + status.stderr


def test_status_json_lease_has_stable_keys(tmp_path: Path, sim: Simulator) -> None:
    settings = demo(tmp_path, sim)
    store = store_of(settings)
    assert store.try_lease(holder="srv:1:x", host="srv", pid=1,
                           now=dt.datetime.now(dt.timezone.utc), ttl_s=60)[0]
    store.dispose()
    data = json.loads(run_cli(tmp_path, "status", "--json").stdout)
    assert set(data["lease"]) == {"holder", "host", "pid", "acquired_at", "expires_at",
                                  "expired"}
    assert set(data["orders"]) == {"pending", "sending", "delivered", "dead", "conferir",
                                   "resolved"}
    assert set(data["items"]) == {"pending", "ordered", "delivered", "refused", "cancelled",
                                  "dead", "conferir"}


def test_retry_prints_brackets_in_names_and_messages_as_they_are(tmp_path: Path,
                                                                  sim: Simulator) -> None:
    """A file name or a message with "[bold]" is shown as it is, not taken as console markup."""
    settings = demo(tmp_path, sim)
    failed = Path(settings.failed_dir)
    failed.mkdir(parents=True, exist_ok=True)
    (failed / "falha[bold].json").write_text('{"reason": "x", "event": {"a": 1}}',
                                             encoding="utf-8")
    for i in range(11):  # ten or more: the summary table instead of one line per file
        (failed / f"lote[red]{i:02d}.json").write_text("{", encoding="utf-8")
    proc = run_cli(tmp_path, "retry", "--limit", "1")
    assert proc.returncode == 0, proc.stderr
    assert "falha[bold].json" in proc.stdout and "formato desconhecido" in proc.stdout
    table = run_cli(tmp_path, "retry")
    assert table.returncode == 0, table.stderr
    assert "lote[red]00.json" in table.stdout and "Arquivos processados" in table.stdout


def test_retry_move_ok_folder_that_cannot_be_created_is_one_line_and_exit_2(
        tmp_path: Path, sim: Simulator) -> None:
    _settings, files = dead_letter_demo(tmp_path, sim)
    blocker = tmp_path / "arquivo"
    blocker.write_text("x", encoding="utf-8")
    before = posts(sim)
    proc = run_cli(tmp_path, "retry", "--send", "--move-ok", str(blocker / "enviados"))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("✗ --move-ok: não foi possível usar a pasta")
    assert posts(sim) == before and all(f.exists() for f in files)  # nothing sent or moved


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl não disponível")
def test_check_with_verify_off_says_so_in_portuguese_only(tmp_path: Path, sim: Simulator) -> None:
    settings = demo(tmp_path, sim)
    front = _TlsFront(tmp_path, sim)
    try:
        write_env(tmp_path, settings, BEMSOFT_BASE_URL=front.url, BEMSOFT_VERIFY="0")
        proc = run_cli(tmp_path, "check")
    finally:
        front.close()
    assert proc.returncode == 0, proc.stdout
    lines = check_lines(proc)
    assert "✓ TLS: certificado NÃO verificado (BEMSOFT_VERIFY=0)" in lines
    assert any(line.startswith("! configuração: BEMSOFT_VERIFY=0") for line in lines)
    assert "Unverified HTTPS" not in proc.stdout + proc.stderr, proc.stderr


def test_python_warnings_go_through_the_log_in_portuguese_lines(tmp_path: Path) -> None:
    code = (
        "import warnings\n"
        "from urllib3.exceptions import InsecureRequestWarning\n"
        "from bemsoft_monitor.logsetup import setup_logging\n"
        "setup_logging(secrets=('tok-SEGREDO-42',))\n"
        "warnings.warn('Unverified HTTPS request', InsecureRequestWarning)\n"
        "warnings.warn('biblioteca avisou: Bearer tok-SEGREDO-42')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=False,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert "Unverified HTTPS" not in proc.stderr
    assert " AVISO " in lines[0] and "biblioteca avisou" in lines[0], proc.stderr
    assert "tok-SEGREDO-42" not in proc.stderr


# --- retry: what it says about keys, answers and order -----------------------------------------


def test_retry_dry_run_shows_the_key_it_would_use_and_why_it_is_not_the_files(
        tmp_path: Path, sim: Simulator) -> None:
    settings, files = dead_letter_demo(tmp_path, sim)
    event = json.loads(files[0].read_text(encoding="utf-8"))["event"]
    store = store_of(settings)
    key_now = store.get_order(int(event["orderId"])).key
    store.dispose()
    # HTTP 400 means nothing was saved: the order moved on to a new key generation.
    assert key_now != event["idempotencyKey"]
    dry = run_cli(tmp_path, "retry", "--file", str(files[0]), "--verbose")
    assert dry.returncode == 0, dry.stderr
    text = " ".join(dry.stdout.split())
    assert (f"seria reenviado com a Idempotency-Key {key_now}, não a "
            f"{event['idempotencyKey']} do arquivo: a Bemsoft respondeu que nada foi salvo") \
        in text, text
    assert f"Idempotency-Key: {key_now}" in dry.stdout  # --verbose shows that same key
    assert "Idempotency-Key registrada" not in dry.stdout
    sent = run_cli(tmp_path, "retry", "--file", str(files[0]), "--send")
    assert sent.returncode == 0 and sim.calls()[-1]["key"] == key_now


def test_retry_verbose_names_the_answer_in_portuguese(tmp_path: Path, sim: Simulator) -> None:
    _settings, files = dead_letter_demo(tmp_path, sim)
    sim.set_faults([{"kind": "status", "status": 400}])
    proc = run_cli(tmp_path, "retry", "--file", str(files[0]), "--send", "--verbose")
    assert proc.returncode == 1
    assert "resposta: HTTP 400 (recusado pela Bemsoft) em " in proc.stdout, proc.stdout
    for english in ("(rejected)", "(delivered)", "(no_answer)"):
        assert english not in proc.stdout


def test_retry_limit_takes_the_oldest_by_time_not_by_name(tmp_path: Path, sim: Simulator) -> None:
    _settings, files = dead_letter_demo(tmp_path, sim)
    payload = json.loads(files[0].read_text(encoding="utf-8"))["event"]["payload"]
    folder = tmp_path / "lote"
    folder.mkdir()

    def write(name: str, external_id: str, mtime: float | None = None) -> None:
        body = dict(payload, batch=dict(payload["batch"], externalId=external_id))
        path = folder / name
        path.write_text(json.dumps({"reason": "x", "event": {"payload": body}}),
                        encoding="utf-8")
        if mtime is not None:
            os.utime(path, (mtime, mtime))

    write("20240102T000000Z_1.json", "EXT-A")  # failed on 2 Jan 2024 (time in the name)
    write("aa_recente.json", "EXT-B")  # no time in the name: now, by its modification time
    write("zz_antigo.json", "EXT-C", mtime=dt.datetime(2023, 6, 1).timestamp())
    proc = run_cli(tmp_path, "retry", "--dir", str(folder), "--limit", "2")
    assert proc.returncode == 0, proc.stderr
    assert "zz_antigo.json" in proc.stdout and "20240102T000000Z_1.json" in proc.stdout
    assert "aa_recente.json" not in proc.stdout
    assert proc.stdout.index("zz_antigo.json") < proc.stdout.index("20240102T000000Z_1.json")
    page = " ".join(run_cli(tmp_path, "retry", "--help").stdout.split())
    assert "os mais antigos primeiro (pela data no nome do arquivo ou, sem ela, pela data de " \
           "modificação)" in page


def test_retry_of_many_files_shows_a_progress_bar_then_the_summary(
        tmp_path: Path, sim: Simulator) -> None:
    settings, files = dead_letter_demo(tmp_path, sim)
    failed = Path(settings.failed_dir)
    for i in range(25):
        shutil.copy(files[0], failed / f"copia_{i:02d}.json")
    env = {k: v for k, v in os.environ.items() if k != "BEMSOFT_ENV_FILE"}
    # Rich draws the bar only on a terminal: these say stderr is one (as in a console window).
    env.update(COLUMNS="200", TTY_COMPATIBLE="1", TTY_INTERACTIVE="1")
    proc = subprocess.run([sys.executable, "-m", "bemsoft_monitor", "retry"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Analisando" in proc.stderr and "27/27" in proc.stderr, proc.stderr
    assert "Arquivos processados" in proc.stdout
    total = next(line for line in proc.stdout.splitlines() if "total" in line)
    assert "27" in total
    assert proc.stdout.count("enviaria") >= 27  # one table row per file, not per line


# --- status after a real run with failures ---------------------------------------------------


def test_status_counts_dead_letters_conferir_and_the_oldest_waiting(
        tmp_path: Path, sim: Simulator) -> None:
    # First answer 400 (FAILED_DIR), second 409 with no earlier attempt (conferir), third
    # 429 asking to wait an hour (still waiting when status runs).
    settings = demo(tmp_path, sim, faults=[
        {"kind": "status", "status": 400}, {"kind": "status", "status": 409},
        {"kind": "429", "retry_after": 3600}])
    proc = run_cli(tmp_path, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["dead_letters"] == data["orders"]["dead"] == 1
    assert data["conferir"] == data["orders"]["conferir"] == 1
    assert data["orders"]["pending"] >= 1
    assert data["failed_files"] == len(list(Path(settings.failed_dir).glob("*.json"))) >= 1
    assert data["oldest_waiting_age_s"] is not None and 0 <= data["oldest_waiting_age_s"] < 600
    table = run_cli(tmp_path, "status")
    assert table.returncode == 0
    row = next(line for line in table.stdout.splitlines() if "Mais antigo na fila" in line)
    assert row.rstrip(" │").endswith(" s"), row
    failed = next(line for line in table.stdout.splitlines() if "Falhas (FAILED_DIR)" in line)
    assert f"1 pedido(s); {data['failed_files']} arquivo(s)" in failed
    assert "1 pedido(s)" in next(line for line in table.stdout.splitlines()
                                 if "Recusados / conferir" in line)
