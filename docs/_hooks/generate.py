"""MkDocs hooks: the documentation pages made from policyroute itself, so they cannot drift.

A page names what it wants generated with a marker line, `<!-- generated: NAME -->`:

- `policy-reference`: every key of the policy language, from the JSON Schema that
  `policyroute schema` prints (type, default, description, example). A key the schema
  does not describe yet takes its description from `keys.yaml` beside this file; examples
  come from `keys.yaml`, else from the example app's policies, else from the key's type.
- `lint-rules`: every rule `policyroute lint --list-rules` lists.
- `problem-types`: every problem type a denial can carry, with the pages that document it.
- `settings`: every `POLICYROUTE_*` setting of `policyroute.Settings`.
- `cli-reference`: every subcommand of `policyroute`, from its argparse parser: usage,
  description, each option with its help text and default, and its exit codes.

What would make a page wrong is logged as a warning, so `mkdocs build --strict` (`make
docs`, `tests/test_docs.py`) fails on it: a key without a description or example, a
`keys.yaml` entry for a key that does not exist or that the schema now describes itself,
a failure-mode row (`| 429 | `rate-limited` | ...`) whose problem type does not exist or
has another status, a problem type no page documents, a request-path diagram whose
step nodes are not the compiled chain's steps in order, and a subcommand or option of the
command line without help text.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import posixpath
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.plugins import get_plugin_logger
from mkdocs.structure.files import Files
from mkdocs.structure.pages import Page

log = get_plugin_logger(__name__)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent  # the checkout: mkdocs.yml, policyroute/, examples/
KEYS_FILE = HERE / "keys.yaml"
EXAMPLE_POLICIES = ROOT / "examples" / "policies"
MARKER = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.MULTILINE)
# A failure-mode row of a page: | 429 | `rate-limited` | headers | when |
FAILURE_ROW = re.compile(r"^\|\s*(\d{3})\s*\|\s*`([a-z][a-z-]*)`\s*\|", re.MULTILINE)
MERMAID = re.compile(r"^```mermaid\n(.*?)^```", re.MULTILINE | re.DOTALL)
MERMAID_NODE = re.compile(r"^\s*([A-Za-z_]\w*)\s*[\[\(\{]", re.MULTILINE)
ARCHITECTURE_PAGE = "architecture.md"
# Root keys in reading order: the route keys are documented where routes are written.
ROOT_ORDER = ("version", "settings", "routes", "defaults", "profiles", "resilience")
# The path prefix of a route's keys (in `keys.yaml` too), and the name of a route.
ROUTE = "route"
PLACEHOLDERS = {"routes": "METHOD /path"}
SHORT = 60  # an example or default longer than this links to its section instead


@dataclass(frozen=True)
class Sources:
    """What the pages are made from, read from policyroute once per build."""

    schema: dict[str, Any]
    rules: tuple[tuple[str, str, str], ...]  # code, severity, summary
    problems: tuple[tuple[str, int, str, str], ...]  # slug, status, title, type URI
    steps: tuple[str, ...]  # the chain's steps in request-path order
    settings: tuple[tuple[str, str, str], ...]  # env var, default, description
    cli: argparse.ArgumentParser  # the `policyroute` command's parser


@functools.cache
def sources() -> Sources:
    """Everything the docs read of policyroute: the one place its module paths are named."""
    # The pages describe this checkout's policyroute, not whichever one is installed
    # (an editable install's finder runs only after the path entries).
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from policyroute import Settings
    from policyroute.cli import parser
    from policyroute.errors import Problems, ProblemType
    from policyroute.language.schema import policy_schema
    from policyroute.review.lint import RULES
    from policyroute.steps import BUILTIN

    problems = [p for p in vars(Problems).values() if isinstance(p, ProblemType)]
    prefix = Settings.model_config.get("env_prefix", "")
    return Sources(
        schema=policy_schema(),
        rules=tuple((r.code, r.severity, r.summary) for r in RULES.values()),
        problems=tuple((p.slug, p.status, p.title, p.uri) for p in problems),
        steps=tuple(BUILTIN),
        settings=tuple(
            ((prefix + name).upper(), _setting_default(info.default), info.description or "")
            for name, info in Settings.model_fields.items()
        ),
        cli=parser(),
    )


def _setting_default(value: Any) -> str:
    return "unset" if value is None else f"`{json.dumps(value)}`"


# ---------------------------------------------------------------------------------------
# mkdocs events


@dataclass
class _Build:
    """What one build learned from the page sources before any page is rendered."""

    documented: dict[str, list[str]] = field(default_factory=dict)  # problem slug -> pages
    titles: dict[str, str] = field(default_factory=dict)  # page -> its first heading


_build = _Build()


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Read every page's failure-mode rows; check them and the request-path diagram."""
    _build.documented, _build.titles = {}, {}
    catalogue = {slug: status for slug, status, _, _ in sources().problems}
    for file in files.documentation_pages():
        text = file.content_string
        heading = re.search(r"^# (.+)$", text, re.MULTILINE)
        _build.titles[file.src_uri] = heading.group(1).strip() if heading else file.src_uri
        for status, slug in FAILURE_ROW.findall(text):
            if slug not in catalogue:
                log.warning("%s: no problem type %r", file.src_uri, slug)
            elif int(status) != catalogue[slug]:
                log.warning(
                    "%s: %s answers %s, not %s", file.src_uri, slug, catalogue[slug], status
                )
            else:
                _build.documented.setdefault(slug, []).append(file.src_uri)
        if file.src_uri == ARCHITECTURE_PAGE:
            _check_diagram(text)
    for slug in catalogue:
        if slug not in _build.documented:
            log.warning("problem type %r is documented on no page (add a failure-mode row)", slug)
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Replace each marker with the text it names."""
    where = page.file.src_uri

    def expand(found: re.Match[str]) -> str:
        name = found.group(1)
        make = GENERATORS.get(name)
        if make is None:
            log.warning("%s: no generated text named %r", where, name)
            return ""
        return make(where)

    return MARKER.sub(expand, markdown)


def _check_diagram(text: str) -> None:
    """The diagram's step nodes are the compiled chain's steps, in request-path order."""
    blocks = MERMAID.findall(text)
    if not blocks:
        log.warning("%s: no mermaid diagram of the request path", ARCHITECTURE_PAGE)
        return
    steps = sources().steps
    nodes = [n for n in dict.fromkeys(MERMAID_NODE.findall(blocks[0])) if n in steps]
    if nodes != list(steps):
        log.warning(
            "%s: the diagram's step nodes are %s; the chain's steps are %s",
            ARCHITECTURE_PAGE,
            ", ".join(nodes),
            ", ".join(steps),
        )


# ---------------------------------------------------------------------------------------
# small text helpers


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell (a pipe in a `code` span splits no cell)."""
    parts = re.split(r"(`[^`]+`)", " ".join(text.split()))  # odd parts are the spans
    return "".join(p if i % 2 else p.replace("|", "\\|") for i, p in enumerate(parts))


