@echo off
rem Para o reprocessamento de falhas iniciado por scripts\start_retry.bat.
rem   Uso: scripts\stop_retry.bat
rem Envia Ctrl+C ao processo (parada segura); se ele não parar em 30 s
rem (ou BEMSOFT_STOP_TIMEOUT_S), força o encerramento (taskkill /F).
setlocal EnableExtensions DisableDelayedExpansion
for /f "tokens=2 delims=:." %%c in ('chcp') do set /a "OLD_CP=%%c" >nul 2>&1
chcp 65001 >nul

set "NAME=Reprocessamento de falhas"
set "PID_FILE=run\retry.pid"
set "TIMEOUT_S=30"
if defined BEMSOFT_STOP_TIMEOUT_S set "TIMEOUT_S=%BEMSOFT_STOP_TIMEOUT_S%"
cd /d "%~dp0.."

set "RC=0"
if exist "%PID_FILE%" goto have_pid_file
echo %NAME% não está em execução.
goto end

:have_pid_file
set "PID="
set /p PID=<"%PID_FILE%"
call :is_running
if not errorlevel 1 goto stop
del /q "%PID_FILE%" >nul 2>&1
echo %NAME% não está em execução (arquivo de PID antigo removido).
goto end

:stop
echo Parando %NAME% (PID %PID%)...
rem Ctrl+C reaches the process through its (hidden) console, like NSSM's console stop;
rem taskkill without /F only closes the console window, which ends Python abruptly.
set "TARGET_PID=%PID%"
powershell -NoProfile -ExecutionPolicy Bypass -Command "Add-Type -Namespace BemsoftStop -Name Console -MemberDefinition '[DllImport(\"kernel32.dll\")] public static extern bool FreeConsole(); [DllImport(\"kernel32.dll\")] public static extern bool AttachConsole(uint id); [DllImport(\"kernel32.dll\")] public static extern bool SetConsoleCtrlHandler(System.IntPtr h, bool add); [DllImport(\"kernel32.dll\")] public static extern bool GenerateConsoleCtrlEvent(uint ev, uint group);'; [void][BemsoftStop.Console]::FreeConsole(); if (-not [BemsoftStop.Console]::AttachConsole([uint32]$env:TARGET_PID)) { exit 1 }; [void][BemsoftStop.Console]::SetConsoleCtrlHandler([System.IntPtr]::Zero, $true); [void][BemsoftStop.Console]::GenerateConsoleCtrlEvent(0, 0); [void][BemsoftStop.Console]::FreeConsole(); exit 0" >nul 2>&1
if errorlevel 1 taskkill /T /PID %PID% >nul 2>&1

set /a WAITED_S=0
:wait_loop
call :is_running
if errorlevel 1 goto stopped
if %WAITED_S% GEQ %TIMEOUT_S% goto force
ping -n 2 127.0.0.1 >nul
set /a WAITED_S+=1
goto wait_loop

:force
echo AVISO: %NAME% não parou em %TIMEOUT_S% s; forçando o encerramento (taskkill /F). 1>&2
taskkill /F /T /PID %PID% >nul 2>&1

:stopped
del /q "%PID_FILE%" >nul 2>&1
echo %NAME% parado.
goto end

rem Sets errorlevel 0 when PID is a live cmd.exe (our wrapper), 1 otherwise (guards PID reuse).
:is_running
if not defined PID exit /b 1
tasklist /FI "PID eq %PID%" /FI "IMAGENAME eq cmd.exe" /FO CSV /NH 2>nul | find """%PID%""" >nul
exit /b %ERRORLEVEL%

:end
if defined OLD_CP chcp %OLD_CP% >nul
exit /b %RC%
