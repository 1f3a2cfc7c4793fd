"""The pure transform: LIS rows of one requisition -> Bemsoft payload and refusals."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from bemsoft_monitor.catalog import SPECIMEN_DUMMY, Catalog, Resolution, Resolver
from bemsoft_monitor.config import Settings
from bemsoft_monitor.models import CatalogEntry, LisItem, TransformResult
from bemsoft_monitor.transform import build_orders, normalize_gender, parse_hora

UTC = dt.timezone.utc
NOW = dt.datetime(2025, 7, 1, 15, 0, 0, tzinfo=UTC)  # 12:00 in the lab (-03:00)

CATALOG = Catalog(
    [
        CatalogEntry("FE", "FERRO SERICO", "SORO", "Soro"),
        CatalogEntry("GLI", "GLICOSE", "PLASMA", "Plasma fluoretado"),
        CatalogEntry("GLI", "GLICOSE (URINA)", "URINA", "Urina"),
        CatalogEntry("TSH", "TSH", "SORO", "Soro"),
    ]
)


def make_settings(**overrides: Any) -> Settings:
    """Settings from keyword arguments only: no .env, no stray environment variables."""
    clean = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    with mock.patch.dict(os.environ, clean, clear=True):
        return Settings(
            _env_file=None,  # type: ignore[call-arg]
            db_url="sqlite://",
            terceiros="LAB",
            bemsoft_dry_run=True,
            **overrides,
        )


SETTINGS = make_settings()


def make_resolver(catalog: Catalog | None = CATALOG, **kw: Any) -> Resolver:
    options: dict[str, Any] = {
        "test_map": {},
        "material_map": {},
        "code_source": "convexames",
        "variant_policy": "refuse",
        "dry_run": False,
    }
    options.update(kw)
    return Resolver(catalog=catalog, **options)


RESOLVER = make_resolver()


def item(item_id: int = 17065, **kw: Any) -> LisItem:
    """A row of the normal requisition 4497 of the spec, with overrides."""
    row: dict[str, Any] = {
        "requisition_id": 4497,
        "exam_type_id": 1,
        "item_entered_at": dt.datetime(2025, 7, 1, 8, 10),
        "description": "FERRO SERICO",
        "conv_code": "FE",
        "support_lab": "LAB",
        "origin": "Sistema",
        "requisition_date": dt.datetime(2025, 7, 1),
        "requisition_time": "08:00",
        "patient_id": 3384,
        "patient_name": "MARIA DA SILVA",
        "patient_cpf": "123.456.789-09",
        "patient_birth": dt.datetime(1990, 5, 15),
        "patient_sex": "F",
        "exam_code": "FE",
        "exam_description": "FERRO SERICO",
    }
    row.update(kw)
    return LisItem(item_id=item_id, **row)


def build(
    items: list[LisItem],
    *,
    settings: Settings = SETTINGS,
    resolver: Resolver = RESOLVER,
    first_seq: int = 1,
    now: dt.datetime = NOW,
) -> TransformResult:
    return build_orders(items, settings=settings, resolver=resolver, first_seq=first_seq, now=now)


def only_payload(result: TransformResult) -> dict[str, Any]:
    assert not result.refusals, result.refusals
    assert len(result.orders) == 1
    return result.orders[0].payload


def batch(result: TransformResult) -> dict[str, Any]:
    assert len(result.orders) == 1, result.refusals
    payload: dict[str, Any] = result.orders[0].payload["batch"]
    return payload


def refusal_reasons(result: TransformResult) -> dict[int, str]:
    return {r.item_id: r.reason for r in result.refusals}


# --- the normal case ------------------------------------------------------------------------


def test_normal_requisition_gives_exactly_the_documented_payload() -> None:
    settings = make_settings(
        physician_name="NOME DO MEDICO",
        physician_council="CRM",
        physician_number="123456",
        physician_uf="se",
    )
    result = build([item()], settings=settings)
    assert result.orders[0].requisition_id == 4497
    assert result.orders[0].seq == 1
    assert result.orders[0].item_ids == (17065,)
    assert only_payload(result) == {
        "batch": {
            "externalId": "sol-4497",
            "date": "2025-07-01",
            "time": "08:00:00",
            "order": {
                "externalId": "order-4497",
                "date": "2025-07-01",
                "time": "08:00:00",
                "patientHeight": 0,
                "patientWeight": 0,
                "patient": {
                    "externalId": "pat-3384",
                    "name": "MARIA DA SILVA",
                    "birthDate": "1990-05-15",
                    "gender": "F",
                    "weight": 0,
                    "height": 0,
                },
                "physician": {
                    "externalId": "123456",
                    "name": "NOME DO MEDICO",
                    "councilAbbreviation": "CRM",
                    "councilNumber": "123456",
                    "councilUf": "SE",
                },
                "tests": [
                    {
                        "externalId": "item-17065",
                        "collectionDate": "2025-07-01",
                        "collectionTime": "08:10:00",
                        "supportTestId": "FE",
                        "supportSpecimenId": "SORO",
                        "additionalInformations": [
                            {"key": "origem", "value": "Sistema"},
                            {"key": "descricao", "value": "FERRO SERICO"},
                        ],
                        "condition": "",
                        "preservative": "",
                        "diuresisVolume": 0,
                        "diuresisTime": 0,
                    }
                ],
            },
        }
    }


def test_physician_is_left_out_unless_all_four_settings_are_filled() -> None:
    settings = make_settings(physician_name="DR", physician_council="CRM", physician_uf="SE")
    assert "physician" not in batch(build([item()], settings=settings))["order"]
    assert "physician" not in batch(build([item()]))["order"]


def test_tests_are_sorted_by_item_id_and_repeated_rows_collapse() -> None:
    rows = [item(3, conv_code="TSH"), item(1), item(2, conv_code="GLI"), item(1)]
    result = build(rows, resolver=make_resolver(variant_policy="first"))
    tests = batch(result)["order"]["tests"]
    assert [t["externalId"] for t in tests] == ["item-1", "item-2", "item-3"]
    assert result.orders[0].item_ids == (1, 2, 3)


def test_later_sequence_numbers_change_the_external_ids() -> None:
    result = build([item()], first_seq=2)
    body = batch(result)
    assert result.orders[0].seq == 2
    assert body["externalId"] == "sol-4497-2"
    assert body["order"]["externalId"] == "order-4497-2"


def test_additional_informations_use_origem_and_description_and_skip_empties() -> None:
    tests = batch(
        build(
            [
                item(1, origin=" Balcão ", description="  FERRO  SERICO "),
                item(2, origin=None, description=None, exam_description=None),
                item(3, origin="", description="", exam_description="FERRO (TEXAME)"),
            ]
        )
    )["order"]["tests"]
    assert tests[0]["additionalInformations"] == [
        {"key": "origem", "value": "Balcão"},
        {"key": "descricao", "value": "FERRO SERICO"},
    ]
    assert tests[1]["additionalInformations"] == [{"key": "origem", "value": "Sistema"}]
    assert tests[2]["additionalInformations"][1] == {"key": "descricao", "value": "FERRO (TEXAME)"}


def test_dry_run_without_catalogue_sends_the_dummy_specimen() -> None:
    resolver = make_resolver(catalog=None, dry_run=True)
    test = batch(build([item(conv_code="fe ")], resolver=resolver))["order"]["tests"][0]
    assert (test["supportTestId"], test["supportSpecimenId"]) == ("FE", SPECIMEN_DUMMY)


# --- patient anomalies ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sexo", "expected"),
    [
        ("M", "M"),
        ("f", "F"),
        (" Masculino ", "M"),
        ("FEMININO", "F"),
        ("fem.", "F"),
        ("M A S C U L I N O", "M"),
    ],
)
def test_gender_spellings_are_understood(sexo: str, expected: str) -> None:
    assert batch(build([item(patient_sex=sexo)]))["order"]["patient"]["gender"] == expected


@pytest.mark.parametrize("sexo", ["I", "", None, "X", "  "])
def test_unknown_gender_uses_default_gender(sexo: str | None) -> None:
    settings = make_settings(default_gender="m")
    body = batch(build([item(patient_sex=sexo)], settings=settings))
    assert body["order"]["patient"]["gender"] == "M"


@pytest.mark.parametrize("sexo", ["I", "", None])
def test_unknown_gender_without_default_refuses_every_item(sexo: str | None) -> None:
    result = build([item(1, patient_sex=sexo), item(2, conv_code="TSH", patient_sex=sexo)])
    assert result.orders == []
    reasons = refusal_reasons(result)
    assert set(reasons) == {1, 2}
    assert len(set(reasons.values())) == 1
    assert "sexo do paciente ausente/inválido" in reasons[1]
    assert "DEFAULT_GENDER=M ou F" in reasons[1]
    assert "paciente.sexo" in reasons[1]
    assert {r.kind for r in result.refusals} == {"patient"}


@pytest.mark.parametrize(
    "birth",
    [None, dt.datetime(1900, 1, 1), dt.datetime(2025, 7, 2), dt.date(2030, 1, 1)],
    ids=["null", "1900", "tomorrow", "future"],
)
def test_bad_birth_date_uses_default_birthdate(birth: Any) -> None:
    settings = make_settings(default_birthdate="1970-01-01")
    body = batch(build([item(patient_birth=birth)], settings=settings))
    assert body["order"]["patient"]["birthDate"] == "1970-01-01"


@pytest.mark.parametrize(
    ("birth", "state"),
    [
        (None, "ausente"),
        (dt.datetime(1900, 1, 1), "1900-01-01, valor provisório"),
        (dt.datetime(2031, 1, 1), "no futuro"),
    ],
)
def test_bad_birth_date_without_default_refuses_naming_the_setting(birth: Any, state: str) -> None:
    reasons = refusal_reasons(build([item(patient_birth=birth)]))
    assert f"data de nascimento do paciente ausente/inválida ({state})" in reasons[17065]
    assert "DEFAULT_BIRTHDATE=AAAA-MM-DD" in reasons[17065]


def test_birth_date_today_is_not_in_the_future() -> None:
    body = batch(build([item(patient_birth=dt.datetime(2025, 7, 1))]))
    assert body["order"]["patient"]["birthDate"] == "2025-07-01"


def test_names_keep_accents_and_apostrophes_and_lose_extra_spaces() -> None:
    body = batch(build([item(patient_name="  JOÃO  D'ÁVILA   da   Conceição ")]))
    assert body["order"]["patient"]["name"] == "JOÃO D'ÁVILA da Conceição"


@pytest.mark.parametrize("name", [None, "", "   "])
def test_blank_name_refuses_the_requisition(name: str | None) -> None:
    reasons = refusal_reasons(build([item(patient_name=name)]))
    assert "nome do paciente vazio" in reasons[17065]


def test_several_patient_problems_are_reported_together() -> None:
    reason = refusal_reasons(build([item(patient_name=None, patient_sex=None)]))[17065]
    assert reason.startswith("solicitação 4497: ")
    assert "nome do paciente vazio" in reason and "DEFAULT_GENDER" in reason


@pytest.mark.parametrize("cpf", ["123.456.789-09", "12345678909", " 123 456 789 09 "])
def test_patient_without_codpaciente_is_identified_by_cpf(cpf: str) -> None:
    body = batch(build([item(patient_id=None, patient_cpf=cpf)]))
    assert body["order"]["patient"]["externalId"] == "cpf-12345678909"


@pytest.mark.parametrize("cpf", [None, "", "123.456.789", "000.000.000-00"])
def test_patient_without_codpaciente_nor_cpf_is_refused(cpf: str | None) -> None:
    result = build(
        [item(1, patient_id=None, patient_cpf=cpf), item(2, patient_id=None, patient_cpf=cpf)]
    )
    assert result.orders == []
    reasons = refusal_reasons(result)
    assert set(reasons) == {1, 2}
    assert "paciente sem identificação: solicitacao.codpaciente vazio" in reasons[1]
    if cpf:
        assert "123" not in reasons[1]  # the CPF itself is not copied into the reason


def test_requisition_columns_come_from_the_first_non_null_row() -> None:
    rows = [
        item(1, patient_name=None, requisition_time=None),
        item(2, patient_name="ANA", requisition_time="9:15"),
    ]
    body = batch(build(rows))
    assert body["order"]["patient"]["name"] == "ANA"
    assert body["order"]["time"] == "09:15:00"


# --- date anomalies -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hora", "dtaentrada", "expected"),
    [
        ("8:00", dt.datetime(2025, 7, 1), "08:00:00"),
        ("08:00", dt.datetime(2025, 7, 1), "08:00:00"),
        ("08:00:00", dt.datetime(2025, 7, 1), "08:00:00"),
        (" 7:05:09 ", dt.datetime(2025, 7, 1, 9, 30), "07:05:09"),
        ("", dt.datetime(2025, 7, 1, 9, 30), "09:30:00"),
        (None, dt.datetime(2025, 7, 1, 9, 30), "09:30:00"),
        ("manhã", dt.datetime(2025, 7, 1, 9, 30), "09:30:00"),
        # dtaentrada without a time: the item's DataEntrada (08:10) that day, as the spec's
        # chain says, rather than a made-up midnight.
        ("25:00", dt.datetime(2025, 7, 1), "08:10:00"),
        (None, dt.datetime(2025, 7, 1), "08:10:00"),
        ("xx", dt.datetime(2025, 7, 1), "08:10:00"),
    ],
)
def test_hora_variants(hora: str | None, dtaentrada: dt.datetime, expected: str) -> None:
    order = batch(build([item(requisition_time=hora, requisition_date=dtaentrada)]))["order"]
    assert (order["date"], order["time"]) == ("2025-07-01", expected)


def test_date_only_requisition_takes_the_earliest_entry_time_of_that_day() -> None:
    rows = [
        item(1, requisition_time=None, item_entered_at=dt.datetime(2025, 7, 1, 10, 5)),
        item(2, requisition_time=None, item_entered_at=dt.datetime(2025, 7, 1, 9, 40),
             conv_code="TSH"),
        item(3, requisition_time=None, item_entered_at=dt.datetime(2025, 6, 30, 23, 0),
             conv_code="FE"),
    ]
    order = batch(build(rows))["order"]
    assert (order["date"], order["time"]) == ("2025-07-01", "09:40:00")


def test_date_only_requisition_without_entries_that_day_stays_at_midnight() -> None:
    rows = [item(requisition_time="", item_entered_at=dt.datetime(2025, 7, 2, 0, 30))]
    body = batch(build(rows))
    assert (body["order"]["date"], body["order"]["time"]) == ("2025-07-01", "00:00:00")
    # The next-day collection still moves only the batch date (quirk 1).
    assert (body["date"], body["time"]) == ("2025-07-02", "00:30:00")


def test_parse_hora_and_normalize_gender_helpers() -> None:
    assert parse_hora("8h30") == dt.time(8, 30)
    assert parse_hora(dt.time(8, 30, 1, 5)) == dt.time(8, 30, 1)
    assert parse_hora(830) is None
    assert normalize_gender("Masculino") == "M"
    assert normalize_gender(None) is None


def test_missing_dtaentrada_uses_the_earliest_item_entry() -> None:
    rows = [
        item(1, requisition_date=None, item_entered_at=dt.datetime(2025, 7, 1, 10, 0)),
        item(
            2,
            requisition_date=None,
            item_entered_at=dt.datetime(2025, 7, 1, 7, 45),
            conv_code="TSH",
        ),
        item(3, requisition_date=None, item_entered_at=None, conv_code="FE"),
    ]
    order = batch(build(rows))["order"]
    assert (order["date"], order["time"]) == ("2025-07-01", "07:45:00")
    assert (order["tests"][2]["collectionDate"], order["tests"][2]["collectionTime"]) == (
        "2025-07-01",
        "07:45:00",
    )


def test_no_date_at_all_uses_now_in_the_lab_timezone() -> None:
    order = batch(build([item(requisition_date=None, item_entered_at=None)]))["order"]
    assert (order["date"], order["time"]) == ("2025-07-01", "12:00:00")
    naive = batch(
        build(
            [item(requisition_date=None, item_entered_at=None)], now=dt.datetime(2025, 7, 2, 1, 30)
        )
    )  # naive `now` is UTC
    assert (naive["date"], naive["time"]) == ("2025-07-01", "22:30:00")


def test_missing_item_entry_collects_at_the_order_time() -> None:
    test = batch(build([item(item_entered_at=None)]))["order"]["tests"][0]
    assert (test["collectionDate"], test["collectionTime"]) == ("2025-07-01", "08:00:00")


def test_collection_on_the_next_day_moves_the_batch_date_not_the_order_date() -> None:
    rows = [
        item(1, item_entered_at=dt.datetime(2025, 7, 1, 22, 0)),
        item(2, item_entered_at=dt.datetime(2025, 7, 2, 0, 40), conv_code="TSH"),
    ]
    body = batch(build(rows))
    assert (body["date"], body["time"]) == ("2025-07-02", "00:40:00")
    assert (body["order"]["date"], body["order"]["time"]) == ("2025-07-01", "08:00:00")


def test_later_collection_on_the_same_day_keeps_the_batch_at_the_order_time() -> None:
    body = batch(build([item(item_entered_at=dt.datetime(2025, 7, 1, 23, 59))]))
    assert (body["date"], body["time"]) == ("2025-07-01", "08:00:00")


def test_timezone_aware_datetimes_are_converted_to_lab_time() -> None:
    rows = [
        item(
            requisition_date=dt.datetime(2025, 7, 1, 2, 0, tzinfo=UTC),
            requisition_time=None,
            item_entered_at=dt.datetime(2025, 7, 1, 11, 10, 30, 999, tzinfo=UTC),
        )
    ]
    order = batch(build(rows))["order"]
    assert (order["date"], order["time"]) == ("2025-06-30", "23:00:00")
    assert order["tests"][0]["collectionTime"] == "08:10:30"


# --- exam code anomalies --------------------------------------------------------------------


@pytest.mark.parametrize("code", [None, "", "   "])
def test_missing_exam_code_refuses_only_that_item(code: str | None) -> None:
    result = build(
        [item(1), item(2, conv_code=code, description="TSH ULTRA"), item(3, conv_code="TSH")]
    )
    assert result.orders[0].item_ids == (1, 3)
    reason = refusal_reasons(result)[2]
    assert reason.startswith("TSH ULTRA: código do exame ausente")
    assert "ItemSol.CodConvExames" in reason
    assert result.refusals[0].kind == "missing_code"


@pytest.mark.parametrize("code", ["FE  ", "fe", " Fe "])
def test_trailing_spaces_and_lower_case_codes_resolve(code: str) -> None:
    assert batch(build([item(conv_code=code)]))["order"]["tests"][0]["supportTestId"] == "FE"


def test_unknown_and_ambiguous_codes_are_refused_with_the_exam_named() -> None:
    result = build(
        [
            item(1),
            item(2, conv_code="XYZ", description="EXAME NOVO"),
            item(3, conv_code="GLI", description="GLICOSE"),
        ]
    )
    assert result.orders[0].item_ids == (1,)
    reasons = refusal_reasons(result)
    assert reasons[2].startswith("EXAME NOVO (XYZ): exame XYZ (código local XYZ) não existe")
    assert reasons[3].startswith("GLICOSE (GLI): exame GLI")
    assert "GLI: PLASMA (Plasma fluoretado), URINA (Urina)" in reasons[3]
    assert {r.kind for r in result.refusals} == {"not_in_catalog", "ambiguous"}


def test_material_hint_picks_the_variant() -> None:
    resolver = make_resolver(material_map={"gli": "Urina"})
    test = batch(build([item(conv_code="gli")], resolver=resolver))["order"]["tests"][0]
    assert (test["supportTestId"], test["supportSpecimenId"]) == ("GLI", "URINA")


def test_no_catalogue_refusals_are_retryable() -> None:
    result = build([item()], resolver=make_resolver(catalog=None))
    assert result.orders == []
    assert result.refusals[0].retryable
    assert result.refusals[0].kind == "no_catalog"


def test_every_item_refused_means_no_order() -> None:
    result = build([item(1, conv_code=None), item(2, conv_code="NOPE")])
    assert result.orders == []
    assert [r.item_id for r in result.refusals] == [1, 2]


def test_an_exception_in_one_item_becomes_its_refusal() -> None:
    class Exploding(Resolver):
        def resolve(self, lis_item: LisItem) -> Resolution:
            if lis_item.item_id == 2:
                raise RuntimeError("falha simulada")
            return super().resolve(lis_item)

    resolver = Exploding(
        catalog=CATALOG,
        test_map={},
        material_map={},
        code_source="convexames",
        variant_policy="refuse",
        dry_run=False,
    )
    result = build([item(1), item(2, description="TSH"), item(3)], resolver=resolver)
    assert result.orders[0].item_ids == (1, 3)
    reason = refusal_reasons(result)[2]
    assert reason.startswith("TSH (FE): erro inesperado ao montar o item")
    assert "falha simulada" in reason
    assert result.refusals[0].kind == "internal"


def test_item_of_another_requisition_is_not_mixed_in() -> None:
    result = build([item(1), item(2, requisition_id=9999)])
    assert result.orders[0].item_ids == (1,)
    assert result.refusals[0].item_id == 2
    assert "erro interno" in result.refusals[0].reason


def test_no_items_no_order() -> None:
    assert build([]) == TransformResult()


# --- externalId length ----------------------------------------------------------------------


def test_ids_over_the_limit_use_the_compact_form() -> None:
    settings = make_settings(bemsoft_extid_max=8)
    rows = [item(17065, patient_id=123456)]
    body = batch(build(rows, settings=settings, first_seq=3))
    assert body["externalId"] == "s4497-3"
    assert body["order"]["externalId"] == "o4497-3"
    assert body["order"]["patient"]["externalId"] == "p123456"
    assert body["order"]["tests"][0]["externalId"] == "i17065"


def test_cpf_id_over_the_limit_uses_the_compact_form() -> None:
    settings = make_settings(bemsoft_extid_max=12)
    body = batch(build([item(patient_id=None)], settings=settings))
    assert body["order"]["patient"]["externalId"] == "c12345678909"


def test_ids_too_long_even_compact_are_refused_naming_the_setting() -> None:
    settings = make_settings(bemsoft_extid_max=8)
    result = build([item(1, requisition_id=123456789)], settings=settings)
    assert result.orders == []
    assert "BEMSOFT_EXTID_MAX=8" in result.refusals[0].reason
    assert result.refusals[0].kind == "extid"

    long_item = build([item(123456789), item(1)], settings=settings)
    assert long_item.orders[0].item_ids == (1,)
    assert "i123456789" in refusal_reasons(long_item)[123456789]


def test_physician_number_longer_than_the_limit_is_refused() -> None:
    settings = make_settings(
        bemsoft_extid_max=8,
        physician_name="DR",
        physician_council="CRM",
        physician_number="123456789",
        physician_uf="SE",
    )
    reason = refusal_reasons(build([item()], settings=settings))[17065]
    assert "PHYSICIAN_NUMBER tem 9 caracteres" in reason


# --- properties -----------------------------------------------------------------------------

SETTINGS_VARIANTS = [
    SETTINGS,
    make_settings(default_gender="F", default_birthdate="1980-02-29", bemsoft_extid_max=8),
    make_settings(
        default_gender="M",
        default_birthdate="1970-01-01",
        bemsoft_extid_max=12,
        physician_name="DR",
        physician_council="CRM",
        physician_number="1234",
        physician_uf="SE",
        lab_utc_offset="-05:00",
    ),
    make_settings(default_gender="M", default_birthdate="1970-01-01", lab_utc_offset="+14:00"),
]
RESOLVERS = [
    RESOLVER,
    make_resolver(variant_policy="first", material_map={"gli": "urina"}),
    make_resolver(catalog=None, dry_run=True, code_source="codigoexame"),
    make_resolver(catalog=None),
]

datetimes = st.one_of(
    st.none(),
    st.datetimes(min_value=dt.datetime(1899, 1, 1), max_value=dt.datetime(2100, 12, 31)),
    st.datetimes(
        min_value=dt.datetime(2000, 1, 1),
        max_value=dt.datetime(2040, 1, 1),
        timezones=st.sampled_from([UTC, dt.timezone(dt.timedelta(hours=-3))]),
    ),
)
texts = st.one_of(st.none(), st.text(max_size=12))
codes = st.one_of(texts, st.sampled_from(["FE", " fe ", "GLI", "TSH", "gli", "XX", ""]))


@st.composite
def requisitions(draw: st.DrawFn) -> list[LisItem]:
    requisition_id = draw(st.integers(min_value=1, max_value=10**12))
    shared = {
        "requisition_date": draw(datetimes),
        "requisition_time": draw(st.one_of(texts, st.sampled_from(["8:00", "08:00:00", "23:59"]))),
        "patient_id": draw(st.one_of(st.none(), st.integers(min_value=0, max_value=10**15))),
        "patient_name": draw(texts),
        "patient_cpf": draw(st.one_of(texts, st.just("123.456.789-09"))),
        "patient_birth": draw(st.one_of(datetimes, st.dates())),
        "patient_sex": draw(st.one_of(texts, st.sampled_from(["M", "f", "Feminino", "I"]))),
    }
    ids = draw(st.lists(st.integers(min_value=1, max_value=10**12), min_size=1, max_size=6))
    return [
        LisItem(
            item_id=item_id,
            requisition_id=requisition_id,
            item_entered_at=draw(datetimes),
            description=draw(texts),
            conv_code=draw(codes),
            exam_code=draw(codes),
            origin=draw(texts),
            **shared,
        )
        for item_id in ids
    ]


def all_external_ids(payload: dict[str, Any]) -> Iterator[str]:
    body = payload["batch"]
    yield body["externalId"]
    yield body["order"]["externalId"]
    yield body["order"]["patient"]["externalId"]
    if "physician" in body["order"]:
        yield body["order"]["physician"]["externalId"]
    for test in body["order"]["tests"]:
        yield test["externalId"]


@hyp_settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    items=requisitions(),
    settings_index=st.integers(min_value=0, max_value=len(SETTINGS_VARIANTS) - 1),
    resolver_index=st.integers(min_value=0, max_value=len(RESOLVERS) - 1),
    seq=st.integers(min_value=1, max_value=99),
    now=st.datetimes(
        min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2040, 1, 1), timezones=st.just(UTC)
    ),
)
def test_any_requisition_gives_valid_orders_or_refusals(
    items: list[LisItem], settings_index: int, resolver_index: int, seq: int, now: dt.datetime
) -> None:
    settings = SETTINGS_VARIANTS[settings_index]
    result = build(
        items, settings=settings, resolver=RESOLVERS[resolver_index], first_seq=seq, now=now
    )

    # Every distinct item ends in exactly one place.
    sent = [i for order in result.orders for i in order.item_ids]
    refused = [r.item_id for r in result.refusals]
    assert sorted(sent + refused) == sorted({i.item_id for i in items})
    assert all(r.reason.strip() for r in result.refusals)
    assert not [r for r in result.refusals if r.kind == "internal"]  # bugs are not hidden
    assert len(result.orders) <= 1

    for order in result.orders:
        json.dumps(order.payload)  # plain JSON data
        body = order.payload["batch"]
        for test in body["order"]["tests"]:
            # Quirk 1: no test collected after the batch's date.
            assert test["collectionDate"] <= body["date"]
            assert len(test["collectionDate"]) == 10 and len(test["collectionTime"]) == 8
            assert test["supportTestId"] and test["supportSpecimenId"]
        assert body["order"]["date"] <= body["date"]
        # Quirk 2: no externalId longer than the configured limit.
        for external_id in all_external_ids(order.payload):
            assert 0 < len(external_id) <= settings.bemsoft_extid_max
        patient = body["order"]["patient"]
        assert patient["gender"] in ("M", "F")
        assert patient["name"] and patient["name"] == " ".join(patient["name"].split())
        assert dt.date.fromisoformat(patient["birthDate"]) > dt.date(1900, 1, 1)
