"""Fuzzing the loader: any document is a clean ConfigError or a valid policy, never a traceback."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policyroute import ConfigError, load_policies
from policyroute.compile import compiler
from policyroute.errors import Finding

ROUTE_KEYS = sorted(compiler.enforced_keys())
NAMES = st.sampled_from(
    [
        *ROUTE_KEYS,
        "key",
        "capacity",
        "refill",
        "per",
        "cost",
        "ttl",
        "topic",
        "algorithm",
        "header",
        "required",
        "shared",
        "attempts",
        "failures",
        "on",
        "no",
        "issuers",
        "auth",
        "x-unknown",
    ]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        ["1s", "250ms", "5m", "-1s", "1h", "user", "ip", "token_bucket", "GET /x", "{x}", "*"]
    ),
    st.text(max_size=20),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(NAMES | st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=25,
)
ROUTE_NAMES = st.sampled_from(
    ["GET /a", "POST /io-job", "GET /user/{id}", "get /a", "GET a", "PATCH /a/{x}/{x}", "GET /"]
)
DOCUMENTS = st.fixed_dictionaries(
    {},
    optional={
        "version": st.sampled_from([1, 2, "1", None]),
        "settings": VALUES,
        "defaults": st.dictionaries(NAMES, VALUES, max_size=4),
        "profiles": st.dictionaries(
            st.text(max_size=6), st.dictionaries(NAMES, VALUES, max_size=4)
        ),
        "resilience": st.dictionaries(st.text(max_size=6), VALUES, max_size=2),
        "routes": st.dictionaries(ROUTE_NAMES, st.dictionaries(NAMES, VALUES, max_size=5)),
    },
)


def _check(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "p.yaml").write_text(text)
        try:
            load_policies(tmp)
        except ConfigError as exc:
            assert exc.findings
            for finding in exc.findings:
                assert isinstance(finding, Finding) and finding.message
                assert str(finding)  # renders as file:line:col: severity[code] message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(DOCUMENTS)
def test_any_structured_document_loads_or_fails_cleanly(doc: dict[str, Any]) -> None:
    _check(yaml.safe_dump(doc, allow_unicode=True))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_any_text_loads_or_fails_cleanly(text: str) -> None:
    _check(text)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "version: 1\n",
                "routes:\n",
                "  GET /a:\n",
                "    public: true\n",
                "    cache: {ttl: 1s}\n",
                "&a [*a]\n",
                "!!python/object:os.system {}\n",
                "key: [\n",
                "\t- x\n",
                "defaults: *b\n",
                "  <<: *c\n",
                "  ? [a]\n  : 1\n",
                "%YAML 1.1\n",
                "---\n",
                "...\n",
            ]
        ),
        max_size=12,
    )
)
def test_hostile_yaml_fragments_fail_cleanly(parts: list[str]) -> None:
    _check("".join(parts))
