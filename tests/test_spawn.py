"""Spawning: sids, failure messages with exit status and log tail, no zombies."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pool_notebook import SpawnError
from pool_notebook.registry import pid_alive
from pool_notebook.spawn import (
    _children,
    new_sid,
    reap_children,
    spawn_and_connect,
    spawn_worker,
)
from tests.fakes import run, wait_dead

pytestmark = pytest.mark.usefixtures("pool_home")


def test_sid_format() -> None:
    assert re.fullmatch(r"p-[0-9a-f]+-[0-9a-f]{16}", new_sid())
    assert new_sid() != new_sid()


def test_worker_that_dies_reports_status_and_stderr() -> None:
    async def main() -> None:
        with pytest.raises(SpawnError) as info:
            await spawn_worker("{python} -c \"import sys; sys.stderr.write('no lua here'); "
                               "sys.exit(3)\" {sid} {sock}")
        assert info.value.returncode == 3
        assert "no lua here" in info.value.stderr_tail
        assert "exited before creating its socket" in str(info.value)
    run(main())


def test_worker_that_never_creates_its_socket_is_stopped() -> None:
    async def main() -> None:
        before = list(_children)
        with pytest.raises(SpawnError, match="did not create") as info:
            await spawn_worker("{python} -c \"print('waiting', flush=True); "
                               "import time; time.sleep(60)\"", timeout=0.5)
        assert "waiting" in info.value.stderr_tail
        (child,) = [p for p in _children if p not in before]
        assert child.returncode is not None  # stopped and waited for: no zombie
        assert not pid_alive(child.pid)
        reap_children()
        assert child not in _children
    run(main())


def test_bad_template_and_missing_program() -> None:
    async def main() -> None:
        with pytest.raises(SpawnError, match="placeholders"):
            await spawn_worker("worker --sid {nope}")
        with pytest.raises(SpawnError, match="cannot start worker"):
            await spawn_worker("/nonexistent/alc pool-worker --sid {sid} --sock {sock}")
    run(main())


def test_exited_workers_are_reaped() -> None:
    async def main() -> None:
        w = await spawn_worker("{python} -c \"import socket,sys; s=socket.socket(socket.AF_UNIX);"
                               " s.bind(sys.argv[1])\" {sock}")
        assert wait_dead(w.pid)  # exited and reaped, not a zombie
    run(main())


def test_clean_exit_removes_the_spawned_workers_log(pool_home: Path) -> None:
    async def main() -> None:
        client, worker = await spawn_and_connect()
        assert Path(worker.log_path).exists()
        async with client:
            await client.shutdown()
        assert wait_dead(worker.pid)
        assert not Path(worker.log_path).exists()
        assert not Path(worker.sock).exists()
    run(main())
