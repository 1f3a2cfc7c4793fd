"""The Bemsoft simulator, driven over real HTTP on a loopback port."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from bemsoft_monitor import simulator as simulator_module
from bemsoft_monitor.simulator import Simulator, load_catalog_sample, validate_order

# Fixture values for the simulator, not secrets.
TOKEN = "test-token"  # noqa: S105
WRONG_TOKEN = "outro-token"  # noqa: S105
ROTATED_TOKEN = "novo-token"  # noqa: S105


def make_order(
    *,
    batch_id: str = "sol-4497",
    batch_date: str = "2025-07-01",
    tests: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A valid POST /requests body in the shape bemsoft-api.md documents."""
    if tests is None:
        tests = [make_test("item-1", "FE", "SORO"), make_test("item-2", "TSH", "SORO")]
    return {
        "batch": {
            "externalId": batch_id,
            "date": batch_date,
            "time": "08:00:00",
            "order": {
                "externalId": "order-4497",
                "date": batch_date,
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
                "tests": tests,
            },
        }
    }


def make_test(
    external_id: str, test_id: str, specimen_id: str, collection_date: str = "2025-07-01"
) -> dict[str, Any]:
    return {
        "externalId": external_id,
        "collectionDate": collection_date,
        "collectionTime": "08:10:00",
        "supportTestId": test_id,
        "supportSpecimenId": specimen_id,
        "additionalInformations": [{"key": "origem", "value": "Sistema"}],
        "condition": "",
        "preservative": "",
        "diuresisVolume": 0,
        "diuresisTime": 0,
    }


def post_order(
    sim: Simulator,
    body: Any,
    *,
    key: str | None = "key-1",
    token: str | None = TOKEN,
    timeout_s: float = 5.0,
) -> requests.Response:
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if key is not None:
        headers["Idempotency-Key"] = key
    return requests.post(f"{sim.url}/requests", json=body, headers=headers, timeout=timeout_s)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(token=TOKEN) as simulator:
        yield simulator


# --------------------------------------------------------------------------- auth and catalogue


def test_missing_token_returns_401_with_portuguese_message(sim: Simulator) -> None:
    response = requests.get(f"{sim.url}/tests", timeout=5)
    assert response.status_code == 401
    assert response.json() == {"message": "Token ausente ou inválido"}


def test_wrong_token_returns_401_on_requests_and_saves_nothing(sim: Simulator) -> None:
    response = post_order(sim, make_order(), token=WRONG_TOKEN)
    assert response.status_code == 401
    assert sim.saved_tests() == []
    assert [c["status"] for c in sim.calls()] == [401]


def test_catalogue_lists_sample_with_both_glucose_variants(sim: Simulator) -> None:
    response = requests.get(f"{sim.url}/tests", headers=auth(), timeout=5)
    assert response.status_code == 200
    tests = response.json()["tests"]
    assert tests == load_catalog_sample()
    assert len(tests) >= 35
    glucose = {t["specimen"]["id"]: t["specimen"]["name"] for t in tests if t["id"] == "GLI"}
    assert glucose == {"PLASMA": "Plasma fluoretado", "URINA": "Urina"}
    by_id = {t["id"]: t["specimen"]["id"] for t in tests}
    assert by_id["FE"] == "SORO"
    assert by_id["TSH"] == "SORO"


def test_set_catalog_serves_new_tests() -> None:
    catalog = [{"id": "NOVO", "name": "EXAME NOVO", "specimen": {"id": "SORO", "name": "Soro"}}]
    with Simulator(token=TOKEN, catalog=catalog) as sim:
        assert requests.get(f"{sim.url}/tests", headers=auth(), timeout=5).json() == {
            "tests": catalog
        }
        sim.set_catalog([*catalog, {**catalog[0], "id": "OUTRO"}])
        tests = requests.get(f"{sim.url}/tests", headers=auth(), timeout=5).json()["tests"]
    assert [t["id"] for t in tests] == ["NOVO", "OUTRO"]


def test_set_token_revokes_the_old_token(sim: Simulator) -> None:
    sim.set_token(ROTATED_TOKEN)
    assert requests.get(f"{sim.url}/tests", headers=auth(), timeout=5).status_code == 401
    rotated = {"Authorization": f"Bearer {ROTATED_TOKEN}"}
    assert requests.get(f"{sim.url}/tests", headers=rotated, timeout=5).status_code == 200


# --------------------------------------------------------------------------- POST /requests


