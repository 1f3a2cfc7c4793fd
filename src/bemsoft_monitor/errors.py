"""One exception tree; retry decisions depend on the type, never on message text."""

from __future__ import annotations


class MonitorError(Exception):
    """Base of every error the monitor raises on purpose."""


class ConfigError(MonitorError):
    """Invalid configuration; carries every problem found, in Portuguese."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class MapFileError(ConfigError):
    """A mapping file (tests map, material map) cannot be used."""


class DatabaseUnavailable(MonitorError):  # noqa: N818 - names other modules import; a rename gains nothing
    """The LIS or state database cannot be reached right now (transient)."""


class LeaseLost(MonitorError):  # noqa: N818 - names other modules import; a rename gains nothing
    """Another monitor holds the lease on the state store."""


class CatalogUnavailable(MonitorError):  # noqa: N818 - names other modules import; a rename gains nothing
    """Bemsoft's /tests could not be loaded and no good copy exists."""
