#!/usr/bin/env bash
# Inicia o Bemsoft Monitor em segundo plano.
#   Uso: bash scripts/start_monitor.sh [opções do "run", ex.: --verbose]
#   Log: logs/monitor.log    PID: run/monitor.pid    Parar: bash scripts/stop_monitor.sh
# Pode ser executado de qualquer pasta e mais de uma vez (não inicia uma segunda cópia).
set -eu

NAME="Bemsoft Monitor"
ENTRY="main.py"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PID_FILE="run/monitor.pid"
LOG_FILE="logs/monitor.log"
START_WAIT_S="${BEMSOFT_START_WAIT_S:-20}"
cd "$ROOT"

# True when $1 is a live process started from our entry script (guards against PID reuse).
is_ours() {
    kill -0 "$1" 2>/dev/null || return 1
    command -v ps >/dev/null 2>&1 || return 0
    ps -p "$1" -o args= 2>/dev/null | grep -q -- "$ENTRY"
}

if [ -x .venv/bin/python ]; then
    PYTHON=".venv/bin/python"
else
    PYTHON="python3"
fi

# Logs and PID files only for this user: the log may hold patient data (masked) and paths.
umask 077
mkdir -p logs run

if [ -f "$PID_FILE" ]; then
    pid="$(cat "$PID_FILE" 2>/dev/null || true)"
    if [ -n "$pid" ] && is_ours "$pid"; then
        echo "$NAME já está em execução (PID $pid)."
        exit 0
    fi
    echo "Removendo arquivo de PID antigo ($PID_FILE): o processo ${pid:-?} não existe mais."
    rm -f "$PID_FILE"
fi

# Where this start's lines begin (the log may not exist yet on a first run).
LOG_OFFSET=0
if [ -f "$LOG_FILE" ]; then
    LOG_OFFSET="$(wc -c <"$LOG_FILE" | tr -d ' ')"
fi
echo "---- $(date '+%Y-%m-%d %H:%M:%S') iniciando $NAME ($PYTHON $ENTRY $*) ----" >>"$LOG_FILE"
chmod 600 "$LOG_FILE" 2>/dev/null || true  # also a log created before this version
PYTHONUNBUFFERED=1 nohup "$PYTHON" "$ENTRY" "$@" >>"$LOG_FILE" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$PID_FILE"

# Wait until the program says it started ("iniciado" in the log) or exits: a bad .env
# ends it at once (code 2), which is reported here instead of "iniciado".
waited_ds=0
while kill -0 "$pid" 2>/dev/null && [ "$waited_ds" -lt $((START_WAIT_S * 10)) ]; do
    if tail -c +"$((LOG_OFFSET + 1))" "$LOG_FILE" 2>/dev/null | grep -q "iniciado"; then
        break
    fi
    sleep 0.1
    waited_ds=$((waited_ds + 1))
done
if ! kill -0 "$pid" 2>/dev/null; then
    rm -f "$PID_FILE"
    rc=0
    wait "$pid" || rc=$?
    if [ "$rc" -eq 0 ]; then
        echo "$NAME já terminou (código 0). Log: $LOG_FILE"
        exit 0
    fi
    echo "ERRO: $NAME encerrou logo após iniciar (código $rc). Últimas linhas de $LOG_FILE:" >&2
    tail -n 20 "$LOG_FILE" >&2
    exit 1
fi
echo "$NAME iniciado (PID $pid). Log: $LOG_FILE"
