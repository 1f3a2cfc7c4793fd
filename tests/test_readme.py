"""README.md in the order a person installs and operates the monitor, and true to the code.

Every command and option it shows exists, every variable it names is a setting, every link
and anchor leads somewhere; the systemd unit points to steps that exist.
"""

from __future__ import annotations

import re
import shlex
import unicodedata
from pathlib import Path
from typing import Any

from bemsoft_monitor.cli import cli_command
from bemsoft_monitor.config import Settings

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
OPERACAO = (REPO / "docs" / "operacao.md").read_text(encoding="utf-8")

#: Read by scripts, tests or the process itself, not settings (see .env.example).
NOT_SETTINGS = {"BEMSOFT_ENV_FILE", "BEMSOFT_START_WAIT_S", "BEMSOFT_STOP_TIMEOUT_S",
                "TEST_POSTGRES_URL", "FAULT_SEED", "TERCEIRO", "SMTP_"}


def sections(text: str, level: str = "## ") -> list[str]:
    return [line[len(level):].strip() for line in text.splitlines() if line.startswith(level)]


def section(text: str, title: str) -> str:
    """The body of the ``## title`` section (up to the next ``## ``)."""
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_" or unicodedata.category(c)
                   .startswith("L"))
    return text.replace(" ", "-")


def test_readme_starts_with_the_two_setup_commands() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    assert blocks[0].strip() == ("python3 -m venv .venv && .venv/bin/pip install . && "
                                 ".venv/bin/bemsoft-monitor demo")
    assert blocks[1].strip() == "bash scripts/run_tests.sh"
    assert README.index(blocks[1]) < README.index("\n## ")  # before any section


def test_sections_follow_install_configure_check_run_operate_order() -> None:
    assert sections(README) == [
        "O que o monitor faz", "1. Instalar", "2. Configurar (`.env`)", "3. Verificar: `check`",
        "4. Rodar", "5. Operar", "6. Solução de problemas", "7. Testes",
        "8. Estrutura do projeto"]
    run = section(README, "4. Rodar")
    for needed in ("scripts/start_monitor.sh", "scripts/stop_monitor.sh",
                   "scripts/start_retry.sh", "scripts/stop_retry.sh",
                   "scripts\\start_monitor.bat", "scripts\\stop_monitor.bat",
                   "scripts\\start_retry.bat", "scripts\\stop_retry.bat",
                   "install_service.bat", "uninstall_service.bat", "NSSM",
                   "deploy/bemsoft-monitor.service", "systemctl enable --now"):
        assert needed in run, needed
    install = section(README, "1. Instalar")
    assert "build.bat" in install and "BemsoftMonitor.exe" in install
    operate = section(README, "5. Operar")
    for needed in ("bemsoft-monitor status", "### Logs", "LOG_FILE", "retry_failed.py",
                   "FAILED_DIR", "retry --refused", "REFUSED_REPORT", "mapping check",
                   "catalog sync", "Painel"):
        assert needed in operate, needed
    assert "bemsoft-monitor check" in section(README, "3. Verificar: `check`")
    assert "[docs/operacao.md](docs/operacao.md)" in README


def _command_lines() -> list[list[str]]:
    lines = []
    for block in re.findall(r"```(?:bash|batch)?\n(.*?)```", README, flags=re.S):
        for raw in block.splitlines():
            line = raw.split("  #")[0].strip()
            for prefix, implied in (("bemsoft-monitor ", []), ("python retry_failed.py", ["retry"]),
                                    ("python main.py", ["run"])):
                if line.startswith(prefix):
                    words = shlex.split(line[len(prefix):].replace("\\", "/"))
                    lines.append(implied + words)
    return lines


def test_every_command_and_option_shown_exists() -> None:
    root: Any = cli_command()
    seen = _command_lines()
    assert len(seen) > 15
    for words in seen:
        command = root
        options: set[str] = set()
        for word in (w.strip("[]") for w in words):
            sub = getattr(command, "commands", {}).get(word)
            if sub is not None and not options:
                command = sub
                continue
            if word.startswith("--"):
                options.add(word.split("=")[0])
        known = {opt for param in command.params for opt in param.opts}
        assert options <= known, (words, options - known)


def test_every_variable_named_is_a_setting() -> None:
    settings = {name.upper() for name in Settings.model_fields}
    named = set(re.findall(r"`([A-Z][A-Z0-9]*_[A-Z0-9_]+)", README))
    unknown = {n for n in named if n not in settings
               and not any(n.startswith(x) for x in NOT_SETTINGS)}
    assert not unknown, unknown


def test_links_and_anchors_lead_somewhere() -> None:
    anchors = {slug(h) for h in sections(OPERACAO)}
    local = {slug(h) for level in ("## ", "### ") for h in sections(README, level)}
    for target in re.findall(r"\]\(([^)]+)\)", README):
        if target.startswith("http"):
            continue
        path, _, anchor = target.partition("#")
        if path:
            assert (REPO / path).exists(), target
        if anchor:
            assert anchor in (anchors if path == "docs/operacao.md" else local), target


def test_systemd_unit_points_to_steps_that_exist() -> None:
    unit = (REPO / "deploy" / "bemsoft-monitor.service").read_text(encoding="utf-8")
    assert 'README.md, seção "Serviço do Linux (systemd)"' in unit
    assert "### Serviço do Linux (systemd)" in README
    assert 'docs/operacao.md, seção "6. Serviço do Linux (systemd)"' in unit
    assert "## 6. Serviço do Linux (systemd)" in OPERACAO
    steps = section(README, "4. Rodar")
    for command in ("sudo useradd --system --home-dir /opt/bemsoft-monitor --shell "
                    "/usr/sbin/nologin bemsoft", "sudo cp deploy/bemsoft-monitor.service "
                    "/etc/systemd/system/", "journalctl -u bemsoft-monitor -f"):
        assert command in unit and command in steps, command
