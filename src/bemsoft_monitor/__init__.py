"""Bemsoft Monitor: LIS (SQL Server) → Bemsoft/WiseLab orders, exactly once in effect."""

__version__ = "0.1.0"
__all__ = ["__version__"]
