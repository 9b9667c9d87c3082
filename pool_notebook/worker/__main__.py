"""Command line of the bundled worker.

``python -m pool_notebook.worker --sid SID --sock PATH`` or
``pool-notebook-worker [pool-worker] --sid SID --sock PATH`` (the optional
``pool-worker`` word accepts algocline's argument order, so this worker can
stand in wherever ``alc pool-worker ...`` is expected).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from .._version import PROTOCOL_VERSION
from ..registry import Registry
from .runtime import DEFAULT_MAX_MEMORY
from .server import Worker, idle_timeout_from_env


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pool-notebook-worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sid", required=True, help="worker id (p-<hex nanos>-<16 hex>)")
    p.add_argument("--sock", required=True, help="socket path (its directory is made 0700)")
    p.add_argument("--protocol-version", default=PROTOCOL_VERSION,
                   help="version to require in the handshake (default: %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=None,
                   help="seconds without requests before exiting; 0 disables "
                        "(default: $POOL_WORKER_IDLE_TIMEOUT, $ALC_POOL_IDLE_TIMEOUT or 1800)")
    p.add_argument("--max-memory-mb", type=int, default=DEFAULT_MAX_MEMORY // 2**20,
                   help="Lua memory cap in MiB (default: %(default)s)")
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
    worker = Worker(
        opts.sid,
        opts.sock,
        version=opts.protocol_version,
        idle_timeout=idle_timeout_from_env() if opts.idle_timeout is None else opts.idle_timeout,
        sandbox=not opts.no_sandbox,
        max_memory=opts.max_memory_mb * 2**20,
        registry=Registry(opts.registry) if opts.registry else Registry.default(),
    )
    reason = asyncio.run(worker.serve())
    logging.getLogger("pool_notebook.worker").info("exited: %s", reason)
    if worker.lua_running:
        # Lua is stuck in a loop in its thread; threads cannot be killed, the process can.
        logging.shutdown()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
