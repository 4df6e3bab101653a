"""Shared fixtures, and the two lanes of the suite.

- The fast lane, ``pytest -m "not vm"`` (``./vmkg-dev test-fast``): pure-logic tests
  (tests/unit/, the protocol, the image builder's logic, lint and import contracts). No VM,
  no image build, no template bake: every fixture that needs one is session-scoped and
  lazy, so only a test that asks for it triggers it, and a test that asks for it without
  the ``vm`` marker is refused at collection (``pytest_collection_modifyitems``). Any
  warning in a fast-lane test is an error (``filterwarnings("error")`` added to each);
  the VM tests are not held to that yet: the whole suite has not been run that way.
- The whole suite, ``pytest`` (``./vmkg-dev test``): the ``vm`` tests run real QEMU
  microVMs. The guest image and the template are built/baked once (cached outside the
  repo by recipe hash); kernelspecs are installed into a private JUPYTER_PATH on first use.

``gw`` is the one gateway fixture: a real ``vmkg serve`` per test module, configured by
the module's ``gateway_options`` fixture (command line arguments, environment), stopped
with SIGTERM at the module's end, which must exit 0 and leave nothing behind.

Whatever the lane, the session ends by checking that no QEMU process of this session and
no VM directory was left behind.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway_helpers import LIVE, Gateway, qemu_pids, serving

os.environ.setdefault("VMKG_ACCEL", "auto")
# the warm pool of a test gateway stays at its pool_size: growing with demand (proven by
# tests/unit/test_pool_demand.py) would restore and warm extra VMs - pandas and matplotlib
# cells each - on 2 shared cores that the tests' own VMs need
os.environ.setdefault("VMKG_POOL_MAX", "1")
# a networked VM's names are forwarded to $VMKG_NET_DNS_UPSTREAM, by default the machine's
# own resolver: no test may send a query there (tests talk to loopback and namespaces they
# make). Loopback's discard port refuses at once, so an unset upstream is a quick SERVFAIL;
# modules with an outside of their own set theirs (and must give the slot pool a fresh start)
os.environ.setdefault("VMKG_NET_DNS_UPSTREAM", "127.0.0.1:9")
# VMs of this session live in a state directory of their own, so a gateway or another
# session on the same machine neither disturbs nor is disturbed by the leak checks
STATE_DIR = Path(tempfile.mkdtemp(prefix="vmkg-test-state-"))
os.environ["VMKG_STATE_DIR"] = str(STATE_DIR)
# removed by no_leaks after its checks; this covers runs without a session (--collect-only)
atexit.register(shutil.rmtree, STATE_DIR, ignore_errors=True)

#: fixtures that build the guest image, bake a template or start VMs: only for ``vm`` tests
VM_FIXTURES = {"template", "image", "jupyter_path", "gw"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a test that would start VMs (or build/bake) without the ``vm`` marker: it
    would silently make the fast lane slow. In the fast lane a warning is an error."""
    wrong = [item.nodeid for item in items
             if VM_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("vm")]
    if wrong:
        raise pytest.UsageError("tests using VM fixtures must carry the vm marker: " + ", ".join(wrong))
    for item in items:
        if not item.get_closest_marker("vm"):
            item.add_marker(pytest.mark.filterwarnings("error"), append=False)


#: how much of each gateway's log a failed test's report shows (its end)
LOG_TAIL = 12000
_LOG_MARKS = pytest.StashKey[dict[int, int]]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    """Note where each live gateway's log stood before the test (see ``pytest_runtest_makereport``)."""
    item.stash[_LOG_MARKS] = {id(g): g.log_path.stat().st_size for g in list(LIVE) if g.log_path.exists()}
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report carries what every gateway logged while it ran (the end of
    it): CI keeps the output, not the pytest temp dir the logs are in."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    marks = item.stash.get(_LOG_MARKS, {})
    for g in list(LIVE):
        try:
            with open(g.log_path, "rb") as f:
                f.seek(marks.get(id(g), 0))
                text = f.read().decode(errors="replace")
        except OSError:
            continue
        if text:
            cut = text[-LOG_TAIL:]
            head = "" if cut is text else "[...]\n"
            report.sections.append((f"gateway log {g.log_path.name} ({report.when})", head + cut))


@pytest.fixture(scope="session")
def jupyter_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Kernelspecs for every template, visible only to this test session."""
    from kernelmanager.kernelspec import kernelspec_json, kernelspec_name
    from kernelmanager.templates import catalog

    root = tmp_path_factory.mktemp("jupyter")
    for spec in catalog().values():
        d = root / "kernels" / kernelspec_name(spec.name)
        d.mkdir(parents=True)
        (d / "kernel.json").write_text(json.dumps(kernelspec_json(spec)))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(root)] + ([old] if old else []))
    yield root
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


@pytest.fixture(scope="session")
def template(jupyter_path: Path) -> Any:
    """The baked python3 template (built on first use: minutes; cached: milliseconds), with
    the kernelspecs installed."""
    from kernelmanager.runtime import Runtime
    from kernelmanager.templates import ensure_template, get_spec

    return Runtime.instance().run_sync(ensure_template(get_spec("python3")), timeout=3600)


@pytest.fixture(scope="session")
def net_template(jupyter_path: Path) -> Any:
    """The baked python3-net template (its own image: pip on top of the default packages).
    Made here, with the template's patience, rather than inside a test's first create
    request (a fresh machine builds the image and bakes it: minutes, beyond an HTTP
    timeout)."""
    from kernelmanager.runtime import Runtime
    from kernelmanager.templates import ensure_template, get_spec

    return Runtime.instance().run_sync(ensure_template(get_spec("python3-net")), timeout=3600)


@pytest.fixture(scope="module")
def gateway_options() -> tuple[list[str], dict[str, str]]:
    """(command line arguments, environment) of the module's ``gw``; modules override it."""
    return ["--pool-size=0"], {}


@pytest.fixture(scope="module")
def gw(template: Any, gateway_options: tuple[list[str], dict[str, str]],
       tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Gateway]:
    """One live ``vmkg serve`` for the test module (see ``gateway_options``)."""
    args, env = gateway_options
    with serving(tmp_path_factory.mktemp(f"gw-{request.module.__name__}"), *args, env=env) as g:
        yield g


@pytest.fixture(scope="session", autouse=True)
def no_leaks() -> Iterator[None]:
    """After the session: no QEMU we started is running, no VM directory remains."""
    from kernelmanager import paths

    before = qemu_pids(STATE_DIR)
    yield
    from kernelmanager.runtime import Runtime

    if Runtime._instance is not None:
        Runtime._instance.shutdown()
    deadline = time.monotonic() + 10
    while qemu_pids(STATE_DIR) - before and time.monotonic() < deadline:
        time.sleep(0.2)
    leftover = qemu_pids(STATE_DIR) - before
    vms = list(paths.vms_dir().iterdir()) if paths.vms_dir().exists() else []
    assert not leftover, f"QEMU processes left behind: {leftover}"
    assert not vms, f"VM directories left behind: {vms}"
    shutil.rmtree(STATE_DIR, ignore_errors=True)
