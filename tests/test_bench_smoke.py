"""The benchmark runs end to end with tiny sizes and writes its JSON and markdown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("drain", "baseline", "steady", "idle", "memory")


def test_bench_quick_writes_json_and_markdown_with_every_scenario(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    out_md = tmp_path / "BENCHMARKS.md"
    env = {k: v for k, v in os.environ.items() if k != "BEMSOFT_ENV_FILE"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src")])
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--backends", "sqlite",
         "--json", str(out_json), "--markdown", str(out_md), "--workdir", str(tmp_path / "w")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out_json.read_text(encoding="utf-8"))
    for key in SCENARIOS:
        assert data[key], f"cenário {key} vazio no JSON"
    drain = data["drain"][0]
    assert drain["complete"] and drain["delivered"] == drain["requisitions"] > 0
    assert drain["failed_calls"] == 0
    assert data["baseline"][0]["delivered"] == data["baseline"][0]["requisitions"]
    steady = data["steady"][0]
    assert steady["items_delivered"] == steady["items_inserted"] > 0
    assert 0 < steady["p50_s"] <= steady["p95_s"] <= steady["p99_s"]
    idle = data["idle"][0]
    assert idle["polls"] > 0 and idle["lis_statements_per_min"] > 0 and idle["http_calls"] == 0
    memory = data["memory"][0]
    assert memory["stop_reason"] == "backlog ingested"
    assert memory["items_ingested"] == memory["backlog_items"]
    assert memory["peak_rss_mb"] > 10
    if data["postgres_problem"] is None:
        assert data["plan"]["caught_up_ids"]["uses_pkey_index"]
        assert data["plan"]["caught_up_items"]["uses_pkey_index"]
    md = out_md.read_text(encoding="utf-8")
    for heading in ("## Máquina", "## Metas", "## 1. Esvaziar a fila", "## 2. Regime contínuo",
                    "## 3. Ocioso", "## 4. Memória", "original (1)"):
        assert heading in md, heading
    assert data["machine"]["cpu_count"] and data["machine"]["sqlite"]
