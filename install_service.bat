@echo off
rem Instala o Bemsoft Monitor como serviço do Windows (nome: BemsoftMonitor) usando o NSSM.
rem Execute como Administrador, na pasta que contém:
rem   BemsoftMonitor.exe (gerado por build.bat), .env (configurado), este arquivo e,
rem   opcionalmente, nssm.exe (https://nssm.cc/download).
rem Sem BemsoftMonitor.exe, o serviço usa o Python (.venv\Scripts\python.exe ou o do PATH)
rem com main.py desta pasta.
rem O serviço inicia com o Windows, reinicia 10 s após uma falha e grava
rem logs\service_output.log e logs\service_error.log (com rotação a cada 10 MB).
rem Pode ser executado de novo para atualizar a configuração de um serviço já instalado.
setlocal EnableExtensions DisableDelayedExpansion
for /f "tokens=2 delims=:." %%c in ('chcp') do set /a "OLD_CP=%%c" >nul 2>&1
chcp 65001 >nul

set "SERVICE=BemsoftMonitor"
set "HERE=%~dp0"
set "HERE=%HERE:~0,-1%"
cd /d "%HERE%"
set "RC=1"

echo === Instalação do serviço %SERVICE% ===

net session >nul 2>&1
if not errorlevel 1 goto is_admin
echo ERRO: este script precisa ser executado como Administrador. 1>&2
echo Clique com o botão direito em install_service.bat e escolha "Executar como administrador". 1>&2
goto end
:is_admin

rem NSSM: beside this script first, then on PATH.
set "NSSM="
if exist "%HERE%\nssm.exe" set "NSSM=%HERE%\nssm.exe"
if not defined NSSM for /f "delims=" %%n in ('where nssm.exe 2^>nul') do if not defined NSSM set "NSSM=%%n"
if defined NSSM goto have_nssm
echo ERRO: NSSM não encontrado. 1>&2
echo Baixe o NSSM em https://nssm.cc/download e copie o nssm.exe ^(pasta win64^) para 1>&2
echo "%HERE%" ou para uma pasta do PATH; depois execute este script de novo. 1>&2
goto end
:have_nssm
echo NSSM: %NSSM%

rem The application: the executable beside this script, else Python with main.py.
if not exist "%HERE%\BemsoftMonitor.exe" goto use_python
set "APP=%HERE%\BemsoftMonitor.exe"
set "APP_ARGS=run"
goto have_app
:use_python
if exist "%HERE%\main.py" goto find_python
echo ERRO: BemsoftMonitor.exe não encontrado em "%HERE%". 1>&2
echo Gere o executável com build.bat ^(fica em dist\BemsoftMonitor.exe^) e copie-o para esta pasta. 1>&2
goto end
rem The full path of the interpreter: the service account does not have the user's PATH.
:find_python
if not exist "%HERE%\.venv\Scripts\python.exe" goto path_python
set "APP=%HERE%\.venv\Scripts\python.exe"
goto python_found
:path_python
set "APP="
for /f "delims=" %%p in ('python -c "import sys; print(sys.executable)" 2^>nul') do set "APP=%%p"
if defined APP goto python_found
echo ERRO: nem BemsoftMonitor.exe nem Python encontrados. Gere o executável com build.bat. 1>&2
goto end
:python_found
set "APP_ARGS=main.py run"
:have_app
echo Aplicativo: %APP% %APP_ARGS%

if exist "%HERE%\.env" goto have_env
echo ERRO: arquivo .env não encontrado em "%HERE%". 1>&2
echo Copie .env.example para .env, configure-o e execute este script de novo. 1>&2
goto end
:have_env

if not exist "%HERE%\logs" mkdir "%HERE%\logs"

"%NSSM%" status %SERVICE% >nul 2>&1
if errorlevel 1 goto install
echo O serviço %SERVICE% já existe: parando para atualizar a configuração...
"%NSSM%" stop %SERVICE% >nul 2>&1
goto configure

:install
"%NSSM%" install %SERVICE% "%APP%" >nul
if not errorlevel 1 goto configure
echo ERRO: não foi possível criar o serviço %SERVICE% ^(nssm install falhou^). 1>&2
goto end

:configure
set "FAILED="
call :nssm_set Application "%APP%"
call :nssm_set AppParameters "%APP_ARGS%"
call :nssm_set AppDirectory "%HERE%"
call :nssm_set DisplayName "Bemsoft Monitor"
call :nssm_set Description "Envia pedidos de exames do LIS para a API Bemsoft (laboratórios de apoio)."
call :nssm_set Start SERVICE_AUTO_START
rem Restart 10 s after any exit, except code 2 (invalid .env): restarting cannot fix it.
call :nssm_set AppExit Default Restart
call :nssm_set AppExit 2 Exit
call :nssm_set AppRestartDelay 10000
call :nssm_set AppStdout "%HERE%\logs\service_output.log"
call :nssm_set AppStderr "%HERE%\logs\service_error.log"
call :nssm_set AppStdoutCreationDisposition 4
call :nssm_set AppStderrCreationDisposition 4
call :nssm_set AppRotateFiles 1
call :nssm_set AppRotateOnline 1
call :nssm_set AppRotateBytes 10485760
rem Stop = Ctrl+C: the monitor waits for in-flight sends (SHUTDOWN_GRACE_SECONDS, 15 s)
rem and exits cleanly; NSSM gives it 20 s before trying harder.
call :nssm_set AppStopMethodSkip 0
call :nssm_set AppStopMethodConsole 20000
call :nssm_set AppStopMethodWindow 1500
call :nssm_set AppStopMethodThreads 1500
call :nssm_set AppEnvironmentExtra PYTHONUNBUFFERED=1 PYTHONIOENCODING=utf-8
if not defined FAILED goto start_service
echo ERRO: a configuração do serviço falhou ^(veja as mensagens acima^). 1>&2
goto end

:start_service
echo Iniciando o serviço %SERVICE%...
"%NSSM%" start %SERVICE%
ping -n 4 127.0.0.1 >nul
"%NSSM%" status %SERVICE% | find /i "SERVICE_RUNNING" >nul
if not errorlevel 1 goto running
echo ERRO: o serviço %SERVICE% não ficou em execução. 1>&2
echo Veja "%HERE%\logs\service_error.log" ^(um .env inválido aparece ali^). 1>&2
goto end

:running
echo.
echo Serviço %SERVICE% instalado e em execução.
echo   Logs:      %HERE%\logs\service_output.log e service_error.log
echo   Status:    sc query %SERVICE%
echo   Parar:     sc stop %SERVICE%      Iniciar: sc start %SERVICE%
echo   Remover:   uninstall_service.bat
set "RC=0"
goto end

:nssm_set
"%NSSM%" set %SERVICE% %* >nul
if errorlevel 1 (
    echo ERRO: nssm set %SERVICE% %1 falhou. 1>&2
    set "FAILED=1"
)
exit /b 0

:end
if defined OLD_CP chcp %OLD_CP% >nul
if not defined BEMSOFT_NO_PAUSE echo %CMDCMDLINE% | find /i "%~nx0" >nul && pause
exit /b %RC%
