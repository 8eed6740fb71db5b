"""Loading, validation positions and the merge rule of policy files."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from policyroute import ConfigError, load_policies

GOOD = """\
version: 1
routes:
  GET /health:
    public: true
"""

# Each case: files, then (file, line, column, code) of the one error expected.
BROKEN: dict[str, tuple[dict[str, str], tuple[str, int, int, str]]] = {
    "unknown key": (
        {"a.yaml": "version: 1\nroutes:\n  GET /x:\n    public: true\n    frobnicate: 1\n"},
        ("a.yaml", 5, 5, "unknown-key"),
    ),
    "misspelled key": (
        {
            "a.yaml": "version: 1\nroutes:\n  GET /x:\n    scopes: [a]\n    rate_limt: {capacity: 1, per: 1s}\n"
        },
        ("a.yaml", 5, 5, "unknown-key"),
    ),
    "bad duration": (
        {"a.yaml": "version: 1\nroutes:\n  GET /x:\n    cache:\n      ttl: 10 minutes\n"},
        ("a.yaml", 5, 12, "invalid-value"),
    ),
    "bad cidr": (
        {
            "a.yaml": "version: 1\nroutes:\n  GET /x:\n    ip_allowlist: [127.0.0.1/32, 10.0.0.300/8]\n"
        },
        ("a.yaml", 4, 34, "invalid-value"),
    ),
    "wrong type": (
        {"a.yaml": "version: 1\nroutes:\n  GET /x:\n    credits:\n      cost: lots\n"},
        ("a.yaml", 5, 13, "wrong-type"),
    ),
    "duplicate route across files": (
        {"a.yaml": GOOD, "b.yaml": "version: 1\nroutes:\n  GET /health:\n    public: true\n"},
        ("b.yaml", 3, 3, "duplicate-route"),
    ),
    "unknown profile": (
        {
            "a.yaml": "version: 1\nprofiles:\n  io_job: {scopes: [a]}\nroutes:\n  GET /x:\n    use: [io_jobs]\n"
        },
        ("a.yaml", 6, 11, "unknown-profile"),
    ),
    "yaml syntax error": (
        {"a.yaml": "version: 1\nroutes:\n  GET /x:\n    public: [true\n  GET /y: {}\n"},
        ("a.yaml", 5, 9, "yaml-syntax"),
    ),
    "route key with a bad method": (
        {
            "a.yaml": "version: 1\nroutes:\n  GET /ok:\n    public: true\n  FETCH /x:\n    public: true\n"
        },
        ("a.yaml", 5, 3, "bad-route-key"),
    ),
    **{
        f"host route key {key}": (
            {"a.yaml": f"version: 1\nroutes:\n  GET /ok:\n    public: true\n  GET {key}:\n    public: true\n"},
            ("a.yaml", 5, 3, "bad-route-key"),
        )
        for key in ("//", "//admin.test", "//Admin.test/x", "//admin.test:8443/x", "//a..b/x", "//-a.test/")
    },
}


def write(directory: Path, files: dict[str, str]) -> None:
    """Write policy files into a directory."""
    for name, text in files.items():
        (directory / name).write_text(text)


@pytest.mark.parametrize("case", list(BROKEN))
def test_each_broken_file_gives_exactly_one_error_at_its_position(
    case: str, policy_dir: Path
) -> None:
    files, (file, line, column, code) = BROKEN[case]
    write(policy_dir, files)
    with pytest.raises(ConfigError) as info:
        load_policies(policy_dir)
    findings = info.value.findings
    assert len(findings) == 1, [str(f) for f in findings]
    found = findings[0]
    assert (
        Path(found.location.file).name,
        found.location.line,
        found.location.column,
        found.code,
    ) == (file, line, column, code), str(found)
    assert str(found).startswith(f"{policy_dir / file}:{line}:{column}: error[{code}]")


def test_host_route_keys_name_a_host_then_a_path(policy_dir: Path) -> None:
    keys = ["//admin.test/", "//admin.test/reports", "//{tenant}.test/{path:path}", "//api-{v}.test/x"]
    routes = "".join(f"  GET {key}:\n    public: true\n" for key in keys)
    write(policy_dir, {"a.yaml": f"version: 1\nroutes:\n{routes}"})
    assert [path for _, path in load_policies(policy_dir).routes] == [
        "//admin.test/", "//admin.test/reports", "//{tenant}.test/{path}", "//api-{v}.test/x"
    ]  # converters dropped for matching


def test_misspelled_key_suggests_the_right_one(policy_dir: Path) -> None:
    write(policy_dir, BROKEN["misspelled key"][0])
    with pytest.raises(ConfigError, match="did you mean 'rate_limit'"):
        load_policies(policy_dir)


def test_misspelled_nested_key_suggests_from_its_own_model(policy_dir: Path) -> None:
    write(
        policy_dir,
        {"a.yaml": "version: 1\nroutes:\n  GET /x:\n    cache: {ttl: 1s, sharde: true}\n"},
    )
    with pytest.raises(ConfigError, match="did you mean 'shared'"):
        load_policies(policy_dir)


def test_error_names_the_key_path(policy_dir: Path) -> None:
    write(policy_dir, BROKEN["bad duration"][0])
    with pytest.raises(ConfigError, match=r"at routes\.GET /x\.cache\.ttl"):
        load_policies(policy_dir)


MERGE = textwrap.dedent("""\
    version: 1
    defaults:
      ip_allowlist: [10.0.0.0/8]
      retry: {attempts: 5, initial: 1s}
      scopes: [base]
    profiles:
      io_job:
        scopes: [run:io_jobs]
        retry: {initial: 200ms}
      tight:
        retry: {max: 3s}
        ip_allowlist: null
    routes:
      POST /io-job:
        use: [io_job, tight]
        retry: {jitter: false}
      GET /plain:
        roles: [reader]
      GET /health:
        public: true
