"""Positions of every key and value in policy files, for lint rules and explain.

The loader already validates the files; this is a second, cheap read (libyaml when
PyYAML has it) that keeps the node tree's shape and marks, so rules that look at raw
text (inline secrets, open proxies) and explain's per-value provenance can point at
the exact line and column.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KeyPath = tuple[str | int, ...]
Mark = tuple[int, int]

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(slots=True)
class Doc:
    """One policy file as a map from key paths to marks, scalars and node kinds."""

    file: str
    values: dict[KeyPath, Mark] = field(default_factory=dict)
    keys: dict[KeyPath, Mark] = field(default_factory=dict)
    scalars: dict[KeyPath, str] = field(default_factory=dict)
    kinds: dict[KeyPath, str] = field(default_factory=dict)  # "map", "seq", "scalar", "null"

    def mark(self, path: KeyPath, *, key: bool = False) -> Mark | None:
        """The line and column of `path` (its key when `key` and it has one)."""
        if key and path in self.keys:
            return self.keys[path]
        return self.values.get(path)


def _mark(node: yaml.Node) -> Mark:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _walk(loader: Any, node: yaml.Node, path: KeyPath, doc: Doc) -> None:
    doc.values[path] = _mark(node)
    if isinstance(node, yaml.MappingNode):
        doc.kinds[path] = "map"
        loader.flatten_mapping(node)
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            child = (*path, key_node.value)
            if child in doc.keys:
                continue  # a repeated key: the loader reports it
            doc.keys[child] = _mark(key_node)
            _walk(loader, value_node, child, doc)
    elif isinstance(node, yaml.SequenceNode):
        doc.kinds[path] = "seq"
        for i, item in enumerate(node.value):
            _walk(loader, item, (*path, i), doc)
    else:
        if str(node.tag).endswith(":null"):
            doc.kinds[path] = "null"
        else:
            doc.kinds[path] = "scalar"
            doc.scalars[path] = str(node.value)


def read_doc(file: str | Path) -> Doc | None:
    """A file's positions; None when it cannot be read or parsed (the loader says why)."""
    name = str(file)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        doc = Doc(name)
        if node is not None:
            _walk(loader, node, (), doc)
    except yaml.YAMLError:
        return None
    finally:
        loader.dispose()
    return doc


def read_docs(files: Iterable[str | Path]) -> list[Doc]:
    """Positions of every readable file, in order."""
    return [d for f in files if (d := read_doc(f)) is not None]
