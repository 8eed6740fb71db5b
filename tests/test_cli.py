"""The `policyroute` command: exit codes, formats, explain and the committed schema."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from policyroute.cli import main
from policyroute.language.loader import is_test_file
from policyroute.language.schema import policy_schema, schema_text

from .conftest import REPO


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the command in-process; return exit code, stdout, stderr."""
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_lint_clean_example_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "lint", str(REPO / "examples" / "policies"))
    assert code == 0, out
    assert out == ""


def test_lint_with_app_checks_routes_both_ways(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "lint", str(REPO / "examples" / "policies"), "--app", "examples.app:app"
    )
    assert code == 0, out


def test_lint_reports_findings_with_exit_one(
    capsys: pytest.CaptureFixture[str], policy_dir: Path
) -> None:
    (policy_dir / "a.yaml").write_text("version: 1\nroutes:\n  GET /x:\n    publc: true\n")
    code, out, _ = run(capsys, "lint", str(policy_dir))
    assert code == 1
    assert out.strip() == (
        f"{policy_dir / 'a.yaml'}:4:5: error[unknown-key] unknown key 'publc'; "
        "did you mean 'public'? (at routes.GET /x.publc)"
    )


def test_lint_json_format(capsys: pytest.CaptureFixture[str], policy_dir: Path) -> None:
    (policy_dir / "a.yaml").write_text("version: 1\nroutes:\n  GET /x:\n    timeout: soon\n")
    code, out, _ = run(capsys, "lint", str(policy_dir), "--format", "json")
    assert code == 1
    [finding] = json.loads(out)
    assert finding["line"] == 4 and finding["code"] == "invalid-value"
    assert finding["path"] == "routes.GET /x.timeout"


@pytest.mark.parametrize("fmt", ["sarif", "github"])
def test_lint_ci_formats(fmt: str, capsys: pytest.CaptureFixture[str], policy_dir: Path) -> None:
    (policy_dir / "a.yaml").write_text("version: 1\nroutes:\n  GET /x:\n    timeout: soon\n")
    code, out, _ = run(capsys, "lint", str(policy_dir), "--format", fmt)
    assert code == 1
    if fmt == "sarif":
        result = json.loads(out)["runs"][0]["results"][0]
        assert result["ruleId"] == "invalid-value"
        assert result["locations"][0]["physicalLocation"]["region"]["startLine"] == 4
    else:
        assert out.startswith("::error file=") and ",line=4,col=14,title=invalid-value::" in out


def test_lint_usage_error_exits_two(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = run(capsys, "lint", "--format", "xml")
    assert code == 2
    code, _, err = run(capsys, "lint", "--app", "no_such_module:app")
    assert code == 2 and "cannot import" in err


def test_lint_app_route_without_policy(
    capsys: pytest.CaptureFixture[str], policy_dir: Path
) -> None:
    (policy_dir / "a.yaml").write_text(
        "version: 1\nroutes:\n  GET /health:\n    public: true\n  GET /nowhere:\n    public: true\n"
    )
    code, out, _ = run(capsys, "lint", str(policy_dir), "--app", "examples.app:app")
    assert code == 1
    assert "error[no-policy] app route POST /io-job has no policy" in out
    assert ":5:3: error[unmatched-policy] policy GET /nowhere matches no route" in out


def test_explain_prints_the_example_chains(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "explain", "--app", "examples.app:app")
    assert code == 0
    assert "GET /health" in out and "public: no authentication" in out
    assert "POST /io-job" in out


def test_explain_one_route_shows_origins(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "explain", "GET /health", str(REPO / "examples" / "policies"))
    assert code == 0
    assert out.startswith("GET /health")
    assert "public: true   <- route at" in out


def test_committed_schema_is_current() -> None:
    committed = (REPO / "policies" / "schema.json").read_text()
    assert committed == schema_text(), "run `make schema` and commit policies/schema.json"


def test_schema_command_prints_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "schema")
    assert code == 0 and json.loads(out) == policy_schema()


def repository_policy_files() -> list[Path]:
    """Every policy YAML file committed in the repository."""
    found = [
        p
        for p in REPO.rglob("*.yaml")
        if ".venv" not in p.parts and "policies" in p.parts and not is_test_file(p)
    ]
    return sorted(found)


@pytest.mark.parametrize("path", repository_policy_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_repository_policy_file_validates_against_the_schema(path: Path) -> None:
    jsonschema.validate(yaml.safe_load(path.read_text()), policy_schema())


def test_schema_rejects_an_unknown_key() -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"version": 1, "routes": {"GET /x": {"publik": True}}}, policy_schema())


