"""Entry point for ``python -m bench``."""

from bench.cli import main
from bench.workflow import main as workflow

status = main()
raise SystemExit(workflow() or status)
