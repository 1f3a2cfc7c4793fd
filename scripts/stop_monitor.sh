#!/usr/bin/env bash
# Para o Bemsoft Monitor iniciado por scripts/start_monitor.sh.
#   Uso: bash scripts/stop_monitor.sh
# Envia SIGTERM (o monitor termina o ciclo atual e sai com segurança); se ele não parar
# em 30 s (ou BEMSOFT_STOP_TIMEOUT_S), força com SIGKILL.
set -eu

NAME="Bemsoft Monitor"
ENTRY="main.py"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PID_FILE="run/monitor.pid"
TIMEOUT_S="${BEMSOFT_STOP_TIMEOUT_S:-30}"
cd "$ROOT"

# True when $1 is a live process started from our entry script (guards against PID reuse).
is_ours() {
    kill -0 "$1" 2>/dev/null || return 1
    command -v ps >/dev/null 2>&1 || return 0
    ps -p "$1" -o args= 2>/dev/null | grep -q -- "$ENTRY"
}

if [ ! -f "$PID_FILE" ]; then
    echo "$NAME não está em execução."
    exit 0
fi
pid="$(cat "$PID_FILE" 2>/dev/null || true)"
if [ -z "$pid" ] || ! is_ours "$pid"; then
    rm -f "$PID_FILE"
    echo "$NAME não está em execução (arquivo de PID antigo removido)."
    exit 0
fi

echo "Parando $NAME (PID $pid)..."
kill -TERM "$pid" 2>/dev/null || true
waited_ds=0
while kill -0 "$pid" 2>/dev/null && [ "$waited_ds" -lt $((TIMEOUT_S * 10)) ]; do
    sleep 0.1
    waited_ds=$((waited_ds + 1))
done
if kill -0 "$pid" 2>/dev/null; then
    echo "AVISO: $NAME não parou em ${TIMEOUT_S} s; forçando o encerramento (SIGKILL)." >&2
    kill -KILL "$pid" 2>/dev/null || true
fi
rm -f "$PID_FILE"
echo "$NAME parado."
