"""The `policyroute` command: `main` parses the command line, one module per subcommand."""

from __future__ import annotations

from ..errors import UsageError
from ._common import EXIT_FINDINGS, EXIT_OK, EXIT_USAGE, load_app
from .main import main, parser

__all__ = ["EXIT_FINDINGS", "EXIT_OK", "EXIT_USAGE", "UsageError", "load_app", "main", "parser"]
