"""YAML loading that remembers the line and column of every key and value."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import ConfigError, Finding, Location

Path = tuple[str | int, ...]
MAX_NODES = 200_000  # alias bombs expand exponentially; a real policy has far fewer nodes


@dataclass(slots=True)
class Located:
    """A YAML document as plain data plus the position of each path in it."""

    file: str
    data: Any
    values: dict[Path, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path, tuple[int, int]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)  # kept by `keep_going`

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


def load_yaml(text: str, file: str, *, keep_going: bool = False) -> Located:
    """Parse one YAML document; raise ConfigError with file:line:col on any syntax error.

    A repeated or non-string key is an error too; with `keep_going` the document is
    returned anyway (the first occurrence of each key kept) with those errors in
    `findings`, so the rest of the file can still be checked.
    """
    doc = Located(file, None)
    try:
        loader = _Loader(text)
    except yaml.YAMLError as exc:
        raise ConfigError([_other_finding(exc, text, file)]) from None
    try:
        node = loader.get_single_node()
        if node is None:
            doc.data = None
            return doc
        builder = _Builder(loader, doc)
        doc.data = builder.build(node, ())
    except yaml.MarkedYAMLError as exc:
        raise ConfigError([_syntax_finding(exc, text, file)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([_other_finding(exc, text, file)]) from None
    finally:
        loader.dispose()
    if builder.findings and not keep_going:
        raise ConfigError(builder.findings)
    doc.findings = builder.findings
    return doc


# Characters that are a YAML token on their own (indicators), named as written.
_INDICATORS = frozenset("[]{},:#&*!|>'\"%@`-?")


def _lines(text: str) -> list[str]:
    """Lines as YAML counts them (its marks count these breaks, not str.splitlines's)."""
    return re.split("\r\n|[\n\r\x85\u2028\u2029]", text)


def _token_at(text: str, line: int, column: int) -> str:
    """The token that starts at 1-based `line`:`column` of `text`, named for a message."""
    lines = _lines(text)
    if lines[-1] == "":
        lines.pop()  # the break that ends the last line starts no line of its own
    if line > len(lines) or (line == len(lines) and column > len(lines[-1])):
        return "the end of the file"
    rest = lines[line - 1][column - 1 :]
    if not rest:
        return "the end of the line"
    first = rest[0]
    if first == "\t":
        return "a tab (YAML indents with spaces)"
    if not first.isprintable():
        return f"the character U+{ord(first):04X}"
    if first in "*&!":  # an alias, anchor or tag: its name is the token
        return repr(re.split(r"[\s,\[\]{}]", rest, maxsplit=1)[0])
    if first in _INDICATORS:
        return repr(first)
    word = re.match(r"[^\s\[\]{},]+", rest)
    return repr(word.group(0).removesuffix(":")) if word else repr(first)


def _syntax_finding(exc: yaml.MarkedYAMLError, text: str, file: str) -> Finding:
    """A YAML syntax error at the token the parser stopped on, naming it.

    When the parser stopped at the end of the file, the token to fix is the one that
    opened what was never closed (a `[`, `{` or quote), so the finding points there.
    """
    problem = exc.problem or "invalid YAML"
    mark, context = exc.problem_mark or exc.context_mark, exc.context_mark
    if mark is None:
        return Finding("yaml-syntax", f"YAML syntax error: {problem}", Location(file, 1, 1))
    stopped = _token_at(text, mark.line + 1, mark.column + 1)
    where = Location(file, mark.line + 1, mark.column + 1)
    if context is None or (context.line, context.column) == (mark.line, mark.column):
        return Finding("yaml-syntax", f"YAML syntax error at {stopped}: {problem}", where)
    opened = _token_at(text, context.line + 1, context.column + 1)
    began = f"{context.line + 1}:{context.column + 1}"
    if stopped == "the end of the file":
        message = (
            f"YAML syntax error at {opened}: the file ends before what it opens is closed "
            f"({exc.context}: {problem})"
        )
        return Finding("yaml-syntax", message, Location(file, context.line + 1, context.column + 1))
    message = (
        f"YAML syntax error at {stopped}: {problem} "
        f"({exc.context} that began at {began} with {opened})"
    )
    return Finding("yaml-syntax", message, where)


def _other_finding(exc: yaml.YAMLError, text: str, file: str) -> Finding:
    """A YAML error without marks: a character the reader refuses, at its position."""
    if isinstance(exc, yaml.reader.ReaderError) and 0 <= exc.position <= len(text):
        before = _lines(text[: exc.position])
        line, column = len(before), len(before[-1]) + 1
        token = _token_at(text, line, column)
        return Finding(
            "yaml-syntax", f"YAML error at {token}: {exc.reason}", Location(file, line, column)
        )
    return Finding("yaml-syntax", f"YAML error: {exc}", Location(file, 1, 1))
