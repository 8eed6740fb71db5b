"""The per-request modules compiled to C with mypyc, and the guard that keeps them honest.

Every request runs the same few thousand lines: the gate, the chain, the context, the
guards, the stateful step and the Valkey pipeline. Compiled with mypyc (the same typed
source, no hand-written C) they cost the worker about a third less CPU than interpreted.
Everything else (the policy language, the compiler, the CLI) stays plain Python.

Compiling is optional: without a C compiler, or with `POLICYROUTE_PURE=1`, every module
runs from its source, with the same behaviour (the test suite runs both ways).

`python -m policyroute._build` builds the modules in place, next to their sources
(`make compile`, which `make test`, `make run` and `make bench` run first), and writes
`_native.json`: the Python it was built for and the SHA-256 of the source of each compiled
module and of every package module they import (`sources`). At import, a build whose
sources no longer match (edited since the build, or a checkout of other code) must never
run: then every module runs from source, with one warning saying how to rebuild.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

# The modules compiled, as paths under the package. Only these are on every request's
# path; their classes that code outside this list subclasses allow interpreted subclasses.
MODULES = (
    "_ids.py",
    "asgi/_entry.py",
    "asgi/chain.py",
    "asgi/gate.py",
    "backends/clock.py",
    "backends/keys.py",
    "backends/pipeline.py",
    "backends/valkey.py",
    "compile/step.py",
    "identity/token_cache.py",
    "observability/metrics.py",
    "observability/requests.py",
    "observability/tracing.py",
    "steps/auth.py",
    "steps/cache.py",
    "steps/client.py",
    "steps/credits.py",
    "steps/idempotency.py",
    "steps/ip_allowlist.py",
    "steps/parts.py",
    "steps/rate_limit.py",
    "steps/roles.py",
    "steps/scopes.py",
    "steps/slots.py",
    "steps/state.py",
)
GROUP = "policyroute._native"  # the shared library: policyroute/_native__mypyc.*.so
MANIFEST = "_native.json"
PURE_ENV = "POLICYROUTE_PURE"

ROOT = Path(__file__).resolve().parent


def module_name(path: str) -> str:
    """`asgi/chain.py` -> `policyroute.asgi.chain`."""
    return "policyroute." + path.removesuffix(".py").replace("/", ".")


def sources(root: Path = ROOT) -> list[str]:
    """`MODULES` and every module of the package they import, at any depth (paths).

    mypyc compiles against all of them: the compiled code checks what it reads from them
    against the types they had at the build, so a build is only as fresh as the lot.
    """
    seen: set[str] = set()
    todo = list(MODULES)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        package = path.rsplit("/", 1)[0].split("/") if "/" in path else []
        if path.endswith("__init__.py"):
            package = path.split("/")[:-1]
        for node in ast.walk(ast.parse((root / path).read_bytes())):
            names: list[list[str]] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                elif node.module and node.module.split(".")[0] == "policyroute":
                    base = []
                else:
                    continue
                module = (node.module or "").split(".") if node.module else []
                if not node.level:
                    module = module[1:]
                names = [base + module] + [base + module + [a.name] for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[1:] for a in node.names
                         if a.name.split(".")[0] == "policyroute"]
            for parts in names:
                for found in ("/".join(parts) + ".py", "/".join([*parts, "__init__.py"])):
                    if parts and (root / found).is_file():
                        todo.append(found)
    return sorted(seen)


def digests(paths: Sequence[str], root: Path = ROOT) -> dict[str, str]:
    """The SHA-256 of each source, by path."""
    return {p: hashlib.sha256((root / p).read_bytes()).hexdigest() for p in paths}


def native_files(root: Path = ROOT) -> list[Path]:
    """The extension files a build left in the package (modules and shared library)."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    found = [p for p in root.rglob("*") if p.name.endswith(suffixes)]
    return sorted(found)


