"""Catalogue parsing, mapping files, item resolution and the persisted catalogue cache."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from bemsoft_monitor.catalog import (
    SPECIMEN_DUMMY,
    Catalog,
    CatalogCache,
    CatalogFormatError,
    Resolver,
    load_material_map,
    load_test_map,
    normalize_code,
    normalize_material,
    parse_catalog,
    parse_catalog_report,
)
from bemsoft_monitor.errors import CatalogUnavailable, MapFileError, MonitorError
from bemsoft_monitor.models import CatalogEntry, LisItem

SPEC_BODY = {
    "tests": [
        {"id": "FE", "name": "FERRO SERICO", "specimen": {"id": "SORO", "name": "Soro"}},
        {"id": "GLI", "name": "GLICOSE", "specimen": {"id": "PLASMA", "name": "Plasma fluoretado"}},
        {"id": "GLI", "name": "GLICOSE (URINA)", "specimen": {"id": "URINA", "name": "Urina"}},
    ]
}
FE = CatalogEntry("FE", "FERRO SERICO", "SORO", "Soro")
GLI_PLASMA = CatalogEntry("GLI", "GLICOSE", "PLASMA", "Plasma fluoretado")
GLI_URINA = CatalogEntry("GLI", "GLICOSE (URINA)", "URINA", "Urina")
HB = CatalogEntry("HB-001", "HEMOGRAMA COMPLETO", "EDTA", "Sangue total EDTA")


def _catalog() -> Catalog:
    return Catalog([FE, GLI_PLASMA, GLI_URINA, HB])


def _resolver(
    *,
    catalog: Catalog | None = None,
    test_map: dict[str, str] | None = None,
    material_map: dict[str, str] | None = None,
    code_source: str = "convexames",
    variant_policy: str = "refuse",
    dry_run: bool = False,
    no_catalog: bool = False,
) -> Resolver:
    return Resolver(
        catalog=None if no_catalog else (catalog or _catalog()),
        test_map=test_map or {},
        material_map=material_map or {},
        code_source=code_source,  # type: ignore[arg-type]
        variant_policy=variant_policy,  # type: ignore[arg-type]
        dry_run=dry_run,
    )


def _item(conv_code: str | None = "FE", *, item_id: int = 1, **kw: str | None) -> LisItem:
    return LisItem(item_id=item_id, requisition_id=10, conv_code=conv_code, **kw)  # type: ignore[arg-type]


# --- parse_catalog ---------------------------------------------------------------------------


def test_spec_body_parses_into_one_entry_per_specimen() -> None:
    entries = parse_catalog(json.dumps(SPEC_BODY).encode(), source="GET /tests")
    assert entries == [FE, GLI_PLASMA, GLI_URINA]


def test_bare_list_and_already_decoded_body_are_accepted() -> None:
    assert parse_catalog(json.dumps(SPEC_BODY["tests"]), source="x") == [FE, GLI_PLASMA, GLI_URINA]
    assert parse_catalog(SPEC_BODY, source="x") == [FE, GLI_PLASMA, GLI_URINA]


def test_utf8_bom_and_numeric_ids_are_read() -> None:
    body = b"\xef\xbb\xbf" + json.dumps(
        [{"id": 123, "name": "ÁCIDO ÚRICO", "specimen": {"id": 7, "name": "Soro"}}],
        ensure_ascii=False,
    ).encode("utf-8")
    assert parse_catalog(body, source="x") == [CatalogEntry("123", "ÁCIDO ÚRICO", "7", "Soro")]


def test_html_body_is_refused_with_a_portuguese_message_naming_the_source() -> None:
    with pytest.raises(CatalogFormatError) as info:
        parse_catalog(b"<!DOCTYPE html><html><body>Login</body></html>", source="GET /tests")
    message = str(info.value)
    assert "GET /tests" in message
    assert "HTML" in message
    assert "BEMSOFT_BASE_URL" in message
    assert isinstance(info.value, MonitorError)


@pytest.mark.parametrize("body", [b"", "   \n", None])
def test_empty_body_is_refused(body: object) -> None:
    with pytest.raises(CatalogFormatError, match="resposta vazia"):
        parse_catalog(body, source="GET /tests")


def test_broken_json_names_line_and_column() -> None:
    with pytest.raises(CatalogFormatError, match=r"não é JSON válido \(linha 1, coluna"):
        parse_catalog('{"tests": [', source="GET /tests")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"data": []}, 'sem a chave "tests"'),
        ({"tests": {"id": "FE"}}, "deveria ser uma lista"),
        ("42", "deveria ser uma lista"),
    ],
)
def test_wrong_shape_is_refused(body: object, fragment: str) -> None:
    with pytest.raises(CatalogFormatError, match=fragment):
        parse_catalog(body, source="GET /tests")


def test_rows_without_ids_are_skipped_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    rows = [
        *SPEC_BODY["tests"],
        {"name": "SEM ID", "specimen": {"id": "SORO"}},
        {"id": "X1", "name": "SEM MATERIAL"},
        {"id": "X2", "specimen": {"name": "Soro"}},
        {"id": "  ", "specimen": {"id": "SORO"}},
        "lixo",
    ]
    report = parse_catalog_report({"tests": rows}, source="GET /tests")
    assert report.entries == [FE, GLI_PLASMA, GLI_URINA]
    assert report.skipped == 5
    with caplog.at_level(logging.WARNING, logger="bemsoft_monitor.catalog"):
        assert parse_catalog({"tests": rows}, source="GET /tests") == report.entries
    assert "5 itens sem id ou specimen.id ignorados" in caplog.text


def test_exact_duplicates_are_collapsed_but_variants_kept() -> None:
    rows = [*SPEC_BODY["tests"], SPEC_BODY["tests"][0], SPEC_BODY["tests"][2]]
    report = parse_catalog_report(rows, source="x")
    assert report.entries == [FE, GLI_PLASMA, GLI_URINA]
    assert report.duplicates == 2


def test_a_catalogue_with_no_usable_row_is_a_format_error() -> None:
    with pytest.raises(CatalogFormatError, match="formato do catálogo da Bemsoft mudou"):
        parse_catalog({"tests": [{"codigo": "FE"}, {"codigo": "GLI"}]}, source="GET /tests")


def test_an_empty_list_is_an_empty_catalogue() -> None:
    assert parse_catalog({"tests": []}, source="x") == []


# --- mapping files ---------------------------------------------------------------------------


def test_test_map_keys_are_trimmed_and_case_insensitive(tmp_path: Path) -> None:
    path = tmp_path / "tests_map.json"
    path.write_bytes(b'\xef\xbb\xbf{" Hemograma ": "HB-001", "12345": " TEST-12345 "}')
    assert load_test_map(path) == {"hemograma": "HB-001", "12345": "TEST-12345"}


def test_test_map_in_windows_1252_is_read(tmp_path: Path) -> None:
    path = tmp_path / "tests_map.json"
    path.write_bytes('{"ÁCIDO ÚRICO": "AU"}'.encode("cp1252"))
    assert load_test_map(path) == {"ácido úrico": "AU"}


def test_invalid_json_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "tests_map.json"
    path.write_text('{\n  "HEMOGRAMA": "HB-001",\n}\n', encoding="utf-8")
    with pytest.raises(MapFileError) as info:
        load_test_map(path)
    message = str(info.value)
    assert f"arquivo {path}, linha 3, coluna 1:" in message
    assert "aspas duplas" in message  # translated, not json's English text


def test_empty_test_map_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "tests_map.json"
    path.write_text("  \n", encoding="utf-8")
    with pytest.raises(MapFileError, match="está vazio"):
        load_test_map(path)


def test_missing_test_map_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(MapFileError, match="não encontrado; corrija BEMSOFT_TEST_MAP_PATH"):
        load_test_map(tmp_path / "nao_existe.json")


def test_test_map_must_be_an_object(tmp_path: Path) -> None:
    path = tmp_path / "tests_map.json"
    path.write_text('["HB-001"]', encoding="utf-8")
    with pytest.raises(MapFileError, match="deve ser um objeto JSON"):
        load_test_map(path)


@pytest.mark.parametrize("value", ["12345", "null", '""', '{"a": "b"}'])
def test_non_text_values_name_the_key(tmp_path: Path, value: str) -> None:
    path = tmp_path / "tests_map.json"
    path.write_text('{"GLICOSE": "GLU", "12345": ' + value + "}", encoding="utf-8")
    with pytest.raises(MapFileError, match='chave "12345": o valor deve ser um texto'):
        load_test_map(path)


def test_repeated_key_with_other_value_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "tests_map.json"
    path.write_text('{"GLI": "GLU", "gli ": "GLI"}', encoding="utf-8")
    with pytest.raises(MapFileError, match="mais de uma vez"):
        load_test_map(path)


def test_excel_cp1252_semicolon_csv_is_read(tmp_path: Path) -> None:
    path = tmp_path / "materiais.csv"
    path.write_bytes("codigo;material\r\nÁCIDO ÚRICO;Soro\r\nGLI;0.Plasma;;\r\n".encode("cp1252"))
    assert load_material_map(path) == {"ácido úrico": "Soro", "gli": "0.Plasma"}


def test_comma_csv_with_header_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "materiais.csv"
    path.write_text(
        "# material de cada exame\nCódigo,Material\nGLI,URINA\n\n FE ,Soro\n", encoding="utf-8"
    )
    assert load_material_map(path) == {"gli": "URINA", "fe": "Soro"}


def test_semicolon_csv_without_header_keeps_commas_in_names(tmp_path: Path) -> None:
    path = tmp_path / "materiais.csv"
    path.write_text("GLI;Plasma, fluoretado\n", encoding="utf-8")
    assert load_material_map(path) == {"gli": "Plasma, fluoretado"}


def test_material_line_without_material_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "materiais.csv"
    path.write_text("codigo;material\nGLI;Plasma\nFE\n", encoding="utf-8")
    with pytest.raises(MapFileError, match=r"linha 3: esperado 'código;material'"):
        load_material_map(path)


def test_material_code_repeated_with_other_material_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "materiais.csv"
    path.write_text("GLI;Plasma\nFE;Soro\ngli;Urina\n", encoding="utf-8")
    with pytest.raises(MapFileError, match='linha 3: o código "gli" já aparece na linha 1'):
        load_material_map(path)


def test_material_map_as_json(tmp_path: Path) -> None:
    path = tmp_path / "materiais.json"
    path.write_text('{"GLI": "Urina"}', encoding="utf-8")
    assert load_material_map(path) == {"gli": "Urina"}


def test_empty_material_map_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "materiais.csv"
    path.write_bytes(b"")
    with pytest.raises(MapFileError, match="BEMSOFT_MATERIAL_MAP_PATH"):
        load_material_map(path)


# --- normalisation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0.Soro", "soro"),
        ("SÔRO ", "soro"),
        ("1 - Plasma  Fluoretado", "plasma fluoretado"),
        ("Urina 24h", "urina 24h"),
        ("", ""),
    ],
)
def test_normalize_material(raw: str, expected: str) -> None:
    assert normalize_material(raw) == expected


def test_normalize_code() -> None:
    assert normalize_code(None) == ""
    assert normalize_code("  Fe ") == "fe"


# --- Catalog --------------------------------------------------------------------------------


def test_catalog_variants_and_search_ignore_case_and_accents() -> None:
    catalog = Catalog([FE, GLI_PLASMA, GLI_URINA, GLI_URINA])
    assert len(catalog) == 3
    assert catalog.variants(" gli ") == [GLI_PLASMA, GLI_URINA]
    assert catalog.variants("NOPE") == []
    assert catalog.search("ferro sérico") == [FE]
    assert catalog.search("gli") == [GLI_PLASMA, GLI_URINA]
    assert catalog.search("urina") == [GLI_URINA]
    assert catalog.search("", limit=2) == [FE, GLI_PLASMA]
    assert catalog.search("glicose", limit=1) == [GLI_PLASMA]


# --- Resolver -------------------------------------------------------------------------------


def test_single_variant_resolves_with_trailing_spaces_and_lower_case() -> None:
    res = _resolver().resolve(_item(" fe  "))
    assert (res.status, res.test_id, res.specimen_id, res.refusal) == ("ok", "FE", "SORO", None)


def test_json_map_translates_the_local_code() -> None:
    res = _resolver(test_map={"hemograma": "HB-001"}).resolve(_item("HEMOGRAMA "))
    assert (res.status, res.test_id, res.specimen_id) == ("ok", "HB-001", "EDTA")


@pytest.mark.parametrize("code", [None, "", "   "])
def test_missing_code_names_the_column(code: str | None) -> None:
    res = _resolver().resolve(_item(code))
    assert res.status == "missing_code"
    assert res.test_id is None and res.specimen_id is None
    assert res.refusal and "ItemSol.CodConvExames" in res.refusal


def test_code_source_codigoexame_uses_texame() -> None:
    resolver = _resolver(code_source="codigoexame")
    res = resolver.resolve(_item("ZZZ", exam_code="FE"))
    assert (res.status, res.test_id) == ("ok", "FE")
    missing = resolver.resolve(_item("FE", exam_code=None))
    assert missing.status == "missing_code"
    assert missing.refusal and "texame.CodigoExame" in missing.refusal


def test_unknown_code_is_refused_with_the_fix() -> None:
    res = _resolver().resolve(_item("XYZ", description="GLICOSE"))
    assert res.status == "not_in_catalog"
    assert res.refusal is not None
    assert "exame XYZ (código local XYZ) não existe no catálogo /tests da Bemsoft" in res.refusal
    assert "BEMSOFT_TEST_MAP_PATH" in res.refusal
    assert "GLI (GLICOSE)" in res.refusal  # a suggestion from the description


def test_several_variants_without_hint_are_refused_listing_them() -> None:
    res = _resolver().resolve(_item("GLI"))
    assert res.status == "ambiguous"
    assert res.refusal is not None
    assert "GLI: PLASMA (Plasma fluoretado), URINA (Urina)" in res.refusal
    assert "BEMSOFT_MATERIAL_MAP_PATH" in res.refusal
    assert res.variants == (GLI_PLASMA, GLI_URINA)


def test_material_hint_by_local_code_matches_specimen_name() -> None:
    res = _resolver(material_map={"glicose": "0.Urina"}, test_map={"glicose": "GLI"}).resolve(
        _item("GLICOSE")
    )
    assert (res.status, res.test_id, res.specimen_id) == ("ok", "GLI", "URINA")


def test_material_hint_by_support_code_matches_specimen_id() -> None:
    res = _resolver(material_map={"GLI": "plasma"}, test_map={"G1": "GLI"}).resolve(_item("g1"))
    assert (res.status, res.specimen_id) == ("ok", "PLASMA")


def test_material_hint_that_matches_no_variant_is_refused() -> None:
    res = _resolver(material_map={"gli": "Sangue"}).resolve(_item("GLI"))
    assert res.status == "ambiguous"
    assert res.refusal and '"Sangue"' in res.refusal


def test_variant_policy_first_takes_the_first_variant() -> None:
    res = _resolver(variant_policy="first").resolve(_item("GLI"))
    assert (res.status, res.specimen_id) == ("ok", "PLASMA")


def test_policy_first_never_overrides_a_material_hint_that_matches_nothing(
        tmp_path: Path) -> None:
    """``first`` is for exams without any hint: a wrong hint is refused, never guessed."""
    materials = tmp_path / "materiais.csv"
    resolver = Resolver(catalog=_catalog(), test_map={}, material_map={"gli": "Sangue"},
                        code_source="convexames", variant_policy="first", dry_run=False,
                        material_map_path=materials)
    res = resolver.resolve(_item("GLI"))
    assert (res.status, res.test_id, res.specimen_id) == ("ambiguous", None, None)
    assert res.refusal is not None
    assert '"Sangue"' in res.refusal  # the hint
    assert "PLASMA (Plasma fluoretado), URINA (Urina)" in res.refusal  # the variants
    assert f"{materials} (BEMSOFT_MATERIAL_MAP_PATH)" in res.refusal  # the file
    assert "BEMSOFT_VARIANT_POLICY=first não se aplica" in res.refusal
    # The same policy still picks the first tube when nothing was indicated for the exam.
    without_hint = _resolver(variant_policy="first", material_map={"fe": "Soro"})
    assert without_hint.resolve(_item("GLI")).specimen_id == "PLASMA"


def test_no_catalogue_in_dry_run_uses_the_dummy_specimen() -> None:
    res = _resolver(no_catalog=True, dry_run=True).resolve(_item(" fe"))
    assert (res.status, res.test_id, res.specimen_id) == ("ok", "FE", SPECIMEN_DUMMY)


def test_no_catalogue_outside_dry_run_is_a_retryable_refusal() -> None:
    res = _resolver(no_catalog=True).resolve(_item("FE"))
    assert res.status == "no_catalog"
    assert res.retryable
    assert res.refusal and "BEMSOFT_TOKEN" in res.refusal


def test_with_catalog_swaps_the_snapshot_only() -> None:
    resolver = _resolver(no_catalog=True, test_map={"x": "FE"})
    assert resolver.with_catalog(_catalog()).resolve(_item("X")).specimen_id == "SORO"
    assert resolver.resolve(_item("X")).status == "no_catalog"


def test_five_thousand_entries_with_variants_resolve_correctly_and_fast() -> None:
    entries: list[CatalogEntry] = []
    for n in range(4000):
        entries.append(CatalogEntry(f"T{n:04d}", f"EXAME {n}", "SORO", "Soro"))
    for n in range(500):  # 500 tests with two specimens each
        entries.append(CatalogEntry(f"V{n:03d}", f"VARIANTE {n}", "SORO", "Soro"))
        entries.append(CatalogEntry(f"V{n:03d}", f"VARIANTE {n} URINA", "URI", "Urina"))
    catalog = Catalog(entries)
    assert len(catalog) == 5000
    hints = {f"v{n:03d}": "urina" for n in range(0, 500, 2)}
    resolver = _resolver(catalog=catalog, material_map=hints)
    items = [_item(f"t{n:04d} ", item_id=n) for n in range(4000)]
    items += [_item(f"V{n:03d}", item_id=10000 + n) for n in range(500)]
    started = time.perf_counter()
    results = [resolver.resolve(i) for i in items]
    assert time.perf_counter() - started < 5
    assert all(r.status == "ok" and r.specimen_id == "SORO" for r in results[:4000])
    for n, res in enumerate(results[4000:]):
        if n % 2 == 0:
            assert (res.status, res.specimen_id) == ("ok", "URI")
        else:
            assert res.status == "ambiguous"
    assert catalog.search("variante 499 urina") == [entries[-1]]


# --- CatalogCache ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self, start: float = 1_750_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class Fetcher:
    """A fetch callable whose next answers are queued (an exception is raised)."""

    def __init__(self, *answers: object) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self) -> list[CatalogEntry]:
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return list(answer)  # type: ignore[call-overload]


def _cache(path: Path, fetch: Fetcher, clock: FakeClock) -> CatalogCache:
    return CatalogCache(fetch=fetch, path=path, ttl_s=3600, min_refresh_s=300, clock=clock)


def test_persisted_copy_is_used_when_fetch_fails_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cache" / "catalogo.json"
    clock = FakeClock()
    first = _cache(path, Fetcher([FE, GLI_PLASMA, GLI_URINA]), clock)
    assert first.catalog is None and first.age_s() is None
    assert first.refresh() is True
    assert path.exists()
    assert [p.name for p in path.parent.iterdir()] == ["catalogo.json"]  # no temp file left

    clock.now += 7200
    down = Fetcher(ConnectionError("Bemsoft fora do ar"))
    second = _cache(path, down, clock)
    assert second.catalog is not None and len(second.catalog) == 3
    assert second.loaded_at == pytest.approx(clock.now - 7200)
    assert second.age_s() == pytest.approx(7200)
    with caplog.at_level(logging.WARNING, logger="bemsoft_monitor.catalog"):
        assert second.refresh_if_stale() is False
    assert down.calls == 1
    assert second.catalog is not None and second.catalog.variants("GLI") == [GLI_PLASMA, GLI_URINA]
    assert second.last_error and "falha ao atualizar o catálogo" in second.last_error
    assert "Bemsoft fora do ar" in second.last_error
    assert "catálogo não atualizado; usando cópia de" in caplog.text


def test_ttl_decides_when_a_refresh_is_due(tmp_path: Path) -> None:
    clock = FakeClock()
    fetch = Fetcher([FE])
    cache = _cache(tmp_path / "c.json", fetch, clock)
    assert cache.refresh_if_stale() is True  # nothing loaded yet
    clock.now += 3000
    assert cache.refresh_if_stale() is False
    assert fetch.calls == 1
    clock.now += 700
    assert cache.refresh_if_stale() is True
    assert fetch.calls == 2
    assert cache.age_s() == 0


def test_refresh_on_miss_is_rate_limited(tmp_path: Path) -> None:
    clock = FakeClock()
    fetch = Fetcher([FE], [FE, GLI_PLASMA])
    cache = _cache(tmp_path / "c.json", fetch, clock)
    assert cache.refresh_on_miss() is True
    clock.now += 100
    assert cache.refresh_on_miss() is False
    assert fetch.calls == 1
    clock.now += 201
    assert cache.refresh_on_miss() is True
    assert fetch.calls == 2
    assert cache.catalog is not None and len(cache.catalog) == 2


def test_failed_refresh_keeps_the_copy_and_sets_last_error(tmp_path: Path) -> None:
    clock = FakeClock()
    fetch = Fetcher([FE], CatalogFormatError("GET /tests: resposta em HTML"), [], [GLI_URINA])
    cache = _cache(tmp_path / "c.json", fetch, clock)
    assert cache.refresh() is True
    loaded_at = cache.loaded_at
    clock.now += 10
    assert cache.refresh() is False
    assert cache.catalog is not None and list(cache.catalog) == [FE]
    assert cache.loaded_at == loaded_at
    assert cache.last_error == "falha ao atualizar o catálogo /tests: GET /tests: resposta em HTML"
    assert cache.refresh() is False  # an empty catalogue never replaces a good one
    assert cache.last_error and "catálogo vazio" in cache.last_error
    assert cache.refresh() is True
    assert cache.last_error is None
    assert cache.catalog is not None and list(cache.catalog) == [GLI_URINA]


def test_stale_refresh_backs_off_after_a_failure(tmp_path: Path) -> None:
    clock = FakeClock()
    fetch = Fetcher(OSError("timeout"))
    cache = _cache(tmp_path / "c.json", fetch, clock)
    assert cache.refresh_if_stale() is False
    clock.now += 5
    assert cache.refresh_if_stale() is False
    assert fetch.calls == 1  # not every poll while Bemsoft is down
    clock.now += 30
    assert cache.refresh_if_stale() is False
    assert fetch.calls == 2
    with pytest.raises(CatalogUnavailable, match="timeout"):
        cache.require()


def test_corrupt_persisted_file_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c.json"
    path.write_text("{meio arquivo", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="bemsoft_monitor.catalog"):
        cache = _cache(path, Fetcher([FE]), FakeClock())
    assert cache.catalog is None
    assert "cópia do catálogo ignorada" in caplog.text
    assert cache.refresh() is True
    assert json.loads(path.read_text(encoding="utf-8"))["tests"][0]["id"] == "FE"
