"""Load policy files, validate them with positions, and merge each route's layers.

Merge rule (one rule, everywhere): layers apply in the order `defaults`, then each
profile named in `use:` in order, then the route's own keys. Mappings merge key by key
(recursively); lists and scalars replace what an earlier layer set; an explicit `null`
removes what an earlier layer set. Routes with `public: true` take no `defaults`.
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from pydantic import BaseModel, ValidationError

from ..errors import ConfigError, Finding, Location
from ._yaml import Located, load_yaml
from ._yaml import Path as KeyPath
from .policy import (
    AuthSettings,
    GlobalSettings,
    PolicyFile,
    Resilience,
    RoutePolicy,
    normalize_path,
    parse_route_key,
)

MAX_FILE_BYTES = 4 * 1024 * 1024

_CODES = {
    "extra_forbidden": "unknown-key",
    "missing": "missing-key",
    "value_error": "invalid-value",
    "literal_error": "invalid-choice",
    "greater_than_equal": "out-of-range",
    "less_than_equal": "out-of-range",
    "too_short": "out-of-range",
}


@dataclass(frozen=True, slots=True)
class Source:
    """Where a layer of a route's policy was written."""

    label: str  # "defaults", "profile io_job" or "route"
    location: Location

    def __str__(self) -> str:
        return f"{self.label} at {self.location}"


@dataclass(frozen=True, slots=True)
class RouteEntry:
    """One route's merged, validated policy and where each key came from."""

    key: str
    method: str
    path: str
    policy: RoutePolicy
    location: Location
    origins: Mapping[str, tuple[Source, ...]] = field(default_factory=dict)

    @property
    def match_key(self) -> tuple[str, str]:
        """(METHOD, path template without converters), the key routes are bound by."""
        return self.method, normalize_path(self.path)


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Every route of every loaded policy file, merged and validated."""

    settings: GlobalSettings
    routes: Mapping[tuple[str, str], RouteEntry]
    resilience: Mapping[str, Resilience]
    profiles: Mapping[str, Location]
    profile_uses: Mapping[str, int]
    files: tuple[str, ...]

    def get(self, method: str, path: str) -> RouteEntry | None:
        """The policy for METHOD + template, HEAD falling back to GET."""
        norm = normalize_path(path)
        entry = self.routes.get((method, norm))
        if entry is None and method == "HEAD":
            entry = self.routes.get(("GET", norm))
        return entry


@dataclass(frozen=True, slots=True)
class Partial:
    """Everything of a set of policy files that validated, and every finding about the rest.

    Lint reads this: a route that failed validation is reported and skipped, and every
    other route is still checked by the rules. `load_policies` refuses on any finding.
    """

    policies: PolicySet  # the routes, settings and resilience profiles that validated
    findings: tuple[Finding, ...]
    # METHOD + template of each route written but not valid (it has a policy, a broken one)
    invalid_routes: frozenset[tuple[str, str]] = frozenset()
    # What of `settings` and `resilience` failed: ("settings",), ("settings", "auth"),
    # ("resilience",) or ("resilience", NAME); rules that would read it stay silent.
    invalid: frozenset[KeyPath] = frozenset()
    # Every file was read and every `routes` section is a mapping: no route is unseen.
    complete: bool = True


TEST_SUFFIXES = (".test.yaml", ".test.yml")


def is_test_file(path: Path) -> bool:
    """Whether a file is a policy test file (`*.test.yaml`), which lives beside policies."""
    return path.name.endswith(TEST_SUFFIXES)


def policy_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand directories into their `*.yaml` / `*.yml` files, sorted; keep files as given.

    Policy test files (`*.test.yaml`, run by `policyroute test`) in a directory are skipped.
    """
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            out.extend(
                sorted(
                    q
                    for q in p.iterdir()
                    if q.suffix in (".yaml", ".yml") and q.is_file() and not is_test_file(q)
                )
            )
        elif p.is_file():
            out.append(p)
        else:
            raise ConfigError(
                [
                    Finding(
                        "no-such-path", f"no policy file or directory {str(p)!r}", Location(str(p))
                    )
                ]
            )
    return out


