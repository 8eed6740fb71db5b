"""`python -m policyroute._build [--force | --clean | --state]`: the compiled modules, in place.

See `_compiled.py`. `make compile` runs it with no option.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ._compiled import MODULES, PURE_ENV, build, clean, state


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
        try:
            build()
        except (Exception, SystemExit) as exc:  # no compiler, no mypyc: run from source
            clean()
            print(f"policyroute: not compiled ({exc}); running from source", file=sys.stderr)
            return 0
        print(f"policyroute: {len(MODULES)} modules compiled")
    else:
        print("usage: python -m policyroute._build [--force | --clean | --state]",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
