"""``retry``, ``status`` and ``check`` as real subprocesses on the demo's LIS and the simulator."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bemsoft_monitor.app import build_monitor, build_parts
from bemsoft_monitor.config import Settings
from bemsoft_monitor.demo import demo_settings, drive_until_quiet, seed_lis, write_demo_files
from bemsoft_monitor.engine import FLAG_AUTH_PAUSED
from bemsoft_monitor.ops import _clock_check
from bemsoft_monitor.simulator import Simulator
from bemsoft_monitor.store import StateStore

STATUS_KEYS = {
    "version", "initialized", "state_db", "dry_run", "checkpoint", "last_successful_poll",
    "last_poll_age_s", "orders", "items", "oldest_waiting_age_s", "dead_letters", "conferir",
    "refused_items", "failed_dir", "failed_files", "catalog_entries", "catalog_age_s", "lease",
    "auth_paused",
}
GLI_ITEM = 17068  # the demo's GLICOSE: refused until the material map names its specimen

# Settings written to the .env the subprocesses read (the demo's, with the test simulator).
ENV_FIELDS = (
    "db_url", "terceiros", "poll_seconds", "debounce_seconds", "initial_item_id",
    "out_of_order_grace_seconds", "failed_dir", "refused_report", "bemsoft_base_url",
    "bemsoft_catalog_cache", "bemsoft_test_map_path", "bemsoft_material_map_path",
    "bemsoft_backoff", "bemsoft_backoff_max", "default_birthdate", "physician_name",
    "physician_council", "physician_number", "physician_uf",
)


def write_env(folder: Path, settings: Settings, **extra: str) -> Path:
    lines = {name.upper(): str(getattr(settings, name)) for name in ENV_FIELDS
             if getattr(settings, name) is not None}
    lines["BEMSOFT_TOKEN"] = settings.token
    lines["BEMSOFT_DRY_RUN"] = "0"
    lines.update(extra)
    path = folder / ".env"
    path.write_text("".join(f"{k}={v}\n" for k, v in lines.items()), encoding="utf-8")
    return path


def run_cli(folder: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "BEMSOFT_ENV_FILE"}
    env.update(PYTHONUNBUFFERED="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "bemsoft_monitor", *args], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)


def demo(folder: Path, sim: Simulator, faults: list[dict[str, Any]] | None = None) -> Settings:
    """The demo's LIS and map files, processed once by the monitor against ``sim``."""
    write_demo_files(folder)
    settings = demo_settings(folder, base_url=sim.url, token=sim.token)
    engine = sa.create_engine(settings.db_url or "")
    seed_lis(engine, dt.datetime.now(dt.timezone(dt.timedelta(hours=-3))).date())
    engine.dispose()
    if faults:
        sim.set_faults(faults)
    parts = build_parts(settings)
    monitor = build_monitor(parts, show_payload=False)
    drive_until_quiet(monitor)
    monitor.close()
    parts.store.dispose()
    parts.lis_engine.dispose()
    write_env(folder, settings)
    return settings


def store_of(settings: Settings) -> StateStore:
    return StateStore(sa.create_engine(settings.db_url or ""))


def item_state(settings: Settings, item_id: int) -> str:
    store = store_of(settings)
    try:
        with store.engine.connect() as conn:
            return str(conn.execute(sa.select(store.items.c.State).where(
                store.items.c.ItemId == item_id)).scalar_one())
    finally:
        store.dispose()


def posts(sim: Simulator) -> int:
    return len(sim.calls())


# --- status --------------------------------------------------------------------------------


