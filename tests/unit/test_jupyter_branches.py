"""vmkg_client.jupyter: which of the gateway's kernels JupyterLab's server adopts (the
branches of its own, at any depth; nothing else). The end-to-end proof, JupyterLab's
Change Kernel... switching a notebook to a ``%fork`` branch, is tests/test_browser.py."""

from __future__ import annotations

from vmkg_client.jupyter import branches_to_adopt


def model(kid: str, parent: str | None = None) -> dict[str, object]:
    return {"id": kid, "name": "python3-microvm", "parent_id": parent}


def test_branches_of_managed_kernels_at_any_depth_parents_first() -> None:
    models = [model("grandchild", "child"), model("other"), model("child", "mine"),
              model("mine"), model("stranger-branch", "other")]
    adopted = branches_to_adopt(models, {"mine"})
    assert [m["id"] for m in adopted] == ["child", "grandchild"]


def test_nothing_without_managed_kernels_and_malformed_entries_ignored() -> None:
    models: list[dict[str, object]] = [model("a", "mine"), {"no": "id"}, {"id": 7, "parent_id": "mine"},
                                       model("mine")]
    assert branches_to_adopt(models, set()) == []
    assert [m["id"] for m in branches_to_adopt(models, {"mine"})] == ["a"]
    # already managed: not adopted twice
    assert branches_to_adopt(models, {"mine", "a"}) == []