def state(root: Path = ROOT) -> str:
    """`compiled`, `pure` (nothing built, or POLICYROUTE_PURE set) or `stale`."""
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return "pure"
    manifest = root / MANIFEST
    if not manifest.is_file():
        return "stale" if native_files(root) else "pure"
    try:
        built = json.loads(manifest.read_text())
        fresh = (
            built["python"] == sys.implementation.cache_tag
            and set(MODULES) <= set(built["sources"])
            and built["sources"] == digests(list(built["sources"]), root)
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "stale"
    return "compiled" if fresh else "stale"


class _FromSource(importlib.abc.MetaPathFinder):
    """Loads the compiled modules from their `.py` sources, never their extensions."""

    def __init__(self, root: Path) -> None:
        self.paths = {module_name(p): root / p for p in MODULES}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        """A source spec for a compiled module's name; None for every other module."""
        source = self.paths.get(fullname)
        if source is None:
            return None
        return importlib.util.spec_from_file_location(fullname, source)


def guard(root: Path = ROOT) -> str:
    """Make sure no compiled module runs unless its source is the one it was built from.

    Called first thing by `policyroute/__init__.py`. Returns the state (`compiled`,
    `pure` or `stale`); for `pure` and `stale`, every listed module loads from source.
    """
    found = state(root)
    if found == "compiled":
        return found
    if native_files(root) and not any(isinstance(f, _FromSource) for f in sys.meta_path):
        sys.meta_path.insert(0, _FromSource(root))
        if found == "stale":
            warnings.warn(
                "policyroute: the compiled modules were built from other sources (or for "
                "another Python); running "
                "from source instead (rebuild with `make compile`, run from source on "
                "purpose with POLICYROUTE_PURE=1, or remove them with "
                "`python -m policyroute._build --clean`)",
                RuntimeWarning,
                stacklevel=2,
            )
    return found


# How a build was optimized (`_native.json`'s `profile`): `none`, `instrumented` (counting
# what a training run executes) or `pgo` (built again from those counts).
PROFILES = ("none", "instrumented", "pgo")


# Compiler and linker options of every build on Linux (ELF, where a shared library's own
# calls go through its PLT unless told otherwise): calls within the compiled library bound
# locally, and inlined into each other where the compiler sees fit. `bench.ab` against the
# same sources built without them: the full chain's worker CPU over bare 30.0 and 32.4 µs
# against 39.1 and 42.8 (bench/README.md).
ELF = sys.platform.startswith("linux")
LOCAL_CALLS = "-fno-semantic-interposition" if ELF else ""
LOCAL_LINK = "-Wl,-Bsymbolic-functions" if ELF else ""


def build(root: Path = ROOT, profile: str = "none", profile_dir: Path | None = None) -> None:
    """Compile `MODULES` in place with mypyc and write the manifest of their sources.

    `instrumented` builds count what runs into `profile_dir`; `pgo` builds from those
    counts (gcc's profile-guided optimization: hot paths laid out together, cold error
    paths out of the way, which matters to a worker whose time goes to cache misses).
    """
    from mypyc.build import mypycify
    from setuptools import setup  # type: ignore[import-untyped]

    assert profile in PROFILES and (profile == "none" or profile_dir is not None)
    clean(root)
    built = {
        "python": sys.implementation.cache_tag,
        "sources": digests(sources(root), root),
        "profile": profile,
    }
    work = root.parent / "build"
    # setuptools skips compiling when its last output looks newer than the C sources: a
    # build of another profile must start from nothing. Files only, not their folders:
    # setuptools remembers the folders it made in this process and would not make them again.
    for folder in [work / "native", *work.glob("lib.*")]:
        for stale in folder.rglob("*"):
            if stale.suffix in (".o", ".so"):
                stale.unlink()
    flags = {
        "none": "",
        "instrumented": f"-fprofile-generate={profile_dir} -fprofile-update=atomic",
        "pgo": f"-fprofile-use={profile_dir} -fprofile-partial-training -Wno-missing-profile",
    }[profile]
    saved = {name: os.environ.get(name) for name in ("CFLAGS", "LDFLAGS")}
    # One library's functions call each other directly, not through its PLT (nothing
    # outside it replaces them), and the compiler may inline them into each other.
    os.environ["CFLAGS"] = f"{saved['CFLAGS'] or ''} {LOCAL_CALLS} {flags}".strip()
    os.environ["LDFLAGS"] = f"{saved['LDFLAGS'] or ''} {LOCAL_LINK} {flags}".strip()
    here = Path.cwd()
    os.chdir(root.parent)
    try:
        paths = [f"policyroute/{p}" for p in MODULES]
        setup(
            name="policyroute-native",
            ext_modules=mypycify(paths, group_name=GROUP, opt_level="3"),
            script_args=["-q", "build_ext", "--inplace", "--build-temp", "build/native"],
        )
    finally:
        os.chdir(here)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    (root / MANIFEST).write_text(json.dumps(built, indent=1, sort_keys=True) + "\n")


def profile_of(root: Path = ROOT) -> str:
    """How the current build was optimized (`PROFILES`); `none` when nothing says."""
    try:
        found = json.loads((root / MANIFEST).read_text()).get("profile", "none")
    except (OSError, ValueError, AttributeError):
        return "none"
    return found if found in PROFILES else "none"


def clean(root: Path = ROOT) -> None:
    """Remove what a build left: the extensions and the manifest."""
    for path in native_files(root):
        path.unlink()
    (root / MANIFEST).unlink(missing_ok=True)


# Imported first by `policyroute/__init__.py`, before any compiled module.
NATIVE = guard()