def _unwrap_models(annotation: Any) -> list[type[BaseModel]]:
    """Model classes reachable inside an annotation (Optional, list, dict, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap_models(typing.get_args(annotation)[0])
    if origin in (list, dict, Union, types.UnionType):
        found: list[type[BaseModel]] = []
        for arg in typing.get_args(annotation):
            found.extend(_unwrap_models(arg))
        return found
    return []


def _fields_at(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model that holds the last element of `loc`."""
    models: list[type[BaseModel]] = [root]
    for part in loc[:-1]:
        nxt: list[type[BaseModel]] = []
        for model in models:
            info = model.model_fields.get(str(part))
            if info is not None:
                nxt.extend(_unwrap_models(info.annotation))
        if nxt:
            models = nxt
        # list indexes, dict keys and union tags keep the current candidates
    return sorted({name for model in models for name in model.model_fields})


def _message(
    error: Mapping[str, Any], root: type[BaseModel], loc: tuple[Any, ...], path: KeyPath
) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        bad = str(loc[-1])
        fields = _fields_at(root, loc)
        close = difflib.get_close_matches(bad, fields, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f" (known keys: {', '.join(fields)})"
        return f"unknown key {bad!r}{hint}"
    if kind == "missing":
        return f"missing required key {str(loc[-1])!r}"
    worded = _in_policy_words(error, root, loc, path)
    if worded is not None:
        return worded
    msg = str(error["msg"])
    return msg.removeprefix("Value error, ")


# What a pydantic type error expected, when the annotation of the key does not say better.
_EXPECTED = {
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "string_type": "a string",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
}
_BOUNDS = {
    "greater_than_equal": ("ge", "at least"),
    "greater_than": ("gt", "greater than"),
    "less_than_equal": ("le", "at most"),
    "less_than": ("lt", "less than"),
}
# (one, many) words for the plain types a key can have
_WORDS: dict[Any, tuple[str, str]] = {
    str: ("a string", "strings"),
    int: ("a whole number", "whole numbers"),
    float: ("a number", "numbers"),
    bool: ("true or false", "true or false values"),
}


def _in_policy_words(
    error: Mapping[str, Any], root: type[BaseModel], loc: tuple[Any, ...], path: KeyPath
) -> str | None:
    """A type, choice or range error said as the policy language says it, or None."""
    kind = error["type"]
    names = [p for p in path if isinstance(p, str)]
    if not names:
        return None
    subject = f"each item of `{names[-1]}`" if path and isinstance(path[-1], int) else None
    subject = subject or f"`{names[-1]}`"
    value = error.get("input")
    if kind == "literal_error":
        choices = typing.get_args(_bare(_annotation_at(root, loc)))
        if not choices:
            return None
        written = [str(c) for c in choices]
        if isinstance(value, str) and value in written:  # `version: "1"`
            return f"{subject} must be {_choices(choices)}, not the string {value!r}"
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, written, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{subject} must be {_choices(choices)}, not {_shown(value)}{hint}"
    if kind in _BOUNDS:
        bound, words = _BOUNDS[kind]
        return f"{subject} must be {words} {error['ctx'][bound]}, not {_shown(value)}"
    if kind in ("too_short", "string_too_short") and error["ctx"].get("min_length") == 1:
        return f"{subject} must not be empty"
    if kind not in _EXPECTED:
        return None
    expected = _describe(_annotation_at(root, loc)) or _EXPECTED[kind]
    got = _shown(value) if isinstance(value, int | float) else _kind_of(value)
    return f"{subject} must be {expected}, not {got}"


def _bare(annotation: Any) -> Any:
    """An annotation without Annotated metadata and without `| None`."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
            continue
        if origin in (Union, types.UnionType):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(members) == 1:
                annotation = members[0]
                continue
        return annotation


def _annotation_at(root: type[BaseModel], loc: tuple[Any, ...]) -> Any:
    """The annotation of what `loc` names (a key, a list item, a mapping value), or None.

    A union stops the walk: pydantic names its members in `loc`, and the union as a
    whole is what the key expects.
    """
    node: Any = root
    for part in loc:
        node = _bare(node)
        origin = typing.get_origin(node)
        if origin in (Union, types.UnionType):
            return node
        if origin is list and isinstance(part, int):
            node = typing.get_args(node)[0]
        elif origin is dict:
            node = typing.get_args(node)[1]
        elif isinstance(node, type) and issubclass(node, BaseModel):
            info = node.model_fields.get(str(part))
            if info is None:
                return None
            node = info.annotation
        else:
            return None
    return node


def _describe(annotation: Any, *, many: bool = False) -> str | None:
    """What a key of this annotation holds, in words: "a list of strings", "true or false"."""
    bare = _bare(annotation)
    origin = typing.get_origin(bare)
    if origin is list:
        items = _describe(typing.get_args(bare)[0], many=True)
        return f"{'lists' if many else 'a list'} of {items}" if items else None
    if origin is dict:
        values = _describe(typing.get_args(bare)[1], many=True)
        return f"a mapping of names to {values}" if values and not many else None
    if origin is typing.Literal:
        return None if many else _choices(typing.get_args(bare))
    if origin in (Union, types.UnionType):
        if set(typing.get_args(bare)) == {ipaddress.IPv4Network, ipaddress.IPv6Network}:
            return "networks (CIDR, e.g. 10.0.0.0/8)" if many else "a network (CIDR)"
        parts = [_describe(a, many=many) for a in typing.get_args(bare) if a is not type(None)]
        return " or ".join(p for p in parts if p) if all(parts) else None
    if isinstance(bare, type) and issubclass(bare, BaseModel):
        return "mappings" if many else "a mapping"
    words = _WORDS.get(bare)
    return (words[1] if many else words[0]) if words else None


def _choices(choices: tuple[Any, ...]) -> str:
    shown = [str(c) for c in choices]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"


def _shown(value: Any) -> str:
    """A short scalar as written, else what kind of value it is."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float) or (isinstance(value, str) and len(value) <= 40):
        return repr(value)
    return _kind_of(value)


def _kind_of(value: Any) -> str:
    """What kind of YAML value was written (never the value: it might be a secret)."""
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _data_path(loc: tuple[Any, ...], data: Any) -> KeyPath:
    """The part of a pydantic `loc` that names real keys in the data (drops union tags)."""
    out: list[str | int] = []
    node = data
    for part in loc:
        if (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and part < len(node)
        ):
            out.append(part)
            node = node[part]
        elif isinstance(node, dict) and not isinstance(part, int):
            out.append(part)  # a missing or unknown key under this mapping
            node = None
    return tuple(out)


class _Resolver:
    """Maps a path in (possibly merged) data back to the file position it came from."""

    def __init__(self) -> None:
        self.origins: dict[KeyPath, tuple[Located, KeyPath]] = {}

    def add(self, dst: KeyPath, doc: Located, src: KeyPath) -> None:
        self.origins[dst] = (doc, src)

    def locate(self, path: KeyPath, *, key: bool) -> Location:
        for cut in range(len(path), -1, -1):
            hit = self.origins.get(path[:cut])
            if hit is not None:
                doc, src = hit
                return doc.location((*src, *path[cut:]), key=key)
        return Location("<policy>")


def _findings(
    exc: ValidationError,
    root: type[BaseModel],
    data: Any,
    resolver: _Resolver,
    *,
    partial: bool,
    prefix: KeyPath = (),
) -> list[Finding]:
    out: list[Finding] = []
    for error in exc.errors():
        kind = error["type"]
        if partial and kind == "missing":
            continue
        loc = tuple(error["loc"])
        path = _data_path(loc, data)
        where = resolver.locate(path, key=kind in ("extra_forbidden", "missing"))
        if kind == "missing":
            where = resolver.locate(path[:-1], key=True)
        message = _message(error, root, loc, (*prefix, *path))
        out.append(Finding(_CODES.get(kind, "wrong-type"), message, where, (*prefix, *path)))
    return out


def _dedupe(findings: Iterable[Finding]) -> list[Finding]:
    """One finding per position: unions and shared layers repeat the same mistake."""
    seen: set[tuple[str, int, int]] = set()
    out: list[Finding] = []
    for f in findings:
        key = (f.location.file, f.location.line, f.location.column)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def _strip_nulls(layer: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in layer.items() if v is not None}


def _validate_layer(layer: Any, doc: Located, src: KeyPath) -> list[Finding]:
    """Check one defaults/profile/route layer alone; required keys may come from other layers."""
    if not isinstance(layer, dict):
        return [
            Finding("wrong-type", "a route policy is a mapping of keys", doc.location(src), src)
        ]
    resolver = _Resolver()
    resolver.add((), doc, src)
    try:
        RoutePolicy.model_validate(_strip_nulls(layer))
    except ValidationError as exc:
        return _findings(exc, RoutePolicy, layer, resolver, partial=True, prefix=src)
    return []


def _merge(
    target: dict[str, Any],
    layer: Mapping[str, Any],
    doc: Located,
    src: KeyPath,
    resolver: _Resolver,
    dst: KeyPath = (),
) -> None:
    for key, value in layer.items():
        here = (*dst, key)
        resolver.add(here, doc, (*src, key))
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value, doc, (*src, key), resolver, here)
        else:
            target[key] = copy.deepcopy(value)


