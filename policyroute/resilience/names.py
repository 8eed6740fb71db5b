"""Resolve the exception names of `retry.on` and `breaker.exclude` to classes."""

from __future__ import annotations

import builtins
import functools
import importlib


@functools.lru_cache(maxsize=256)
def resolve_exception(name: str) -> type[BaseException]:
    """The exception class a builtin name or dotted import path names; ValueError if none."""
    if "." not in name:
        found = getattr(builtins, name, None)
        if isinstance(found, type) and issubclass(found, BaseException):
            return found
        raise ValueError(
            f"unknown exception {name!r}: not a builtin exception; use a dotted import path "
            "such as httpx.ConnectError"
        )
    parts = name.split(".")
    # The longest importable module prefix, then attributes (nested classes allowed).
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            target: object = importlib.import_module(module_name)
        except ImportError:
            continue
        except Exception as exc:  # a module that fails to import is a config error too
            raise ValueError(
                f"cannot resolve {name!r}: importing {module_name} failed: {exc}"
            ) from exc
        for attr in parts[cut:]:
            target = getattr(target, attr, None)
            if target is None:
                raise ValueError(f"unknown exception {name!r}: {module_name} has no {attr!r}")
        if isinstance(target, type) and issubclass(target, BaseException):
            return target
        raise ValueError(f"{name!r} is not an exception class")
    raise ValueError(f"unknown exception {name!r}: cannot import module {parts[0]!r}")


def resolve_all(names: list[str]) -> tuple[type[BaseException], ...]:
    """Every name resolved, in order; ValueError on the first unknown one."""
    return tuple(resolve_exception(n) for n in names)
