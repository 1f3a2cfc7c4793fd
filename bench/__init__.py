"""Benchmark of Bemsoft Monitor: backlog drain, steady state, idle cost, memory, baseline.

Run with ``python -m bench`` (or ``make bench``); writes ``BENCHMARKS.md`` and
``bench/latest.json``. Each monitor (and the baseline) runs in a child process
(``python -m bench.worker``) so CPU time and peak RSS are its own; the Bemsoft simulator
runs in another child process on loopback with a configurable latency.
"""
