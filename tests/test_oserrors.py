"""File-system and JSON errors in Portuguese: the reason, the path and the right fix."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from bemsoft_monitor.oserrors import json_error_text, os_error_fix, os_error_text


def raised(action: object) -> OSError:
    with pytest.raises(OSError) as info:
        action()  # type: ignore[operator]
    return info.value


def test_real_file_system_errors_read_in_portuguese(tmp_path: Path) -> None:
    a_file = tmp_path / "arquivo"
    a_file.write_text("x", encoding="utf-8")
    cases = {
        "não existe": raised((tmp_path / "nada.json").read_bytes),
        "uma parte do caminho é um arquivo, não uma pasta": raised(
            lambda: (a_file / "sub" / "x").mkdir(parents=True)),
        "já existe um arquivo com esse nome onde deveria haver uma pasta": raised(
            lambda: a_file.mkdir(parents=True, exist_ok=True)),
        "é uma pasta, não um arquivo": raised(tmp_path.read_bytes),
    }
    for reason, exc in cases.items():
        text = os_error_text(exc)
        assert text.startswith(reason), (reason, text)
        assert str(exc.filename) in text
        assert exc.strerror not in text  # never the C library's English
        assert os_error_fix(exc, windows=False) == "confira o caminho"


@pytest.mark.parametrize(("number", "reason", "fix"), [
    (errno.EACCES, "sem permissão de acesso", "ajuste as permissões ou escolha outra pasta"),
    (errno.EROFS, "o disco ou a pasta é somente leitura", "escolha uma pasta gravável"),
    (errno.ENOSPC, "disco cheio", "libere espaço em disco"),
])
def test_errors_that_need_a_person(number: int, reason: str, fix: str) -> None:
    exc = OSError(number, os.strerror(number), "/dados/relatorio.csv")
    assert os_error_text(exc) == f"{reason}: /dados/relatorio.csv"
    assert os_error_fix(exc, windows=False) == fix


def test_excel_is_suggested_only_for_a_locked_file_on_windows() -> None:
    denied = PermissionError(errno.EACCES, "Permission denied", "mapeamento.csv")
    assert "Excel" in os_error_fix(denied, windows=True)
    assert "Excel" not in os_error_fix(denied, windows=False)
    exists = FileExistsError(errno.EEXIST, "File exists", "relatorios")
    assert "Excel" not in os_error_fix(exists, windows=True)


def test_json_errors_name_line_and_column_in_portuguese() -> None:
    with pytest.raises(json.JSONDecodeError) as cut:
        json.loads('{"reason": "x", "event": {')
    assert json_error_text(cut.value) == ("JSON inválido na linha 1, coluna 27 (o conteúdo "
                                          "termina no meio (arquivo cortado?))")
    with pytest.raises(json.JSONDecodeError) as comma:
        json.loads('{"a": 1,\n}')
    assert json_error_text(comma.value) == ("JSON inválido na linha 2, coluna 1 (a chave deve "
                                            "estar entre aspas duplas (vírgula sobrando antes "
                                            "de '}'?))")