def _code(text: str) -> str:
    fence = "``" if "`" in text else "`"
    pad = " " if "`" in text else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _flow(value: Any) -> str:
    """A value as one line of YAML (flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=math.inf)
    text = text.strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _link(text: str, source: str, target: str, anchor: str = "") -> str:
    """A link from page `source` to page `target` (both source paths under docs/)."""
    path = posixpath.relpath(target, posixpath.dirname(source) or ".")
    return f"[{text}]({path}{'#' + anchor if anchor else ''})"


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    millis = seconds * 1000
    return f"{int(millis)}ms" if millis.is_integer() else f"{seconds:g}s"


def _size(size: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


# ---------------------------------------------------------------------------------------
# the policy language reference


@dataclass
class Section:
    """One object of the language: where it is written and its keys."""

    name: str  # its name in the schema's $defs ("" for the file itself)
    path: str  # the key path its keys extend: "settings.auth", "route.rate_limit"
    title: str
    node: dict[str, Any]
    places: list[str] = field(default_factory=list)  # every key path that holds it

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9_]+", "-", self.title.lower()).strip("-")


def _place(path: str) -> str:
    """Where an object is written: a route's own keys are named as the route's."""
    if path.startswith(ROUTE + "."):
        return f"`{path.removeprefix(ROUTE + '.')}` of a route"
    return f"`{path}`"


def _refs(node: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """The $defs a property holds, each with how: `""` itself, `"[]"` a list, `"*"` a mapping."""
    if "$ref" in node:
        yield node["$ref"].rpartition("/")[2], ""
    for member in node.get("anyOf", ()):
        yield from _refs(member)
    if isinstance(node.get("items"), dict):
        for name, _ in _refs(node["items"]):
            yield name, "[]"
    if isinstance(node.get("additionalProperties"), dict):
        for name, _ in _refs(node["additionalProperties"]):
            yield name, "*"


class Reference:
    """The sections of the policy language, in reading order, and how to render them."""

    def __init__(self, schema: dict[str, Any], notes: dict[str, dict[str, Any]]) -> None:
        self.defs: dict[str, dict[str, Any]] = schema["$defs"]
        self.notes = notes
        self.sections: list[Section] = []
        self.by_def: dict[str, Section] = {}
        root = Section("", "", "Policy file", schema)
        self.sections.append(root)
        self._visit(root)
        self.examples = self._examples()

    def _visit(self, section: Section) -> None:
        props: dict[str, Any] = section.node.get("properties", {})
        keys = list(props)
        if not section.path:
            keys.sort(key=lambda k: ROOT_ORDER.index(k) if k in ROOT_ORDER else len(ROOT_ORDER))
        for key in keys:
            place = self.key_path(section, key)
            for name, how in _refs(props[key]):
                shown = place + (f".<{PLACEHOLDERS.get(key, 'name')}>" if how == "*" else "")
                known = self.by_def.get(name)
                if known is not None:
                    known.places.append(shown)
                    continue
                if key == "routes" and not section.path:
                    path, title = ROUTE, "Route keys"
                elif how == "*":
                    path, title = f"{place}.*", f"{place}.<name>"
                else:
                    path, title = place, place.removeprefix(ROUTE + ".")
                child = Section(name, path, title, self.defs[name], [shown])
                self.by_def[name] = child
                self.sections.append(child)
                self._visit(child)

    @staticmethod
    def key_path(section: Section, key: str) -> str:
        return f"{section.path}.{key}" if section.path else key

    def keys(self) -> Iterator[tuple[Section, str, dict[str, Any]]]:
        """Every key of every section."""
        for section in self.sections:
            for key, prop in section.node.get("properties", {}).items():
                yield section, key, prop

    # examples from the example app's policy files -----------------------------------

    def _examples(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for file in sorted(EXAMPLE_POLICIES.glob("*.yaml")):
            if file.name.endswith(".test.yaml"):
                continue
            doc = yaml.safe_load(file.read_text(encoding="utf-8"))
            self._collect(doc, self.sections[0], found)
        return found

    def _collect(self, value: Any, section: Section, found: dict[str, Any]) -> None:
        if not isinstance(value, dict):
            return
        props = section.node.get("properties", {})
        for key, item in value.items():
            prop = props.get(key)
            if prop is None:
                continue
            found.setdefault(self.key_path(section, key), item)
            for name, how in _refs(prop):
                child = self.by_def[name]
                if how == "*" and isinstance(item, dict):
                    for each in item.values():
                        self._collect(each, child, found)
                elif how == "[]" and isinstance(item, list):
                    for each in item:
                        self._collect(each, child, found)
                elif how == "":
                    self._collect(item, child, found)

    # rendering ----------------------------------------------------------------------

    def kind(self, node: dict[str, Any]) -> str:
        """A property's type in words, with links to the sections of its mappings."""
        if "$ref" in node:
            return f"[mapping](#{self.by_def[node['$ref'].rpartition('/')[2]].anchor})"
        if "anyOf" in node:
            members = [m for m in node["anyOf"] if m != {"type": "null"}]
            parts = list(dict.fromkeys(self.kind(m) for m in members))
            if "duration" in parts and "number" in parts:
                parts.remove("number")
            if "size" in parts and "integer" in parts:
                parts.remove("integer")
            return " or ".join(parts)
        if "const" in node:
            return _code(_flow(node["const"]))
        if "enum" in node:
            return "one of " + ", ".join(_code(_flow(v)) for v in node["enum"])
        kind = node.get("type")
        if kind == "array":
            return "list of " + self.kind(node.get("items", {}))
        if kind == "object":
            values = node.get("additionalProperties")
            if isinstance(values, dict):
                return "mapping of names to " + self.kind(values)
            return "mapping"
        if kind == "string":
            return self._string_kind(node)
        return str(kind or "any")

    @staticmethod
    def _string_kind(node: dict[str, Any]) -> str:
        pattern = node.get("pattern", "")
        if "ms|s|m|h|d" in pattern:
            return "duration"
        if "KiB" in pattern:
            return "size"
        if pattern.startswith("^(persistent"):
            return "Pulsar topic"
        if "!#$%&" in pattern:
            return "header name"
        if "CIDR" in node.get("description", ""):
            return "CIDR"
        return "string"

    def _is(self, node: dict[str, Any], kind: str) -> bool:
        members = node.get("anyOf", [node])
        return any(self._string_kind(m) == kind for m in members if m.get("type") == "string")

    def value(self, node: dict[str, Any], value: Any) -> str:
        """A value of a property as written in a policy file."""
        if isinstance(value, int | float) and not isinstance(value, bool):
            if self._is(node, "duration"):
                return _code(_duration(float(value)))
            if self._is(node, "size") and isinstance(value, int):
                return _code(_size(value))
        return _code(_flow(value))

    def default(self, section: Section, key: str, node: dict[str, Any]) -> str:
        if key in section.node.get("required", ()):
            return "required"
        if "default" not in node or node["default"] is None:
            return "unset"
        text = self.value(node, node["default"])
        if len(text) > SHORT:
            refs = [name for name, _ in _refs(node)]
            if refs:
                return f"[each key's default](#{self.by_def[refs[0]].anchor})"
        return text

    def description(self, section: Section, key: str, node: dict[str, Any]) -> str | None:
        """The schema's own description, else the note's; a type's generic text is none."""
        own = node.get("description", "")
        if own.startswith(("A duration:", "A size:")):
            own = ""
        note = self.notes.get(self.key_path(section, key), {}).get("description")
        return own or note

    def example(self, section: Section, key: str, node: dict[str, Any]) -> str | None:
        path = self.key_path(section, key)
        note = self.notes.get(path, {})
        if "example" in note:
            value = note["example"]
        elif path in self.examples:
            value = self.examples[path]
        else:
            return self._made_up(key, node)
        text = _code(f"{key}: {_flow(value)}")
        refs = [name for name, _ in _refs(node)]
        if len(text) > SHORT and refs:
            return f"[see `{self.by_def[refs[0]].title}`](#{self.by_def[refs[0]].anchor})"
        return text

    @staticmethod
    def _made_up(key: str, node: dict[str, Any]) -> str | None:
        """An example from the type alone: a choice other than the default, a flag flipped."""
        members = [m for m in node.get("anyOf", [node]) if m != {"type": "null"}]
        default = node.get("default")
        for member in members:
            if "enum" in member:
                other = [v for v in member["enum"] if v != default] or member["enum"]
                return _code(f"{key}: {_flow(other[0])}")
            if member.get("type") == "boolean":
                return _code(f"{key}: {_flow(not default)}")
        return None

    def markdown(self) -> str:
        out: list[str] = []
        for section in self.sections:
            out.append(self._section(section))
        return "\n".join(out)

    def _section(self, section: Section) -> str:
        title = section.title if " " in section.title else f"`{section.title}`"
        lines = [f"## {title} {{#{section.anchor}}}", ""]
        about = section.node.get("description", "")
        if about and section.path:
            lines += [about, ""]
        if section.path:
            held = ", ".join(_place(p) for p in dict.fromkeys(section.places))
            lines += [f"Written at: {held}.", ""]
        lines += ["| Key | Type | Default | Example | Description |", "|---|---|---|---|---|"]
        for key, node in section.node.get("properties", {}).items():
            cells = (
                f"`{key}`",
                self.kind(node),
                self.default(section, key, node),
                self.example(section, key, node) or "",
                self.description(section, key, node) or "",
            )
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        return "\n".join(lines) + "\n"

    def problems(self) -> list[str]:
        """What keeps the reference from being complete and current."""
        found = []
        known = {self.key_path(s, k) for s, k, _ in self.keys()}
        for path, note in self.notes.items():
            if path not in known:
                found.append(f"{KEYS_FILE.name}: {path!r} is no key of the policy language")
                continue
            if not isinstance(note, dict) or not set(note) <= {"description", "example"}:
                found.append(f"{KEYS_FILE.name}: {path!r} takes `description` and `example`")
        for section, key, node in self.keys():
            path = self.key_path(section, key)
            own = node.get("description", "")
            if own and not own.startswith(("A duration:", "A size:")):
                if "description" in self.notes.get(path, {}):
                    found.append(
                        f"{KEYS_FILE.name}: {path!r} is described by the schema now; "
                        "remove its description here"
                    )
            elif not self.description(section, key, node):
                found.append(f"{path!r} has no description: add one to {KEYS_FILE.name}")
            if not self.example(section, key, node):
                found.append(f"{path!r} has no example: add one to {KEYS_FILE.name}")
        return found


