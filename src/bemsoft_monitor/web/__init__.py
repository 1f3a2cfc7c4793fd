"""Painel web, health and metrics endpoints of a running monitor."""

from __future__ import annotations

from .server import (
    HttpBindError,
    PainelServer,
    exposure_warning,
    is_loopback,
    parse_addr,
    start_http,
)
from .views import Painel

__all__ = [
    "HttpBindError",
    "Painel",
    "PainelServer",
    "exposure_warning",
    "is_loopback",
    "parse_addr",
    "start_http",
]