def test_status_json_has_stable_keys_and_the_store_counts(tmp_path: Path, sim: Simulator) -> None:
    settings = demo(tmp_path, sim)
    proc = run_cli(tmp_path, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data) == STATUS_KEYS
    store = store_of(settings)
    counts, checkpoint = store.counts(), store.checkpoint()
    store.dispose()
    assert data["initialized"] is True
    assert data["checkpoint"] == checkpoint
    assert {k: v for k, v in data["orders"].items() if v} == counts["orders"]
    assert {k: v for k, v in data["items"].items() if v} == counts["items"]
    assert data["refused_items"] == counts["items"]["refused"] > 0
    assert data["dead_letters"] == 0 and data["conferir"] == 0
    assert data["last_successful_poll"] is not None and data["last_poll_age_s"] < 600
    assert data["catalog_entries"] == len(sim.catalog())
    assert data["lease"] is None  # released on a graceful stop
    assert data["auth_paused"] is None


def test_status_shows_lease_holder_and_token_pause(tmp_path: Path, sim: Simulator) -> None:
    settings = demo(tmp_path, sim)
    store = store_of(settings)
    now = dt.datetime.now(dt.timezone.utc)
    assert store.try_lease(holder="srv-lab:4242:abcd", host="srv-lab", pid=4242, now=now,
                           ttl_s=300)[0]
    store.set_flag(FLAG_AUTH_PAUSED, "HTTP 401: token recusado", now=now)
    store.dispose()
    data = json.loads(run_cli(tmp_path, "status", "--json").stdout)
    assert data["lease"]["holder"] == "srv-lab:4242:abcd"
    assert data["lease"]["expired"] is False
    assert data["auth_paused"] == "HTTP 401: token recusado"
    table = run_cli(tmp_path, "status")
    assert table.returncode == 0
    assert "srv-lab:4242:abcd" in table.stdout
    assert "SIM: HTTP 401" in table.stdout


def test_status_before_the_first_run_says_so(tmp_path: Path, sim: Simulator) -> None:
    write_demo_files(tmp_path)
    settings = demo_settings(tmp_path, base_url=sim.url, token=sim.token)
    seed_lis(sa.create_engine(settings.db_url or ""), dt.date(2026, 7, 1))
    write_env(tmp_path, settings)
    data = json.loads(run_cli(tmp_path, "status", "--json").stdout)
    assert data["initialized"] is False and data["checkpoint"] is None
    assert "ainda não rodou" in run_cli(tmp_path, "status").stdout


# --- retry --refused --------------------------------------------------------------------------


def test_retry_refused_delivers_the_glicose_once_the_material_map_is_fixed(
        tmp_path: Path, sim: Simulator) -> None:
    settings = demo(tmp_path, sim)
    assert item_state(settings, GLI_ITEM) == "refused"
    before = posts(sim)

    dry = run_cli(tmp_path, "retry", "--refused")
    assert dry.returncode == 0, dry.stderr
    assert "Simulação" in dry.stdout and str(GLI_ITEM) in dry.stdout
    assert item_state(settings, GLI_ITEM) == "refused" and posts(sim) == before

    with (tmp_path / "materiais.csv").open("a", encoding="utf-8") as fh:
        fh.write("GLI;Plasma\n")
    sent = run_cli(tmp_path, "retry", "--refused", "--send")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert item_state(settings, GLI_ITEM) == "delivered"
    assert any(t["support_test_id"] == "GLI" for t in sim.saved_tests())
    assert "entregues: 1" in sent.stdout
    assert "Ainda recusados (3)" in sent.stdout  # the others still need a person


def report_rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig")),
                               delimiter=";"))


def test_refused_report_names_an_item_again_only_when_its_reason_changes(
        tmp_path: Path, sim: Simulator) -> None:
    settings = demo(tmp_path, sim)
    report = Path(settings.refused_report)
    first = report_rows(report)
    assert first and len({r["item"] for r in first}) == len(first)
    for _ in range(2):
        proc = run_cli(tmp_path, "retry", "--refused", "--send")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Ainda recusados" in proc.stdout
    assert report_rows(report) == first  # refused again for the same reasons: nothing new

    # A material that matches no variant changes the GLICOSE's reason: one new line, once.
    with (tmp_path / "materiais.csv").open("a", encoding="utf-8") as fh:
        fh.write("GLI;Sangue\n")
    for _ in range(2):
        assert run_cli(tmp_path, "retry", "--refused", "--send").returncode == 0
    after = report_rows(report)
    assert after[:len(first)] == first and len(after) == len(first) + 1
    assert after[-1]["item"] == str(GLI_ITEM) and '"Sangue"' in after[-1]["motivo"]