@dataclass(slots=True)
class _Loaded:
    doc: Located
    model: PolicyFile | None


class _Builder:
    """Collects every file, then checks names across files and merges each route."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.docs: list[Located] = []
        self.settings: tuple[GlobalSettings, Located] | None = None
        self.profiles: dict[str, tuple[Any, Located]] = {}
        self.resilience: dict[str, Resilience] = {}
        self.defaults: list[tuple[Any, Located]] = []
        self.routes: dict[tuple[str, str], tuple[str, str, str, Any, Located]] = {}
        self.bad_layers: set[tuple[str, KeyPath]] = set()  # (file, path) of layers in error
        self.invalid: set[KeyPath] = set()
        self.complete = True

    def add_file(self, path: Path) -> None:
        doc = self._read(path)
        if doc is None:
            self.complete = False  # its routes are unknown
            return
        self.findings.extend(doc.findings)
        self.docs.append(doc)
        self._check_file(doc)

    def _read(self, path: Path) -> Located | None:
        name = str(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            self.findings.append(
                Finding("unreadable", f"cannot read policy file: {exc.strerror}", Location(name))
            )
            return None
        if len(raw) > MAX_FILE_BYTES:
            self.findings.append(
                Finding(
                    "file-too-large", f"policy file over {MAX_FILE_BYTES} bytes", Location(name)
                )
            )
            return None
        try:
            doc = load_yaml(raw.decode("utf-8"), name, keep_going=True)
        except UnicodeDecodeError:
            self.findings.append(
                Finding("encoding", "policy files are UTF-8", Location(name, 1, 1))
            )
            return None
        except ConfigError as exc:
            self.findings.extend(exc.findings)
            return None
        return doc

    def _check_file(self, doc: Located) -> None:
        data = doc.data
        if not isinstance(data, dict):
            self.findings.append(
                Finding(
                    "wrong-type",
                    "a policy file is a mapping with `version: 1`",
                    Location(doc.file, 1, 1),
                )
            )
            self.complete = False
            return
        shell = {k: v for k, v in data.items() if k not in ("defaults", "profiles", "routes")}
        shell.update({k: {} for k in ("profiles", "routes") if isinstance(data.get(k), dict)})
        resolver = _Resolver()
        resolver.add((), doc, ())
        try:
            model = PolicyFile.model_validate(shell)
            settings, resilience = model.settings, model.resilience
        except ValidationError as exc:
            self.findings.extend(_findings(exc, PolicyFile, shell, resolver, partial=False))
            # The rest of the file is still checked: a wrong `version` or a bad setting
            # hides nothing else.
            settings, resilience = _salvage(shell, self.invalid)
        if not data.keys() <= PolicyFile.model_fields.keys():
            self.complete = False  # an unknown section (`rotues:`) may hold routes
        for section in ("profiles", "routes"):
            value = data.get(section)
            if value is not None and not isinstance(value, dict):
                if section == "routes":
                    self.complete = False
                self.findings.append(
                    Finding(
                        "wrong-type",
                        f"`{section}` is a mapping",
                        doc.location((section,)),
                        (section,),
                    )
                )
        self._collect(doc, settings, resilience)

    def _collect(
        self, doc: Located, settings: GlobalSettings | None, resilience: Mapping[str, Resilience]
    ) -> None:
        data = doc.data
        if settings is not None:
            if self.settings is not None:
                first = self.settings[1].location(("settings",), key=True)
                self.findings.append(
                    Finding(
                        "duplicate-settings",
                        f"`settings` is already set in {first}",
                        doc.location(("settings",), key=True),
                        ("settings",),
                    )
                )
            else:
                self.settings = (_resolve_paths(settings, Path(doc.file).parent), doc)
        self.resilience.update(resilience)
        if "defaults" in data and data["defaults"] is not None:
            self._layer(data["defaults"], doc, ("defaults",), allow_use=False)
            self.defaults.append((data["defaults"], doc))
        for name, layer in _mapping(data.get("profiles")).items():
            src: KeyPath = ("profiles", name)
            if name in self.profiles:
                first = self.profiles[name][1].location(src, key=True)
                self.findings.append(
                    Finding(
                        "duplicate-profile",
                        f"profile {name!r} is already defined at {first}",
                        doc.location(src, key=True),
                        src,
                    )
                )
                continue
            self._layer(layer, doc, src, allow_use=False)
            self.profiles[name] = (layer, doc)
        for key, layer in _mapping(data.get("routes")).items():
            self._route(key, layer, doc)

    def _layer(self, layer: Any, doc: Located, src: KeyPath, *, allow_use: bool) -> None:
        found = _validate_layer(layer, doc, src)
        self.findings.extend(found)
        nested = not allow_use and isinstance(layer, dict) and layer.get("use")
        if found or nested:
            self.bad_layers.add((doc.file, src))  # the routes it is part of are not merged
        if nested:
            self.findings.append(
                Finding(
                    "nested-use",
                    "only routes may `use:` profiles",
                    doc.location((*src, "use"), key=True),
                    (*src, "use"),
                )
            )

    def _route(self, key: str, layer: Any, doc: Located) -> None:
        src: KeyPath = ("routes", key)
        try:
            method, path = parse_route_key(key)
        except ValueError as exc:
            self.findings.append(
                Finding("bad-route-key", str(exc), doc.location(src, key=True), src)
            )
            return
        match = (method, normalize_path(path))
        if match in self.routes:
            first_doc = self.routes[match][4]
            first = first_doc.location(("routes", self.routes[match][0]), key=True)
            self.findings.append(
                Finding(
                    "duplicate-route",
                    f"route {method} {path} is already defined at {first}",
                    doc.location(src, key=True),
                    src,
                )
            )
            return
        self._layer(layer, doc, src, allow_use=True)
        self.routes[match] = (key, method, path, layer, doc)

    def _merge_route(
        self, key: str, method: str, path: str, layer: Any, doc: Located
    ) -> RouteEntry | None:
        if not isinstance(layer, dict):
            return None
        src: KeyPath = ("routes", key)
        merged: dict[str, Any] = {}
        resolver = _Resolver()
        origins: dict[str, list[Source]] = {}
        layers: list[tuple[str, Any, Located, KeyPath]] = []
        if not layer.get("public"):
            layers += [("defaults", d, ddoc, ("defaults",)) for d, ddoc in self.defaults]
        uses = layer.get("use") or []
        for name in uses if isinstance(uses, list) else []:
            found = self.profiles.get(name) if isinstance(name, str) else None
            if found is None:
                return None  # reported by _check_uses
            layers.append((f"profile {name}", found[0], found[1], ("profiles", name)))
        layers.append(("route", layer, doc, src))
        if any((ldoc.file, lsrc) in self.bad_layers for _, _, ldoc, lsrc in layers):
            return None  # a layer in error is reported where it is written, once
        for label, data, ldoc, lsrc in layers:
            if not isinstance(data, dict):
                continue
            body = {k: v for k, v in data.items() if k != "use"} if label != "route" else data
            _merge(merged, body, ldoc, lsrc, resolver)
            for k in body:
                origins.setdefault(k, []).append(Source(label, ldoc.location((*lsrc, k), key=True)))
        try:
            policy = RoutePolicy.model_validate(merged)
        except ValidationError as exc:
            self.findings.extend(
                _findings(exc, RoutePolicy, merged, resolver, partial=False, prefix=src)
            )
            return None
        return RouteEntry(
            key,
            method,
            path,
            policy,
            doc.location(src, key=True),
            {k: tuple(v) for k, v in origins.items()},
        )

    def _check_uses(self) -> None:
        for key, _, _, layer, doc in self.routes.values():
            uses = layer.get("use") if isinstance(layer, dict) else None
            for i, name in enumerate(uses if isinstance(uses, list) else []):
                if isinstance(name, str) and name in self.profiles:
                    continue
                close = difflib.get_close_matches(str(name), list(self.profiles), n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                where: KeyPath = ("routes", key, "use", i)
                self.findings.append(
                    Finding(
                        "unknown-profile",
                        f"unknown profile {name!r}{hint}",
                        doc.location(where),
                        where,
                    )
                )

    def build(self) -> Partial:
        entries: dict[tuple[str, str], RouteEntry] = {}
        invalid_routes: set[tuple[str, str]] = set()
        self._check_uses()
        for match, (key, method, path, layer, doc) in self.routes.items():
            entry = self._merge_route(key, method, path, layer, doc)
            if entry is None or self._broken_resilience(entry):
                invalid_routes.add(match)
            else:
                entries[match] = entry
        ordered = sorted(
            self.findings, key=lambda f: (f.location.file, f.location.line, f.location.column)
        )
        policies = PolicySet(
            settings=self.settings[0] if self.settings else GlobalSettings(),
            routes=entries,
            resilience=dict(self.resilience),
            profiles={
                n: doc.location(("profiles", n), key=True) for n, (_, doc) in self.profiles.items()
            },
            profile_uses=self._profile_uses(),
            files=tuple(d.file for d in self.docs),
        )
        return Partial(
            policies,
            tuple(_dedupe(ordered)),
            frozenset(invalid_routes),
            frozenset(self.invalid),
            self.complete,
        )

    def _broken_resilience(self, entry: RouteEntry) -> bool:
        """Whether the route names a resilience profile that failed validation."""
        name = entry.policy.resilience
        if name is None or name in self.resilience:
            return False
        return bool({("resilience",), ("resilience", name)} & self.invalid)

    def _profile_uses(self) -> dict[str, int]:
        """How many routes name each profile, counting routes that failed validation."""
        uses: dict[str, int] = dict.fromkeys(self.profiles, 0)
        for _, _, _, layer, _ in self.routes.values():
            names = layer.get("use") if isinstance(layer, dict) else None
            for name in names if isinstance(names, list) else []:
                if isinstance(name, str):
                    uses[name] = uses.get(name, 0) + 1
        return uses


def _mapping(value: Any) -> Mapping[Any, Any]:
    """A section that should be a mapping; anything else (reported) as an empty one."""
    return value if isinstance(value, dict) else {}


def _salvage(
    shell: Mapping[str, Any], invalid: set[KeyPath]
) -> tuple[GlobalSettings | None, dict[str, Resilience]]:
    """The valid parts of a file's `settings` and `resilience` when the file has errors.

    Settings that fail keep their `auth` when it is valid on its own (the issuers decide
    whether routes can verify tokens); what fails is added to `invalid`.
    """
    settings: GlobalSettings | None = None
    raw = shell.get("settings")
    if raw is not None:
        try:
            settings = GlobalSettings.model_validate(raw)
        except ValidationError:
            invalid.add(("settings",))
            auth = raw.get("auth") if isinstance(raw, dict) else None
            try:
                settings = GlobalSettings(auth=AuthSettings.model_validate(auth or {}))
            except ValidationError:
                invalid.add(("settings", "auth"))
                settings = GlobalSettings()
    resilience: dict[str, Resilience] = {}
    profiles = shell.get("resilience")
    if profiles is not None and not isinstance(profiles, dict):
        invalid.add(("resilience",))
    for name, value in _mapping(profiles).items():
        try:
            resilience[name] = Resilience.model_validate(value)
        except ValidationError:
            invalid.add(("resilience", name))
    return settings, resilience


def _resolve_paths(settings: GlobalSettings, base: Path) -> GlobalSettings:
    """Make relative JWKS file paths relative to the file that names them."""
    issuers = []
    for issuer in settings.auth.issuers:
        jwks = issuer.jwks
        if jwks and not jwks.startswith("https://") and not Path(jwks).is_absolute():
            issuer = issuer.model_copy(update={"jwks": str((base / jwks).resolve())})
        issuers.append(issuer)
    auth = settings.auth.model_copy(update={"issuers": issuers})
    return settings.model_copy(update={"auth": auth})


def load_policies(*paths: str | Path) -> PolicySet:
    """Load, validate and merge policy files and directories; raise ConfigError on any error."""
    loaded = load_partial(*paths)
    if loaded.findings:
        raise ConfigError(loaded.findings)
    return loaded.policies


def load_partial(*paths: str | Path) -> Partial:
    """Load every file and validate every route; keep what validated, report the rest.

    Raises ConfigError only when there is nothing to load (no such path, no files).
    """
    builder = _Builder()
    files = policy_files(paths or ("policies",))
    if not files:
        raise ConfigError(
            [
                Finding(
                    "no-policies",
                    "no *.yaml policy files found",
                    Location(", ".join(str(p) for p in paths)),
                )
            ]
        )
    for file in files:
        builder.add_file(file)
    return builder.build()
