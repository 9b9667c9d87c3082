"""Every code block of README.md, executed, so the README stays true.

- ``python``/``lua`` blocks of a notebook session (magics, top-level ``await``)
  run in order as cells of one IPython shell with the extension loaded;
- ``python`` scripts (``asyncio.run(...)``) run as ``python -c`` in a subprocess;
- ``bash`` blocks run where that is safe (the worker started by hand, against a
  temporary directory). Blocks that are not run say why in ``SKIPPED``, and
  are still checked for what can be checked without running them.

A README block none of these recognise fails the test: teach it here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomllib
from IPython.core.interactiveshell import InteractiveShell

from pool_notebook.client import PoolClient
from pool_notebook.connections import manager
from pool_notebook.history import History
from tests.fakes import run

pytestmark = pytest.mark.usefixtures("pool_home")

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent

#: Blocks not executed, with the reason (matched by their first line).
SKIPPED = {
    "python3 -m venv .venv && .venv/bin/pip install -e '.[lab]' && .venv/bin/jupyter lab":
        "builds a venv from the network and starts a JupyterLab server; the browser test runs "
        "the same JupyterLab on the quickstart. Checked: the 'lab' extra exists and names "
        "JupyterLab, the notebook exists, and jupyter lab accepts --allow-root.",
    "bash .ci/run":
        "the whole CI (installs packages, runs this test suite, so it would run itself). "
        "Checked: the script exists and bash parses it.",
}


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # where it starts in README.md

    @property
    def first(self) -> str:
        return self.code.strip().splitlines()[0] if self.code.strip() else ""


def blocks(text: str) -> list[Block]:
    """Fenced code blocks in order, with their language and line number."""
    found = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S):
        found.append(Block(m[1], m[2], text.count("\n", 0, m.start()) + 1))
    return found


def _skipped(block: Block) -> str | None:
    return next((why for start, why in SKIPPED.items() if block.first.startswith(start)), None)


def _is_script(block: Block) -> bool:
    return block.lang == "python" and "asyncio.run(" in block.code


def _is_cell(block: Block) -> bool:
    return block.lang in ("python", "lua") and not _is_script(block)


def _is_worker_by_hand(block: Block) -> bool:
    return block.lang == "bash" and "pool-notebook-worker" in block.code


def test_every_block_is_run_or_skipped_with_a_reason() -> None:
    found = blocks(README.read_text())
    assert len(found) >= 6
    for block in found:
        handled = (_skipped(block) or _is_script(block) or _is_cell(block)
                   or _is_worker_by_hand(block))
        assert handled, f"README.md:{block.line}: a {block.lang!r} block this test does not " \
                        f"run; teach tests/test_readme.py how:\n{block.code}"
    assert all(any(b.first.startswith(start) for b in found) for start in SKIPPED), \
        "SKIPPED names a block the README no longer has"


@pytest.fixture
def shell(pool_home: Path) -> Iterator[InteractiveShell]:
    ip = InteractiveShell.instance()
    manager.history = History(None)
    ip.user_ns.clear()
    ip.init_user_ns()
    yield ip
    for conn in list(manager.connections.values()):
        manager.disconnect(conn.name)
    ip.run_line_magic("unload_ext", "pool_notebook")


def test_notebook_session_blocks_run_in_order(shell: InteractiveShell) -> None:
    cells = [b for b in blocks(README.read_text()) if _is_cell(b)]
    assert cells and cells[0].first == "%load_ext pool_notebook"
    for block in cells:
        result = shell.run_cell(block.code, store_history=False)
        assert result.success, f"README.md:{block.line} failed: " \
                               f"{result.error_before_exec or result.error_in_exec!r}"
    assert manager.connections == {}  # the session ends with %pool_disconnect


def test_python_scripts_run(pool_home: Path) -> None:
    scripts = [b for b in blocks(README.read_text()) if _is_script(b)]
    assert scripts
    for block in scripts:
        done = subprocess.run([sys.executable, "-c", block.code], cwd=ROOT, env=os.environ,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"README.md:{block.line}:\n{done.stderr[-3000:]}"
        # ``print(x)  # value``: the comment states what is printed
        for expected in re.findall(r"^\s*print\(.*#\s*(.+)$", block.code, flags=re.M):
            assert expected.strip() in done.stdout.splitlines(), (block.line, expected,
                                                                  done.stdout)


def test_worker_started_by_hand(pool_home: Path) -> None:
    block = next(b for b in blocks(README.read_text()) if _is_worker_by_hand(b))
    with tempfile.TemporaryDirectory(prefix="pn-readme-", dir="/tmp") as tmp:
        sock_dir = os.path.join(tmp, "pool")
        command = block.code.strip().replace("/tmp/pool", sock_dir) \
            .replace(".venv/bin/", f"{BIN}/")
        proc = subprocess.Popen(["bash", "-c", command], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        sock = os.path.join(sock_dir, "w.sock")
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(sock):
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else b""
                assert time.monotonic() < deadline, "the worker never created its socket"
                time.sleep(0.05)
            assert os.stat(sock_dir).st_mode & 0o777 == 0o700

            async def talk() -> Any:
                client = await PoolClient.connect(sock)
                async with client:
                    status = await client.status()
                    await client.shutdown()
                return status

            assert run(talk()).has_session is False
            assert proc.wait(15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_skipped_blocks_still_hold() -> None:
    found = {b.first: b for b in blocks(README.read_text())}
    lab = next(b for first, b in found.items() if first.startswith("python3 -m venv"))
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    words = shlex.split(lab.code.replace("&&", " "))
    extra = next(w for w in words if w.startswith(".[")).strip(".[]")
    assert any(dep.startswith("jupyterlab") for dep in extras[extra])
    notebook = next(w for w in words if w.endswith(".ipynb"))
    assert (ROOT / notebook).is_file()
    help_all = subprocess.run([str(BIN / "jupyter"), "lab", "--help-all"],
                              capture_output=True, text=True, timeout=120).stdout
    assert "--allow-root" in help_all
    ci = ROOT / ".ci" / "run"
    assert subprocess.run(["bash", "-n", str(ci)]).returncode == 0
