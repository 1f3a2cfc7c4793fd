"""Map and material files as labs really write them, and maps re-read while the monitor runs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from bemsoft_monitor.catalog import (
    Catalog,
    MapReloader,
    Resolver,
    load_material_map,
    load_test_map,
    parse_catalog_report,
)
from bemsoft_monitor.errors import MapFileError
from bemsoft_monitor.models import CatalogEntry, LisItem

GLI_PLASMA = CatalogEntry("GLI", "GLICOSE", "PLASMA", "Plasma fluoretado")
GLI_URINA = CatalogEntry("GLI", "GLICOSE (URINA)", "URINA", "Urina")


# --- encodings Excel and Notepad produce --------------------------------------------------------


def test_excel_unicode_text_utf16_with_tabs_is_read(tmp_path: Path) -> None:
    path = tmp_path / "materiais.txt"
    path.write_bytes("Código\tMaterial\r\nÁCIDO ÚRICO\tSôro\r\n".encode("utf-16"))
    assert load_material_map(path) == {"ácido úrico": "Sôro"}


def test_utf16_without_bom_is_refused_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "materiais.csv"
    path.write_bytes("GLI;Plasma\r\n".encode("utf-16-le"))
    with pytest.raises(MapFileError) as info:
        load_material_map(path)
    message = str(info.value)
    assert f"arquivo {path}, linha 1" in message
    assert "UTF-16" in message and "BEMSOFT_MATERIAL_MAP_PATH" in message


def test_mixed_utf8_and_windows_1252_names_the_line_instead_of_garbling(tmp_path: Path) -> None:
    path = tmp_path / "materiais.csv"
    path.write_bytes("GLI;Plasma\r\nÁCIDO ÚRICO;Soro\r\n".encode()
                     + "FÓSFORO;Soro\r\n".encode("cp1252"))
    with pytest.raises(MapFileError) as info:
        load_material_map(path)
    message = str(info.value)
    assert f"arquivo {path}, linha 3" in message
    assert "mistura UTF-8" in message


def test_a_byte_neither_utf8_nor_windows_1252_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "tests_map.json"
    path.write_bytes(b'{\n  "A": "B",\n  "C\x81": "D"\n}\n')
    with pytest.raises(MapFileError, match=r"linha 3: codificação não reconhecida \(byte 0x81"):
        load_test_map(path)


def test_windows_1252_csv_from_excel_with_accents_and_prefixes_resolves(tmp_path: Path) -> None:
    path = tmp_path / "materiais.csv"
    path.write_bytes("Código;Material;Observação\r\nGLICOSE;0.Urina;coleta às 8h\r\n"
                     .encode("cp1252"))
    material_map = load_material_map(path)
    resolver = Resolver(catalog=Catalog([GLI_PLASMA, GLI_URINA]), test_map={"glicose": "GLI"},
                        material_map=material_map, code_source="convexames",
                        variant_policy="refuse", dry_run=False)
    res = resolver.resolve(LisItem(item_id=1, requisition_id=1, conv_code=" glicose "))
    assert (res.status, res.test_id, res.specimen_id) == ("ok", "GLI", "URINA")


# --- JSON messages name the line ----------------------------------------------------------------


def test_a_bad_value_in_the_json_map_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "tests_map.json"
    path.write_text('{\n  "HEMOGRAMA": "HMG",\n  "GLICOSE": 123\n}\n', encoding="utf-8")
    with pytest.raises(MapFileError, match=rf'arquivo {path}, linha 3, chave "GLICOSE"'):
        load_test_map(path)


def test_a_repeated_key_names_the_line_of_the_second_one(tmp_path: Path) -> None:
    path = tmp_path / "tests_map.json"
    path.write_text('{\n  "GLI": "GLU",\n  "FE": "FE",\n  "GLI": "GLI"\n}\n', encoding="utf-8")
    with pytest.raises(MapFileError, match=r"linha 4, chave \"GLI\": aparece mais de uma vez"):
        load_test_map(path)


def test_a_csv_given_as_the_json_map_says_it_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "tests_map.json"
    path.write_text("HEMOGRAMA;HMG\n", encoding="utf-8")
    with pytest.raises(MapFileError) as info:
        load_test_map(path)
    message = str(info.value)
    assert f"arquivo {path}, linha 1, coluna 1: o arquivo não é JSON" in message
    assert "BEMSOFT_TEST_MAP_PATH" in message


# --- the catalogue: repeats are one variant -------------------------------------------------------


def test_the_same_test_and_specimen_under_two_names_is_not_ambiguous() -> None:
    rows = [{"id": "FE", "name": "FERRO", "specimen": {"id": "SORO", "name": "Soro"}},
            {"id": "fe ", "name": "FERRO SÉRICO", "specimen": {"id": "soro", "name": "SORO"}}]
    report = parse_catalog_report(rows, source="GET /tests")
    assert report.duplicates == 1 and report.duplicate_examples == ("fe/soro",)
    catalog = Catalog([*report.entries, CatalogEntry("FE", "FERRO 2", " SORO", "")])
    assert len(catalog.variants("FE")) == 1
    resolver = Resolver(catalog=catalog, test_map={}, material_map={}, code_source="convexames",
                        variant_policy="refuse", dry_run=False)
    res = resolver.resolve(LisItem(item_id=1, requisition_id=1, conv_code="FE"))
    assert (res.status, res.specimen_id) == ("ok", "SORO")


# --- MapReloader --------------------------------------------------------------------------------


def _touch(path: Path, text: str, encoding: str = "utf-8") -> None:
    """Rewrite the file and move its time forward (coarse file-system clocks)."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text, encoding=encoding)
    os.utime(path, ns=(before + 2_000_000_000, before + 2_000_000_000))


