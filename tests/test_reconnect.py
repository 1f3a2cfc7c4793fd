"""Connections are not pinged on checkout: one the server closed costs no outage and no item."""

from __future__ import annotations

import logging

import pytest
import sqlalchemy as sa

from bemsoft_monitor.simulator import Simulator

from .conftest import POSTGRES_URL, FakeClock, Lis, drive, make_monitor, make_settings


def test_connections_closed_by_the_server_are_replaced_without_an_outage(
        pg_url: str, tmp_path, sim: Simulator, clock: FakeClock,
        caplog: pytest.LogCaptureFixture) -> None:
    lis = Lis(pg_url)
    lis.patient()
    lis.requisition(1)
    lis.item(1, "FE", item_id=10)
    settings = make_settings(pg_url, tmp_path, sim)
    monitor, parts = make_monitor(settings, clock)
    backends: list[int] = []
    for engine in (parts.lis_engine, parts.store.engine):
        sa.event.listen(engine, "connect",
                        lambda dbapi, _rec: backends.append(dbapi.info.backend_pid))
    drive(monitor, clock)
    assert backends, "the monitor opened its connections after the listeners"
    # The server restarts (or a firewall drops idle connections): every pooled one dies.
    admin = sa.create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        killed = conn.execute(sa.text("SELECT count(*) FROM (SELECT pg_terminate_backend(pid) "
                                      "FROM unnest(CAST(:pids AS int[])) AS pid) AS t"),
                              {"pids": backends}).scalar()
    admin.dispose()
    assert killed == len(backends)
    lis.requisition(2)
    lis.item(2, "FE", item_id=20)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bemsoft_monitor"):
        clock.advance(1)
        drive(monitor, clock)
    saved = {t["test_external_id"] for t in sim.saved_tests()}
    print(f"\nconexões encerradas pelo servidor: {killed}; exames salvos: {sorted(saved)}")
    assert saved == {"item-10", "item-20"}
    messages = [r.getMessage() for r in caplog.records]
    assert any("reconectando" in m for m in messages), messages
    assert not any("indisponível" in m for m in messages), messages
    monitor.close()
    lis.dispose()
