@echo off
rem Gera o executável único dist\BemsoftMonitor.exe (Python e bibliotecas incluídos).
rem   Uso: build.bat [extras]     ex.: build.bat mssql-python   (inclui o driver mssql-python)
rem Usa .venv\Scripts\python.exe (cria o .venv com o python do PATH se não existir),
rem instala o projeto com o PyInstaller e roda: pyinstaller --noconfirm --clean bemsoft_monitor.spec
rem Depois copie para o servidor: dist\BemsoftMonitor.exe, o .env configurado,
rem install_service.bat, uninstall_service.bat e, opcionalmente, nssm.exe.
setlocal EnableExtensions DisableDelayedExpansion
for /f "tokens=2 delims=:." %%c in ('chcp') do set /a "OLD_CP=%%c" >nul 2>&1
chcp 65001 >nul
cd /d "%~dp0"
set "RC=1"

set "EXTRAS=build"
if not "%~1"=="" set "EXTRAS=build,%~1"

if exist ".venv\Scripts\python.exe" goto have_venv
echo [1/4] Criando o ambiente virtual .venv...
where python >nul 2>&1
if not errorlevel 1 goto make_venv
echo ERRO: Python não encontrado no PATH. Instale o Python 3.10 ou mais novo ^(python.org^). 1>&2
goto end
:make_venv
python -m venv .venv
if errorlevel 1 goto fail
goto install
:have_venv
echo [1/4] Usando o ambiente virtual .venv existente.

:install
set "PY=.venv\Scripts\python.exe"
echo [2/4] Instalando o projeto e o PyInstaller (extras: %EXTRAS%)...
rem Editable install: a development .venv keeps pointing at src\.
"%PY%" -m pip install --disable-pip-version-check -q -e ".[%EXTRAS%]"
if errorlevel 1 goto fail

echo [3/4] Gerando o executável (leva alguns minutos)...
"%PY%" -m PyInstaller --noconfirm --clean bemsoft_monitor.spec
if errorlevel 1 goto fail
if not exist "dist\BemsoftMonitor.exe" goto fail

echo [4/4] Verificando o executável...
"dist\BemsoftMonitor.exe" --version
if errorlevel 1 goto fail
copy /y install_service.bat dist\ >nul
copy /y uninstall_service.bat dist\ >nul
copy /y .env.example dist\ >nul 2>&1

echo.
echo Pronto: dist\BemsoftMonitor.exe
echo A pasta dist\ também tem install_service.bat, uninstall_service.bat e .env.example.
echo Para instalar no servidor, copie a pasta dist\, crie o .env ^(a partir de .env.example^),
echo coloque o nssm.exe ^(https://nssm.cc/download^) ao lado e execute install_service.bat
echo como Administrador.
set "RC=0"
goto end

:fail
echo. 1>&2
echo ERRO: a geração do executável falhou ^(veja as mensagens acima^). 1>&2

:end
if defined OLD_CP chcp %OLD_CP% >nul
if not defined BEMSOFT_NO_PAUSE echo %CMDCMDLINE% | find /i "%~nx0" >nul && pause
exit /b %RC%
