"""Faults the bundled worker must survive (issue 8), against a real worker subprocess.

Each test drives ``python -m pool_notebook.worker`` over its socket, checks the
outcome, and then that the next request works (or, where the worker is meant
to exit, that it exited cleanly: status 0, socket and log removed).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pool_notebook.registry import LOG_FILE_ENV
from tests.conftest import RawConnection, WorkerProc

StartWorker = Callable[..., WorkerProc]

#: How long a worker may take to exit after it was told to (the goal is < 1 s;
#: this bound only keeps a loaded 2-core CI machine from failing spuriously).
EXIT_BOUND = 5.0


def _private_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="pnw-", dir="/tmp"))


def _run(conn: RawConnection, code: str, **extra: object) -> None:
    conn.send({"op": "run", "code": code, "ctx": None, "lib_paths": [], **extra})


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _exited_cleanly(worker: WorkerProc, within: float = EXIT_BOUND) -> None:
    assert worker.wait(within) == 0, worker.output()
    assert not os.path.exists(worker.sock)
    assert "Traceback" not in worker.output()


# ------------------------------------------------------------------ backpressure


def test_client_that_never_reads_replies_is_not_read_either(start_worker: StartWorker) -> None:
    worker = start_worker()
    conn = worker.connect()
    rss_before = worker.rss_kib()
    line = b'{"op":"status","include_history":true}\n'
    chunk = line * 4096  # 160 KiB of requests
    conn.sock.setblocking(False)
    sent, stalls = 0, 0
    while sent < 256 * 2**20 and stalls < 40:  # give up once the worker stopped reading
        try:
            sent += conn.sock.send(chunk[sent % len(chunk):])
            stalls = 0
        except BlockingIOError:
            stalls += 1
            time.sleep(0.05)
    rss_after = worker.rss_kib()
    # The worker stopped reading long before 256 MiB: only socket buffers and one
    # line's worth of queued requests were accepted, and its memory stayed flat.
    assert sent < 64 * 2**20
    assert rss_after - rss_before < 64 * 1024, (rss_before, rss_after)
    # Every complete request is answered, in order, once we read.
    conn.sock.settimeout(60)
    rest = line[sent % len(line):] if sent % len(line) else b""
    finisher = threading.Thread(target=conn.sock.sendall, args=(rest,))
    finisher.start()  # the worker reads on only as we read
    for _ in range((sent + len(rest)) // len(line)):
        reply = conn.recv()
        assert reply["ok"] is True and reply["data"]["kind"] == "status", reply
    finisher.join()
    assert conn.ask({"op": "status"})["data"]["has_session"] is False


def test_endless_line_while_lua_runs_is_bounded_then_refused(start_worker: StartWorker,
                                                             tmp_path: Path) -> None:
    flag = tmp_path / "go"
    worker = start_worker("--no-sandbox")
    conn = worker.connect()
    code = f'while not io.open("{flag}") do end return alc.llm("after the loop")'
    _run(conn, code)
    rss_before = worker.rss_kib()
    blob = b"x" * 2**20
    sent = [0]

    def flood() -> None:  # 64 MiB, no newline, while the Lua loop spins
        try:
            for _ in range(64):
                conn.sock.sendall(blob)
                sent[0] += len(blob)
        except OSError:
            pass  # the worker closed the connection after refusing the line

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    sender.join(3.0)
    assert sender.is_alive(), "the worker read 64 MiB of one line while Lua ran"
    assert sent[0] < 48 * 2**20
    assert worker.rss_kib() - rss_before < 48 * 1024
    flag.write_text("go")  # let the Lua loop end: it pauses on alc.llm
    paused = conn.recv()
    assert "Paused" in paused["data"]["feed_result"]
    refused = conn.recv()
    assert refused["ok"] is False
    assert refused["error"].startswith("malformed request: request line longer than 16777216")
    assert conn.at_eof()
    sender.join(10)
    # the paused session waits for a reconnect: the next request works
    again = worker.connect()
    sid = paused["data"]["session_id"]
    done = again.ask({"op": "continue", "sid": sid, "response": "ok", "query_id": None,
                      "usage": None})
    assert done["data"]["feed_result"]["Finished"]["state"] == {"Completed": {"result": "ok"}}


def test_reply_over_the_line_limit_fails_the_session_not_the_connection(
        start_worker: StartWorker) -> None:
    conn = start_worker().connect()
    conn.send({"op": "run", "code": 'return ("x"):rep(20 * 2^20)', "ctx": None,
               "lib_paths": []})
    line = conn.file.readline()
    assert len(line) < 2**20
    error = json.loads(line)["data"]["feed_result"]["Finished"]["state"]["Failed"]["error"]
    assert error.startswith("result too large: ") and "16777216-byte line limit" in error
    conn.send({"op": "run", "code": 'return alc.llm(("p"):rep(17 * 2^20))', "ctx": None,
               "lib_paths": []})
    error = conn.recv()["data"]["feed_result"]["Finished"]["state"]["Failed"]["error"]
    assert error.startswith("LLM queries too large: ")
    assert conn.ask({"op": "status"})["data"]["has_session"] is False  # nothing left paused
    assert conn.ask({"op": "run", "code": "return 1", "ctx": None, "lib_paths": []})[
        "data"]["feed_result"]["Finished"]["state"] == {"Completed": {"result": 1}}


# ---------------------------------------------------------------- interruption


def test_shutdown_during_endless_loop_is_answered_and_the_worker_exits(
        start_worker: StartWorker) -> None:
    worker = start_worker()
    conn = worker.connect()
    _run(conn, "while true do end")
    time.sleep(0.2)  # let the loop start (the outcome is the same if it has not)
    conn.send({"op": "shutdown"})
    ran = conn.recv()
    assert ran["data"]["feed_result"]["Finished"]["state"] == {
        "Failed": {"error": "interrupted: shutdown requested"}}
    assert conn.recv() == {"ok": True, "data": {"kind": "shutdown"}, "error": None}
    _exited_cleanly(worker, within=1.0)  # issue 8: answered, and gone within 1 s


def test_disconnect_during_endless_loop_ends_the_worker(start_worker: StartWorker) -> None:
    worker = start_worker()
    conn = worker.connect()
    _run(conn, "while true do end")
    time.sleep(0.2)
    conn.close()
    _exited_cleanly(worker, within=1.0)
    assert "client disconnected" in worker.output()


# ------------------------------------------------------------------ handshakes


def test_slow_handshaker_is_cut_off_and_the_next_client_served(
        start_worker: StartWorker) -> None:
    worker = start_worker("--handshake-timeout", "1")
    slow = RawConnection(worker.sock)
    stop = threading.Event()

    def dribble() -> None:  # one byte every 0.2 s, never a whole line
        for byte in b'{"op":"handshake","version":"':
            if stop.wait(0.2):
                return
            try:
                slow.sock.sendall(bytes([byte]))
            except OSError:
                return

    threading.Thread(target=dribble, daemon=True).start()
    nxt = RawConnection(worker.sock)  # accepted at once, served when its turn comes
    assert nxt.hello()["ok"] is True
    assert slow.at_eof()  # the slow one was closed
    stop.set()
    assert nxt.ask({"op": "status"})["data"]["has_session"] is False
    assert worker.proc.poll() is None  # an ungreeted client leaving does not end the worker


# -------------------------------------------------------------- socket directory


def test_missing_socket_directory_is_created_private(start_worker: StartWorker) -> None:
    base = _private_dir()
    try:
        nested = base / "a" / "b"
        worker = start_worker(sock_dir=nested)
        assert stat.S_IMODE(nested.stat().st_mode) == 0o700
        assert stat.S_IMODE(os.stat(worker.sock).st_mode) == 0o600
        worker.connect().close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_existing_0755_directory_is_used_and_left_unchanged(start_worker: StartWorker) -> None:
    base = _private_dir()
    try:
        os.chmod(base, 0o755)
        worker = start_worker(sock_dir=base)
        conn = worker.connect()
        assert conn.ask({"op": "status"})["ok"] is True
        assert stat.S_IMODE(base.stat().st_mode) == 0o755
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("mode", [0o1777, 0o777, 0o775])
def test_directory_writable_by_others_is_refused_and_left_unchanged(
        start_worker: StartWorker, mode: int) -> None:
    base = _private_dir()
    try:
        os.chmod(base, mode)
        worker = start_worker(sock_dir=base)
        assert worker.wait() == 2
        out = worker.output()
        assert "refusing socket directory" in out and "writable by group or others" in out
        assert "Traceback" not in out
        assert stat.S_IMODE(base.stat().st_mode) == mode
        assert not os.path.exists(worker.sock)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_directory_owned_by_another_uid_is_refused(start_worker: StartWorker) -> None:
    base = _private_dir()
    try:
        os.chown(base, 65534, 65534)
        worker = start_worker(sock_dir=base)
        assert worker.wait() == 2
        assert "belongs to uid 65534" in worker.output()
        assert base.stat().st_uid == 65534 and stat.S_IMODE(base.stat().st_mode) == 0o700
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ----------------------------------------------------------------- peer uid check

_PEER = "pnpeer"
_PEER_CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
s.connect(sys.argv[1])
f = s.makefile("rb")
try:
    s.sendall(json.dumps({"op": "handshake", "version": sys.argv[2]}).encode() + b"\\n")
except OSError:
    pass  # refused before we spoke: the reason is waiting to be read
first = f.readline()
print(first.decode().strip())
if json.loads(first)["ok"]:
    s.sendall(b'{"op":"run","code":"return 42","ctx":null,"lib_paths":[]}\\n')
    print(f.readline().decode().strip())
else:
    print("EOF" if f.readline() == b"" else "more")
"""


