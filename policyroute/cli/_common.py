"""What the subcommands share: exit codes, the policy paths given, the app a command names."""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from ..errors import UsageError

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose `--help` ends with the command's exit codes (`exits`)."""

    def __init__(self, *args: Any, exits: Mapping[int, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.exits: dict[int, str] = dict(exits or {})

    def format_help(self) -> str:
        """The help argparse writes, then an `exit codes:` section."""
        text = super().format_help()
        if not self.exits:
            return text
        width = max(shutil.get_terminal_size().columns - 2, 40)  # as argparse wraps
        pad = max(len(str(code)) for code in self.exits)
        lines = [text.rstrip("\n"), "", "exit codes:"]
        for code, when in self.exits.items():
            first = f"  {code:<{pad}}  "
            lines.append(textwrap.fill(when, width, initial_indent=first,
                                       subsequent_indent=" " * len(first)))
        return "\n".join(lines) + "\n"


def existing(paths: Sequence[str] | None, default: str = "policies") -> list[str]:
    """The policy paths a command was given (or the default); a usage error names one that
    does not exist."""
    found = list(paths or [default])
    missing = [p for p in found if not Path(p).exists()]
    if missing:
        raise UsageError(f"no policy file or directory {missing[0]!r}")
    return found


def load_app(spec: str) -> FastAPI:
    """Import `MODULE:ATTR` and return the FastAPI app it names."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"--app takes MODULE:ATTR, got {spec!r}")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    # Importing the app runs its `install`; lint and explain must not need live backends.
    previous = os.environ.get("POLICYROUTE_OFFLINE")
    os.environ["POLICYROUTE_OFFLINE"] = "1"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from exc
    finally:
        if previous is None:
            del os.environ["POLICYROUTE_OFFLINE"]
        else:
            os.environ["POLICYROUTE_OFFLINE"] = previous
    app = getattr(module, attr, None)
    if not isinstance(app, FastAPI):
        raise UsageError(f"{spec} is not a FastAPI app")
    return app
