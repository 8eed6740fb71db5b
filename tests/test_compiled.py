"""The compiled per-request modules run only when built from the sources beside them."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import policyroute
from policyroute import _compiled

PACKAGE = Path(policyroute.__file__).resolve().parent
PROBE = (
    "import policyroute, policyroute.asgi.chain as c, policyroute.steps.state as s;"
    "print(policyroute.NATIVE, c.__file__.rsplit('.', 1)[-1], s.__file__.rsplit('.', 1)[-1])"
)


def _run(root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def _built() -> None:
    if os.environ.get(_compiled.PURE_ENV, "") not in ("", "0"):
        pytest.skip(f"{_compiled.PURE_ENV} is set: this run is the pure one")


def test_the_suite_runs_the_compiled_modules_built_from_these_sources() -> None:
    # `make test` compiles first (`make compile`): a build that fell back to source, or
    # a source edited since, would leave the suite testing something users do not run.
    _built()
    assert policyroute.NATIVE == "compiled", "run `make compile` (needs a C compiler)"
    for path in _compiled.MODULES:
        module = sys.modules.get(_compiled.module_name(path))
        if module is not None:
            assert module.__file__ is not None and not module.__file__.endswith(".py"), path


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    shutil.copytree(PACKAGE, root / "policyroute", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_a_module_edited_since_the_build_runs_from_source_and_says_so(tmp_path: Path) -> None:
    _built()
    root = _copy(tmp_path)
    assert _run(root).stdout.split() == ["compiled", "so", "so"]
    source = root / "policyroute" / "asgi" / "chain.py"
    source.write_text(source.read_text() + "\n# edited after the build\n")
    done = _run(root)
    # Every compiled module runs from source, not only the edited one: a compiled module
    # may have inlined what the edited one defines.
    assert done.stdout.split() == ["stale", "py", "py"]
    assert "built from other sources" in done.stderr and "make compile" in done.stderr


def test_a_module_the_compiled_ones_import_edited_since_the_build_runs_all_from_source(
    tmp_path: Path,
) -> None:
    # The compiled code checks what it reads from `errors.py` (not compiled itself) against
    # the types it had at the build: a build is stale once any module it saw changes.
    _built()
    root = _copy(tmp_path)
    source = root / "policyroute" / "errors.py"
    source.write_text(source.read_text() + "\n# edited after the build\n")
    done = _run(root)
    assert done.stdout.split() == ["stale", "py", "py"]
    assert "built from other sources" in done.stderr
    assert "errors.py" in _compiled.sources(root / "policyroute")


def test_a_build_for_another_python_is_not_taken_for_this_one(tmp_path: Path) -> None:
    _built()
    root = _copy(tmp_path)
    manifest = root / "policyroute" / _compiled.MANIFEST
    built = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**built, "python": "cpython-399"}))
    assert _run(root).stdout.split() == ["stale", "py", "py"]


def test_pure_runs_every_module_from_source(tmp_path: Path) -> None:
    _built()
    root = _copy(tmp_path)
    done = _run(root, **{_compiled.PURE_ENV: "1"})
    assert done.stdout.split() == ["pure", "py", "py"]
    assert done.stderr == ""


def test_extensions_without_a_manifest_are_never_loaded(tmp_path: Path) -> None:
    _built()
    root = _copy(tmp_path)
    (root / "policyroute" / _compiled.MANIFEST).unlink()
    assert _run(root).stdout.split() == ["stale", "py", "py"]


def test_a_profile_guided_build_runs_compiled_and_says_how_it_was_built(tmp_path: Path) -> None:
    # `make compile-pgo` writes `profile: pgo` in the manifest; the guard takes the build
    # on its sources alone, and `_build --state` names the profile.
    _built()
    root = _copy(tmp_path)
    manifest = root / "policyroute" / _compiled.MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "profile": "pgo"}))
    assert _run(root).stdout.split() == ["compiled", "so", "so"]
    state = subprocess.run(
        [sys.executable, "-m", "policyroute._build", "--state"],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert state.stdout.strip() == "compiled (pgo)"
    assert _compiled.profile_of(root / "policyroute") == "pgo"


def test_make_compile_replaces_a_build_a_profile_guided_build_left_instrumented(
    tmp_path: Path,
) -> None:
    # `_build --pgo` cut short between its builds leaves one that counts what it runs (and
    # writes profile files at every exit): `make compile` must build again, not keep it.
    # Without a C compiler that build fails at once, which shows it was attempted.
    _built()
    root = _copy(tmp_path)
    manifest = root / "policyroute" / _compiled.MANIFEST
    built = json.loads(manifest.read_text())
    env = {**os.environ, "PYTHONPATH": str(root), "CC": str(tmp_path / "no-such-cc")}
    manifest.write_text(json.dumps({**built, "profile": "pgo"}))
    kept = subprocess.run(
        [sys.executable, "-m", "policyroute._build"],
        cwd=root, env=env, capture_output=True, text=True, timeout=60, check=True,
    )
    assert "match their sources" in kept.stdout  # a profile-guided build is kept
    manifest.write_text(json.dumps({**built, "profile": "instrumented"}))
    done = subprocess.run(
        [sys.executable, "-m", "policyroute._build"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "compiling" in done.stdout and "not compiled" in done.stderr
    assert _compiled.native_files(root / "policyroute") == []


def test_a_manifest_without_a_known_profile_reads_as_a_plain_build(tmp_path: Path) -> None:
    root = tmp_path / "policyroute"
    root.mkdir()
    assert _compiled.profile_of(root) == "none"  # no manifest
    for written in ({}, {"profile": "turbo"}, {"profile": ["pgo"]}):
        (root / _compiled.MANIFEST).write_text(json.dumps(written))
        assert _compiled.profile_of(root) == "none", written
    (root / _compiled.MANIFEST).write_text("not json")
    assert _compiled.profile_of(root) == "none"


def _awaits_in_handlers(source: str) -> list[int]:
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try | ast.TryStar):
            continue
        bodies = [h.body for h in node.handlers] + [node.finalbody]
        for body in bodies:
            for statement in body:
                for inner in ast.walk(statement):
                    if isinstance(inner, ast.Await | ast.AsyncFor | ast.AsyncWith):
                        found.append(inner.lineno)
    return found


def test_no_compiled_coroutine_suspends_while_it_handles_an_exception() -> None:
    # A compiled coroutine that awaits inside `except` or `finally` leaks the exception it
    # handles to the coroutines resumed while it waits: mypyc keeps one handled-exception
    # state per thread, not one per coroutine. Seen here: a NOSCRIPT reply caught (and the
    # script reloaded inside the handler) surfaced later from an unrelated `with` block as
    # a 500 after a 201. So the compiled modules await only outside their handlers.
    found = {
        path: lines
        for path in _compiled.MODULES
        if (lines := _awaits_in_handlers((PACKAGE / path).read_text()))
    }
    assert found == {}
    # and the check itself finds what it looks for
    sample = "async def f():\n    try:\n        pass\n    except E:\n        await g()\n"
    assert _awaits_in_handlers(sample) == [5]


def test_without_a_c_compiler_the_build_says_so_and_everything_runs_from_source(
    tmp_path: Path,
) -> None:
    # `make compile` on a machine with Python alone: the build fails at the first compiler
    # call, removes what it left, and the package runs from source (the exit code is 0, so
    # `make run` and `make test` go on).
    _built()  # once a `make test` is enough: it takes the build's half minute
    root = _copy(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "policyroute._build", "--force"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), "CC": str(tmp_path / "no-such-cc")},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "not compiled" in done.stderr and "running from source" in done.stderr
    assert _compiled.native_files(root / "policyroute") == []
    assert _run(root).stdout.split() == ["pure", "py", "py"]


async def test_a_local_chain_request_runs_no_policyroute_code_interpreted(
    valkey_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the compiled build is for: the bench's local chain (JWT, scopes, roles, IP
    # allowlist), a request after warm-up, calls no policyroute function that runs as
    # Python bytecode, nor an `__init__` that `@dataclass` generated for one of its classes
    # (mypyc compiles the class, but that `__init__` runs interpreted). The access log and
    # tracing are off, as they are by default (the suite turns both on everywhere else).
    _built()
    import importlib
    import logging
    from types import FrameType
    from typing import Any

    from asgi_lifespan import LifespanManager
    from opentelemetry.trace import NoOpTracerProvider

    from bench.lua import _drive, _scopes
    from policyroute.observability import tracing

    access = logging.getLogger("policyroute.access")
    level = access.level
    monkeypatch.setenv("BENCH_POLICY", "local")
    monkeypatch.setenv("POLICYROUTE_VALKEY_URL", valkey_url)
    monkeypatch.delitem(sys.modules, "bench.apps.policyroute_app", raising=False)
    app: Any = importlib.import_module("bench.apps.policyroute_app").app
    ran: set[str] = set()

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event != "call":
            return
        code = frame.f_code
        owner = type(frame.f_locals.get("self")).__module__
        if code.co_filename.startswith(str(PACKAGE)) or (
            code.co_filename == "<string>" and owner.startswith("policyroute")
        ):
            # Not the suite's own span exporter, which FastAPI's spans reach (the suite
            # traces everything through the global provider, a sanitizing exporter on it).
            back = frame.f_back
            while back is not None and "/opentelemetry/" not in back.f_code.co_filename:
                back = back.f_back
            if back is None:
                ran.add(f"{code.co_filename}:{code.co_firstlineno} {code.co_name} ({owner})")

    access.setLevel(logging.WARNING)
    tracing.set_provider(NoOpTracerProvider())
    try:
        async with LifespanManager(app):
            assert await _drive(app, _scopes("/ping", 50, 0), 1) == 50
            sys.setprofile(profile)
            try:
                assert await _drive(app, _scopes("/ping", 20, 50), 1) == 20
            finally:
                sys.setprofile(None)
    finally:
        tracing.set_provider(None)
        access.setLevel(level)
        sys.modules.pop("bench.apps.policyroute_app", None)
    assert ran == set()
