@echo off
rem Inicia o reprocessamento de falhas (retry_failed.py --send) em segundo plano (janela oculta).
rem   Uso: scripts\start_retry.bat [PASTA] [outras opções do retry, ex.: --limit 10]
rem   PASTA: eventos com falha a reenviar (padrão: FAILED_DIR do .env, completo\failed_events)
rem   Log: logs\retry.log    PID: run\retry.pid    Parar: scripts\stop_retry.bat
rem Pode ser executado de qualquer pasta e mais de uma vez (não inicia uma segunda cópia).
rem Usa .venv\Scripts\python.exe se existir; senão BemsoftMonitor.exe (na pasta do projeto
rem ou em dist\); senão o python do PATH.
setlocal EnableExtensions DisableDelayedExpansion
for /f "tokens=2 delims=:." %%c in ('chcp') do set /a "OLD_CP=%%c" >nul 2>&1
chcp 65001 >nul

set "NAME=Reprocessamento de falhas"
set "PID_FILE=run\retry.pid"
set "EXIT_FILE=run\retry.exit"
set "LOG_FILE=logs\retry.log"
rem A relative folder is relative to where the user ran the script, not to the project.
set "ARGS=--send"
set "FIRST=%~1"
if not defined FIRST goto args_done
if "%FIRST:~0,1%"=="-" goto args_rest
for %%d in ("%FIRST%") do set "ARGS=--dir "%%~fd" --send"
shift /1
:args_rest
if "%~1"=="" goto args_done
set ARGS=%ARGS% %1
shift /1
goto args_rest
:args_done
cd /d "%~dp0.."

if exist ".venv\Scripts\python.exe" (
    set "APP=.venv\Scripts\python.exe retry_failed.py"
) else if exist "BemsoftMonitor.exe" (
    set "APP=BemsoftMonitor.exe retry"
) else if exist "dist\BemsoftMonitor.exe" (
    set "APP=dist\BemsoftMonitor.exe retry"
) else (
    set "APP=python retry_failed.py"
)
if not "%APP%"=="python retry_failed.py" goto app_found
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
>>"%LOG_FILE%" echo ---- %DATE% %TIME% iniciando %NAME% (%APP% %ARGS%) ----
set "PYTHONUNBUFFERED=1"
set "PYTHONIOENCODING=utf-8"
rem cmd /c appends to the log and records the exit code; its PID is the one we stop.
set "RUN_LINE=%APP% %ARGS% 0<NUL 1>>%LOG_FILE% 2>&1 & echo !ERRORLEVEL!>%EXIT_FILE%"
powershell -NoProfile -ExecutionPolicy Bypass -Command "$p = Start-Process -FilePath $env:ComSpec -ArgumentList ('/d /v:on /c ' + $env:RUN_LINE) -WorkingDirectory (Get-Location).Path -WindowStyle Hidden -PassThru; [IO.File]::WriteAllText((Join-Path (Get-Location).Path $env:PID_FILE), [string]$p.Id)"
if errorlevel 1 goto start_failed
set "PID="
set /p PID=<"%PID_FILE%"

rem A short retry may already be done; a bad .env exits at once with code 2.
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
