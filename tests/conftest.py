"""Fixtures: a private POOL_NOTEBOOK_HOME per test, and worker cleanup."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pool_notebook import spawn
from pool_notebook.registry import Registry


@pytest.fixture
def pool_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An isolated package home; every worker registered in it is stopped afterwards."""
    home = Path(tempfile.mkdtemp(prefix="pn-", dir="/tmp"))  # short: sun_path is 108 bytes
    monkeypatch.setenv("POOL_NOTEBOOK_HOME", str(home))
    monkeypatch.setenv("ALC_HOME", str(tmp_path / "alc"))
    monkeypatch.setenv("POOL_NOTEBOOK_HISTORY", str(tmp_path / "history.sqlite"))
    monkeypatch.setenv("POOL_NOTEBOOK_WIDGETS", "0")
    yield home
    try:
        entries = Registry.default().entries()
    except Exception:
        entries = []
    for entry in entries:
        with contextlib.suppress(ProcessLookupError):
            os.kill(entry.pid, signal.SIGKILL)
    for child in spawn._children:  # a worker whose entry is gone must not outlive its test
        if child.poll() is None:
            child.kill()
            child.wait()
    shutil.rmtree(home, ignore_errors=True)
