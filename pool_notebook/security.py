"""Security checks for worker sockets: private directories and same-user peers.

A Unix socket is only as private as its directory: anyone who can write there
can swap the socket for their own. So before connecting we require the socket's
directory to be a real directory (not a symlink) owned by us and not writable by
group or others, and the path itself to be a socket. After connecting we ask the
kernel who the peer is (``SO_PEERCRED``) and refuse other users' processes.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import ConnectError, InsecureDirectoryError, InsecureSocketError

__all__ = ["PeerCredentials", "check_peer", "check_socket_path", "directory_problem",
           "ensure_private_dir", "peer_credentials"]


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def directory_problem(directory: str | os.PathLike[str]) -> str | None:
    """Why ``directory`` is not private to us (a symlink, not ours, writable by others), or None."""
    st = os.lstat(directory)
    if stat.S_ISLNK(st.st_mode):
        return f"its directory {directory} is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return f"{directory} is not a directory"
    if st.st_uid != os.geteuid():
        return f"its directory {directory} belongs to uid {st.st_uid}, not to us"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"its directory {directory} is writable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}; use a 0700 directory)")
    return None


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700 if it is missing; refuse an existing one that is not ours.

    An existing directory is never chmodded (it may be ``/tmp`` or someone
    else's): if it is a symlink, owned by another uid, or writable by group or
    others, ``InsecureDirectoryError`` says so. Missing parents are created with
    the default mode. Returns ``path``.
    """
    try:
        path.mkdir(mode=0o700)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return ensure_private_dir(path)
    except FileExistsError:
        problem = directory_problem(path)
        if problem is not None:
            raise InsecureDirectoryError(str(path), problem) from None
        return path
    os.chmod(path, 0o700)  # ours, just made: the umask may have taken bits away
    return path


def check_socket_path(sock_path: str | os.PathLike[str], *, allow_insecure: bool = False) -> str:
    """Refuse a socket in an unsafe directory, or a path that is not a socket.

    Returns the path as a string. A missing path raises ``ConnectError`` (the
    worker is probably not running); the security checks raise
    ``InsecureSocketError`` unless ``allow_insecure``.
    """
    path = os.fspath(sock_path)
    try:
        st = os.lstat(path)
    except FileNotFoundError as exc:
        raise ConnectError(path, "no such socket file") from exc
    except OSError as exc:
        raise ConnectError(path, exc.strerror or str(exc)) from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise InsecureSocketError(path, "the path exists but is not a socket")
    if allow_insecure:
        return path
    problem = directory_problem(os.path.dirname(os.path.abspath(path)))
    if problem is not None:
        raise InsecureSocketError(path, problem)
    return path


def peer_credentials(sock: socket.socket) -> PeerCredentials | None:
    """The connected peer's pid/uid/gid, or None where ``SO_PEERCRED`` is unavailable.

    Both ends ask: the client (is the worker us?) and the worker (is the client us?).
    """
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    size = struct.calcsize("3i")
    try:
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, option, size))
    except OSError:
        return None
    return PeerCredentials(pid, uid, gid)


def check_peer(sock: socket.socket, sock_path: str, *, allow_insecure: bool = False) -> (
    PeerCredentials | None
):
    """Refuse a peer process that runs as another user (unless ``allow_insecure``)."""
    creds = peer_credentials(sock)
    if creds is not None and not allow_insecure and creds.uid != os.geteuid():
        raise InsecureSocketError(
            sock_path, f"the worker process (pid {creds.pid}) runs as uid {creds.uid}, not as us"
        )
    return creds
