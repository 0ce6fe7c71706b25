"""notebooks/quickstart.ipynb runs top to bottom (offline, CPU, tiny models) with nbclient."""

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
KERNEL = "evafusion-test-python"


@pytest.fixture
def kernel_with_this_python(tmp_path, monkeypatch):
    """A kernelspec that runs this interpreter (the venv's), found first via JUPYTER_PATH."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "evafusion test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # never pick up a local demo run: the notebook must work from nothing
    monkeypatch.setenv("EVAFUSION_DEMO_OUT", str(tmp_path / "no_demo_here"))
    return KERNEL


def test_quickstart_notebook_executes(kernel_with_this_python):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=kernel_with_this_python, timeout=300,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    def text(cell):
        return "".join(o.get("text", "") for o in cell.get("outputs", [])
                       if o.get("output_type") == "stream")

    code = [c for c in nb.cells if c.cell_type == "code"]
    out = "\n".join(text(c) for c in code)
    assert "tiny, randomly initialised" in out
    assert "fused: (1, 64, 64, 1) float32" in out
    assert "aggregated reward" in out and "Overall_Score" in out
    # the figures were rendered (fused pair, heatmap, regions)
    images = sum(1 for c in code for o in c.get("outputs", [])
                 if "image/png" in o.get("data", {}))
    assert images >= 3
    # five GRPO steps ran and the network moved away from its start
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(steps) == 5
    moved = float(out.split("mean |F_after - F_before| =")[1].split()[0])
    assert moved > 0.0