def test_valid_order_returns_201_and_saves_each_test(sim: Simulator) -> None:
    response = post_order(sim, make_order(), key="sol-4497:a")
    assert response.status_code == 201
    assert response.json()["status"] == "created"
    assert response.json()["id"]
    saved = sim.saved_tests()
    assert [(s["test_external_id"], s["support_test_id"]) for s in saved] == [
        ("item-1", "FE"),
        ("item-2", "TSH"),
    ]
    assert saved[0]["key"] == "sol-4497:a"
    assert saved[0]["batch_external_id"] == "sol-4497"
    assert saved[0]["order_external_id"] == "order-4497"
    assert saved[0]["patient_external_id"] == "pat-3384"
    assert saved[0]["support_specimen_id"] == "SORO"
    assert saved[0]["collection_date"] == saved[0]["batch_date"] == "2025-07-01"
    listing = requests.get(f"{sim.url}/saved", timeout=5).json()
    assert listing["count"] == 2
    assert listing["tests"] == saved
    assert sim.calls()[0] | {"at": None} == {
        "key": "sol-4497:a",
        "status": 201,
        "at": None,
        "batch": "sol-4497",
        "n_tests": 2,
        "fault": None,
    }


def test_reused_key_returns_409_and_saves_nothing(sim: Simulator) -> None:
    assert post_order(sim, make_order(), key="k").status_code == 201
    other_items = make_order(tests=[make_test("item-9", "GLI", "PLASMA")])
    response = post_order(sim, other_items, key="k")
    assert response.status_code == 409
    assert response.json() == {"message": "Idempotency-Key já processada"}
    assert len(sim.saved_tests()) == 2


def test_non_json_body_returns_400(sim: Simulator) -> None:
    response = requests.post(
        f"{sim.url}/requests",
        data=b"{not json",
        headers={**auth(), "Idempotency-Key": "k", "Content-Type": "application/json"},
        timeout=5,
    )
    assert response.status_code == 400
    assert response.json()["message"].startswith("Corpo não é JSON válido: ")


def test_bad_gender_returns_400_naming_the_field(sim: Simulator) -> None:
    body = make_order()
    body["batch"]["order"]["patient"]["gender"] = "X"
    response = post_order(sim, body)
    assert response.status_code == 400
    assert response.json() == {"message": "batch.order.patient.gender: deve ser M ou F"}
    assert sim.saved_tests() == []


def test_rejected_body_does_not_record_the_key(sim: Simulator) -> None:
    body = make_order()
    body["batch"]["date"] = "01/07/2025"
    assert post_order(sim, body, key="k").status_code == 400
    assert post_order(sim, make_order(), key="k").status_code == 201


def test_missing_idempotency_key_returns_400(sim: Simulator) -> None:
    response = post_order(sim, make_order(), key=None)
    assert response.status_code == 400
    assert "Idempotency-Key" in response.json()["message"]
    assert sim.saved_tests() == []


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda b: b["batch"].pop("externalId"), "batch.externalId: campo obrigatório"),
        (
            lambda b: b["batch"].update(time="8:00"),
            "batch.time: deve ser uma hora válida no formato HH:MM:SS",
        ),
        (
            lambda b: b["batch"]["order"].update(date="2025-02-30"),
            "batch.order.date: deve ser uma data válida no formato AAAA-MM-DD",
        ),
        (
            lambda b: b["batch"]["order"]["patient"].update(name=""),
            "batch.order.patient.name: deve ser um texto não vazio",
        ),
        (
            lambda b: b["batch"]["order"]["physician"].update(councilUf=None),
            "batch.order.physician.councilUf: deve ser um texto",
        ),
        (
            lambda b: b["batch"]["order"].update(tests=[]),
            "batch.order.tests: deve ser uma lista não vazia",
        ),
        (
            lambda b: b["batch"]["order"]["tests"][1].update(supportSpecimenId=""),
            "batch.order.tests[1].supportSpecimenId: deve ser um texto não vazio",
        ),
        (
            lambda b: b["batch"]["order"]["tests"][0].update(
                additionalInformations=[{"key": "origem", "value": 3}]
            ),
            "batch.order.tests[0].additionalInformations[0].value: deve ser um texto",
        ),
    ],
)
def test_shape_problems_are_reported_with_the_field_path(mutate: Any, expected: str) -> None:
    body = copy.deepcopy(make_order())
    mutate(body)
    assert validate_order(body) == expected


