"""Concrete requests resolve to the route template that governs them (check, explain, test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from policyroute.cli import main
from policyroute.language.loader import load_policies, policy_files
from policyroute.language.resolve import RouteNotFound, resolve_request

from .conftest import REPO

EXAMPLES = REPO / "examples" / "policies"

ROUTES = """\
version: 1
routes:
  GET /user/{user_id}: {public: true}
  GET /user/me: {public: true}
  GET /a/{n:int}: {public: true}
  GET /a/{name}: {public: true}
  GET /files/{rest:path}: {public: true}
  GET /files/{name}/raw: {public: true}
  POST /user/{user_id}: {public: true}
  GET /x/{a}/b: {public: true}
  GET /x/b/{c}: {public: true}
  GET //{tenant}.example.com/reports: {public: true}
"""


@pytest.fixture
def routes(policy_dir: Path) -> Path:
    (policy_dir / "routes.yaml").write_text(ROUTES)
    return policy_dir


@pytest.mark.parametrize(
    ("request_line", "key", "params"),
    [
        ("GET /user/42", "GET /user/{user_id}", {"user_id": "42"}),
        ("get /user/42", "GET /user/{user_id}", {"user_id": "42"}),
        ("Post /user/7?full=1", "POST /user/{user_id}", {"user_id": "7"}),
        ("GET /user/me", "GET /user/me", {}),  # a literal beats a parameter
        ("GET /user/{user_id}", "GET /user/{user_id}", {}),  # the template itself
        ("GET /a/12", "GET /a/{n:int}", {"n": "12"}),  # the int converter
        ("GET /a/twelve", "GET /a/{name}", {"name": "twelve"}),
        ("GET /files/x/raw", "GET /files/{name}/raw", {"name": "x"}),  # `:path` last
        ("GET /files/x/y/z", "GET /files/{rest:path}", {"rest": "x/y/z"}),
        ("HEAD /user/42", "GET /user/{user_id}", {"user_id": "42"}),  # HEAD follows GET
        ("GET //acme.example.com/reports", "GET //{tenant}.example.com/reports",
         {"tenant": "acme"}),
    ],
)
def test_a_concrete_request_names_its_route(
    routes: Path, request_line: str, key: str, params: dict[str, str]
) -> None:
    found = resolve_request(load_policies(routes), request_line)
    assert found.key == key
    assert found.params == params
    assert found.method == request_line.split()[0].upper()


def test_the_query_is_kept_apart(routes: Path) -> None:
    found = resolve_request(load_policies(routes), "post /user/7?full=1")
    assert (found.path, found.query, found.target) == ("/user/7", "full=1", "/user/7?full=1")


def test_two_equally_specific_templates_are_reported(routes: Path) -> None:
    with pytest.raises(RouteNotFound, match=r"matches 'GET /x/\{a\}/b' and 'GET /x/b/\{c\}'"):
        resolve_request(load_policies(routes), "GET /x/b/b")


@pytest.mark.parametrize(
    ("request_line", "message"),
    [
        ("GET /usr/42", "no route of the policies matches GET /usr/42; close: GET /user/{user_id}"),
        ("DELETE /user/42", "no route of the policies matches DELETE /user/42"),
        ("FETCH /user/42", "unknown HTTP method 'FETCH'"),
        ("GET", "is not a request"),
        ("GET user/42", "'user/42' is not a path"),
    ],
)
def test_what_resolves_to_nothing_says_why(routes: Path, request_line: str, message: str) -> None:
    with pytest.raises(RouteNotFound) as caught:
        resolve_request(load_policies(routes), request_line)
    assert message in str(caught.value)


def test_explain_takes_a_concrete_request(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "get /user/42", "--paths", str(EXAMPLES)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("GET /user/{user_id}  (")
    assert "  3. scopes: all of read:user" in out


def test_test_files_beside_the_policies_are_not_policies(routes: Path) -> None:
    (routes / "routes.test.yaml").write_text("version: 1\ncases: []\n")
    (routes / "more.test.yml").write_text("version: 1\ncases: []\n")
    assert [f.name for f in policy_files([routes])] == ["routes.yaml"]
    assert len(load_policies(routes).routes) == 10
