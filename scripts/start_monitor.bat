@echo off
rem Inicia o Bemsoft Monitor em segundo plano (janela oculta).
rem   Uso: scripts\start_monitor.bat [opções do "run", ex.: --verbose]
rem   Log: logs\monitor.log    PID: run\monitor.pid    Parar: scripts\stop_monitor.bat
rem Pode ser executado de qualquer pasta e mais de uma vez (não inicia uma segunda cópia).
rem Usa .venv\Scripts\python.exe se existir; senão BemsoftMonitor.exe (na pasta do projeto
rem ou em dist\); senão o python do PATH.
setlocal EnableExtensions DisableDelayedExpansion
for /f "tokens=2 delims=:." %%c in ('chcp') do set /a "OLD_CP=%%c" >nul 2>&1
chcp 65001 >nul

set "NAME=Bemsoft Monitor"
set "PID_FILE=run\monitor.pid"
set "EXIT_FILE=run\monitor.exit"
set "LOG_FILE=logs\monitor.log"
cd /d "%~dp0.."

if exist ".venv\Scripts\python.exe" (
    set "APP=.venv\Scripts\python.exe main.py"
) else if exist "BemsoftMonitor.exe" (
    set "APP=BemsoftMonitor.exe run"
) else if exist "dist\BemsoftMonitor.exe" (
    set "APP=dist\BemsoftMonitor.exe run"
) else (
    set "APP=python main.py"
)
if not "%APP%"=="python main.py" goto app_found
where python >nul 2>&1
if not errorlevel 1 goto app_found
echo ERRO: Python não encontrado. Crie o ambiente .venv ^(veja o README^) ou gere o BemsoftMonitor.exe com build.bat. 1>&2
set "RC=1"
goto end
:app_found

if not exist logs mkdir logs
if not exist run mkdir run

set "PID="
if not exist "%PID_FILE%" goto start
set /p PID=<"%PID_FILE%"
call :is_running
if errorlevel 1 goto stale
echo %NAME% já está em execução (PID %PID%).
set "RC=0"
goto end

:stale
echo Removendo arquivo de PID antigo (%PID_FILE%): o processo %PID% não existe mais.
del /q "%PID_FILE%" >nul 2>&1

:start
del /q "%EXIT_FILE%" >nul 2>&1
rem How many "iniciado" lines the log already has: a new one means this start succeeded.
set "BEFORE=0"
if exist "%LOG_FILE%" for /f %%n in ('find /c "iniciado" ^< "%LOG_FILE%"') do set "BEFORE=%%n"
>>"%LOG_FILE%" echo ---- %DATE% %TIME% iniciando %NAME% (%APP%) ----
set "PYTHONUNBUFFERED=1"
set "PYTHONIOENCODING=utf-8"
rem cmd /c appends to the log and records the exit code; its PID is the one we stop.
set "RUN_LINE=%APP% %* 0<NUL 1>>%LOG_FILE% 2>&1 & echo !ERRORLEVEL!>%EXIT_FILE%"
powershell -NoProfile -ExecutionPolicy Bypass -Command "$p = Start-Process -FilePath $env:ComSpec -ArgumentList ('/d /v:on /c ' + $env:RUN_LINE) -WorkingDirectory (Get-Location).Path -WindowStyle Hidden -PassThru; [IO.File]::WriteAllText((Join-Path (Get-Location).Path $env:PID_FILE), [string]$p.Id)"
if errorlevel 1 goto start_failed
set "PID="
set /p PID=<"%PID_FILE%"

rem A bad .env makes the process exit at once (code 2): report it instead of "iniciado".
rem Wait (up to BEMSOFT_START_WAIT_S, 20 s) until the program logs "iniciado" or exits;
rem the executable alone takes a few seconds to unpack before it reads the .env.
set "START_WAIT_S=20"
if defined BEMSOFT_START_WAIT_S set "START_WAIT_S=%BEMSOFT_START_WAIT_S%"
set /a WAITED_S=0
:wait_start
call :is_running
if errorlevel 1 goto exited
set "NOW=0"
for /f %%n in ('find /c "iniciado" ^< "%LOG_FILE%"') do set "NOW=%%n"
if not "%NOW%"=="%BEFORE%" goto started
if %WAITED_S% GEQ %START_WAIT_S% goto started
ping -n 2 127.0.0.1 >nul
set /a WAITED_S+=1
goto wait_start

:exited
del /q "%PID_FILE%" >nul 2>&1
set "CODE=?"
if exist "%EXIT_FILE%" set /p CODE=<"%EXIT_FILE%"
if "%CODE%"=="0" (
    echo %NAME% já terminou ^(código 0^). Log: %LOG_FILE%
    set "RC=0"
    goto end
)
echo ERRO: %NAME% encerrou logo após iniciar (código %CODE%). Últimas linhas de %LOG_FILE%: 1>&2
powershell -NoProfile -Command "Get-Content -LiteralPath $env:LOG_FILE -Tail 20 -Encoding UTF8" 1>&2
set "RC=1"
goto end

:started
echo %NAME% iniciado (PID %PID%). Log: %LOG_FILE%
set "RC=0"
goto end

:start_failed
echo ERRO: não foi possível iniciar %NAME% (PowerShell indisponível?). 1>&2
set "RC=1"
goto end

rem Sets errorlevel 0 when PID is a live cmd.exe (our wrapper), 1 otherwise (guards PID reuse).
:is_running
if not defined PID exit /b 1
tasklist /FI "PID eq %PID%" /FI "IMAGENAME eq cmd.exe" /FO CSV /NH 2>nul | find """%PID%""" >nul
exit /b %ERRORLEVEL%

:end
if defined OLD_CP chcp %OLD_CP% >nul
exit /b %RC%