def test_order_without_physician_or_additional_informations_is_valid() -> None:
    body = make_order()
    del body["batch"]["order"]["physician"]
    del body["batch"]["order"]["tests"][0]["additionalInformations"]
    assert validate_order(body) is None


# --------------------------------------------------------------------------- observed quirks


def test_test_collected_after_batch_date_is_silently_not_saved(sim: Simulator) -> None:
    body = make_order(
        tests=[
            make_test("item-1", "FE", "SORO", "2025-07-01"),
            make_test("item-2", "TSH", "SORO", "2025-07-02"),
        ]
    )
    response = post_order(sim, body)
    assert response.status_code == 201
    assert "error" not in response.json()
    assert [s["test_external_id"] for s in sim.saved_tests()] == ["item-1"]


def test_long_external_id_returns_201_with_error_and_saves_nothing(sim: Simulator) -> None:
    long_id = "sol-43335-cd27cc0df48"  # 21 characters, one over the default limit
    response = post_order(sim, make_order(batch_id=long_id), key="k")
    assert response.status_code == 201
    assert response.json() == {
        "error": f"Não foi possível salvar os dados recebidos no lote {long_id}."
    }
    assert sim.saved_tests() == []
    # The key was recorded anyway: a retry with it gets 409 for an order never saved.
    assert post_order(sim, make_order(batch_id="sol-43335"), key="k").status_code == 409


def test_long_test_external_id_is_refused_like_a_long_batch_id(sim: Simulator) -> None:
    body = make_order(tests=[make_test("x" * 21, "FE", "SORO")])
    assert "error" in post_order(sim, body).json()
    assert sim.saved_tests() == []


def test_external_id_limit_is_configurable() -> None:
    with Simulator(token=TOKEN, extid_max=30) as sim:
        response = post_order(sim, make_order(batch_id="sol-43335-cd27cc0df481"))
    assert response.json()["status"] == "created"
    assert len(sim.saved_tests()) == 2


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_status_fault_before_save_answers_status_and_saves_nothing(
    sim: Simulator, status: int
) -> None:
    sim.set_faults([{"kind": "status", "status": status, "after_save": False}])
    response = post_order(sim, make_order(), key="k")
    assert response.status_code == status
    assert sim.saved_tests() == []
    # Key not recorded, and the fault was consumed: the retry goes through.
    assert post_order(sim, make_order(), key="k").status_code == 201
    assert len(sim.saved_tests()) == 2


def test_status_fault_after_save_saves_and_records_the_key(sim: Simulator) -> None:
    sim.set_faults([{"kind": "status", "status": 502, "after_save": True}])
    assert post_order(sim, make_order(), key="k").status_code == 502
    assert len(sim.saved_tests()) == 2
    assert post_order(sim, make_order(), key="k").status_code == 409
    assert len(sim.saved_tests()) == 2


def test_429_fault_carries_retry_after_and_records_nothing(sim: Simulator) -> None:
    sim.set_faults([{"kind": "429", "retry_after": 2}])
    response = post_order(sim, make_order(), key="k")
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "2"
    assert sim.saved_tests() == []
    assert post_order(sim, make_order(), key="k").status_code == 201


def test_error201_fault_answers_201_with_error_and_records_nothing(sim: Simulator) -> None:
    sim.set_faults([{"kind": "error201"}])
    response = post_order(sim, make_order(), key="k")
    assert response.status_code == 201
    assert response.json() == {
        "error": "Não foi possível salvar os dados recebidos no lote sol-4497."
    }
    assert sim.saved_tests() == []
    assert post_order(sim, make_order(), key="k").status_code == 201


def test_reset_fault_drops_the_connection_without_saving(sim: Simulator) -> None:
    sim.set_faults([{"kind": "reset"}])
    with pytest.raises(requests.ConnectionError):
        post_order(sim, make_order(), key="k")
    assert sim.saved_tests() == []
    assert sim.calls()[0]["status"] is None
    assert post_order(sim, make_order(), key="k").status_code == 201


def test_reset_fault_after_save_drops_the_connection_but_saves(sim: Simulator) -> None:
    sim.set_faults([{"kind": "reset", "after_save": True}])
    with pytest.raises(requests.ConnectionError):
        post_order(sim, make_order(), key="k")
    assert len(sim.saved_tests()) == 2
    assert post_order(sim, make_order(), key="k").status_code == 409


