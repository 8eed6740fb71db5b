"""What an applied reload changed: the policy files (by content) and the routes (by merged
policy), for the one INFO line a reload logs (`engine.last_reload`)."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..language.loader import PolicySet, RouteEntry
from ..language.policy import RoutePolicy


def file_digests(files: Iterable[str]) -> dict[str, str]:
    """A digest of each policy file's bytes, to say which files a reload changed."""
    found: dict[str, str] = {}
    for file in files:
        with contextlib.suppress(OSError):  # gone since it was loaded: counts as changed
            found[file] = hashlib.sha256(Path(file).read_bytes()).hexdigest()
    return found


@dataclass(frozen=True, slots=True)
class Reloaded:
    """What an applied reload changed: files (by content) and routes (by merged policy)."""

    files: tuple[str, ...]
    routes: tuple[str, ...]
    settings: bool

    @classmethod
    def between(
        cls,
        old: PolicySet,
        new: PolicySet,
        old_files: Mapping[str, str],
        new_files: Mapping[str, str],
    ) -> Reloaded:
        """Compare two policy sets and the digests of their files."""
        names = sorted(set(old_files) | set(new_files))
        files = tuple(f for f in names if old_files.get(f) != new_files.get(f))
        keys = dict.fromkeys([*old.routes, *new.routes])
        routes = tuple(
            (new.routes.get(k) or old.routes[k]).key
            for k in keys
            if _policy(old.routes.get(k)) != _policy(new.routes.get(k))
        )
        return cls(files, routes, old.settings != new.settings)

    def __str__(self) -> str:
        from ..review.lint import relative

        where = ", ".join(relative(f) for f in self.files) or "no file changed"
        count = len(self.routes)
        said = f"{count} route{'' if count == 1 else 's'} changed"
        if self.routes:
            shown = ", ".join(self.routes[:5]) + (", ..." if count > 5 else "")
            said += f" ({shown})"
        if self.settings:
            said += "; settings changed"
        return f"{where}: {said}"


def _policy(entry: RouteEntry | None) -> RoutePolicy | None:
    return entry.policy if entry is not None else None
