"""`python -m policyroute._build [--force | --clean | --state]`: the compiled modules, in place.

See `_compiled.py`. `make compile` runs it with no option.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from ._compiled import MODULES, PURE_ENV, ROOT, build, clean, state

# What the compiler and mypyc print (warnings about comprehensions, every gcc command).
LOG = ROOT.parent / "build" / "native.log"


@contextlib.contextmanager
def _into(path: Path) -> Iterator[None]:
    """Everything written to stdout and stderr meanwhile (subprocesses' too) goes to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with path.open("wb") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def main(argv: Sequence[str] | None = None) -> int:
    """Build, clean or report the compiled modules.

    With no option it builds only when the built modules do not match their sources, and
    a build that fails (no C compiler) leaves the package to run from source.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--clean"]:
        clean()
    elif args == ["--state"]:
        print(state())
    elif args in ([], ["--force"]):
        if not args and state() == "compiled":
            print("policyroute: the compiled modules match their sources")
            return 0
        if os.environ.get(PURE_ENV, "") not in ("", "0"):
            print(f"policyroute: {PURE_ENV} is set: not compiled")
            return 0
        print(f"policyroute: compiling {len(MODULES)} modules (about a minute; log: {LOG})")
        try:
            with _into(LOG):
                build()
        except (Exception, SystemExit) as exc:  # no compiler, no mypyc: run from source
            clean()
            tail = "".join(LOG.read_text(errors="replace").splitlines(True)[-20:])
            print(f"{tail}policyroute: not compiled ({exc}); running from source",
                  file=sys.stderr)
            return 0
        print(f"policyroute: {len(MODULES)} modules compiled")
    else:
        print("usage: python -m policyroute._build [--force | --clean | --state]",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