def test_delay_fault_answers_late_then_normally(sim: Simulator) -> None:
    sim.set_faults([{"kind": "delay", "seconds": 0.3}])
    started = time.monotonic()
    response = post_order(sim, make_order())
    assert time.monotonic() - started >= 0.3
    assert response.status_code == 201
    assert len(sim.saved_tests()) == 2


def test_delay_longer_than_client_timeout_raises_timeout(sim: Simulator) -> None:
    sim.set_faults([{"kind": "delay", "seconds": 0.5}])
    with pytest.raises(requests.Timeout):
        post_order(sim, make_order(), timeout_s=0.1)


def test_html_fault_answers_an_html_error_page(sim: Simulator) -> None:
    sim.set_faults([{"kind": "html", "status": 502}])
    response = post_order(sim, make_order())
    assert response.status_code == 502
    assert response.headers["Content-Type"].startswith("text/html")
    assert "<html>" in response.text
    assert "Bad Gateway" in response.text
    assert sim.saved_tests() == []


def test_empty_fault_answers_an_empty_body(sim: Simulator) -> None:
    sim.set_faults([{"kind": "empty", "status": 200}])
    response = post_order(sim, make_order())
    assert response.status_code == 200
    assert response.content == b""
    assert sim.saved_tests() == []


def test_faults_are_consumed_one_per_post_in_order(sim: Simulator) -> None:
    sim.set_faults([{"kind": "status", "status": 503}, {"kind": "429"}])
    statuses = [post_order(sim, make_order(), key="k").status_code for _ in range(3)]
    assert statuses == [503, 429, 201]
    assert [c["fault"] for c in sim.calls()] == ["status", "429", None]


def test_unauthorised_post_does_not_consume_a_fault(sim: Simulator) -> None:
    sim.set_faults([{"kind": "status", "status": 503}])
    assert post_order(sim, make_order(), token=None).status_code == 401
    assert post_order(sim, make_order()).status_code == 503


def test_unknown_fault_kind_is_rejected(sim: Simulator) -> None:
    with pytest.raises(ValueError, match="Falha simulada inválida"):
        sim.set_faults([{"kind": "meteoro"}])


def test_constant_latency_applies_to_every_post() -> None:
    with Simulator(token=TOKEN, latency_s=0.15) as sim:
        started = time.monotonic()
        assert post_order(sim, make_order()).status_code == 201
        assert time.monotonic() - started >= 0.15


# --------------------------------------------------------------------------- control endpoints


def test_control_endpoints_drive_a_simulator_in_another_process(sim: Simulator) -> None:
    faults = {"faults": [{"kind": "status", "status": 504}]}
    assert requests.post(f"{sim.url}/_sim/faults", json=faults, timeout=5).status_code == 200
    assert post_order(sim, make_order(), key="a").status_code == 504
    assert post_order(sim, make_order(), key="a").status_code == 201

    calls = requests.get(f"{sim.url}/_sim/calls", timeout=5).json()
    assert calls["count"] == 2
    assert [c["status"] for c in calls["calls"]] == [504, 201]

    token = {"token": ROTATED_TOKEN}
    assert requests.post(f"{sim.url}/_sim/token", json=token, timeout=5).status_code == 200
    assert post_order(sim, make_order(), key="b").status_code == 401
    assert post_order(sim, make_order(), key="b", token=ROTATED_TOKEN).status_code == 201

    assert requests.post(f"{sim.url}/_sim/reset", timeout=5).status_code == 200
    assert sim.saved_tests() == []
    assert sim.calls() == []
    assert post_order(sim, make_order(), key="a", token=ROTATED_TOKEN).status_code == 201


def test_control_faults_endpoint_rejects_unknown_kind(sim: Simulator) -> None:
    bad = {"faults": [{"kind": "meteoro"}]}
    response = requests.post(f"{sim.url}/_sim/faults", json=bad, timeout=5)
    assert response.status_code == 400
    assert "Falha simulada inválida" in response.json()["message"]


def test_reset_forgets_saved_tests_keys_calls_and_faults(sim: Simulator) -> None:
    assert post_order(sim, make_order(), key="k").status_code == 201
    sim.set_faults([{"kind": "status", "status": 500}])
    sim.reset()
    assert sim.saved_tests() == []
    assert sim.calls() == []
    assert post_order(sim, make_order(), key="k").status_code == 201


def test_unknown_path_returns_404_json(sim: Simulator) -> None:
    response = requests.get(f"{sim.url}/nada", headers=auth(), timeout=5)
    assert response.status_code == 404
    assert "message" in response.json()


# --------------------------------------------------------------------------- lifecycle


