"""Where ``vmkg serve`` settings come from, in rising priority: the default, a ``VMKG_*``
environment variable, the config file (``--config`` or ``$VMKG_CONFIG``, Python or JSON),
the command line.

In-process and without serving: ``ServeApp.initialize(argv)`` resolves the settings, and
the kernel manager is built with the app as its parent, as ``serve()`` does. (The
end-to-end version, a real gateway configured each way, is test_gateway_config.py.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gateway.app import ServeApp
from gateway.kernels import VMMappingKernelManager

#: every setting exercised here: (class, trait, environment variable)
SETTINGS = [
    ("ServeApp", "port", "VMKG_PORT"),
    ("ServeApp", "list_kernels", "VMKG_LIST_KERNELS"),
    ("ServeApp", "allow_origin", "VMKG_ALLOW_ORIGIN"),
    ("ServeApp", "max_message_size", "VMKG_MAX_MESSAGE_SIZE"),
    ("VMMappingKernelManager", "max_kernels", "VMKG_MAX_KERNELS"),
    ("VMMappingKernelManager", "pool_size", "VMKG_POOL_SIZE"),
    ("VMMappingKernelManager", "cull_busy", "VMKG_CULL_BUSY"),
]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No VMKG_* setting of the machine running the tests leaks in (the state dir stays)."""
    for name in list(os.environ):
        if name.startswith("VMKG_") and name != "VMKG_STATE_DIR":
            monkeypatch.delenv(name)


def resolve(*argv: str) -> tuple[ServeApp, VMMappingKernelManager]:
    app = ServeApp()
    app.initialize(list(argv))
    return app, VMMappingKernelManager(parent=app)


def value(app: ServeApp, km: VMMappingKernelManager, cls: str, trait: str) -> object:
    return getattr(app if cls == "ServeApp" else km, trait)


def test_defaults() -> None:
    app, km = resolve()
    assert (app.port, app.list_kernels, app.allow_origin, app.max_message_size) == (8888, True, "", 64 << 20)
    assert (km.max_kernels, km.pool_size, km.cull_busy) == (None, 1, False)
    assert app.auth_enabled and app.auth_token == "" and app.ip == "127.0.0.1"


ENV = {"VMKG_PORT": "9001", "VMKG_LIST_KERNELS": "no", "VMKG_ALLOW_ORIGIN": "https://env.example",
       "VMKG_MAX_MESSAGE_SIZE": "1000", "VMKG_MAX_KERNELS": "7", "VMKG_POOL_SIZE": "0",
       "VMKG_CULL_BUSY": "yes"}
FROM_ENV = {"port": 9001, "list_kernels": False, "allow_origin": "https://env.example",
            "max_message_size": 1000, "max_kernels": 7, "pool_size": 0, "cull_busy": True}


def test_environment_over_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    app, km = resolve()
    assert {t: value(app, km, c, t) for c, t, _ in SETTINGS} == FROM_ENV


@pytest.mark.parametrize(("name", "raw", "expected"), [
    ("VMKG_PORT", "", 8888),  # empty means unset
    ("VMKG_PORT", "0", 0),  # 0 picks a free port: not the default
    ("VMKG_LIST_KERNELS", "TRUE", True),
    ("VMKG_LIST_KERNELS", "off", False),
    ("VMKG_MAX_KERNELS", "", None),
])
def test_environment_values(monkeypatch: pytest.MonkeyPatch, name: str, raw: str, expected: object) -> None:
    monkeypatch.setenv(name, raw)
    app, km = resolve()
    (cls, trait), = [(c, t) for c, t, e in SETTINGS if e == name]
    assert value(app, km, cls, trait) == expected


PY_CONFIG = """\
c.ServeApp.port = 9002
c.ServeApp.list_kernels = True
c.VMMappingKernelManager.max_kernels = 5
c.VMMappingKernelManager.cull_busy = False
"""
FROM_FILE = {**FROM_ENV, "port": 9002, "list_kernels": True, "max_kernels": 5, "cull_busy": False}


@pytest.fixture(params=["py", "json"])
def config_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    if request.param == "py":
        path = tmp_path / "vmkg_config.py"
        path.write_text(PY_CONFIG)
    else:
        path = tmp_path / "vmkg_config.json"
        path.write_text(json.dumps({"ServeApp": {"port": 9002, "list_kernels": True},
                                    "VMMappingKernelManager": {"max_kernels": 5, "cull_busy": False}}))
    return path


def test_config_file_over_environment(monkeypatch: pytest.MonkeyPatch, config_file: Path) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    app, km = resolve(f"--config={config_file}")
    assert {t: value(app, km, c, t) for c, t, _ in SETTINGS} == FROM_FILE  # the rest from the env


def test_the_config_file_can_be_named_by_the_environment(monkeypatch: pytest.MonkeyPatch, config_file: Path) -> None:
    monkeypatch.setenv("VMKG_CONFIG", str(config_file))
    monkeypatch.setenv("VMKG_PORT", "9001")
    app, km = resolve()
    assert app.config_file == str(config_file)
    assert (app.port, km.max_kernels) == (9002, 5)


def test_command_line_over_config_file_and_environment(monkeypatch: pytest.MonkeyPatch,
                                                       config_file: Path) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    app, km = resolve("--port=9003", "--max-kernels=4", "--cull-busy", f"--config={config_file}",
                      "--ServeApp.allow_origin=https://cli.example")
    got = {t: value(app, km, c, t) for c, t, _ in SETTINGS}
    assert got == {**FROM_FILE, "port": 9003, "max_kernels": 4, "cull_busy": True,
                   "allow_origin": "https://cli.example"}


def test_a_missing_config_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.py"
    with pytest.raises(SystemExit) as info:
        resolve(f"--config={missing}")
    assert info.value.code == 1
    assert f"config file {missing} not found" in capsys.readouterr().err
