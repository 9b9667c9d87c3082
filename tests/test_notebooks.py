"""Every notebook in notebooks/ runs top to bottom in a real kernel (nbclient).

The notebooks assert on what they produce; here we also check a few outputs.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from pool_notebook import PROTOCOL_VERSION

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("pool_home")]

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


def _execute(name: str) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def _outputs(nb: nbformat.NotebookNode) -> list[str]:
    return [str(o) for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]


def _pngs_of_plot_cells(nb: nbformat.NotebookNode) -> list[int]:
    """How many images each ``%pool_history --plot`` cell shows."""
    return [sum("image/png" in o.get("data", {}) for o in cell.outputs)
            for cell in nb.cells if cell.cell_type == "code" and "--plot" in cell.source]


def test_quickstart_runs_and_shows_widgets_and_history(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOL_NOTEBOOK_WIDGETS", "1")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # no network in tests: the stand-in
    nb = _execute("quickstart.ipynb")
    outputs = _outputs(nb)
    assert any("worker version" in o and PROTOCOL_VERSION in o for o in outputs)
    assert any("application/vnd.jupyter.widget-view+json" in o for o in outputs)
    assert any("What is 2 + 2?" in o for o in outputs)
    assert any("blue apple" in o for o in outputs)
    assert any("answering with a deterministic stand-in" in o for o in outputs)
    assert any("p50_ms" in o for o in outputs)
    assert _pngs_of_plot_cells(nb) == [1]  # drawn once
    failed = next(c for c in nb.cells if "error('boom from Lua')" in c.source)
    page = next(o.data["text/html"] for o in failed.outputs if "text/html" in o.get("data", {}))
    visible = page.split("<details>")[0]
    assert visible.index("failed") < visible.index("boom from Lua") < visible.index("line 3:")
    assert "xpcall" not in visible


def test_compare_runs_two_strategies_side_by_side(monkeypatch: pytest.MonkeyPatch) -> None:
    """notebooks/compare.ipynb (issue 11): %%pool_map and map() over 50 questions."""
    monkeypatch.setenv("POOL_NOTEBOOK_WIDGETS", "1")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # no network in tests: the stand-in
    nb = _execute("compare.ipynb")
    outputs = _outputs(nb)
    assert any("answering with a deterministic stand-in" in o for o in outputs)
    assert any("application/vnd.jupyter.widget-view+json" in o for o in outputs)  # tqdm bar
    table = next(c for c in nb.cells if "compare_maps" in c.source)
    assert "vote of 5" in str(table.outputs) and "score_mean" in str(table.outputs)
    figure = next(c for c in nb.cells if c.source.startswith("map_figure"))
    assert sum("image/png" in o.get("data", {}) for o in figure.outputs) == 1
    assert any(o.get("text", "").startswith("direct 0.74, vote 0.92") for c in nb.cells
               if c.cell_type == "code" for o in c.outputs)


def test_committed_notebooks_have_no_outputs() -> None:
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") and not c.get("execution_count")
                   for c in nb.cells if c.cell_type == "code"), path


def test_latency_notebook_runs_thousands_of_requests() -> None:
    nb = _execute("latency.ipynb")
    outputs = _outputs(nb)
    assert any("requests" in o for o in outputs)
    assert any("p99_ms" in o for o in outputs)
    assert _pngs_of_plot_cells(nb) == [1]  # "%pool_history --plot;" draws once too


def test_interop_notebook_runs_and_says_what_it_skipped() -> None:
    nb = _execute("interop.ipynb")
    outputs = _outputs(nb)
    assert any(f"version mismatch: client={PROTOCOL_VERSION}, server=0.30.0" in o
               for o in outputs)
    assert any("resumed: yes" in o for o in outputs)
    assert any("skipped: no algocline" in o or "Connection 'alc'" in o for o in outputs)