# --- retry of FAILED_DIR files -------------------------------------------------------------


def dead_letter_demo(tmp_path: Path, sim: Simulator) -> tuple[Settings, list[Path]]:
    """The demo where Bemsoft refused the first two orders (HTTP 400): two FAILED_DIR files."""
    settings = demo(tmp_path, sim, faults=[{"kind": "status", "status": 400}] * 2)
    files = sorted(Path(settings.failed_dir).glob("*.json"))
    assert len(files) == 2
    return settings, files


def test_retry_dry_run_sends_nothing_then_send_delivers_and_moves(
        tmp_path: Path, sim: Simulator) -> None:
    settings, files = dead_letter_demo(tmp_path, sim)
    before = posts(sim)
    dry = run_cli(tmp_path, "retry")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("enviaria") >= 2 and posts(sim) == before
    assert "Resumo (simulação: nada foi enviado)" in dry.stdout

    sent_dir = tmp_path / "enviados"
    sent = run_cli(tmp_path, "retry", "--send", "--move-ok", str(sent_dir), "--verbose")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert posts(sim) == before + 2
    assert sorted(p.name for p in sent_dir.iterdir()) == [f.name for f in files]
    assert not list(Path(settings.failed_dir).glob("*.json"))
    assert "Idempotency-Key:" in sent.stdout and "resposta: HTTP 201" in sent.stdout
    # --verbose shows payloads with the patient masked (LOG_PII is off).
    assert "MARIA JOSÉ DA CONCEIÇÃO" not in sent.stdout
    data = json.loads(run_cli(tmp_path, "status", "--json").stdout)
    assert data["dead_letters"] == 0
    assert data["orders"]["delivered"] == sum(data["orders"].values())


def test_retry_never_sends_again_what_was_delivered(tmp_path: Path, sim: Simulator) -> None:
    _settings, files = dead_letter_demo(tmp_path, sim)
    copies = tmp_path / "copias"
    copies.mkdir()
    for f in files:
        shutil.copy(f, copies / f.name)
    assert run_cli(tmp_path, "retry", "--send").returncode == 0
    after_first = posts(sim)
    # The same events again (a copy kept by the operator): the outbox says delivered.
    again = run_cli(tmp_path, "retry", "--dir", str(copies), "--send")
    assert again.returncode == 0, again.stdout
    assert again.stdout.count("já entregue") >= 2
    assert posts(sim) == after_first
    accepted = [c["key"] for c in sim.calls() if c["status"] == 201]
    assert len(accepted) == len(set(accepted))  # no key was accepted twice


def test_retry_keeps_the_idempotency_key_of_the_order(tmp_path: Path, sim: Simulator) -> None:
    settings, files = dead_letter_demo(tmp_path, sim)
    event = json.loads(files[0].read_text(encoding="utf-8"))["event"]
    store = store_of(settings)
    key_in_store = store.get_order(event["orderId"]).key
    store.dispose()
    assert run_cli(tmp_path, "retry", "--file", str(files[0]), "--send").returncode == 0
    last = sim.calls()[-1]
    assert last["key"] == key_in_store
    assert last["status"] == 201


