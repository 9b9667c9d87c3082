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


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("pid", [99999999999999, 2**31, True, False, 0, -5, "1234", 1.5, None])
def test_invalid_pids_are_dropped_by_gc_and_never_raise(tmp_path: Path, pid: object) -> None:
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"sessions": [
        {"sid": "p-bad", "pid": pid, "sock": "/b.sock", "version": "1", "created_at": ""},
        {"sid": "p-live", "pid": os.getpid(), "sock": "/l.sock", "version": "1",
         "created_at": ""}]}))
    reg = Registry(path)
    bad = reg.find("p-bad")
    assert bad is not None and not bad.alive and bad.to_json()["pid"] == pid  # kept as written
    reg.add(WorkerEntry.new("p-new", os.getpid(), "/n.sock", "1"))  # rewrites the file...
    assert json.loads(path.read_text())["sessions"][0]["pid"] == pid  # ...keeping it as is
    assert [e.sid for e in reg.gc()] == ["p-bad"]
    assert [e.sid for e in reg.entries()] == ["p-live", "p-new"]


def test_gc_removes_the_log_of_a_pruned_worker_only(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry.json")
    reg.add(WorkerEntry.new("p-dead", _dead_pid(), "/d.sock", "1"))
    reg.add(WorkerEntry.new("p-live", os.getpid(), "/l.sock", "1"))
    (tmp_path / "p-dead.log").write_text("crashed")
    (tmp_path / "p-live.log").write_text("running")
    assert [e.sid for e in reg.gc()] == ["p-dead"]
    assert not (tmp_path / "p-dead.log").exists()
    assert (tmp_path / "p-live.log").read_text() == "running"


#: registry.json exactly as algocline writes it: ``serde_json::to_string_pretty`` of
#: ``PoolRegistry { sessions: Vec<PoolSessionEntry> }`` with entries made by
#: ``PoolSessionEntry::new(sid, pid, sock, "0.30.0")`` (created_at from
#: ``now_iso8601()``: ``YYYY-MM-DDTHH:MM:SSZ``). Source: algocline
#: crates/algocline-app/src/pool/registry.rs (``make_entry`` in its tests, ``save``),
#: crates/algocline-app/src/service/manifest.rs (``now_iso8601``).
ALGOCLINE_REGISTRY = """{
  "sessions": [
    {
      "sid": "live-session",
      "pid": LIVE,
      "sock": "/tmp/alc-pool/live-session.sock",
      "version": "0.30.0",
      "created_at": "2026-04-22T09:15:02Z"
    },
    {
      "sid": "dead-session",
      "pid": DEAD,
      "sock": "/tmp/alc-pool/dead-session.sock",
      "version": "0.30.0",
      "created_at": "2026-04-22T09:15:03Z"
    }
  ]
}"""


def test_reads_and_prunes_a_registry_as_algocline_writes_it(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ALC_HOME", str(tmp_path))
    path = tmp_path / "state" / "pool" / "registry.json"
    path.parent.mkdir(parents=True, mode=0o700)
    # algocline's own test uses pid 999999 as "dead"; a reaped child is dead for sure
    path.write_text(ALGOCLINE_REGISTRY.replace("LIVE", str(os.getpid()))
                    .replace("DEAD", str(_dead_pid())))
    reg = Registry.algocline()
    live, dead = reg.entries()
    assert (live.sid, live.pid, live.sock, live.version) == (
        "live-session", os.getpid(), "/tmp/alc-pool/live-session.sock", "0.30.0")
    assert live.alive and not dead.alive and live.extra == {}
    assert live.age_seconds is not None and live.age_seconds > 0
    assert [e.sid for e in reg.gc()] == ["dead-session"]
    assert reg.find("live-session") == live
    # what we write back reads as algocline's serde struct: the same five keys
    assert list(json.loads(path.read_text())["sessions"][0]) == [
        "sid", "pid", "sock", "version", "created_at"]
