"""The worker registry: algocline's format, locking, corruption, pruning."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pool_notebook import RegistryCorrupted
from pool_notebook.registry import Registry, WorkerEntry, algocline_home, pid_alive


def _add_many(path: str, worker: int, count: int) -> None:
    reg = Registry(path)
    for i in range(count):
        reg.add(WorkerEntry.new(f"p-{worker}-{i}", os.getpid(), f"/s/{worker}-{i}.sock", "0.1"))


def test_four_processes_times_100_concurrent_adds_lose_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "state" / "registry.json")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_many, args=(path, w, 100)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    sids = {e.sid for e in Registry(path).entries()}
    assert sids == {f"p-{w}-{i}" for w in range(4) for i in range(100)}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(Path(path).parent).st_mode) == 0o700
    assert not [p for p in Path(path).parent.iterdir() if p.name.endswith(".tmp")]


def test_format_is_algoclines_and_unknown_keys_survive(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"sessions": [
        {"sid": "p-1-a", "pid": os.getpid(), "sock": "/x.sock", "version": "0.31.0",
         "created_at": "2026-01-01T00:00:00Z", "future_field": 1}]}))
    reg = Registry(path)
    (entry,) = reg.entries()
    assert entry.extra == {"future_field": 1} and entry.alive
    reg.add(WorkerEntry.new("p-2-b", os.getpid(), "/y.sock", "0.1.0"))
    saved = json.loads(path.read_text())["sessions"]
    assert saved[0]["future_field"] == 1
    assert set(saved[1]) == {"sid", "pid", "sock", "version", "created_at"}
    assert saved[1]["created_at"].endswith("Z")
    assert reg.find("p-2-b") is not None and reg.remove("p-2-b") and not reg.remove("p-2-b")


@pytest.mark.parametrize("content", ["{not json", '{"sessions": 3}', "[]",
                                     '{"sessions": [{"sid": 1}]}', "\xff"])
def test_corrupted_file_is_an_error_never_empty(tmp_path: Path, content: str) -> None:
    path = tmp_path / "registry.json"
    path.write_bytes(content.encode("latin-1"))
    reg = Registry(path)
    with pytest.raises(RegistryCorrupted, match="corrupted"):
        reg.entries()
    with pytest.raises(RegistryCorrupted):
        reg.add(WorkerEntry.new("p", 1, "/s", "v"))
    assert path.read_bytes() == content.encode("latin-1")  # left untouched


def test_gc_prunes_dead_pids(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    reg = Registry(tmp_path / "registry.json")
    reg.add(WorkerEntry.new("live", os.getpid(), "/a", "1"))
    reg.add(WorkerEntry.new("dead", dead.pid, "/b", "1"))
    assert not pid_alive(dead.pid)
    assert [e.sid for e in reg.gc()] == ["dead"]
    assert [e.sid for e in reg.entries()] == ["live"]


def test_algocline_registry_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ALC_HOME", str(tmp_path))
    assert algocline_home() == tmp_path
    assert Registry.algocline().path == tmp_path / "state" / "pool" / "registry.json"
    assert Registry.algocline().entries() == []
