"""``python -m bemsoft_monitor``."""

from .cli import main

main()
