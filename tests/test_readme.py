"""Every shell command of README.md runs, and answers what the README says it answers.

The ```sh blocks are run in order in bash, as a reader types them:

- the blocks of "Your first app" in an empty folder, after the files its ```python and
  ```yaml blocks name on their first line (`# app.py`, `# policies/api.yaml`) are written;
- every other block from the repository, against the example app started the way
  `make run` starts it (`policyroute run examples.app:app --reload` on embedded backends).

What a command must show is read from its comment (on its last line, or the comment lines
right after it): the status codes the comment starts with (`# 401 unauthenticated`,
`#   200 200 200 429`; in any order for requests sent at once with `&`), the problem type
right after a status (checked in the answer of `curl -i`), a `result: NNN` line (of
`policyroute check`), and `exit N` (every other command must exit 0).

The test maps what a reader has and a test does not: `.venv/bin/` is this checkout's
interpreter and command (so is `policyroute` on the PATH), port 8000 is a free port,
`PORT` in `redis://127.0.0.1:PORT/0` is the embedded Valkey's as `run` prints it, and a
command that serves (`make run`, `policyroute run APP`) runs in the background until the
session ends (with SIGTERM; the temporary folders of every embedded server must be gone
then). A `<!-- readme-test: NAME=VALUE -->` line before a block sets an environment
variable for that block alone. `make test` (this suite) and `make demo`
(tests/test_examples.py runs it) are the only commands not run here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from policyroute.errors import Problems, ProblemType

from .servers import REPO, free_port

README = REPO / "README.md"
FIRST_APP = "Your first app"
# Commands covered elsewhere: the suite itself, and the demo (tests/test_examples.py).
ELSEWHERE = {"make test", "make demo"}
SLUGS = {p.slug for p in vars(Problems).values() if isinstance(p, ProblemType)}
SERVE_TIMEOUT = 60


@dataclass
class Block:
    """One fenced block of the README: its section, language and lines."""

    section: str
    lang: str
    line: int  # of its first line in README.md
    lines: list[str]
    env: str | None = None  # NAME=VALUE from a `<!-- readme-test: ... -->` line before it


@dataclass
class Command:
    """One shell command (with its continuation lines) and what the README says of it."""

    line: int
    text: str
    notes: list[str] = field(default_factory=list)
    env: str | None = None

    @property
    def said(self) -> str:
        """Everything its comments say, in order."""
        return " ".join(self.notes)


def blocks(text: str) -> list[Block]:
    """Every fenced block, with the `## ` section it is in."""
    found: list[Block] = []
    section, current, directive = "", None, None
    for number, line in enumerate(text.splitlines(), 1):
        if current is not None:
            if line.startswith("```"):
                found.append(current)
                current = None
            else:
                current.lines.append(line)
            continue
        if line.startswith("## "):
            section = line[3:].strip()
        match = re.match(r"<!-- readme-test: (\S+=\S+)", line)
        if match:
            directive = match.group(1)
            continue
        if line.startswith("```"):
            current = Block(section, line[3:].strip(), number + 1, [], directive)
        directive = None
    return found


def _comment_at(line: str) -> int | None:
    """Where an unquoted `#` comment starts on a shell line, if it has one."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1] in " \t"):
            return i
    return None


def commands(block: Block) -> list[Command]:
    """The commands of a shell block, each with the comments that follow it."""
    found: list[Command] = []
    continued = False
    for offset, line in enumerate(block.lines):
        stripped = line.strip()
        if continued:
            found[-1].text += "\n" + line
        elif stripped.startswith("#"):
            if found:
                found[-1].notes.append(stripped.lstrip("#").strip())
            continue
        elif stripped:
            found.append(Command(block.line + offset, line, env=block.env))
        else:
            continue
        code = line.rstrip()
        at = _comment_at(code)
        if at is not None:
            found[-1].notes.append(code[at:].lstrip("#").strip())
            code = code[:at].rstrip()
        continued = code.endswith("\\")
    return found


def expected_codes(command: Command) -> list[str]:
    """The status codes the command's first comment starts with."""
    first = command.notes[0] if command.notes else ""
    match = re.match(r"[1-5]\d\d(?:[ ,]+[1-5]\d\d)*\b", first)
    return re.findall(r"\d{3}", match.group(0)) if match else []


def expected_slug(command: Command) -> str | None:
    """The problem type named right after the status codes, if any."""
    first = command.notes[0] if command.notes else ""
    match = re.match(r"[1-5]\d\d(?:[ ,]+[1-5]\d\d)*[ ,]+([a-z][a-z-]+)", first)
    return match.group(1) if match and match.group(1) in SLUGS else None


@dataclass
class Session:
    """One bash session: where it runs, its commands and where their output goes."""

    name: str
    cwd: Path
    port: int
    commands: list[Command]
    skipped: list[str] = field(default_factory=list)


