"""BENCHMARKS.md from the JSON result (tables, targets met or not, machine, command)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

NOTES = Path(__file__).resolve().parent / "NOTES.md"


def _table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _mark(ok: bool | None) -> str:
    return "n/d" if ok is None else ("ATINGIDA" if ok else "NÃO ATINGIDA")


def targets(out: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    poll = float(out["args"]["poll_seconds"])
    default_poll = float(out["args"]["poll_seconds"])
    cells = [c for c in out["drain"] if c["latency_ms"] == 50 and c["concurrency"] <= 16
             and c["poll_seconds"] == default_poll]
    if cells:
        worst = min(cells, key=lambda c: c["ratio_sustained"])
        rows.append(["Esvaziar fila ≥ 0,8 × concorrência ÷ latência (até 16, 50 ms)",
                     _mark(all(c["ratio_sustained"] >= 0.8 for c in cells)),
                     f"pior: {worst['backend']} concorrência {worst['concurrency']} = "
                     f"{worst['ratio_sustained']} (sustentado, POLL_SECONDS={default_poll:g})"])
        fast = [c for c in out["drain"] if c["poll_seconds"] != default_poll]
        for c in fast:
            rows.append([f"… a mesma meta com POLL_SECONDS={c['poll_seconds']:g} "
                         f"({c['backend']}, concorrência {c['concurrency']})",
                         _mark(c["ratio_sustained"] >= 0.8), f"razão {c['ratio_sustained']}"])
    if out["steady"]:
        worst_s = max(out["steady"], key=lambda s: s["p95_s"])
        rows.append([f"Regime: p95 ≤ POLL_SECONDS + 1 s = {poll + 1:g} s",
                     _mark(all(s["p95_s"] <= poll + 1 for s in out["steady"])),
                     f"pior: {worst_s['backend']} p95 = {worst_s['p95_s']} s"])
    if out["idle"]:
        cpu_ok = all(i["cpu_percent_one_core"] < 1 for i in out["idle"])
        lis_ok = all(i["lis_statements_per_poll"] <= 1.0 for i in out["idle"])
        all_ok = all(i["all_statements_per_poll"] <= 1.0 for i in out["idle"])
        detail = "; ".join(
            f"{i['backend']}: {i['cpu_percent_one_core']} % CPU, LIS {i['lis_statements_per_poll']}"
            f"/leitura, LIS+estado {i['all_statements_per_poll']}/leitura" for i in out["idle"])
        rows.append(["Ocioso: < 1 % de um núcleo", _mark(cpu_ok), detail])
        rows.append(["Ocioso: uma ida ao banco por leitura (LIS)", _mark(lis_ok), detail])
        rows.append(["Ocioso: uma ida ao banco por leitura (LIS + banco de estado)",
                     _mark(all_ok), "ver nota sobre a trava (lease)"])
    big = [m for m in out["memory"] if m["backlog_items"] >= 1_000_000]
    if big:
        rows.append(["Pico de RSS < 200 MB com 1.000.000 itens na fila",
                     _mark(all(m["peak_rss_mb"] < 200 for m in big)),
                     "; ".join(f"{m['backend']}: {m['peak_rss_mb']} MB "
                               f"({m['items_ingested']} itens lidos em {m['ran_s']} s, "
                               f"{m['stop_reason']})" for m in big)])
    plan = out.get("plan")
    if plan:
        cells = [v for k, v in plan.items() if k.startswith("caught_up")]
        rows.append([f"Consultas de leitura usam o índice de CodItemSol ({plan['rows']} linhas, "
                     "PostgreSQL)", _mark(bool(cells) and all(c["uses_pkey_index"]
                                                              for c in cells)),
                     "; ".join(f"{c['query']}: {c['itemsol_access']}" for c in cells)
                     + " (também em tests/test_query_plan.py)"])
    return rows


def render(out: dict[str, Any]) -> str:
    m = out["machine"]
    a = out["args"]
    parts = [
        "# Benchmarks do Bemsoft Monitor",
        "",
        "Gerado por `python -m bench` (ou `make bench`); não edite à mão — a análise vem de "
        "`bench/NOTES.md`. Números brutos: `bench/latest.json`.",
        "",
        f"**Comando:** `{out['command'].strip()}`  ",
        f"**Início:** {out['started_utc']} UTC · **fim:** {out.get('finished_utc', '?')} UTC · "
        f"**duração:** {out.get('elapsed_s', '?')} s",
        "",
        "## Máquina",
        "",
        _table(["item", "valor"], [
            ["CPU", m["cpu_model"]], ["núcleos", m["cpu_count"]], ["RAM", f"{m['ram_gb']} GB"],
            ["sistema", m["os"]], ["Python", m["python"]], ["SQLite", m["sqlite"]],
            ["PostgreSQL", m["postgresql"] or "indisponível"], ["SQLAlchemy", m["sqlalchemy"]],
            ["requests", m["requests"]],
            ["carga (loadavg) no início", ", ".join(map(str, m["loadavg_at_start"]))],
        ]),
        "",
        "A máquina tem 2 núcleos compartilhados com outras pessoas rodando testes ao mesmo "
        "tempo: os números são conservadores e variam de uma execução para outra. Monitor, "
        "simulador e banco de dados rodam na mesma máquina (simulador e monitor em processos "
        "separados; rede só em 127.0.0.1).",
        "",
        "## Metas",
        "",
        _table(["meta", "resultado", "medido"], targets(out)),
        "",
    ]
    if NOTES.exists():
        parts += [NOTES.read_text(encoding="utf-8").strip(), ""]
    parts += [
        "## 1. Esvaziar a fila (backlog) e 5. comparação com o desenho original",
        "",
        f"Fila inicial: {a['requisitions']} solicitações × 1–8 itens já no LIS; "
        f"DEBOUNCE_SECONDS=0, POLL_SECONDS={a['poll_seconds']}, BATCH_SIZE=500. Cada célula "
        f"roda até entregar tudo ou até {a['drain_cap']} s; **células com “amostra” não "
        "esvaziaram a fila: o número é o ritmo medido nesse intervalo**, não o tempo total. "
        "“Sustentado” = pedidos entregues ÷ tempo entre a primeira e a última resposta 201 "
        "(sem a partida); “ponta a ponta” = entregues ÷ tempo desde o início do processo. "
        "Teórico = concorrência ÷ latência. O original é o desenho da versão de partida "
        "(envio sequencial, uma transação aberta no LIS durante os envios).",
        "",
    ]
    base = {(b["backend"], b["latency_ms"]): b for b in out["baseline"]}
    rows = []
    for b in out["baseline"]:
        rows.append([b["backend"], b["latency_ms"], "original (1)", b["poll_seconds"],
                     b["delivered"],
                     "completa" if b["complete"] else f"amostra {b['wall_s']} s",
                     b["orders_per_s_sustained"], b["orders_per_s_end_to_end"],
                     b["theoretical_per_s"], b["ratio_sustained"], "1,00×",
                     b["cpu_s"]])
    for c in out["drain"]:
        ref = base.get((c["backend"], c["latency_ms"]))
        vs = (f"{c['orders_per_s_sustained'] / ref['orders_per_s_sustained']:.2f}×"
              if ref and ref["orders_per_s_sustained"] else "")
        rows.append([c["backend"], c["latency_ms"], c["concurrency"], c["poll_seconds"],
                     c["delivered"],
                     "completa" if c["complete"] else f"amostra {c['wall_s']} s",
                     c["orders_per_s_sustained"], c["orders_per_s_end_to_end"],
                     c["theoretical_per_s"], c["ratio_sustained"], vs, c["cpu_s"]])
    rows.sort(key=lambda r: (r[0], r[1], 0 if isinstance(r[2], str) else r[2], -r[3]))
    parts += [_table(["banco", "latência ms", "concorrência", "POLL_SECONDS", "entregues",
                      "execução",
                      "pedidos/s sustentado", "pedidos/s ponta a ponta", "teórico/s",
                      "razão (sust./teórico)", "× original", "CPU s"], rows), ""]
    if out["baseline"]:
        parts += ["Transações do original no LIS (abertas durante os envios):", "",
                  _table(["banco", "latência ms", "transações", "maior (s)", "média (s)"],
                         [[b["backend"], b["latency_ms"], b["baseline"]["lis_transactions"],
                           b["baseline"]["max_transaction_s"],
                           b["baseline"]["mean_transaction_s"]] for b in out["baseline"]]),
                  "", "O produto não mantém transação no LIS durante chamadas HTTP "
                  "(invariante 2).", ""]
    if out["steady"]:
        s0 = out["steady"][0]
        parts += ["## 2. Regime contínuo", "",
                  f"{s0['rate_items_per_s']:g} itens/s inseridos por {s0['seconds']:g} s (uma "
                  f"solicitação de 4 itens a cada {4 / s0['rate_items_per_s']:g} s), "
                  f"DEBOUNCE_SECONDS=0, POLL_SECONDS={s0['poll_seconds']}, latência do "
                  f"simulador {s0['latency_ms']} ms, BEMSOFT_CONCURRENCY={s0['concurrency']}. "
                  "Latência = hora em que o simulador gravou o exame − hora do commit da "
                  "inserção no LIS (inclui a latência simulada).", "",
                  _table(["banco", "inseridos", "entregues", "p50 s", "p95 s", "p99 s", "máx s",
                          "CPU s"],
                         [[s["backend"], s["items_inserted"], s["items_delivered"], s["p50_s"],
                           s["p95_s"], s["p99_s"], s["max_s"], s["cpu_s"]]
                          for s in out["steady"]]), ""]
    if out["idle"]:
        i0 = out["idle"][0]
        parts += ["## 3. Ocioso", "",
                  f"Nada novo no LIS; POLL_SECONDS={i0['poll_seconds']}; janela de "
                  f"{i0['seconds']} s após {i0['warmup_s']} s de aquecimento. "
                  "CPU = `os.times()` do processo "
                  "do monitor (todas as threads) ÷ tempo. Comandos SQL contados pelo evento "
                  "`before_cursor_execute` de cada engine (no SQLite, o `BEGIN` explícito, "
                  "que roda dentro do processo, não conta); “checkouts” = conexões tiradas do "
                  "pool (sem ping: uma conexão que o servidor fechou é trocada na primeira "
                  "falha).", "",
                  _table(["banco", "leituras", "CPU % de 1 núcleo", "SQL LIS/min",
                          "SQL estado/min", "checkouts LIS/min", "checkouts estado/min",
                          "SQL LIS/leitura", "SQL total/leitura", "chamadas HTTP"],
                         [[i["backend"], i["polls"], i["cpu_percent_one_core"],
                           i["lis_statements_per_min"], i["state_statements_per_min"],
                           i["lis_checkouts_per_min"], i["state_checkouts_per_min"],
                           i["lis_statements_per_poll"], i["all_statements_per_poll"],
                           i["http_calls"]] for i in out["idle"]]), ""]
    if out["memory"]:
        parts += ["## 4. Memória", "",
                  "O monitor roda num processo próprio sobre a fila; pico de RSS = `VmHWM` de "
                  "`/proc/self/status` no fim do processo. Para chegar ao fim da fila no tempo "
                  f"do benchmark usa POLL_SECONDS={a['memory_poll']}; DEBOUNCE_SECONDS="
                  f"{a['memory_debounce']} (com o padrão do produto, 300 s, a fila inteira é lida "
                  "antes do primeiro envio: é a fase em que ler tudo de uma vez estouraria a "
                  "memória); "
                  f"latência 50 ms, concorrência 4, no máximo {a['memory_cap']} s; a coluna "
                  "“parada” diz se a fila inteira foi lida.", "",
                  _table(["banco", "itens na fila", "solicitações", "itens lidos", "executou s",
                          "parada", "pedidos", "pico RSS MB"],
                         [[x["backend"], x["backlog_items"], x["backlog_requisitions"],
                           x["items_ingested"], x["ran_s"], x["stop_reason"],
                           ", ".join(f"{k}={v}" for k, v in sorted(x["orders"].items())),
                           x["peak_rss_mb"]] for x in out["memory"]]), ""]
    plan = out.get("plan")
    if plan:
        parts += ["## Plano da consulta de leitura (PostgreSQL)", "",
                  "As duas consultas de uma leitura, compiladas para PostgreSQL, `ItemSol` com "
                  f"{plan['rows']} linhas (ANALYZE feito): `LisSource.visible_ids_query` "
                  "(quais CodItemSol existem acima do checkpoint; roda a cada leitura, mesmo "
                  "ociosa) e `LisSource.new_items_query` (os itens do laboratório dentro da "
                  "janela devolvida).", ""]
        for name, title in (("caught_up", "monitor em dia"), ("cold_start", "partida do zero")):
            for query in ("ids", "items"):
                p = plan.get(f"{name}_{query}")
                if p is None:
                    continue
                parts += [f"**{title}, {query}** (CodItemSol > {p['after_id']}): ItemSol lido "
                          f"por {p['itemsol_access']}", "", "```", p["plan"], "```", ""]
    prof = out.get("profile")
    if prof:
        parts += ["## Perfil (cProfile) da thread do laço do monitor", "",
                  f"{prof['backend']}, {prof['latency_ms']} ms, concorrência "
                  f"{prof['concurrency']}: {prof['orders_per_s_sustained']} pedidos/s "
                  "sustentado sob o perfilador (que deixa o laço mais lento).", "",
                  _table(["função", "chamadas", "tempo próprio s", "tempo acumulado s"],
                         [[f"`{r['file']}` {r['function'].split(' ', 1)[1]}", r["calls"],
                           r["tottime_s"], r["cumtime_s"]] for r in prof["top"]]), ""]
    return "\n".join(parts) + "\n"
