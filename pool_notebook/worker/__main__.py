"""Command line of the bundled worker.

``python -m pool_notebook.worker --sid SID --sock PATH`` or
``pool-notebook-worker [pool-worker] --sid SID --sock PATH`` (the optional
``pool-worker`` word accepts algocline's argument order, so this worker can
stand in wherever ``alc pool-worker ...`` is expected).

Environment: ``POOL_WORKER_IDLE_TIMEOUT`` / ``ALC_POOL_IDLE_TIMEOUT`` (seconds,
0 disables), ``POOL_WORKER_HANDSHAKE_TIMEOUT`` (seconds), ``POOL_WORKER_LOG_FILE``
(set by the spawner: removed on a clean exit). Invalid numbers are ignored with
a warning. A socket directory that exists and is not private to us is refused
(exit status 2), never chmodded.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from .._version import PROTOCOL_VERSION
from ..errors import PoolError
from ..registry import LOG_FILE_ENV, Registry
from .runtime import DEFAULT_MAX_MEMORY
from .server import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    Worker,
    handshake_timeout_from_env,
    idle_timeout_from_env,
    seconds,
)

#: Exit status when the worker cannot start (unsafe directory, bad arguments).
EXIT_REFUSED = 2
#: Upper bound of --max-memory-mb (1 TiB): anything above is a typo.
_MAX_MEMORY_MB = 2**20


def _memory_mb(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of MiB: {text!r}") from None
    if not 1 <= value <= _MAX_MEMORY_MB:
        raise argparse.ArgumentTypeError(
            f"{value} MiB is out of range 1..{_MAX_MEMORY_MB} (a Lua session always has a cap)")
    return value


def _uid(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a numeric uid: {text!r}") from None
    if not 0 <= value < 2**32 - 1:
        raise argparse.ArgumentTypeError(f"uid {value} is out of range")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pool-notebook-worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sid", required=True, help="worker id (p-<hex nanos>-<16 hex>)")
    p.add_argument("--sock", required=True,
                   help="socket path (its directory is created 0700 if missing)")
    p.add_argument("--protocol-version", default=PROTOCOL_VERSION,
                   help="version to require in the handshake (default: %(default)s)")
    p.add_argument("--idle-timeout", type=str, default=None,
                   help="seconds without requests before exiting; 0 disables "
                        "(default: $POOL_WORKER_IDLE_TIMEOUT, $ALC_POOL_IDLE_TIMEOUT or 1800)")
    p.add_argument("--handshake-timeout", type=str, default=None,
                   help="seconds a connection has to complete its handshake "
                        "(default: $POOL_WORKER_HANDSHAKE_TIMEOUT or 5)")
    p.add_argument("--max-memory-mb", type=_memory_mb, default=DEFAULT_MAX_MEMORY // 2**20,
                   help="Lua memory cap in MiB, 1..1048576 (default: %(default)s)")
    p.add_argument("--allow-uid", type=_uid, action="append", default=[], metavar="UID",
                   help="also serve clients running as this uid (repeatable; "
                        "by default only our own uid is served)")
    p.add_argument("--allow-env", action="append", default=[], metavar="NAME",
                   help="let sandboxed Lua read this environment variable with os.getenv "
                        "(repeatable; ALC_* are always readable)")
    p.add_argument("--no-sandbox", action="store_true",
                   help="give Lua its full standard library (os, io, C modules)")
    p.add_argument("--registry", default=None,
                   help="registry.json to remove our entry from on exit "
                        "(default: the pool_notebook registry)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["pool-worker"]:
        args = args[1:]
    opts = _parser().parse_args(args)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        worker = Worker(
            opts.sid,
            opts.sock,
            version=opts.protocol_version,
            idle_timeout=(idle_timeout_from_env() if opts.idle_timeout is None else seconds(
                "--idle-timeout", opts.idle_timeout, DEFAULT_IDLE_TIMEOUT, allow_zero=True)),
            handshake_timeout=(handshake_timeout_from_env() if opts.handshake_timeout is None
                               else seconds("--handshake-timeout", opts.handshake_timeout,
                                            DEFAULT_HANDSHAKE_TIMEOUT, allow_zero=False)),
            sandbox=not opts.no_sandbox,
            max_memory=opts.max_memory_mb * 2**20,
            registry=Registry(opts.registry) if opts.registry else Registry.default(),
            allow_uids=opts.allow_uid,
            allow_env=opts.allow_env,
            log_file=os.environ.get(LOG_FILE_ENV) or None,
        )
        reason = asyncio.run(worker.serve())
    except (PoolError, OSError) as exc:  # bad --allow-env, unsafe directory, path in use
        print(f"pool-notebook-worker: error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    logging.getLogger("pool_notebook.worker").info("exited: %s", reason)
    if worker.lua_running:
        # Lua did not stop when interrupted (stuck in C code); threads cannot be
        # killed, the process can.
        logging.shutdown()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
