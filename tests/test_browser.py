"""The painel in Debian's Chromium (headless, Selenium) against the real monitor and simulator.

The monitor runs as the real CLI (`run`, painel at HTTP_ADDR) on a SQLite LIS; the simulator
refuses the first order with a 422, so it becomes a dead letter. The browser logs in, sees
it, clicks Reenviar and watches the monitor deliver it; the simulator must have saved it
exactly once.
Screenshots go to test-artifacts/ at each checkpoint, and a screenshot plus the page source
(``*-falha.png``/``*-falha.html``) whenever the test fails. The overview is copied to
docs/painel.png only with UPDATE_PAINEL_SCREENSHOT=1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from bemsoft_monitor.simulator import Simulator

from .conftest import IN_CI, Lis
from .test_cli_run import cli, env_for, write_env
from .test_web import PAINEL_TOKEN, _free_port

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
DOC_SCREENSHOT = REPO / "docs" / "painel.png"
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER = ("/usr/bin/chromedriver",)


def _first(paths: tuple[str, ...], name: str) -> str | None:
    for p in paths:
        if os.access(p, os.X_OK):
            return p
    return shutil.which(name)


def _skip_or_fail(reason: str) -> None:
    if IN_CI:
        pytest.fail(reason + " (obrigatório em CI: scripts/run_tests.sh instala chromium e "
                             "chromium-driver)")
    print(f"\nSKIP: {reason}", file=sys.stderr)
    pytest.skip(reason)


@pytest.fixture
def browser() -> Iterator[Any]:
    chromium = _first(CHROMIUM, "chromium")
    driver_path = _first(CHROMEDRIVER, "chromedriver")
    if chromium is None or driver_path is None:
        _skip_or_fail("Chromium/ChromeDriver ausentes (apt-get install chromium chromium-driver)")
    try:
        # Imported here: without selenium the test must skip (or fail in CI), not crash.
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _skip_or_fail("selenium não instalado (pip install -e '.[test]')")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(chromium)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--disable-background-networking",
                "--disable-extensions", "--no-first-run", "--lang=pt-BR"):
        opts.add_argument(arg)
    # An explicit driver path: Selenium Manager never downloads anything.
    driver = webdriver.Chrome(service=Service(executable_path=str(driver_path)), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def monitor_process(tmp_path: Path, sim: Simulator) -> Iterator[tuple[str, Simulator]]:
    lis = Lis(f"sqlite:///{(tmp_path / 'lis.db').as_posix()}")
    lis.patient()
    for req in (1, 2):
        lis.requisition(req)
        lis.item(req, "FE")
    lis.item(2, "TSH")
    lis.dispose()
    # One sender, so requisition 1 is the first POST and meets the 422.
    sim.set_faults([{"kind": "status", "status": 422}])
    port = _free_port()
    # HTTP_ADDR from the .env here; test_web covers `run --http`.
    write_env(tmp_path, sim, PAINEL_TOKEN=PAINEL_TOKEN, BEMSOFT_CONCURRENCY="1",
              POLL_SECONDS="0.2", HTTP_ADDR=f"127.0.0.1:{port}")
    proc = subprocess.Popen(cli("run"), cwd=tmp_path,
                            env=env_for(tmp_path), stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                text = requests.get(base + "/metrics", timeout=1).text
                if ('bemsoft_queue_depth{state="dead"} 1.0' in text
                        and 'bemsoft_queue_depth{state="delivered"} 1.0' in text):
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None:
                pytest.fail(f"o monitor parou: {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(0.1)
        else:
            pytest.fail("o monitor não produziu o pedido não enviado a tempo")
        yield base, sim
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0


def _shot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    return path


@contextlib.contextmanager
def evidence_on_failure(driver: Any, name: str) -> Iterator[None]:
    """On any failure inside, keep what the browser showed: screenshot and page source."""
    try:
        yield
    except BaseException:
        ARTIFACTS.mkdir(exist_ok=True)
        saved = []
        # Best effort: the browser itself may be what broke; the original error matters more.
        with contextlib.suppress(Exception):
            driver.save_screenshot(str(ARTIFACTS / f"{name}-falha.png"))
            saved.append(f"{name}-falha.png")
        with contextlib.suppress(Exception):
            (ARTIFACTS / f"{name}-falha.html").write_text(
                f"<!-- {driver.current_url} -->\n{driver.page_source}", encoding="utf-8")
            saved.append(f"{name}-falha.html")
        print(f"\nartefatos da falha em {ARTIFACTS}: {', '.join(saved) or 'nenhum'}",
              file=sys.stderr)
        raise


def test_a_failure_keeps_a_screenshot_and_the_page_source(browser: Any, tmp_path: Path) -> None:
    page = tmp_path / "pendencias.html"
    page.write_text('<html lang="pt-BR"><body><h1>Pendências de teste</h1></body></html>',
                    encoding="utf-8")
    browser.get(page.as_uri())  # a local file: nothing leaves this machine
    name = f"teste-evidencia-{os.getpid()}"
    shot, source = ARTIFACTS / f"{name}-falha.png", ARTIFACTS / f"{name}-falha.html"
    try:
        with pytest.raises(AssertionError, match="falhou de propósito"), \
                evidence_on_failure(browser, name):
            raise AssertionError("falhou de propósito")
        assert shot.read_bytes().startswith(b"\x89PNG")
        assert "Pendências de teste" in source.read_text(encoding="utf-8")
    finally:
        shot.unlink(missing_ok=True)
        source.unlink(missing_ok=True)


def test_login_see_dead_letter_reenviar_and_simulator_gets_it_once(
    browser: Any, monitor_process: tuple[str, Simulator],
) -> None:
    with evidence_on_failure(browser, "painel"):
        _login_see_dead_letter_reenviar(browser, *monitor_process)


def _login_see_dead_letter_reenviar(browser: Any, base: str, sim: Simulator) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 20, poll_frequency=0.1)
    saved_before = [t for t in sim.saved_tests() if t["order_external_id"] == "order-1"]
    assert saved_before == []

    # Log in.
    browser.get(base + "/pendencias")
    assert "/login" in browser.current_url
    browser.find_element(By.ID, "token").send_keys("token-errado-123")
    browser.find_element(By.ID, "entrar").click()
    refused = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".aviso.erro"))
    assert "Token inválido" in refused[0].text
    browser.find_element(By.ID, "token").send_keys(PAINEL_TOKEN)
    browser.find_element(By.ID, "entrar").click()
    wait.until(lambda d: d.current_url.endswith("/pendencias"))

    # The dead letter is listed with the API's reason.
    row = browser.find_element(By.CSS_SELECTOR, "#mortos tbody tr")
    assert "422" in row.text and row.find_element(By.TAG_NAME, "a").text == "1"
    order_id = row.get_attribute("id").removeprefix("morto-")
    _shot(browser, "painel-pendencias.png")

    browser.get(base + "/")
    assert browser.find_element(By.ID, "total-mortos").text == "1"
    assert browser.find_elements(By.CSS_SELECTOR, "svg.grafico rect.falha")
    overview = _shot(browser, "painel-visao-geral.png")
    # The README's picture changes only when someone asks for it.
    if os.environ.get("UPDATE_PAINEL_SCREENSHOT") == "1":
        DOC_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(overview, DOC_SCREENSHOT)

    # Reenviar.
    browser.find_element(By.ID, "nav-pendencias").click()
    browser.find_element(By.ID, f"reenviar-{order_id}").click()
    flash = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".aviso.ok"))
    assert "voltou para a fila" in flash.text

    # The monitor's loop sends it; the detail page shows it delivered.
    browser.get(base + "/requisicao/1")

    def delivered(d: Any) -> bool:
        d.refresh()
        state = str(d.find_element(By.CSS_SELECTOR, f"#pedido-{order_id} .estado").text)
        return state == "entregue"

    wait.until(delivered)
    _shot(browser, "painel-requisicao-entregue.png")
    assert "M**** D* S****" in browser.page_source and "MARIA DA SILVA" not in browser.page_source

    saved = [t for t in sim.saved_tests() if t["order_external_id"] == "order-1"]
    assert len(saved) == 1
    created = [c for c in sim.calls() if c["batch"] == "sol-1" and c["status"] == 201]
    assert len(created) == 1
    browser.get(base + "/pendencias")
    assert "Nenhum pedido em FAILED_DIR" in browser.page_source