def test_restart_keeps_the_port_and_stop_refuses_connections() -> None:
    sim = Simulator(token=TOKEN).start()
    try:
        url = sim.url
        session = requests.Session()
        assert session.get(f"{url}/tests", headers=auth(), timeout=5).status_code == 200
        sim.stop()
        with pytest.raises(requests.ConnectionError):
            session.get(f"{url}/tests", headers=auth(), timeout=5)
        sim.start()
        assert sim.url == url
        assert session.get(f"{url}/tests", headers=auth(), timeout=5).status_code == 200
    finally:
        sim.stop()


def test_stop_does_not_wait_for_a_delayed_request() -> None:
    sim = Simulator(token=TOKEN).start()
    sim.set_faults([{"kind": "delay", "seconds": 30}])
    with pytest.raises(requests.Timeout):
        post_order(sim, make_order(), timeout_s=0.1)
    started = time.monotonic()
    sim.stop()
    assert time.monotonic() - started < 1.0


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM não existe no Windows")
def test_serve_prints_url_and_stops_cleanly_on_sigterm() -> None:
    src_dir = Path(simulator_module.__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(src_dir), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "bemsoft_monitor.simulator", "--port", "0", "--token", TOKEN],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        first_line = process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:\d+", first_line)
        assert match, first_line
        response = requests.get(f"{match.group(0)}/tests", headers=auth(), timeout=5)
        assert response.status_code == 200
        process.send_signal(signal.SIGTERM)
        remaining, _ = process.communicate(timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    assert "Simulador parado." in remaining


# ------------------------------------------------------------ --catalog FILE, start errors


def _run_simulator_module(*args: str) -> subprocess.CompletedProcess[str]:
    src_dir = Path(simulator_module.__file__).resolve().parents[1]
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(src_dir), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "bemsoft_monitor.simulator", *args],
                          capture_output=True, text=True, env=env, timeout=30, check=False)


def test_catalog_file_is_served_instead_of_the_sample(tmp_path: Path) -> None:
    entries = [{"id": "LAB1", "name": "EXAME DO LAB", "specimen": {"id": "SORO", "name": "Soro"}},
               {"id": "LAB1", "name": "EXAME DO LAB (URINA)",
                "specimen": {"id": "URINA", "name": "Urina"}}]
    path = tmp_path / "catalogo.json"
    path.write_text('\ufeff{"tests": ' + json.dumps(entries) + "}",
                    encoding="utf-8")
    with Simulator(token=TOKEN, catalog_path=path) as sim:
        served = requests.get(f"{sim.url}/tests", headers=auth(), timeout=5).json()
    assert served == {"tests": entries}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"tests": [\n  {"id": "FE",\n}', "linha 3, coluna 1"),
        ('{"tests": [{"id": "FE"}]}', "tests[0].specimen"),
        ('{"tests": [{"id": " ", "specimen": {"id": "SORO"}}]}', "tests[0].id"),
        ('{"exames": []}', 'esperado {"tests": [...]}'),
        ('{"tests": []}', "vazia"),
    ],
)
def test_unusable_catalog_file_is_one_clear_line_and_exit_2(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "catalogo.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(expected)):
        simulator_module.load_catalog_file(path)
    proc = _run_simulator_module("--port", "0", "--catalog", str(path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert expected in proc.stderr and "catalogo.json" in proc.stderr


def test_port_in_use_is_one_clear_line_and_exit_2() -> None:
    with Simulator(token=TOKEN) as busy:
        proc = _run_simulator_module("--port", str(busy.port))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"127.0.0.1:{busy.port}" in proc.stderr and "--port" in proc.stderr


def test_saved_listing_is_read_only(sim: Simulator) -> None:
    assert post_order(sim, make_order(), key="k").status_code == 201
    before = requests.get(f"{sim.url}/saved", timeout=5).json()
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        response = requests.request(method, f"{sim.url}/saved", json={"tests": []}, timeout=5)
        assert response.status_code == 405, method
        assert "não permitido" in response.json()["message"]
    assert requests.get(f"{sim.url}/saved", timeout=5).json() == before
    assert before["count"] == 2


def test_simulator_command_reports_a_bad_catalog_file_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "catalogo.json"
    path.write_text('{"tests": [{"id": "FE"}]}', encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "bemsoft_monitor", "simulator", "--port", "0",
                           "--catalog", str(path)], capture_output=True, text=True, timeout=30,
                          check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "tests[0].specimen" in proc.stderr