def test_lint_refuses_a_shared_cache_on_an_authenticated_route(
    capsys: pytest.CaptureFixture[str], policy_dir: Path
) -> None:
    (policy_dir / "a.yaml").write_text(
        "version: 1\nroutes:\n  GET /me:\n    scopes: [read:me]\n    cache: {ttl: 60s, shared: true}\n"
        "  GET /catalog:\n    cache: {ttl: 60s, shared: true, acknowledge_shared: true}\n"
        "  GET /public:\n    public: true\n    cache: {ttl: 60s, shared: true}\n"
    )
    (policy_dir / "b.yaml").write_text(  # an issuer, so the routes that need a token may have one
        "version: 1\nsettings:\n  auth:\n    issuers:\n"
        "      - {issuer: https://auth.example.test/, audience: api, jwks: keys/jwks.json}\n"
    )
    code, out, _ = run(capsys, "lint", str(policy_dir))
    assert code == 1
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    assert ":5:5: error[shared-cache-authenticated] GET /me caches one response for every caller" in lines[0]


def test_run_never_lets_uvicorn_trust_proxy_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the policy's trusted_proxies may replace a client address (ip_allowlist relies on it)."""
    import uvicorn

    from policyroute.cli.run import run

    seen: dict[str, object] = {}
    monkeypatch.setenv("POLICYROUTE_VALKEY_URL", "redis://127.0.0.1:1/0")  # no embedded servers
    monkeypatch.setenv("POLICYROUTE_PULSAR_URL", "pulsar://127.0.0.1:1")
    monkeypatch.setattr(uvicorn, "run", lambda target, **kw: seen.update(kw, target=target))
    assert run("examples.app:app", host="127.0.0.1", port=0, reload=False) == 0
    assert seen["target"] == "examples.app:app" and seen["proxy_headers"] is False


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    import policyroute

    assert main(["--version"]) == 0
    # and whether the per-request modules run compiled (`make test` compiles them first)
    how = "compiled" if policyroute.NATIVE == "compiled" else "from source"
    assert capsys.readouterr().out == f"policyroute {policyroute.__version__} ({how})\n"


def test_help_ends_with_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "check", "--help")
    assert code == 0
    assert out.split("exit codes:\n")[1].startswith("  0  the chain lets the request on\n")