def _peer_uid() -> int:
    try:
        return pwd.getpwnam(_PEER).pw_uid
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", _PEER],
                       check=True)
        return pwd.getpwnam(_PEER).pw_uid


def _as_peer(sock: str, uid: int) -> str:
    from pool_notebook._version import PROTOCOL_VERSION

    done = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
         "/usr/bin/python3", "-c", _PEER_CLIENT, sock, PROTOCOL_VERSION],
        capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root (useradd, setpriv) to connect as another uid")
@pytest.mark.parametrize("allowed", [False, True])
def test_other_uid_is_refused_unless_allowed(start_worker: StartWorker, allowed: bool) -> None:
    uid = _peer_uid()
    base = _private_dir()
    try:
        os.chmod(base, 0o755)  # reachable: the worker's uid check is all that stands
        worker = start_worker("--handshake-timeout", "1",
                              *(["--allow-uid", str(uid)] if allowed else []), sock_dir=base)
        probe = worker.connect(greet=False)  # serving: past its own chmod 0600 of the socket
        assert probe.ask({"op": "status"})["ok"] is False  # not greeted: leaving ends nothing
        probe.close()
        os.chmod(worker.sock, 0o666)  # as in the issue: a socket others can reach
        out = _as_peer(worker.sock, uid).splitlines()
        lines = [json.loads(line) if line.startswith("{") else line for line in out]
        if allowed:
            assert lines[0]["ok"] is True
            assert lines[1]["data"]["feed_result"]["Finished"]["state"] == {
                "Completed": {"result": 42}}
        else:
            assert lines[0] == {"ok": False, "data": None, "error":
                                f"connection refused: uid {uid} may not use this worker (it "
                                "serves its own uid and those given with --allow-uid)"}
            assert lines[1] == "EOF"
            # our own uid is still served
            assert worker.connect().ask({"op": "status"})["ok"] is True
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------- numeric settings


