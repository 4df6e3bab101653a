"""The operator functions, where they need no VM: a bake the host cannot complete is a
TemplateError with the reason; a cache prune reads the running QEMU processes safely."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kernelmanager import prune_cache
from kernelmanager.exceptions import TemplateError
from kernelmanager.image import ImageRecipe, find_image
from kernelmanager.snapshots import bake_template
from kernelmanager.templates import get_spec


def test_an_os_error_while_baking_is_a_template_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = find_image(ImageRecipe())
    if image is None:
        pytest.skip("the guest image is not built yet")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "templates").write_text("a file where the template directory should be")
    monkeypatch.setenv("VMKG_CACHE_DIR", str(cache))
    with pytest.raises(TemplateError, match="cannot write the template cache") as info:
        asyncio.run(bake_template(image, get_spec("python3").machine("tcg")))
    assert isinstance(info.value.__cause__, OSError)


def test_cache_prune_dry_run_of_an_empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads every QEMU process's mappings (anonymous ones have no path) without failing."""
    monkeypatch.setenv("VMKG_CACHE_DIR", str(tmp_path))
    report = prune_cache(dry_run=True)
    assert report.removed == [] and report.freed_bytes == 0
