"""The `policyroute` command: one module per subcommand."""

from __future__ import annotations

from .main import EXIT_FINDINGS, EXIT_OK, EXIT_USAGE, UsageError, load_app, main, parser

__all__ = ["EXIT_FINDINGS", "EXIT_OK", "EXIT_USAGE", "UsageError", "load_app", "main", "parser"]