def _serve(command: str, port: int, out: Path) -> str:
    """A serving command started in the background; waits until /health answers."""
    log, pid = out / f"serve-{port}.log", out / f"serve-{port}.pid"
    # Started from a subshell, so it is no job of this shell: the README's `wait` waits
    # for its own requests only, as in the reader's second terminal.
    return (
        f"( {command} --port {port} >> {log} 2>&1 & echo $! > {pid} )\n"
        f"SERVERS=\"$SERVERS $(cat {pid})\"\n"
        f"for _ in $(seq {SERVE_TIMEOUT * 10}); do\n"
        f"  curl -s -o /dev/null 127.0.0.1:{port}/health && break; sleep 0.1\n"
        "done\n"
        f"PR_VALKEY_URL=$(sed -n 's/^policyroute: embedded Valkey at //p' {log} | tail -1)\n"
        f"curl -s -o /dev/null 127.0.0.1:{port}/health"
    )


def script(session: Session, bin_dir: Path, out: Path) -> str:
    """The bash script that runs the session's commands, each output to its own file."""
    lines = ["SERVERS=", f"cd {shlex.quote(str(session.cwd))}"]
    for i, command in enumerate(session.commands):
        text = command.text.replace(".venv/bin/", f"{bin_dir}/")
        text = re.sub(r"\b(localhost|127\.0\.0\.1):8000\b", f"127.0.0.1:{session.port}", text)
        text = text.replace("redis://127.0.0.1:PORT/0", "$PR_VALKEY_URL")
        head = command.text.split("#")[0].strip()
        if head in ELSEWHERE:
            session.skipped.append(head)
            text = ":"
        elif head.startswith("make run"):
            text = _serve(
                f"{bin_dir}/policyroute run examples.app:app --reload", session.port, out
            )
        elif re.match(r"(\S*/)?policyroute run ", head):
            text = _serve(head, session.port, out)
        if command.env:
            text = f"(export {command.env}\n{text}\n)"
        lines.append(f"{{\n{text}\n}} > {out}/{session.name}-{i}.out 2>&1")
        lines.append(f"echo $? > {out}/{session.name}-{i}.rc")
    lines.append("for pid in $SERVERS; do kill -TERM $pid; done")
    lines.append("for pid in $SERVERS; do")  # not children of this shell: poll them
    lines.append("  for _ in $(seq 300); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done")
    lines.append("done")
    return "\n".join(lines) + "\n"


def check(session: Session, out: Path) -> list[str]:
    """What differs from the README, one message per command."""
    problems: list[str] = []
    for i, command in enumerate(session.commands):
        where = f"README.md:{command.line}: {command.text.strip()}"
        output = (out / f"{session.name}-{i}.out").read_text(errors="replace")
        rc = int((out / f"{session.name}-{i}.rc").read_text())
        said = command.said
        exit_match = re.search(r"\bexit (\d)\b", said)
        want_rc = int(exit_match.group(1)) if exit_match else 0
        if rc != want_rc:
            problems.append(f"{where}\n  exit {rc}, the README says {want_rc}:\n{output[-1500:]}")
            continue
        codes = expected_codes(command)
        if codes:
            if "curl " not in command.text:
                problems.append(f"{where}\n  shows statuses, but only curl's are checked")
                continue
            if re.search(r"(^|\s)-i\b", command.text):
                got = re.findall(r"^HTTP/\S+ (\d{3})", output, re.MULTILINE)
            else:
                got = re.findall(r"\b[1-5]\d\d\b", output)
            concurrent = "&" in command.text.replace("&&", "")
            if (sorted(got) if concurrent else got) != (sorted(codes) if concurrent else codes):
                problems.append(f"{where}\n  answered {got}, the README says {codes}:\n"
                                f"{output[-1500:]}")
                continue
            slug = expected_slug(command)
            if slug and "-i" in command.text.split() and f"problem:{slug}" not in output:
                problems.append(f"{where}\n  no {slug} problem in the answer:\n{output[-1500:]}")
        for result in re.findall(r"result: (\d{3})", said):
            if f"result: {result}" not in output:
                problems.append(f"{where}\n  no 'result: {result}' line:\n{output[-1500:]}")
    return problems


def sessions(tmp: Path) -> tuple[list[Session], dict[Path, str]]:
    """The first app's session (and its files), then the repository's."""
    first = Session("first-app", tmp / "hello", free_port(), [])
    repo = Session("repo", REPO, free_port(), [])
    files: dict[Path, str] = {}
    for block in blocks(README.read_text()):
        ours = block.section == FIRST_APP
        if block.lang == "sh":
            (first if ours else repo).commands.extend(commands(block))
        elif ours and block.lines and re.match(r"# [\w./-]+\.\w+$", block.lines[0]):
            files[first.cwd / block.lines[0][2:]] = "\n".join(block.lines[1:]) + "\n"
    return [first, repo], files


