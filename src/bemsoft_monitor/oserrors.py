"""File-system and JSON errors in Portuguese: the reason and the fix, never Python's English.

``OSError.strerror`` is the C library's English text ("Not a directory", "File exists");
every message a person reads about a file or folder is built here from the ``errno``.
"""

from __future__ import annotations

import errno
import json
import sys

__all__ = [
    "json_error_reason",
    "json_error_text",
    "os_error_fix",
    "os_error_reason",
    "os_error_text",
]

#: Reason per errno, in Portuguese.
_REASONS: dict[int, str] = {
    errno.ENOENT: "não existe",
    errno.EACCES: "sem permissão de acesso",
    errno.EPERM: "operação não permitida",
    errno.EEXIST: "já existe um arquivo com esse nome onde deveria haver uma pasta",
    errno.ENOTDIR: "uma parte do caminho é um arquivo, não uma pasta",
    errno.EROFS: "o disco ou a pasta é somente leitura",
    errno.ENOSPC: "disco cheio",
    errno.EISDIR: "é uma pasta, não um arquivo",
    errno.ENAMETOOLONG: "nome ou caminho longo demais",
    errno.EBUSY: "em uso por outro programa",
    errno.EDQUOT: "cota de disco esgotada",
}
#: Windows errors without a POSIX errno of their own (ERROR_SHARING_VIOLATION, LOCK_VIOLATION).
_WINDOWS_SHARING = (32, 33)


def os_error_reason(exc: OSError) -> str:
    """What went wrong, in Portuguese, from the errno alone ('disco cheio')."""
    if getattr(exc, "winerror", None) in _WINDOWS_SHARING:
        return "o arquivo está aberto em outro programa"
    reason = _REASONS.get(exc.errno or 0)
    if reason is not None:
        return reason
    name = errno.errorcode.get(exc.errno or 0)
    return f"erro do sistema de arquivos ({name})" if name else (
        f"erro do sistema de arquivos ({type(exc).__name__})")


def os_error_text(exc: OSError) -> str:
    """The reason with the path it is about: 'uma parte do caminho é um arquivo… (/x/y)'."""
    reason = os_error_reason(exc)
    return f"{reason}: {exc.filename}" if exc.filename else reason


def os_error_fix(exc: OSError, *, windows: bool | None = None) -> str:
    """What a person can do about it; Excel is named only where it locks files (Windows)."""
    windows = sys.platform == "win32" if windows is None else windows
    number = exc.errno or 0
    if getattr(exc, "winerror", None) in _WINDOWS_SHARING or (
            windows and number in (errno.EACCES, errno.EPERM, errno.EBUSY)):
        return ("feche o arquivo se estiver aberto no Excel ou em outro programa, ou ajuste "
                "as permissões")
    if number in (errno.EACCES, errno.EPERM):
        return "ajuste as permissões ou escolha outra pasta"
    if number in (errno.ENOSPC, errno.EDQUOT):
        return "libere espaço em disco"
    if number == errno.EROFS:
        return "escolha uma pasta gravável"
    if number == errno.EBUSY:
        return "feche o programa que está usando o arquivo"
    return "confira o caminho"


_JSON_REASONS = {
    "Expecting value": "valor esperado (vírgula sobrando ou texto sem aspas?)",
    "Expecting ',' delimiter": "falta uma vírgula entre os itens",
    "Expecting ':' delimiter": "falta ':' entre a chave e o valor",
    "Expecting property name enclosed in double quotes": (
        "a chave deve estar entre aspas duplas (vírgula sobrando antes de '}'?)"
    ),
    "Extra data": "conteúdo depois do fim do objeto JSON",
    "Unterminated string starting at": "texto sem as aspas de fechamento",
    "Invalid control character at": "quebra de linha ou caractere de controle dentro de um texto",
    "Invalid \\escape": "barra invertida inválida (use / ou \\\\)",
}


def json_error_reason(exc: json.JSONDecodeError) -> str | None:
    """Portuguese for the decoder's English message; None when it is not a known one."""
    return _JSON_REASONS.get(exc.msg)


def json_error_text(exc: json.JSONDecodeError) -> str:
    """'JSON inválido na linha L, coluna C (reason)'; the file may be cut or hand-edited."""
    text = f"JSON inválido na linha {exc.lineno}, coluna {exc.colno}"
    if exc.doc.strip() and exc.pos >= len(exc.doc.rstrip()):
        reason: str | None = "o conteúdo termina no meio (arquivo cortado?)"
    else:
        reason = json_error_reason(exc)
    return f"{text} ({reason})" if reason else text