""")


def test_merge_rule_mappings_merge_lists_replace_null_removes(policy_dir: Path) -> None:
    write(policy_dir, {"a.yaml": MERGE})
    policies = load_policies(policy_dir)
    io_job = policies.get("POST", "/io-job")
    assert io_job is not None
    policy = io_job.policy
    assert policy.scopes == ["run:io_jobs"]  # lists replace: the profile's list wins whole
    assert policy.retry is not None
    assert (policy.retry.attempts, policy.retry.initial, policy.retry.max, policy.retry.jitter) == (
        5,
        0.2,
        3.0,
        False,
    )  # mappings merge key by key across all layers
    assert policy.ip_allowlist is None  # null removes what defaults set
    plain = policies.get("GET", "/plain")
    assert (
        plain is not None and plain.policy.scopes == ["base"] and plain.policy.roles == ["reader"]
    )


def test_public_routes_take_no_defaults(policy_dir: Path) -> None:
    write(policy_dir, {"a.yaml": MERGE})
    health = load_policies(policy_dir).get("GET", "/health")
    assert health is not None
    assert (
        health.policy.public and health.policy.scopes == [] and health.policy.ip_allowlist is None
    )


def test_origins_name_the_layer_and_line_of_each_key(policy_dir: Path) -> None:
    write(policy_dir, {"a.yaml": MERGE})
    entry = load_policies(policy_dir).get("POST", "/io-job")
    assert entry is not None
    labels = [(s.label, s.location.line) for s in entry.origins["retry"]]
    assert labels == [("defaults", 4), ("profile io_job", 9), ("profile tight", 11), ("route", 16)]


def test_head_follows_get_and_converters_are_ignored(policy_dir: Path) -> None:
    write(
        policy_dir, {"a.yaml": "version: 1\nroutes:\n  GET /items/{item_id}:\n    public: true\n"}
    )
    policies = load_policies(policy_dir)
    assert policies.get("HEAD", "/items/{item_id:int}") is policies.get("GET", "/items/{item_id}")
    assert policies.get("POST", "/items/{item_id}") is None


def test_settings_in_two_files_is_an_error(policy_dir: Path) -> None:
    settings = "version: 1\nsettings:\n  trusted_proxies: [10.0.0.0/8]\n"
    write(policy_dir, {"a.yaml": settings, "b.yaml": settings})
    with pytest.raises(ConfigError, match="duplicate-settings"):
        load_policies(policy_dir)


def test_public_route_cannot_require_scopes(policy_dir: Path) -> None:
    write(
        policy_dir,
        {"a.yaml": "version: 1\nroutes:\n  GET /x:\n    public: true\n    scopes: [a]\n"},
    )
    with pytest.raises(ConfigError, match="public route cannot require scopes"):
        load_policies(policy_dir)


def test_duplicate_yaml_key_is_an_error_not_a_silent_override(policy_dir: Path) -> None:
    write(
        policy_dir,
        {
            "a.yaml": "version: 1\nroutes:\n  GET /x:\n    public: true\n  GET /x:\n    public: true\n"
        },
    )
    with pytest.raises(ConfigError) as info:
        load_policies(policy_dir)
    assert [(f.code, f.location.line) for f in info.value.findings] == [("duplicate-key", 5)]


def test_same_template_with_converter_is_a_duplicate_route(policy_dir: Path) -> None:
    write(
        policy_dir,
        {
            "a.yaml": "version: 1\nroutes:\n  GET /a/{id}:\n    public: true\n"
            "  GET /a/{id:int}:\n    public: true\n"
        },
    )
    with pytest.raises(ConfigError, match="duplicate-route"):
        load_policies(policy_dir)


def test_alias_bomb_is_refused(policy_dir: Path) -> None:
    lines = ["version: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 7)]
    write(policy_dir, {"a.yaml": "\n".join(lines) + "\n"})
    with pytest.raises(ConfigError, match="yaml-too-large"):
        load_policies(policy_dir)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("250ms", True),
        ("30s", True),
        ("5m", True),
        ("1h", True),
        (2.5, True),
        ("5", False),
        ("-1s", False),
        ("1y", False),
    ],
)
def test_durations(value: object, ok: bool, policy_dir: Path) -> None:
    write(
        policy_dir,
        {"a.yaml": f"version: 1\nroutes:\n  GET /x:\n    timeout: {value!r}\n".replace("'", '"')},
    )
    if ok:
        load_policies(policy_dir)
    else:
        with pytest.raises(ConfigError, match="invalid-value"):
            load_policies(policy_dir)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("512B", 512),
        ("64KiB", 65536),
        ("1.5KiB", 1536),
        ("1MiB", 1 << 20),
        ("10MB", 10_000_000),
        ("1GiB", 1 << 30),
        (4096, 4096),
        (0, 0),
        ("1.1B", None),
        ("-1KiB", None),
        ("1 megabyte", None),
        ("1mib", None),
        (-1, None),
        (True, None),
    ],
)
def test_sizes(value: object, size: int | None, policy_dir: Path) -> None:
    text = f"version: 1\nroutes:\n  GET /x:\n    cache: {{ttl: 1m, max_body: {value!r}}}\n"
    write(policy_dir, {"a.yaml": text.replace("'", '"').replace("True", "true")})
    if size is None:
        with pytest.raises(ConfigError, match=r"invalid-value|wrong-type"):
            load_policies(policy_dir)
        return
    cache = load_policies(policy_dir).get("GET", "/x").policy.cache  # type: ignore[union-attr]
    assert cache is not None and cache.max_body == size


@pytest.mark.parametrize(
    ("topic", "ok"),
    [
        ("persistent://public/default/io-jobs", True),
        ("non-persistent://t/n/x", True),
        ("io-jobs", False),
        ("persistent://public/io-jobs", False),
        ("kafka://a/b/c", False),
    ],
)
def test_topics(topic: str, ok: bool, policy_dir: Path) -> None:
    write(
        policy_dir,
        {"a.yaml": f"version: 1\nroutes:\n  GET /x:\n    events: {{topic: '{topic}'}}\n"},
    )
    if ok:
        load_policies(policy_dir)
    else:
        with pytest.raises(ConfigError, match="invalid Pulsar topic"):
            load_policies(policy_dir)


@pytest.mark.parametrize("scope", ["read user", 'a"b', "a\\b"])
def test_bad_scope_strings(scope: str, policy_dir: Path) -> None:
    escaped = scope.replace("\\", "\\\\").replace('"', '\\"')
    write(policy_dir, {"a.yaml": f'version: 1\nroutes:\n  GET /x:\n    scopes: ["{escaped}"]\n'})
    with pytest.raises(ConfigError, match="invalid scope"):
        load_policies(policy_dir)


@pytest.mark.parametrize(
    "key", ["GET x", "GET /a?b=1", "GET /a/{b", "GET /a/{b}/{b}", "GET", "get /x"]
)
def test_bad_route_keys(key: str, policy_dir: Path) -> None:
    write(policy_dir, {"a.yaml": f'version: 1\nroutes:\n  "{key}":\n    public: true\n'})
    with pytest.raises(ConfigError, match="bad-route-key"):
        load_policies(policy_dir)


def test_plain_keys_keep_their_text(policy_dir: Path) -> None:
    """YAML 1.1 would read `on:` as true; a policy key is always its own text."""
    (policy_dir / "p.yaml").write_text(
        "version: 1\nroutes:\n  GET /a:\n    public: true\n"
        "    retry: {attempts: 2, on: [5xx, ConnectionError]}\n"
    )
    entry = load_policies(policy_dir).routes[("GET", "/a")]
    assert entry.policy.retry is not None
    assert entry.policy.retry.on == ["5xx", "ConnectionError"]


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("version: 1\x1f\n", "yaml-syntax"),  # a control character
        ("version: 1\nroutes: &a\n  GET /a: *a\n", "yaml-recursive"),  # an alias inside itself
        ("a: &x [*x]\n", "yaml-recursive"),
    ],
)
def test_hostile_yaml_is_one_clean_finding(policy_dir: Path, text: str, code: str) -> None:
    (policy_dir / "p.yaml").write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_policies(policy_dir)
    assert [f.code for f in caught.value.findings] == [code]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version: 1\nroutes:\n  GET /x:\n    scopes: read\n",
         "`scopes` must be a list of strings, not a string"),
        ("version: 2\nroutes: {}\n", "`version` must be 1, not 2"),
        ("version: '1'\nroutes: {}\n", "`version` must be 1, not the string '1'"),
        ("version: 1\nroutes:\n  GET /x:\n    credits: {cost: lots}\n",
         "`cost` must be a whole number, not a string"),
        ("version: 1\nroutes:\n  GET /x:\n    public: maybe\n",
         "`public` must be true or false, not a string"),
        ("version: 1\nroutes:\n  GET /x:\n    ip_allowlist: 10.0.0.0/8\n",
         "`ip_allowlist` must be a list of networks (CIDR, e.g. 10.0.0.0/8), not a string"),
        ("version: 1\nroutes:\n  GET /x:\n    rate_limit: [5]\n",
         "each item of `rate_limit` must be a mapping, not 5"),
        ("version: 1\nroutes:\n  GET /x:\n    retry: {backoff: fixd}\n",
         "`backoff` must be exponential or fixed, not 'fixd'; did you mean 'fixed'?"),
        ("version: 1\nroutes:\n  GET /x:\n    credits: {cost: 0}\n", "`cost` must be at least 1, not 0"),
        ("version: 1\nsettings:\n  auth:\n    issuers: [{issuer: x, audience: 5, jwks: k.json}]\n",
         "`audience` must be a string or a list of strings, not 5"),
    ],
)
def test_type_errors_say_what_the_policy_expects(
    text: str, message: str, policy_dir: Path
) -> None:
    write(policy_dir, {"a.yaml": text})
    with pytest.raises(ConfigError) as info:
        load_policies(policy_dir)
    assert [f.message for f in info.value.findings] == [message]


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        # The parser stops at the ':' a plain scalar may not hold, in the unclosed sequence.
        ("version: 1\nroutes:\n  GET /x:\n    public: [true\n  GET /y: {}\n", (5, 9),
         "YAML syntax error at ':': did not find expected ',' or ']' (while parsing a flow "
         "sequence that began at 4:13 with '[')"),
        # The file ends inside the sequence: the '[' that is never closed is the token to fix.
        ("version: 1\nroutes:\n  GET /x:\n    scopes: [a, b\n", (4, 13),
         "YAML syntax error at '[': the file ends before what it opens is closed"),
        ("version: 1\nroutes:\n  GET /x:\n    scopes: [a]]\n", (4, 16),
         "YAML syntax error at ']': did not find expected key"),
        ("version: 1\nroutes:\n  GET /x:\n    public: true\n   retry: {}\n", (5, 4),
         "YAML syntax error at 'retry': did not find expected key"),
        ("version: 1\nroutes:\n  GET /x:\n\tpublic: true\n", (4, 1),
         "YAML syntax error at a tab (YAML indents with spaces)"),
        ("version: 1\nroutes:\n  GET /x: *nope\n", (3, 11),
         "YAML syntax error at '*nope': found undefined alias"),
        ("version: 1\nroutes:\n  GET /x:\n    public: tr\x07ue\n", (4, 15),
         "YAML error at the character U+0007: control characters are not allowed"),
    ],
)
def test_a_yaml_syntax_error_is_at_the_token_it_names(
    text: str, where: tuple[int, int], message: str, policy_dir: Path
) -> None:
    write(policy_dir, {"a.yaml": text})
    with pytest.raises(ConfigError) as info:
        load_policies(policy_dir)
    [found] = info.value.findings
    assert (found.code, found.location.line, found.location.column) == ("yaml-syntax", *where)
    assert found.message.startswith(message), found.message


def test_every_error_of_every_file_is_refused_at_once(policy_dir: Path) -> None:
    """Startup refuses as before, with every finding: one error no longer hides the others."""
    write(
        policy_dir,
        {
            "a.yaml": "version: 2\nroutes:\n  GET /x:\n    publik: true\n  GET /y:\n    public: true\n",
            "b.yaml": "version: 1\nsettings:\n  trusted_proxies: [10.0.0.300/8]\nroutes:\n"
            "  GET /z:\n    cache: {}\n",
            "c.yaml": "version: 1\nroutes:\n  GET /w: [oops\n",
        },
    )
    with pytest.raises(ConfigError) as info:
        load_policies(policy_dir)
    found = [(Path(f.location.file).name, f.location.line, f.code) for f in info.value.findings]
    assert found == [
        ("a.yaml", 1, "invalid-choice"),
        ("a.yaml", 4, "unknown-key"),
        ("b.yaml", 3, "invalid-value"),
        ("b.yaml", 6, "missing-key"),
        ("c.yaml", 3, "yaml-syntax"),  # at the '[' never closed
    ]