@pytest.mark.parametrize(
    "argv",
    [
        ["lint", "{missing}"],
        ["lint"],  # the default, policies/, is missing too
        ["explain", "{missing}"],
        ["explain", "{missing}", "GET /health"],
        ["check", "GET /health", "{missing}"],
        ["test", "{missing}"],
        ["diff", "{missing}", "{examples}"],
        ["schema", "-o", "{missing}/schema.json"],
    ],
    ids=lambda argv: " ".join(argv),
)
def test_a_missing_path_is_a_usage_error(
    argv: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # no policies/ here
    names = {"missing": str(tmp_path / "nowhere"), "examples": str(REPO / "examples" / "policies")}
    code, out, err = run(capsys, *(a.format(**names) for a in argv))
    assert code == 2, (out, err)
    assert err.startswith("policyroute: no ") and ("nowhere" in err or "'policies'" in err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "what"),
    [
        (["cache", "warm", "/health", "--app", "examples.app:app"], "the cache"),
        (["cache", "invalidate", "GET /user/{user_id}", "--app", "examples.app:app"], "the cache"),
        (["credits", "show", "alice"], "credits"),
        (["mfa", "enrol", "alice"], "TOTP secrets"),
    ],
    ids=lambda v: " ".join(v[:2]) if isinstance(v, list) else v,
)
def test_commands_on_valkey_without_its_url_say_so_in_one_line(
    argv: list[str], what: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("POLICYROUTE_VALKEY_URL", raising=False)
    monkeypatch.chdir(REPO)
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert err == f"policyroute: set POLICYROUTE_VALKEY_URL to manage {what}\n"


def test_plain_uvicorn_without_a_backend_url_prints_the_one_line_finding() -> None:
    """`uvicorn examples.app:app` with no POLICYROUTE_VALKEY_URL: the finding that says what
    to set, once for every route that needs it, and no traceback through uvicorn."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYROUTE_")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-m", "uvicorn", "examples.app:app", "--port", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    [line] = done.stderr.strip().splitlines()
    assert "error[missing-backend]" in line and "set POLICYROUTE_VALKEY_URL" in line
    assert re.search(r" and \d+ other routes: settings\.auth\.lockout .*need the valkey ", line)
    assert "policyroute run" in line


SMALL_APP = """\
from fastapi import FastAPI

import policyroute

app = FastAPI()


@app.get("/search")
def search() -> dict[str, str]:
    return {}


policyroute.install(app, "policies")
"""
SMALL_POLICY = """\
version: 1
routes:
  GET /search:
    public: true
    rate_limit: {name: searches, key: ip, capacity: 3, per: 10s}
"""
FINDING = "error[missing-backend] GET /search: rate_limit needs the valkey backend"


def small_app_without_its_backend(folder: Path) -> dict[str, str]:
    """An app in `folder` whose policy needs Valkey; the environment that names none."""
    (folder / "policies").mkdir()
    (folder / "policies" / "api.yaml").write_text(SMALL_POLICY, encoding="utf-8")
    (folder / "svc.py").write_text(SMALL_APP, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYROUTE_")}
    env["PYTHONPATH"] = str(REPO)
    return env


def server_lines(stderr: str) -> list[str]:
    """The lines of stderr that are not uvicorn's own log lines."""
    own = ("INFO:", "WARNING:", "ERROR:")
    return [line for line in stderr.strip().splitlines() if not line.startswith(own)]


def test_in_a_worker_process_install_prints_the_findings_and_raises_a_config_error_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What ends a worker: still a ConfigError to catch, and a SystemExit with code 3."""
    import multiprocessing

    from fastapi import FastAPI

    import policyroute
    from policyroute.errors import ConfigError

    small_app_without_its_backend(tmp_path)
    monkeypatch.setattr(multiprocessing, "parent_process", lambda: object())
    app = FastAPI()
    app.get("/search")(lambda: {})
    with pytest.raises(ConfigError) as caught:
        policyroute.install(app, tmp_path / "policies", settings=policyroute.Settings(valkey_url=None))
    assert isinstance(caught.value, SystemExit) and caught.value.code == 3
    assert [f.code for f in caught.value.findings] == ["missing-backend"]
    [line] = capsys.readouterr().err.strip().splitlines()
    assert FINDING in line


def test_uvicorn_workers_without_a_backend_url_print_the_one_line_finding_and_stop(
    tmp_path: Path,
) -> None:
    """`uvicorn --workers 2`: each worker says what to set in one line, no traceback through
    multiprocessing, and exits 3, on which uvicorn's supervisor stops instead of looping."""
    from uvicorn.supervisors import multiprocess

    if not hasattr(multiprocess, "STARTUP_FAILURE"):
        pytest.skip("this uvicorn's supervisor starts a failed worker again whatever its exit")
    env = small_app_without_its_backend(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "uvicorn", "svc:app", "--port", "0", "--workers", "2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "Traceback" not in done.stderr
    lines = server_lines(done.stderr)
    assert lines and all(FINDING in line for line in lines), done.stderr
    assert "failed to start, stopping the parent process" in done.stderr


def test_uvicorn_reload_without_a_backend_url_prints_the_one_line_finding(
    tmp_path: Path,
) -> None:
    """`uvicorn --reload`: the worker says what to set in one line and the reloader waits
    for a change, with no traceback through multiprocessing."""
    folder = tmp_path / "app"  # the reloader watches it; the log is kept outside
    folder.mkdir()
    env = small_app_without_its_backend(folder)
    log = tmp_path / "stderr.log"
    with log.open("w", encoding="utf-8") as err:
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "svc:app", "--port", "0", "--reload"],
            cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while FINDING not in log.read_text(encoding="utf-8") and server.poll() is None:
                assert time.monotonic() < deadline, log.read_text(encoding="utf-8")
                time.sleep(0.1)
            time.sleep(0.5)  # for anything the worker or the reloader would print after it
        finally:
            server.terminate()
            server.wait(timeout=30)
    stderr = log.read_text(encoding="utf-8")
    assert "Traceback" not in stderr
    lines = server_lines(stderr)
    assert len(lines) == 1 and FINDING in lines[0], stderr


@pytest.mark.parametrize("module", ["policyroute", "policyroute.cli"])
def test_python_dash_m_runs_the_command_line(module: str, tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text("version: 1\nroutes:\n  GET /x: {public: true}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run(
        [sys.executable, "-m", module, "lint", str(tmp_path)], env=env, capture_output=True
    )
    assert ok.returncode == 0, ok.stderr
    missing = subprocess.run(
        [sys.executable, "-m", module, "lint", str(tmp_path / "none")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "no policy file or directory" in missing.stderr