def test_retry_reports_and_skips_corrupted_and_foreign_files(tmp_path: Path,
                                                             sim: Simulator) -> None:
    settings, _files = dead_letter_demo(tmp_path, sim)
    failed = Path(settings.failed_dir)
    (failed / "0_truncado.json").write_text('{"reason": "x", "event": {', encoding="utf-8")
    (failed / "0_outro_sistema.json").write_text('{"pedido": 1}', encoding="utf-8")
    (failed / "0_latin1.json").write_bytes('{"reason": "ã"}'.encode("latin-1"))
    (failed / "0_sem_corpo.json").write_text('{"reason": "x", "event": {"a": 1}}',
                                             encoding="utf-8")
    proc = run_cli(tmp_path, "retry", "--send")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ignorado") >= 4
    assert "JSON inválido" in proc.stdout and "UTF-8" in proc.stdout
    # Where and why in Portuguese; never the decoder's English.
    assert "0_truncado.json (solicitação ?): JSON inválido na linha 1, coluna 27 (o conteúdo " \
           "termina no meio (arquivo cortado?)); arquivo ignorado" in proc.stdout
    assert "Expecting" not in proc.stdout
    assert "entregue" in proc.stdout
    assert posts(sim) >= 2  # the two real events still went out
    assert (failed / "0_truncado.json").exists()  # never deleted or moved


def test_retry_of_an_external_file_sends_once(tmp_path: Path, sim: Simulator) -> None:
    _settings, files = dead_letter_demo(tmp_path, sim)
    payload = json.loads(files[0].read_text(encoding="utf-8"))["event"]["payload"]
    payload["batch"]["externalId"] = "EXT-1"
    foreign = tmp_path / "externo"
    foreign.mkdir()
    path = foreign / "20240101T120000Z_123.json"
    path.write_text(json.dumps({"reason": "antigo", "event": {"payload": payload}}),
                    encoding="utf-8")
    first = run_cli(tmp_path, "retry", "--file", str(path), "--send")
    assert first.returncode == 0, first.stdout
    assert "arquivo externo" in first.stdout and "entregue" in first.stdout
    n = posts(sim)
    second = run_cli(tmp_path, "retry", "--file", str(path), "--send")
    assert second.returncode == 0 and "já entregue" in second.stdout
    assert posts(sim) == n


def test_retry_limit_and_progress_for_many_files(tmp_path: Path, sim: Simulator) -> None:
    settings, files = dead_letter_demo(tmp_path, sim)
    failed = Path(settings.failed_dir)
    for i in range(12):
        shutil.copy(files[0], failed / f"copia_{i:02d}.json")
    proc = run_cli(tmp_path, "retry", "--limit", "11")
    assert proc.returncode == 0, proc.stderr
    assert "Arquivos processados" in proc.stdout  # table instead of one line per file
    total_line = next(line for line in proc.stdout.splitlines() if "total" in line)
    assert "11" in total_line