def test_nan_idle_timeout_is_ignored_with_a_warning_not_a_busy_loop(
        start_worker: StartWorker) -> None:
    worker = start_worker(env={"POOL_WORKER_IDLE_TIMEOUT": "nan"})
    conn = worker.connect()
    cpu_before = _cpu_seconds(worker.proc.pid)
    time.sleep(1.5)
    assert _cpu_seconds(worker.proc.pid) - cpu_before < 0.5  # a busy loop would use ~1.5 s
    assert conn.ask({"op": "status"})["ok"] is True
    assert "ignoring POOL_WORKER_IDLE_TIMEOUT='nan'" in worker.output()


@pytest.mark.parametrize("flag,value", [("--idle-timeout", "inf"), ("--idle-timeout", "-3"),
                                        ("--handshake-timeout", "0"),
                                        ("--handshake-timeout", "nan")])
def test_invalid_seconds_arguments_fall_back_to_the_default(
        start_worker: StartWorker, flag: str, value: str) -> None:
    worker = start_worker(flag, value)
    assert worker.connect().ask({"op": "status"})["ok"] is True
    assert f"ignoring {flag}={value!r}" in worker.output()


def test_handshake_timeout_from_the_environment(start_worker: StartWorker) -> None:
    bad = start_worker(env={"POOL_WORKER_HANDSHAKE_TIMEOUT": "-2"})
    assert bad.connect().ask({"op": "status"})["ok"] is True
    assert "ignoring POOL_WORKER_HANDSHAKE_TIMEOUT='-2'" in bad.output()
    quick = start_worker(env={"POOL_WORKER_HANDSHAKE_TIMEOUT": "0.5"})
    silent = RawConnection(quick.sock)  # never greets: closed after 0.5 s
    assert silent.at_eof()
    assert quick.connect().ask({"op": "status"})["ok"] is True


