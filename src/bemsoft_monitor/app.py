"""Wiring: settings → engines, source, store, client, catalogue, monitor."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.pool import StaticPool

from .bemsoft import BemsoftClient
from .catalog import CatalogCache, MapReloader
from .config import Settings, config_warnings
from .dbconn import lis_schema, lis_url, make_engine, state_url
from .engine import Clock, Monitor
from .errors import CatalogUnavailable, ConfigError
from .logsetup import mask_payload
from .models import CatalogEntry
from .source import LisSource, install_sqlite_functions, lis_tables
from .store import OrderRow, StateStore

log = logging.getLogger(__name__)


@dataclass
class Parts:
    """Everything a command may need, built once from the settings."""

    settings: Settings
    lis_engine: sa.Engine
    source: LisSource
    store: StateStore
    client: BemsoftClient | None
    catalog: CatalogCache | None
    test_map: dict[str, str]
    material_map: dict[str, str]
    maps: MapReloader | None = None


def build_client(settings: Settings) -> BemsoftClient:
    """The HTTP client configured from BEMSOFT_*."""
    return BemsoftClient(
        base_url=settings.bemsoft_base_url, token=settings.token,
        endpoint=settings.bemsoft_endpoint, tests_endpoint=settings.bemsoft_tests_endpoint,
        timeout_s=settings.bemsoft_timeout, verify=settings.verify,
        proxy=settings.bemsoft_proxy,
    )


def build_parts(settings: Settings, *, state_in_memory: bool | None = None) -> Parts:
    """Build engines and components; maps are loaded (and validated) here."""
    for warning in config_warnings(settings):
        log.warning("configuração: %s", warning)
    lis_engine = make_engine(lis_url(settings), settings=settings)
    install_sqlite_functions(lis_engine)
    schema = lis_schema(settings, lis_engine.dialect.name)
    source = LisSource(tables=lis_tables(schema), support_labs=settings.support_labs)
    in_memory = settings.bemsoft_dry_run if state_in_memory is None else state_in_memory
    store = _state_store(settings, lis_engine, in_memory=in_memory)
    # Read (and validated) here; the running monitor re-reads a file that changes.
    maps = MapReloader(
        test_map_path=Path(settings.bemsoft_test_map_path)
        if settings.bemsoft_test_map_path else None,
        material_map_path=Path(settings.bemsoft_material_map_path)
        if settings.bemsoft_material_map_path else None)
    client: BemsoftClient | None = None
    if not settings.bemsoft_dry_run:
        client = build_client(settings)
    catalog = CatalogCache(
        fetch=client.fetch_catalog if client is not None else _no_http,
        path=Path(settings.bemsoft_catalog_cache),
        ttl_s=settings.bemsoft_tests_ttl,
        min_refresh_s=settings.bemsoft_tests_min_refresh,
    )
    return Parts(settings, lis_engine, source, store, client, catalog, maps.test_map,
                 maps.material_map, maps)


def _no_http() -> list[CatalogEntry]:
    raise CatalogUnavailable("BEMSOFT_DRY_RUN=1: nenhuma chamada HTTP é feita; usando a cópia "
                             "salva do catálogo, se houver")


def _state_store(settings: Settings, lis_engine: sa.Engine, *, in_memory: bool) -> StateStore:
    if in_memory:
        # DRY_RUN never touches the real state: nothing is marked as sent, the real
        # checkpoint stays where it is, and a later real run sends everything.
        engine = sa.create_engine("sqlite://", poolclass=StaticPool,
                                  connect_args={"check_same_thread": False})
        store = StateStore(engine)
        store.create_tables()
        real = _real_checkpoint(settings, lis_engine)
        if real is not None:
            store.init_checkpoint(real, _utcnow())
        return store
    engine = make_engine(state_url(settings), settings=settings, for_state=True)
    return StateStore(engine, schema=_state_schema(settings, engine))


def _state_schema(settings: Settings, engine: sa.Engine) -> str | None:
    """The LIS schema when the state lives in the LIS (or in any SQL Server database)."""
    if settings.state_db_url and engine.dialect.name != "mssql":
        return None  # a separate SQLite/PostgreSQL store uses its default schema
    return lis_schema(settings, engine.dialect.name)


def _real_checkpoint(settings: Settings, lis_engine: sa.Engine) -> int | None:
    """The real store's checkpoint, read-only; None when there is none (or no database)."""
    try:
        engine = make_engine(state_url(settings), settings=settings)
    except ConfigError:
        return None
    try:
        real = StateStore(engine, schema=_state_schema(settings, engine))
        if not sa.inspect(engine).has_table("_MonitorState", schema=real.state.schema):
            return None
        return real.checkpoint()
    except sa.exc.SQLAlchemyError:
        return None
    finally:
        engine.dispose()


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def build_monitor(
    parts: Parts, *, clock: Clock | None = None,
    show_payload: bool = True,
) -> Monitor:
    """A monitor over the given parts."""
    return Monitor(
        settings=parts.settings, lis_engine=parts.lis_engine, source=parts.source,
        store=parts.store, client=parts.client, catalog=parts.catalog,
        test_map=parts.test_map, material_map=parts.material_map, maps=parts.maps, clock=clock,
        show_payload=_payload_printer(parts.settings.log_pii) if show_payload else None,
    )


def _payload_printer(show_pii: bool) -> Callable[[OrderRow], None]:
    def show(order: OrderRow) -> None:
        payload = order.payload if show_pii else mask_payload(order.payload)
        log.info("[DRY_RUN] solicitação %s, pedido %s (chave %s):\n%s", order.requisition_id,
                 order.seq, order.key, json.dumps(payload, ensure_ascii=False, indent=2))

    return show
