"""Entry point for ``python -m bench``."""

from bench.calls import main as calls
from bench.cli import main
from bench.gate import main as gate
from bench.pipeline import main as pipeline
from bench.workflow import main as workflow

status = main()
raise SystemExit(workflow() or gate() or pipeline() or calls() or status)
