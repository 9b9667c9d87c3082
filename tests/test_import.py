"""Imports: the worker never loads the notebook layer; the package import does nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

#: Modules only the notebook layer needs (numpy is not one: the worker's math uses it).
NOTEBOOK_LAYER = ("pandas", "IPython", "ipywidgets", "pool_notebook.connections",
                  "pool_notebook.history", "pool_notebook.session", "pool_notebook.magics",
                  "pool_notebook.display", "pool_notebook.loop")


def _loaded(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; the notebook-layer modules it left loaded."""
    probe = code + textwrap.dedent(f"""
        import json, sys
        print(json.dumps([m for m in sys.modules
                          if m in {NOTEBOOK_LAYER!r} or m.split(".")[0] in {NOTEBOOK_LAYER!r}]))
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    loaded: list[str] = json.loads(out.splitlines()[-1])
    return loaded


def test_importing_the_worker_leaves_the_notebook_layer_out() -> None:
    assert _loaded("import pool_notebook.worker\nimport pool_notebook.worker.server\n") == []


def test_worker_command_line_leaves_the_notebook_layer_out() -> None:
    # -X importtime lists every module the real `python -m pool_notebook.worker` imports
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "pool_notebook.worker",
                          "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "--sock" in run.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines()
                if line.startswith("import time:")}
    assert "pool_notebook.worker.server" in imported
    leaked = sorted(m for m in imported
                    if m in NOTEBOOK_LAYER or m.split(".")[0] in NOTEBOOK_LAYER)
    assert leaked == []


def test_package_import_has_no_side_effects() -> None:
    code = textwrap.dedent("""
        import atexit, signal, threading
        registered = []
        atexit.register = lambda fn, *a, **k: registered.append(fn)  # watch for hooks
        import pool_notebook
        assert not registered, registered
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert threading.active_count() == 1
        assert pool_notebook.PoolError.__name__ == "PoolError"  # errors are cheap
    """)
    assert _loaded(code) == []


def test_every_public_name_resolves_lazily() -> None:
    code = textwrap.dedent("""
        import pool_notebook
        names = pool_notebook.__all__
        assert len(names) == len(set(names))
        missing = [n for n in names if getattr(pool_notebook, n, None) is None]
        assert not missing, missing
        assert set(names) <= set(dir(pool_notebook))
        from pool_notebook import Session, Outcome, SessionRefused, connect
        import pool_notebook.history as module  # binds the submodule as the attribute...
        assert module.History and pool_notebook.history is module
        assert pool_notebook.history().empty  # ...and history() still works: it is callable
        assert Outcome.OK == "ok" and issubclass(SessionRefused, pool_notebook.WorkerError)
        try:
            pool_notebook.no_such_name
        except AttributeError as exc:
            assert "no_such_name" in str(exc)
        else:
            raise AssertionError("unknown names must raise AttributeError")
    """)
    loaded = _loaded(code)
    assert "pool_notebook.session" in loaded and "pool_notebook.connections" in loaded


def test_the_error_tree_drawing_matches_the_classes() -> None:
    import re

    from pool_notebook import errors

    drawn: dict[str, str] = {}  # class -> parent, as the docstring draws it
    stack: list[str] = []
    for line in (errors.__doc__ or "").splitlines():
        match = re.match(r"^\s{4}((?:[│ ] {3})*)(?:[├└]── )?([A-Z]\w+)\b", line)
        if not match or not (match[2] == "PoolError" or "──" in line):
            continue
        depth = len(match[1]) // 4 + (1 if "──" in line else 0)
        del stack[depth:]
        if stack:
            drawn[match[2]] = stack[-1]
        stack.append(match[2])
    classes = {name: getattr(errors, name) for name in errors.__all__}
    assert set(drawn) | {"PoolError"} == set(classes)  # every error drawn, nothing extra
    for name, parent in drawn.items():
        assert classes[name].__bases__[0] is classes[parent], f"{name} is drawn under {parent}"
