"""The notebooks in notebooks/ run green against a live gateway, so they can never rot.

Each notebook is executed by nbclient in a local (host) ipykernel: the notebook drives
the gateway through the SDK, the way its readers will."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from gateway_helpers import Gateway
from nbclient import NotebookClient

pytestmark = pytest.mark.vm
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def test_forked_exploration_notebook_runs_green(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMKG_URL", gw.url)
    monkeypatch.setenv("VMKG_TOKEN", gw.token)
    nb = nbformat.read(NOTEBOOKS / "forked_exploration.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the plot did not come home"
    table = next(o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {}))
    assert table.count("\n") == 4 and "(best)" in table
    # the notebook shut its kernels down
    assert gw.request("GET", "/api/kernels").json() == []