def _wrappers(bin_dir: Path) -> None:
    """`.venv/bin/policyroute` and `.venv/bin/python` of this checkout."""
    bin_dir.mkdir()
    path = f'export PYTHONPATH="{REPO}${{PYTHONPATH:+:$PYTHONPATH}}"\n'
    for name, run in (("policyroute", "-m policyroute.cli "), ("python", "")):
        wrapper = bin_dir / name
        wrapper.write_text(f'#!/bin/sh\n{path}exec "{sys.executable}" {run}"$@"\n')
        wrapper.chmod(0o755)


def test_every_readme_command_runs_and_answers_as_shown(tmp_path: Path) -> None:
    """The README's commands, run as a newcomer runs them, answer what it shows."""
    bin_dir, out, temp = tmp_path / "bin", tmp_path / "out", tmp_path / "tmp"
    _wrappers(bin_dir)
    out.mkdir()
    temp.mkdir()
    planned, files = sessions(tmp_path)
    assert {"app.py", "policies/api.yaml", "policies/api.test.yaml"} <= {
        str(p.relative_to(planned[0].cwd)) for p in files
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYROUTE_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", TMPDIR=str(temp))
    running = []
    for session in planned:
        file = tmp_path / f"{session.name}.sh"
        file.write_text(script(session, bin_dir, out))
        log = (tmp_path / f"{session.name}.log").open("wb")
        running.append((subprocess.Popen(["bash", str(file)], cwd=session.cwd, env=env,
                                         stdout=log, stderr=log), log))  # fmt: skip
    for proc, log in running:
        proc.wait(timeout=240)
        log.close()
    problems = [p for session in planned for p in check(session, out)]
    assert not problems, "\n\n".join(problems)
    assert sorted(planned[1].skipped) == sorted(ELSEWHERE)
    assert len(planned[0].commands) >= 8 and len(planned[1].commands) >= 60
    left = sorted(p.name for p in temp.iterdir())
    assert left == [], f"embedded servers left their folders behind: {left}"


def test_the_extractor_reads_commands_comments_and_statuses() -> None:
    block = Block("s", "sh", 10, [
        "A=$(tok a) # DEV ONLY",
        "curl -i $api/x -H 'k: \"#1\"' \\",
        "     -d '{}'   # 401 unauthenticated, more",
        "for i in 1 2; do curl -s -w '%{http_code} ' $api & done; wait",
        "#   200 429: one of each",
        "policyroute check 'GET /x'",
        "# result: 403 forbidden-role",
        "# (exit 1: refused)",
    ])  # fmt: skip
    found = commands(block)
    assert [c.line for c in found] == [10, 11, 13, 15]
    assert found[1].text.endswith("-d '{}'   # 401 unauthenticated, more")
    assert (expected_codes(found[1]), expected_slug(found[1])) == (["401"], "unauthenticated")
    assert expected_codes(found[2]) == ["200", "429"] and expected_slug(found[2]) is None
    assert expected_codes(found[0]) == [] and "exit 1" in found[3].said


def test_a_command_that_fails_or_answers_otherwise_is_reported(tmp_path: Path) -> None:
    block = Block("s", "sh", 1, [
        "curl -i $api/a   # 429 auth-locked",
        "curl -i $api/b   # 429 auth-locked",
        "for i in 1 2; do curl -s -w '%{http_code} ' $api/c & done; wait   # 200 429",
        "policyroute lint nowhere",
        "policyroute check 'GET /x'   # result: 403 forbidden-role (exit 1)",
    ])  # fmt: skip
    session = Session("t", tmp_path, 0, commands(block))
    answers = [
        ("HTTP/1.1 429 Too Many Requests\n\n{\"type\":\"urn:policyroute:problem:auth-locked\"}", 0),
        ("HTTP/1.1 429 Too Many Requests\n\n{\"type\":\"urn:policyroute:problem:rate-limited\"}", 0),
        ("429 200 ", 0),
        ("policyroute: no policy file or directory 'nowhere'", 2),
        ("result: 200 allowed", 1),
    ]
    for i, (output, rc) in enumerate(answers):
        (tmp_path / f"t-{i}.out").write_text(output)
        (tmp_path / f"t-{i}.rc").write_text(f"{rc}\n")
    problems = check(session, tmp_path)
    assert [p.split("\n")[0].split(": ", 1)[0] for p in problems] == [
        "README.md:2", "README.md:4", "README.md:5"
    ]  # fmt: skip
    assert "no auth-locked problem" in problems[0]
    assert "exit 2, the README says 0" in problems[1]
    assert "no 'result: 403' line" in problems[2]