def test_map_reloader_picks_up_a_fixed_map_without_a_restart(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    tests, materials = tmp_path / "tests_map.json", tmp_path / "materiais.csv"
    _touch(tests, '{"HEMOGRAMA": "HMG"}')
    _touch(materials, "codigo;material\nCREA;Soro\n")
    maps = MapReloader(test_map_path=tests, material_map_path=materials)
    assert maps.test_map == {"hemograma": "HMG"}
    assert maps.refresh() is False  # nothing changed

    _touch(materials, "codigo;material\nCREA;Soro\nGLI;Plasma\n", encoding="cp1252")
    with caplog.at_level(logging.INFO, logger="bemsoft_monitor.catalog"):
        assert maps.refresh() is True
    assert maps.material_map == {"crea": "Soro", "gli": "Plasma"}
    assert "BEMSOFT_MATERIAL_MAP_PATH recarregado" in caplog.text
    assert maps.refresh() is False


def test_a_map_broken_while_running_keeps_the_last_good_one_and_says_where(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tests = tmp_path / "tests_map.json"
    _touch(tests, '{"HEMOGRAMA": "HMG"}')
    maps = MapReloader(test_map_path=tests, material_map_path=None)

    _touch(tests, '{\n  "HEMOGRAMA": "HMG",\n  "XYZ9": "TSH",\n}\n')  # trailing comma
    with caplog.at_level(logging.INFO, logger="bemsoft_monitor.catalog"):
        assert maps.refresh() is False  # maybe caught mid-save: no alarm yet
        assert "não recarregado" not in caplog.text
        assert maps.refresh() is False  # still broken: now it is an ERROR
    assert maps.test_map == {"hemograma": "HMG"}  # nothing already resolved is lost
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert f"arquivo {tests}, linha 4, coluna 1" in errors[0].getMessage()
    assert "continua valendo a versão anterior" in errors[0].getMessage()
    assert maps.problems and "linha 4" in maps.problems[0]
    maps.refresh()
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1  # said once

    _touch(tests, '{"HEMOGRAMA": "HMG", "XYZ9": "TSH"}')
    assert maps.refresh() is True
    assert maps.test_map == {"hemograma": "HMG", "xyz9": "TSH"}
    assert maps.problems == []


def test_a_map_deleted_while_running_keeps_the_last_good_one(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    materials = tmp_path / "materiais.csv"
    _touch(materials, "GLI;Plasma\n")
    maps = MapReloader(test_map_path=None, material_map_path=materials)
    materials.unlink()
    with caplog.at_level(logging.ERROR, logger="bemsoft_monitor.catalog"):
        assert maps.refresh() is False
        assert maps.refresh() is False
    assert maps.material_map == {"gli": "Plasma"}
    assert "não encontrado" in caplog.text
    _touch(materials, "GLI;Urina\n")
    assert maps.refresh() is True
    assert maps.material_map == {"gli": "Urina"}


def test_map_reloader_refuses_to_start_on_a_broken_file(tmp_path: Path) -> None:
    tests = tmp_path / "tests_map.json"
    tests.write_text("", encoding="utf-8")
    with pytest.raises(MapFileError, match="está vazio"):
        MapReloader(test_map_path=tests, material_map_path=None)
