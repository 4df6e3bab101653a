"""Preloaded templates (kernelmanager.templates): the default template's kernel has numpy,
pandas and matplotlib imported before any cell, its warm-up cells left nothing in the
user's namespace, ipykernel's faster stream write and the host's coalescing of small
stream messages deliver output exactly; a template
whose warm-up cell fails is refused at bake time with an error naming the template and
the cell. The fast tests check the catalog and the error's wording without a VM."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from gateway_helpers import Channels, Gateway

from kernelmanager.exceptions import AgentError, TemplateError
from kernelmanager.image import ImageRecipe, find_image
from kernelmanager.snapshots import bake_template, template_id, warmup_failure
from kernelmanager.templates import TemplateSpec, catalog

PRELOADED = ("numpy", "pandas", "matplotlib", "matplotlib.pyplot")


# -- fast lane ------------------------------------------------------------------------------


def test_default_template_preloads_and_warms_up() -> None:
    spec = catalog()["python3"]
    assert set(PRELOADED) <= set(spec.preload)
    cells = spec.warmup_cells()
    assert spec.fast_stdout and len(cells) >= 2
    assert any("describe()" in c for c in cells) and any("savefig" in c for c in cells)
    for cell in cells:
        compile(cell, "<warm-up>", "exec")  # a syntax error would only show at bake time


def test_opting_out_in_the_catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "templates.json"
    path.write_text(json.dumps({"bare": {"preload": [], "warmup": [], "fast_stdout": False},
                                "custom": {"warmup": ["import json"]}}))
    monkeypatch.setenv("VMKG_TEMPLATES", str(path))
    specs = catalog()
    assert specs["bare"].preload == () and specs["bare"].warmup_cells() == ()
    assert not specs["bare"].fast_stdout
    assert specs["custom"].warmup_cells() == ("import json",) and specs["custom"].fast_stdout


def test_warmup_is_part_of_the_template_id() -> None:
    image = find_image(ImageRecipe())
    if image is None:
        pytest.skip("the guest image is not built yet")
    machine = TemplateSpec().machine("tcg")
    ids = {template_id(image, machine, "q", ("numpy",), w) for w in ((), ("1",), ("2",))}
    assert len(ids) == 3
    # and so is opting out of the lean output path (fast_stdout)
    assert template_id(image, machine, "q", ("numpy",), lean_output=False) not in ids


def test_warmup_failure_names_template_and_cell() -> None:
    cells = ("import json", "# comment\nx = 1/0\nprint(x)")
    err = warmup_failure("data", cells, AgentError(
        "warm-up cell 2 of 2 failed: ZeroDivisionError: division by zero", kind="warmup"))
    msg = str(err)
    assert "template 'data'" in msg and "warm-up cell 2 of 2" in msg
    assert "ZeroDivisionError" in msg and "'x = 1/0'" in msg and '"warmup": []' in msg


# -- with VMs -------------------------------------------------------------------------------


@pytest.mark.vm
async def test_fresh_kernel_has_pandas_before_any_cell(gw: Gateway) -> None:
    kid = gw.start_kernel()["id"]
    ch = await Channels.open(gw, kid)
    try:
        first = await ch.execute(
            "import sys, json\n"
            f"print(json.dumps([m in sys.modules for m in {list(PRELOADED)!r}]))")
        assert first.reply["status"] == "ok", first.reply
        assert first.reply["execution_count"] == 1  # the warm-up cells did not count
        assert json.loads(first.stdout) == [True] * len(PRELOADED)
        # the warm-up cells' variables are gone; the faster stream write is in place
        assert await ch.value("[n for n in ('_df', '_fig', '_plt', '_pd') if n in globals()]") == []
        assert await ch.value("sys.stdout.write.__qualname__") == "Writer.write"  # compiled
        # and delivers exactly: many small writes, in order, nothing lost or doubled
        r = await ch.execute("for i in range(20000): sys.stdout.write(f'{i}\\n')\n"
                             "sys.stdout.write('end')")
        assert r.reply["status"] == "ok", r.reply
        assert r.stdout == "".join(f"{i}\n" for i in range(20000)) + "end"
        # a message per line (flushed): coalesced on the host, still exact and in order
        r = await ch.execute("for i in range(300): print(i, 'é', flush=True)", timeout=600)
        assert r.reply["status"] == "ok", r.reply
        assert r.stdout == "".join(f"{i} é\n" for i in range(300))
    finally:
        await ch.close()
        gw.delete_kernel(kid)


@pytest.mark.vm
def test_a_failing_warmup_cell_fails_the_bake_clearly() -> None:
    """A bare kernel (no preloads) whose second warm-up cell raises: no template is left."""
    from kernelmanager import accel
    from kernelmanager.vm.qemu import qemu_version

    image = find_image(ImageRecipe())
    if image is None:
        pytest.skip("the guest image is not built yet")
    spec = TemplateSpec(name="broken-warmup", preload=(), fast_stdout=False,
                        warmup=("x = 41", "import nonexistent_module_vmkg"))
    machine = spec.machine(accel.detect().name)
    with pytest.raises(TemplateError) as info:
        asyncio.run(bake_template(image, machine, preload=spec.preload, warmup=spec.warmup_cells(),
                                  lean_output=spec.fast_stdout, name=spec.name))
    msg = str(info.value)
    assert "template 'broken-warmup'" in msg and "warm-up cell 2 of 2 failed" in msg, msg
    assert "ModuleNotFoundError" in msg and "import nonexistent_module_vmkg" in msg, msg
    from kernelmanager import paths
    tid = template_id(image, machine, qemu_version(), spec.preload, spec.warmup_cells(), spec.fast_stdout)
    assert not (paths.templates_dir() / tid).exists()
