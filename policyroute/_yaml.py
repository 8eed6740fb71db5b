"""YAML loading that remembers the line and column of every key and value."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import ConfigError, Finding, Location

Path = tuple[str | int, ...]
MAX_NODES = 200_000  # alias bombs expand exponentially; a real policy has far fewer nodes


@dataclass(slots=True)
class Located:
    """A YAML document as plain data plus the position of each path in it."""

    file: str
    data: Any
    values: dict[Path, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path, tuple[int, int]] = field(default_factory=dict)

    def location(self, path: Path, *, key: bool = False) -> Location:
        """Where `path` is written; its key when `key`, else its value; else the nearest parent."""
        table = self.keys if key else self.values
        probe = path
        while True:
            pos = table.get(probe) or self.values.get(probe)
            if pos is not None:
                return Location(self.file, *pos)
            if not probe:
                return Location(self.file, 1, 1)
            probe = probe[:-1]


# libyaml's parser when PyYAML was built with it (about ten times faster on large sets),
# else the pure-Python one; both give nodes with line and column marks.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


class _Builder:
    """Turns a composed node tree into plain data, recording positions."""

    def __init__(self, loader: Any, doc: Located) -> None:
        self.loader = loader
        self.doc = doc
        self.count = 0
        self.findings: list[Finding] = []
        self.open: set[int] = set()  # nodes being built: an alias to one of them is a cycle

    def build(self, node: yaml.Node, path: Path) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise ConfigError(
                [
                    Finding(
                        "yaml-too-large",
                        f"more than {MAX_NODES} YAML nodes (alias bomb?)",
                        Location(self.doc.file, *_mark(node)),
                        path,
                    )
                ]
            )
        self.doc.values[path] = _mark(node)
        if isinstance(node, yaml.ScalarNode):
            return self.loader.construct_object(node, deep=True)
        if id(node) in self.open:
            raise ConfigError(
                [
                    Finding(
                        "yaml-recursive",
                        "an alias refers to a node that contains it; policies cannot be recursive",
                        Location(self.doc.file, *_mark(node)),
                        path,
                    )
                ]
            )
        self.open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        finally:
            self.open.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[str, Any]:
        self.loader.flatten_mapping(node)
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            where = Location(self.doc.file, *_mark(key_node))
            if not isinstance(key_node, yaml.ScalarNode):
                self.findings.append(
                    Finding("yaml-key", "mapping keys must be plain strings", where, path)
                )
                continue
            # A key is its text: YAML 1.1 would read a plain `on`, `off`, `yes` or `no`
            # as a boolean and `0x10` as 16, but a policy key is always a name.
            key = key_node.value
            child = (*path, key)
            if key in out:
                first = self.doc.keys[child]
                self.findings.append(
                    Finding(
                        "duplicate-key",
                        f"key {key!r} is repeated (first at line {first[0]})",
                        where,
                        child,
                    )
                )
                continue
            self.doc.keys[child] = _mark(key_node)
            out[key] = self.build(value_node, child)
        return out


def load_yaml(text: str, file: str) -> Located:
    """Parse one YAML document; raise ConfigError with file:line:col on any syntax error."""
    doc = Located(file, None)
    try:
        loader = _Loader(text)
    except yaml.YAMLError as exc:
        raise ConfigError(
            [Finding("yaml-syntax", f"YAML error: {exc}", Location(file, 1, 1))]
        ) from None
    try:
        node = loader.get_single_node()
        if node is None:
            doc.data = None
            return doc
        builder = _Builder(loader, doc)
        doc.data = builder.build(node, ())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Location(file, mark.line + 1, mark.column + 1) if mark else Location(file, 1, 1)
        message = " ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
        if exc.context_mark is not None and mark is not exc.context_mark:
            message += f" (the construct began at line {exc.context_mark.line + 1})"
        raise ConfigError(
            [Finding("yaml-syntax", f"YAML syntax error: {message}", where)]
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(
            [Finding("yaml-syntax", f"YAML error: {exc}", Location(file, 1, 1))]
        ) from None
    finally:
        loader.dispose()
    if builder.findings:
        raise ConfigError(builder.findings)
    return doc