@pytest.mark.parametrize("value", ["0", "-1", "lots", "99999999"])
def test_max_memory_out_of_range_is_refused(start_worker: StartWorker, value: str) -> None:
    worker = start_worker("--max-memory-mb", value)
    assert worker.wait() == 2
    out = worker.output()
    assert "--max-memory-mb" in out and "Traceback" not in out


def test_invalid_allow_env_name_is_refused_at_startup(start_worker: StartWorker) -> None:
    worker = start_worker("--allow-env", "BAD=NAME")
    assert worker.wait() == 2
    out = worker.output()
    assert "--allow-env" in out and "Traceback" not in out


# ------------------------------------------------------------ logs and imports


def test_clean_exit_removes_the_worker_log(start_worker: StartWorker) -> None:
    fd, log = tempfile.mkstemp(prefix="pnw-spawnlog-", dir="/tmp")
    os.close(fd)
    worker = start_worker(env={LOG_FILE_ENV: log})
    assert os.path.exists(log)
    conn = worker.connect()
    assert conn.ask({"op": "shutdown"})["data"] == {"kind": "shutdown"}
    _exited_cleanly(worker)
    assert not os.path.exists(log)


def test_worker_imports_nothing_of_the_notebook_layer() -> None:
    probe = ("import sys, pool_notebook.worker.__main__, pool_notebook.worker.server; "
             "print(' '.join(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True)
    loaded = set(done.stdout.split())
    heavy = {"pandas", "IPython", "ipywidgets", "matplotlib", "numpy", "scipy", "rapidfuzz",
             "pool_notebook.connections", "pool_notebook.history", "pool_notebook.magics",
             "pool_notebook.display", "pool_notebook.client"}
    assert not heavy & loaded


def test_request_before_the_handshake_is_answered_and_the_connection_stays(
        start_worker: StartWorker) -> None:
    # a request line with no handshake is answered and the connection stays usable
    worker = start_worker()
    conn = RawConnection(worker.sock)
    first = conn.ask({"op": "status"})
    assert first["ok"] is False and "expected a handshake first" in first["error"]
    assert conn.hello()["ok"] is True
    conn.sock.shutdown(socket.SHUT_WR)
    assert conn.at_eof()


# ------------------------------------------------------------------ socket path


def test_socket_path_taken_by_a_file_or_a_live_worker_is_refused(
        start_worker: StartWorker) -> None:
    first = start_worker()
    first.connect(greet=False).close()  # listening
    second = start_worker(sock_dir=first.dir)  # same path
    assert second.wait() == 2
    assert "another worker is listening there" in second.output()
    assert first.connect().ask({"op": "status"})["ok"] is True  # untouched
    base = _private_dir()
    try:
        (base / "w.sock").write_text("not a socket")
        third = start_worker(sock_dir=base)
        assert third.wait() == 2
        assert "the path exists and is not a socket" in third.output()
        assert (base / "w.sock").read_text() == "not a socket"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_stale_socket_of_a_dead_worker_is_replaced(start_worker: StartWorker) -> None:
    base = _private_dir()
    try:
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(base / "w.sock"))  # bound, never listening, then abandoned
        stale.close()
        worker = start_worker(sock_dir=base)
        assert worker.connect().ask({"op": "status"})["ok"] is True
    finally:
        shutil.rmtree(base, ignore_errors=True)
