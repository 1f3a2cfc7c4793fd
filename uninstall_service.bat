@echo off
rem Remove o serviço BemsoftMonitor (instalado por install_service.bat).
rem Execute como Administrador. Os arquivos (executável, .env, logs) não são apagados.
setlocal EnableExtensions DisableDelayedExpansion
for /f "tokens=2 delims=:." %%c in ('chcp') do set /a "OLD_CP=%%c" >nul 2>&1
chcp 65001 >nul

set "SERVICE=BemsoftMonitor"
set "HERE=%~dp0"
set "HERE=%HERE:~0,-1%"
cd /d "%HERE%"
set "RC=1"

echo === Remoção do serviço %SERVICE% ===

net session >nul 2>&1
if not errorlevel 1 goto is_admin
echo ERRO: este script precisa ser executado como Administrador. 1>&2
echo Clique com o botão direito em uninstall_service.bat e escolha "Executar como administrador". 1>&2
goto end
:is_admin

set "NSSM="
if exist "%HERE%\nssm.exe" set "NSSM=%HERE%\nssm.exe"
if not defined NSSM for /f "delims=" %%n in ('where nssm.exe 2^>nul') do if not defined NSSM set "NSSM=%%n"
if defined NSSM goto have_nssm
echo ERRO: NSSM não encontrado. 1>&2
echo Baixe o NSSM em https://nssm.cc/download e copie o nssm.exe para "%HERE%" ou para o PATH. 1>&2
echo Alternativa sem NSSM: sc stop %SERVICE% e depois sc delete %SERVICE% 1>&2
goto end
:have_nssm

"%NSSM%" status %SERVICE% >nul 2>&1
if not errorlevel 1 goto remove
echo O serviço %SERVICE% não está instalado; nada a fazer.
set "RC=0"
goto end

:remove
echo Parando o serviço %SERVICE% (o monitor termina o ciclo atual; pode levar até 20 s)...
"%NSSM%" stop %SERVICE% >nul 2>&1
"%NSSM%" remove %SERVICE% confirm
if not errorlevel 1 goto removed
echo ERRO: não foi possível remover o serviço %SERVICE%. 1>&2
echo Feche o services.msc ^(ele bloqueia a remoção^) e execute este script de novo. 1>&2
goto end

:removed
echo Serviço %SERVICE% removido. Os logs continuam em "%HERE%\logs".
set "RC=0"
goto end

:end
if defined OLD_CP chcp %OLD_CP% >nul
if not defined BEMSOFT_NO_PAUSE echo %CMDCMDLINE% | find /i "%~nx0" >nul && pause
exit /b %RC%
