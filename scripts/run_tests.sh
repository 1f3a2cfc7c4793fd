#!/usr/bin/env bash
# Instala tudo o que a suíte de testes precisa e roda a suíte inteira.
# Uso: bash scripts/run_tests.sh [argumentos extras do pytest]
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"

# 1. Pacotes do sistema (Debian/Ubuntu, como root): driver ODBC (pyodbc), FreeTDS,
#    Chromium e ChromeDriver para o teste do painel no navegador.
need=()
command -v odbcinst >/dev/null 2>&1 || need+=(unixodbc)
[ -e /usr/lib/x86_64-linux-gnu/odbc/libtdsodbc.so ] || [ -e /usr/lib/aarch64-linux-gnu/odbc/libtdsodbc.so ] || need+=(tdsodbc)
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "Instalando pacotes do sistema: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "Aviso: faltam pacotes do sistema (${need[*]}); os testes que dependem deles serão pulados." >&2
  fi
fi

# 2. PostgreSQL local (os testes usam 127.0.0.1:5432, usuário postgres, banco test).
if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 -p 5432; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    echo "Iniciando o PostgreSQL local"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
  fi
fi

# 3. Ambiente virtual com o projeto e as dependências de teste e de build.
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,build,mssql-python]"

# 4. A suíte inteira.
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