def _reference(page: str) -> str:
    notes = yaml.safe_load(KEYS_FILE.read_text(encoding="utf-8")) or {}
    reference = Reference(sources().schema, notes)
    for problem in reference.problems():
        log.warning("%s", problem)
    return reference.markdown()


# ---------------------------------------------------------------------------------------
# lint rules, problem types, settings


def _lint_rules(page: str) -> str:
    lines = ["| Code | Severity | What it catches |", "|---|---|---|"]
    for code, severity, summary in sources().rules:
        lines.append(f"| <a id=\"{code}\"></a>`{code}` | {severity} | {_cell(summary)} |")
    return "\n".join(lines) + "\n"


def _problem_types(page: str) -> str:
    lines = ["| Type | Status | Title | Documented in |", "|---|---|---|---|"]
    for slug, status, title, uri in sorted(sources().problems, key=lambda p: (p[1], p[0])):
        pages = _build.documented.get(slug, [])
        where = ", ".join(_link(_build.titles[p], page, p) for p in dict.fromkeys(pages))
        lines.append(
            f"| <a id=\"{slug}\"></a>`{slug}`<br><small>`{uri}`</small> | {status} | "
            f"{_cell(title)} | {where} |"
        )
    return "\n".join(lines) + "\n"


def _settings(page: str) -> str:
    lines = ["| Variable | Default | What it sets |", "|---|---|---|"]
    for name, default, description in sources().settings:
        lines.append(f"| `{name}` | {default} | {_cell(description)} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# the command line

# Markdown's own characters in help text, outside its `code` spans.
MARKDOWN_CHARS = re.compile(r"([\\*_<>\[\]])")
USAGE_WIDTH = 88  # the usage lines as a terminal this wide shows them


def _prose(text: str) -> str:
    """Plain help text as markdown: its backquoted spans stay code, the rest is escaped."""
    parts = re.split(r"(`[^`]+`)", " ".join(text.split()))  # odd parts are the spans
    return "".join(p if i % 2 else MARKDOWN_CHARS.sub(r"\\\1", p) for i, p in enumerate(parts))


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")


@dataclass(frozen=True)
class Command:
    """One parser of the command line: `policyroute` itself or a subcommand."""

    name: str  # "" for `policyroute` itself
    about: str  # the help line `policyroute --help` lists it with
    parser: argparse.ArgumentParser

    @property
    def anchor(self) -> str:
        return self.name or "policyroute"


class Cli:
    """The `policyroute` command as its argparse parsers describe it, and how to render it.

    argparse has no public API to list a parser's actions or format one alone, so this reads
    `_actions` and the formatter's helpers, as `--help` does.
    """

    def __init__(self, top: argparse.ArgumentParser) -> None:
        self.top = Command("", top.description or "", top)
        self.commands: list[Command] = []
        for action in top._actions:
            if isinstance(action, argparse._SubParsersAction):
                about = {a.dest: a.help or "" for a in action._choices_actions}
                for name, parser in action.choices.items():
                    self.commands.append(Command(name, about.get(name, ""), parser))

    @staticmethod
    def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
        """The arguments `--help` lists, but -h and the subcommands."""
        return [
            a
            for a in parser._actions
            if a.help != argparse.SUPPRESS
            and not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)
        ]

    @staticmethod
    def _formatter(parser: argparse.ArgumentParser) -> argparse.HelpFormatter:
        kind = parser.formatter_class  # a HelpFormatter class, which takes the width too
        assert isinstance(kind, type) and issubclass(kind, argparse.HelpFormatter)
        return kind(prog=parser.prog, width=USAGE_WIDTH)

    def invocation(self, parser: argparse.ArgumentParser, action: argparse.Action) -> str:
        """How `--help` names an argument: `-o OUTPUT, --output OUTPUT`, `paths`."""
        return self._formatter(parser)._format_action_invocation(action)

    def usage(self, parser: argparse.ArgumentParser) -> str:
        formatter = self._formatter(parser)
        formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
        return formatter.format_help().strip()

    def help(self, parser: argparse.ArgumentParser, action: argparse.Action) -> str:
        """An argument's help text as `--help` prints it (its `%(default)s` filled in)."""
        return self._formatter(parser)._expand_help(action) if action.help else ""

    @staticmethod
    def default(action: argparse.Action) -> str:
        # argparse marks a positional `nargs="*"` required; it may be left out all the same.
        if action.required and action.nargs not in ("?", "*"):
            return "required"
        if action.nargs == 0:  # a flag: --version, --reload
            return "" if action.default == argparse.SUPPRESS else "off"
        if action.default in (None, []):
            listed = action.nargs in ("*", "+") or isinstance(action, argparse._AppendAction)
            return "none" if listed else "unset"
        return _code(str(action.default))

    def problems(self) -> list[str]:
        """What keeps the reference from saying what each command and option is for."""
        found = []
        for command in [self.top, *self.commands]:
            named = f"policyroute {command.name}".strip()
            if not command.about.strip():
                found.append(f"{named} has no help text (add_parser's help=)")
            for action in self.options(command.parser):
                if not (action.help or "").strip():
                    argument = self.invocation(command.parser, action)
                    found.append(f"{named} {argument} has no help text")
        return found

    def markdown(self) -> str:
        lines = ["| Command | What it does |", "|---|---|"]
        for command in self.commands:
            link = f"[`{command.name}`](#{command.anchor})"
            lines.append(f"| {link} | {_cell(_prose(_sentence(command.about)))} |")
        out = ["\n".join(lines) + "\n"]
        for command in [self.top, *self.commands]:
            out.append(self._command(command))
        return "\n".join(out)

    def _command(self, command: Command) -> str:
        parser = command.parser
        title = f"policyroute {command.name}".strip()
        lines = [f"## `{title}` {{#{command.anchor}}}", ""]
        lines += [_prose(_sentence(command.about)), ""]
        if parser.description and command.name:
            for paragraph in re.split(r"\n\s*\n", parser.description.strip()):
                lines += [_prose(paragraph), ""]
        lines += ["```text", self.usage(parser), "```", ""]
        options = self.options(parser)
        if options:
            lines += ["| Argument | Default | Description |", "|---|---|---|"]
            for action in options:
                cells = (
                    _code(self.invocation(parser, action)),
                    self.default(action),
                    _prose(self.help(parser, action)),
                )
                lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
            lines.append("")
        exits: dict[int, str] = getattr(parser, "exits", {})
        if exits:
            whose = "Exit codes of every command" if not command.name else "Exit codes"
            lines += [f"{whose}:", "", "| Code | When |", "|---|---|"]
            for code, when in exits.items():
                lines.append(f"| `{code}` | {_cell(_prose(_sentence(when)))} |")
            lines.append("")
        return "\n".join(lines)


def _cli_reference(page: str) -> str:
    cli = Cli(sources().cli)
    for problem in cli.problems():
        log.warning("%s", problem)
    return cli.markdown()


GENERATORS = {
    "policy-reference": _reference,
    "lint-rules": _lint_rules,
    "problem-types": _problem_types,
    "settings": _settings,
    "cli-reference": _cli_reference,
}
