"""`python -m policyroute._build [--force | --pgo [--force] | --clean | --state]`: the
compiled modules, in place.

See `_compiled.py`. `make compile` runs it with no option; `make compile-pgo` (which `make
bench` runs) with `--pgo`: the build production should run, optimized by gcc from a
profile of the bench's chains (`bench/README.md`, "Profile-guided build").
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from ._compiled import MODULES, PURE_ENV, ROOT, build, clean, profile_of, state

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


# The training run of a profile-guided build: the bench's policy sets served in process
# (the chains production runs: local, one limit, the full stateful chain), on a real
# Valkey it starts itself. From the repository only: an installed package has no bench.
TRAINING = ("-m", "bench.inproc", "--tasks", "32", "--uvloop", "core", "local", "limit", "full")
PROFILE_DIR = ROOT.parent / "build" / "pgo-profile"


def _compile(profile: str = "none") -> bool:
    """One build of `profile`, its output in `LOG`; False (and no build left) on failure."""
    try:
        with _into(LOG):
            build(profile=profile, profile_dir=PROFILE_DIR)
    except (Exception, SystemExit) as exc:  # no compiler, no mypyc: run from source
        clean()
        tail = "".join(LOG.read_text(errors="replace").splitlines(True)[-20:])
        print(f"{tail}policyroute: not compiled ({exc}); running from source", file=sys.stderr)
        return False
    return True


def _train() -> str | None:
    """Run the training workload on the instrumented build; why it failed, else None."""
    if not (ROOT.parent / "bench" / "inproc.py").is_file():
        return "no bench/ beside the package (a profile-guided build runs from the repository)"
    done = subprocess.run(
        [sys.executable, *TRAINING], cwd=ROOT.parent, capture_output=True, text=True,
        check=False,
    )
    if done.returncode != 0:
        return f"the training run failed: {done.stderr.strip()[-500:]}"
    return None


def _pgo(force: bool) -> int:
    """Build instrumented, train, build again from the counts (a plain build if training
    cannot run)."""
    if not force and state() == "compiled" and profile_of() == "pgo":
        print("policyroute: the profile-guided build matches its sources")
        return 0
    print(f"policyroute: a profile-guided build of {len(MODULES)} modules: built to count, "
          f"trained, built again (about three minutes; log: {LOG})")
    shutil.rmtree(PROFILE_DIR, ignore_errors=True)
    PROFILE_DIR.mkdir(parents=True)
    if not _compile("instrumented"):
        return 0
    failed = _train()
    if failed is not None:
        print(f"policyroute: {failed}; building without a profile", file=sys.stderr)
        if _compile("none"):
            print(f"policyroute: {len(MODULES)} modules compiled")
        return 0
    if _compile("pgo"):
        print(f"policyroute: {len(MODULES)} modules compiled, profile-guided")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Build, clean or report the compiled modules.

    With no option it builds only when the built modules do not match their sources
    (a profile-guided build that matches is kept), and a build that fails (no C compiler)
    leaves the package to run from source. `--pgo` makes a profile-guided build.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--clean"]:
        clean()
    elif args == ["--state"]:
        found = state()
        print(f"{found} ({profile_of()})" if found == "compiled" else found)
    elif args in ([], ["--force"], ["--pgo"], ["--pgo", "--force"]):
        if os.environ.get(PURE_ENV, "") not in ("", "0"):
            print(f"policyroute: {PURE_ENV} is set: not compiled")
            return 0
        if "--pgo" in args:
            return _pgo("--force" in args)
        if not args and state() == "compiled":
            if profile_of() == "instrumented":  # a profile-guided build cut short
                return _plain()
            print("policyroute: the compiled modules match their sources")
            return 0
        return _plain()
    else:
        print("usage: python -m policyroute._build [--force | --pgo [--force] | --clean | "
              "--state]", file=sys.stderr)
        return 2
    return 0


def _plain() -> int:
    print(f"policyroute: compiling {len(MODULES)} modules (about a minute; log: {LOG})")
    if _compile():
        print(f"policyroute: {len(MODULES)} modules compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