def test_retry_bad_input_gives_one_line_and_exit_2(tmp_path: Path, sim: Simulator) -> None:
    demo(tmp_path, sim)
    for args, text in (
        (("retry", "--file", "nao_existe.json"), "arquivo não encontrado: nao_existe.json"),
        (("retry", "--dir", "pasta_inexistente"), "pasta não encontrada"),
        (("retry", "--sned"), "opção desconhecida: --sned"),
        (("retry", "--limit", "0"), "--limit"),
        (("retry", "--refused", "--dir", "x"), "--refused não se combina"),
        (("status", "--xml"), "opção desconhecida: --xml"),
    ):
        proc = run_cli(tmp_path, *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, (args, proc.stderr)
        assert text in lines[0]


def test_retry_with_nothing_to_do(tmp_path: Path, sim: Simulator) -> None:
    demo(tmp_path, sim)
    proc = run_cli(tmp_path, "retry")
    assert proc.returncode == 0
    assert "nada a reenviar" in proc.stdout


def test_retry_failed_py_script_is_the_retry_command(tmp_path: Path, sim: Simulator) -> None:
    _settings, _files = dead_letter_demo(tmp_path, sim)
    script = Path(__file__).resolve().parents[1] / "retry_failed.py"
    env = {k: v for k, v in os.environ.items() if k != "BEMSOFT_ENV_FILE"}
    env["COLUMNS"] = "200"
    proc = subprocess.run([sys.executable, str(script), "--limit", "1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "enviaria" in proc.stdout and "total" in proc.stdout


# --- check -----------------------------------------------------------------------------------


def check_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line[:1] in "✓✗!–"]


def test_check_passes_on_the_demo_with_one_line_per_check(tmp_path: Path, sim: Simulator) -> None:
    demo(tmp_path, sim)
    proc = run_cli(tmp_path, "check")
    assert proc.returncode == 0, proc.stdout
    lines = check_lines(proc)
    assert not [line for line in lines if line.startswith("✗")]
    text = "\n".join(lines)
    for label in ("configuração válida", "componentes", "banco do LIS acessível",
                  "tabelas do LIS", "tabelas de estado do monitor", "Bemsoft acessível",
                  "token", "catálogo /tests", "relógio", "FAILED_DIR", "TLS"):
        assert label in text, label
    assert sim.token not in proc.stdout + proc.stderr


def test_check_names_a_refused_token_and_exits_3(tmp_path: Path, sim: Simulator) -> None:
    settings = demo(tmp_path, sim)
    write_env(tmp_path, settings, BEMSOFT_TOKEN="token-errado-123")  # noqa: S106 - test value
    proc = run_cli(tmp_path, "check")
    assert proc.returncode == 3
    bad = [line for line in check_lines(proc) if line.startswith("✗")]
    assert len(bad) == 1 and "token" in bad[0] and "BEMSOFT_TOKEN" in bad[0]
    assert "token-errado-123" not in proc.stdout + proc.stderr


def test_check_names_missing_columns_and_tables(tmp_path: Path, sim: Simulator) -> None:
    settings = demo(tmp_path, sim)
    engine = sa.create_engine(settings.db_url or "")
    with engine.begin() as conn:
        conn.execute(sa.text('ALTER TABLE "ItemSol" DROP COLUMN "NomeTerceirizado"'))
        conn.execute(sa.text('DROP TABLE "texame"'))
    engine.dispose()
    proc = run_cli(tmp_path, "check", "--offline")
    assert proc.returncode == 3
    bad = "\n".join(line for line in check_lines(proc) if line.startswith("✗"))
    assert "ItemSol: faltam as colunas NomeTerceirizado" in bad
    assert "texame: não encontrada" in bad


def test_check_lists_installed_odbc_drivers_when_the_configured_one_is_missing(
        tmp_path: Path) -> None:
    pyodbc = pytest.importorskip("pyodbc")
    (tmp_path / ".env").write_text(
        "DB_SERVER=127.0.0.1,9\nDB_NAME=LIS\nDB_USER=u\nDB_PASS=senha-secreta\n"
        "ODBC_DRIVER=Driver Que Nao Existe 99\nTERCEIROS=LAB\nBEMSOFT_DRY_RUN=1\n"
        f"FAILED_DIR={tmp_path / 'f'}\nDB_LOGIN_TIMEOUT=2\n", encoding="utf-8")
    proc = run_cli(tmp_path, "check", "--offline")
    assert proc.returncode == 3
    driver = next(line for line in check_lines(proc) if "driver do SQL Server" in line)
    assert driver.startswith("✗") and "Driver Que Nao Existe 99" in driver
    for name in pyodbc.drivers():
        assert name in driver
    bad = [line for line in check_lines(proc) if line.startswith("✗")]
    assert bad == [driver]  # no second, misleading "no connection" line
    assert "– banco do LIS: não verificado (driver do SQL Server ausente)" in check_lines(proc)
    assert "senha-secreta" not in proc.stdout + proc.stderr


def test_check_with_a_failed_dir_that_cannot_be_written(tmp_path: Path, sim: Simulator) -> None:
    settings = demo(tmp_path, sim)
    blocker = tmp_path / "um_arquivo"
    blocker.write_text("não é pasta", encoding="utf-8")
    write_env(tmp_path, settings, FAILED_DIR=str(blocker / "falhas"))
    proc = run_cli(tmp_path, "check", "--offline")
    assert proc.returncode == 3
    bad = [line for line in check_lines(proc) if line.startswith("✗")]
    assert len(bad) == 1 and "FAILED_DIR" in bad[0] and "falhas" in bad[0]
    assert "uma parte do caminho é um arquivo, não uma pasta" in bad[0], bad[0]
    assert "Not a directory" not in bad[0] and "File exists" not in bad[0]


def test_env_file_with_bom_and_crlf_works(tmp_path: Path, sim: Simulator) -> None:
    settings = demo(tmp_path, sim)
    env = write_env(tmp_path, settings)
    text = env.read_text(encoding="utf-8")
    env.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))
    proc = run_cli(tmp_path, "check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(run_cli(tmp_path, "status", "--json").stdout)
    assert data["failed_dir"] == str(settings.failed_dir)  # no stray "\r"


def test_invalid_configuration_in_check_is_a_failed_check(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("POLL_SECONDS=abc\n", encoding="utf-8")
    proc = run_cli(tmp_path, "check")
    assert proc.returncode == 3
    assert any(line.startswith("✗ configuração: POLL_SECONDS") for line in check_lines(proc))


def test_clock_check_thresholds() -> None:
    now = dt.datetime(2026, 7, 1, 12, 0, tzinfo=dt.timezone.utc)
    ok = _clock_check("à Bemsoft", now - dt.timedelta(seconds=5), now, can_fail=True, fix="x")
    warn = _clock_check("à Bemsoft", now - dt.timedelta(seconds=120), now, can_fail=True,
                        fix="x")
    fail = _clock_check("à Bemsoft", now + dt.timedelta(seconds=900), now, can_fail=True,
                        fix="acerte o relógio")
    db_only = _clock_check("ao banco", now + dt.timedelta(seconds=900), now, can_fail=False,
                           fix="x")
    assert (ok.status, warn.status, fail.status, db_only.status) == ("ok", "warn", "fail", "warn")
    assert "atrasado 900 s" in fail.line() and fail.line().startswith("✗")


class _TlsFront:
    """HTTPS on 127.0.0.1 with a self-signed certificate, relaying GETs to the simulator."""

    def __init__(self, folder: Path, sim: Simulator) -> None:
        import http.server
        import ssl
        import threading

        import requests

        self.cert, key = folder / "cert.pem", folder / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-keyout", str(key), "-out", str(self.cert), "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"],
                       check=True, capture_output=True, timeout=60)
        backend = sim.url

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server's naming
                resp = requests.get(backend + self.path, timeout=10, headers={
                    "Authorization": self.headers.get("Authorization", "")})
                self.send_response(resp.status_code)
                self.send_header("Content-Type", resp.headers.get("Content-Type", ""))
                self.send_header("Content-Length", str(len(resp.content)))
                self.end_headers()
                self.wfile.write(resp.content)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl não disponível")
def test_check_tls_untrusted_certificate_then_trusted_ca(tmp_path: Path, sim: Simulator) -> None:
    settings = demo(tmp_path, sim)
    front = _TlsFront(tmp_path, sim)
    try:
        write_env(tmp_path, settings, BEMSOFT_BASE_URL=front.url)
        untrusted = run_cli(tmp_path, "check")
        assert untrusted.returncode == 3
        bad = [line for line in check_lines(untrusted) if line.startswith("✗")]
        assert len(bad) == 1 and bad[0].startswith("✗ TLS: certificado de") \
            and "BEMSOFT_VERIFY" in bad[0], untrusted.stdout
        assert any(line.startswith("– token: não verificado") for line in check_lines(untrusted))

        write_env(tmp_path, settings, BEMSOFT_BASE_URL=front.url, BEMSOFT_VERIFY=str(front.cert))
        trusted = run_cli(tmp_path, "check")
        assert trusted.returncode == 0, trusted.stdout
        lines = check_lines(trusted)
        assert "✓ TLS: certificado válido" in lines
        assert any(line.startswith("✓ token: aceito") for line in lines)
        assert any(line.startswith("✓ catálogo /tests") for line in lines)
    finally:
        front.close()
