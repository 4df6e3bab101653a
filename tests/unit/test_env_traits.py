"""Settings precedence (gateway.envvars.env_trait): command line > config file > $VMKG_* >
the trait's default, on the real ServeApp and kernel manager. No VMs: a fast-lane test."""

from __future__ import annotations

from pathlib import Path

import pytest
from traitlets import Bool, Float, HasTraits, Integer, List, TraitError, Unicode
from traitlets.config import Config

from gateway.app import ServeApp
from gateway.envvars import env_trait
from gateway.kernels import VMMappingKernelManager
from gateway.websocket import VMKGWebsocketConnection


def serve_app(*argv: str) -> ServeApp:
    app = ServeApp()
    app.initialize(list(argv))
    return app


def test_command_line_beats_config_file_beats_environment_beats_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMKG_PORT", raising=False)
    monkeypatch.delenv("VMKG_CONFIG", raising=False)
    assert serve_app().port == 8888
    monkeypatch.setenv("VMKG_PORT", "1111")
    assert serve_app().port == 1111
    config = tmp_path / "vmkg_config.py"
    config.write_text("c.ServeApp.port = 2222\n")
    assert serve_app(f"--config={config}").port == 2222
    assert serve_app(f"--config={config}", "--port=3333").port == 3333
    monkeypatch.setenv("VMKG_CONFIG", str(config))  # the config file's own variable
    assert serve_app().port == 2222
    assert serve_app("--ServeApp.port=4444").port == 4444


def test_kernel_manager_and_websocket_settings_read_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMKG_MAX_KERNELS", "3")
    monkeypatch.setenv("VMKG_CULL_INTERVAL", "0")  # 0 cannot work: the default stays
    monkeypatch.setenv("VMKG_CULL_BUSY", " Yes ")
    monkeypatch.setenv("VMKG_ENV_ALLOWLIST", "A, B,,C")
    monkeypatch.setenv("VMKG_DEFAULT_KERNEL_NAME", "data-microvm")
    monkeypatch.setenv("VMKG_DISCONNECT_GRACE", "2.5")
    km = VMMappingKernelManager()
    assert km.max_kernels == 3 and km.cull_interval == 300 and km.cull_busy is True
    assert km.env_allowlist == ["A", "B", "C"] and km.default_kernel_name == "data-microvm"
    assert km.max_kernels_per_user is None  # unset: the trait's default
    km = VMMappingKernelManager(config=Config({"VMMappingKernelManager": {"max_kernels": 5}}))
    assert km.max_kernels == 5  # configuration beats the environment
    grace = VMKGWebsocketConnection.class_traits()["disconnect_grace"]
    assert grace.default() == 2.5 and "$VMKG_DISCONNECT_GRACE" in grace.help


class Example(HasTraits):
    name = env_trait(Unicode, "VMKG_TEST_NAME", "dflt", help="A name.")
    count = env_trait(Integer, "VMKG_TEST_COUNT", 7, help="A count.")
    limit = env_trait(Integer, "VMKG_TEST_LIMIT", 64, zero_is_default=True, help="A limit.")
    ratio = env_trait(Float, "VMKG_TEST_RATIO", 0.5, help="A ratio.")
    on = env_trait(Bool, "VMKG_TEST_ON", True, help="A switch.")
    names = env_trait(List, "VMKG_TEST_NAMES", ["x"], trait=Unicode(), help="Names.")


def test_how_each_type_reads_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("NAME", "COUNT", "LIMIT", "RATIO", "ON", "NAMES"):
        monkeypatch.delenv(f"VMKG_TEST_{var}", raising=False)
    e = Example()
    assert (e.name, e.count, e.limit, e.ratio, e.on, e.names) == ("dflt", 7, 64, 0.5, True, ["x"])
    for var in ("NAME", "COUNT", "LIMIT", "RATIO", "ON", "NAMES"):
        monkeypatch.setenv(f"VMKG_TEST_{var}", "")
    e = Example()  # empty: the default, except for text, where "" is a value
    assert (e.name, e.count, e.limit, e.ratio, e.on, e.names) == ("", 7, 64, 0.5, True, ["x"])
    monkeypatch.setenv("VMKG_TEST_COUNT", "0")
    monkeypatch.setenv("VMKG_TEST_LIMIT", "0")
    monkeypatch.setenv("VMKG_TEST_ON", "off")
    monkeypatch.setenv("VMKG_TEST_NAMES", " a ,b")
    e = Example()
    assert (e.count, e.limit, e.on, e.names) == (0, 64, False, ["a", "b"])
    assert Example(count=9).count == 9  # an explicit value never consults the variable
    monkeypatch.setenv("VMKG_TEST_COUNT", "many")
    with pytest.raises(TraitError, match=r"\$VMKG_TEST_COUNT='many'"):
        Example().count  # noqa: B018
    traits = Example.class_traits()
    assert traits["count"].help == "A count. ($VMKG_TEST_COUNT)"
    assert traits["names"].help == "Names. ($VMKG_TEST_NAMES, comma-separated)"
    assert type(traits["count"]).__name__ == Integer.__name__ and isinstance(traits["count"], Integer)
