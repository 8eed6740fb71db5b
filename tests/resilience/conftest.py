"""Keep `@resilient` declarations made inside a test from outliving it."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from policyroute.resilience import profiles


@pytest.fixture(autouse=True)
def no_leftover_declarations() -> Iterator[None]:
    """After each test its decorated coroutines are gone, so later installs never see them."""
    yield
    gc.collect()
    assert not list(profiles._DECLARED), "a @resilient coroutine outlived its test"
