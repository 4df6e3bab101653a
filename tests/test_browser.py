"""A real JupyterLab user: JupyterLab 4 in gateway mode (``--gateway-url``) at a live
``vmkg serve``, driven in headless Chromium through Selenium.

One gateway, one JupyterLab and one browser serve the whole module (module fixtures);
the scenarios share one notebook on one microVM kernel, in order: run a cell, interrupt a
runaway loop, restart (no "appears to have died" dialog), reload the page while a cell is
printing, crash the kernel (the died notice, then a working kernel); then ``%fork`` from a
cell and a second notebook switched to the branch with Kernel > Change Kernel... (JupyterLab
runs with ``vmkg_client.jupyter.GatewayKernelManager``, which lists its kernels' branches), and
the gateway's dashboard (``GET /``: the tree of kernels, fork and delete from the page;
``VMKG_DOCS_SCREENSHOTS=1`` also saves its screenshot as docs/dashboard.png). Every dialog
JupyterLab shows is recorded in the page (a MutationObserver), so a dialog that flashes
by is still seen. A failing scenario leaves a screenshot, the page's HTML, the dialogs it
showed and the browser's console in the folder printed at the start of the module.

**Budget.** The module must finish within ``$VMKG_BROWSER_BUDGET`` seconds (300: the CI
budget for the browser suite); its wall time is reported at the end and exceeding the
budget fails the module's teardown. To stay well inside it the page is loaded as few times
as the scenarios need (the first open, the reload scenario, the dashboard), JupyterLab and
Chromium start while the gateway warms its pool, and every wait polls for the event it
waits for (no fixed sleeps).

Needs Debian's ``chromium`` and ``chromium-driver`` and PyPI's ``selenium`` and
``jupyterlab`` (``./vmkg-dev`` installs them); skipped if any is missing.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from gateway_helpers import REPO, Gateway

pytestmark = [pytest.mark.vm, pytest.mark.browser]

selenium = pytest.importorskip("selenium")
pytest.importorskip("jupyterlab")
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip("needs Debian's chromium and chromium-driver", allow_module_level=True)

KERNEL = "python3-microvm"
NOTEBOOK = "microvm.ipynb"
LAB_TOKEN = "lab-token"
DIED = "appears to have died"

#: records every dialog JupyterLab shows (title and body text), even one gone in a moment
WATCH_DIALOGS = """
if (!window.__dialogs) {
  window.__dialogs = [];
  new MutationObserver(() => {
    for (const d of document.querySelectorAll('.jp-Dialog')) {
      if (d.__seen) continue;
      d.__seen = true;
      window.__dialogs.push(d.innerText);
    }
  }).observe(document.body, {childList: true, subtree: true});
}
"""


BUDGET = float(os.environ.get("VMKG_BROWSER_BUDGET") or 300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module", autouse=True)
def budget(request: pytest.FixtureRequest) -> Iterator[None]:
    """The module's wall time, from the gateway's start to its stop: reported, and over
    ``VMKG_BROWSER_BUDGET`` seconds a failure (of the last test's teardown)."""
    start = time.monotonic()
    yield
    took = time.monotonic() - start
    load = os.getloadavg()[0]
    line = (f"browser suite: {took:.0f} s wall time (budget {BUDGET:.0f} s, "
            f"VMKG_BROWSER_BUDGET), load average {load:.1f}")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)
    assert took <= BUDGET, line


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("browser-failures")
    print(f"\nbrowser test: screenshots of failures go to {d}")
    return d


@pytest.fixture(scope="module")
def gw(template: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("gw-browser"), "--pool-size=1")
    try:
        yield g
    finally:
        assert g.stop() == 0, g.log()[-3000:]
        g.assert_clean()


@pytest.fixture(scope="module")
def lab_started(gw: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any, Path]]:
    """JupyterLab started (not yet ready: Chromium starts meanwhile, see ``lab``)."""
    root = tmp_path_factory.mktemp("lab")
    home = root / "home"
    work = root / "notebooks"
    for d in (home, work):
        d.mkdir()
    (work / NOTEBOOK).write_text(json.dumps({
        "cells": [{"cell_type": "code", "execution_count": None, "id": "c0", "metadata": {},
                   "outputs": [], "source": ""}],
        "metadata": {"kernelspec": {"name": KERNEL, "display_name": "Python 3 (microVM)",
                                    "language": "python"}},
        "nbformat": 4, "nbformat_minor": 5}))
    port = free_port()
    env = {**os.environ, "HOME": str(home), "JUPYTER_CONFIG_DIR": str(home / "config"),
           "JUPYTER_DATA_DIR": str(home / "data"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces")}
    log_path = root / "jupyterlab.log"
    log = open(log_path, "w")
    print(f"\nbrowser test: JupyterLab's log is {log_path}")
    proc = subprocess.Popen(
        ["jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={LAB_TOKEN}",
         f"--ServerApp.root_dir={work}", f"--gateway-url={gw.url}",
         f"--GatewayClient.auth_token={gw.token}", "--GatewayClient.request_timeout=120",
         # lists the fork branches of its kernels (jupyter_server's own lists only what it started)
         "--ServerApp.kernel_manager_class=vmkg_client.jupyter.GatewayKernelManager",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.expose_app_in_browser=True"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work)
    url = f"http://127.0.0.1:{port}"
    try:
        yield url, proc, log_path
    finally:
        # shut its sessions down first, so the gateway's kernels go through JupyterLab's path
        try:
            for s in requests.get(f"{url}/api/sessions?token={LAB_TOKEN}", timeout=30).json():
                requests.delete(f"{url}/api/sessions/{s['id']}?token={LAB_TOKEN}", timeout=60)
        except (requests.RequestException, ValueError):
            pass
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def lab(lab_started: tuple[str, Any, Path], browser: Any) -> str:
    """JupyterLab's URL once it answers."""
    url, proc, log_path = lab_started
    deadline = time.monotonic() + 90
    while True:
        try:
            if requests.get(f"{url}/api/status?token={LAB_TOKEN}", timeout=2).ok:
                return url
        except requests.ConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"JupyterLab did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def browser(lab_started: tuple[str, Any, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    opts = webdriver.ChromeOptions()
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1400,900",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def keep_evidence(test: Callable[..., None]) -> Callable[..., None]:
    """On failure: a screenshot, the page's HTML and the dialogs seen, kept in ``shots``."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            test(*args, **kwargs)
        except BaseException:
            page: Page = kwargs["page"]
            d: Path = kwargs["shots"]
            try:
                page.driver.save_screenshot(str(d / f"{test.__name__}.png"))
                (d / f"{test.__name__}.html").write_text(page.driver.page_source)
                (d / f"{test.__name__}.dialogs.txt").write_text("\n---\n".join(page.dialogs()))
                (d / f"{test.__name__}.console.txt").write_text("\n".join(
                    f"{e.get('level')} {e.get('message')}" for e in page.driver.get_log("browser")))
                print(f"{test.__name__}: screenshot kept in {d}")
            except WebDriverException as exc:
                print(f"{test.__name__}: no screenshot ({exc})")
            raise

    return run


class Page:
    """The notebook as a user sees it."""

    def __init__(self, driver: Any, url: str) -> None:
        self.driver = driver
        self.url = url

    def wait(self, what: str, predicate: Callable[[], Any], timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                got = predicate()
                if got:
                    return got
            except (StaleElementReferenceException, WebDriverException) as exc:
                last = exc
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                             + (f" (last error: {last})" if last else ""))

    def js(self, script: str) -> Any:
        return self.driver.execute_script(script)

    def open(self, notebook: str = NOTEBOOK) -> None:
        """Load JupyterLab on ``notebook`` (a page load: only where a scenario needs one)."""
        self.driver.get(f"{self.url}/lab/tree/{notebook}?token={LAB_TOKEN}")
        self.ready()

    def ready(self) -> None:
        """After a page load: watch dialogs, wait for the notebook and an idle kernel."""
        self.js(WATCH_DIALOGS)
        self.wait("the notebook's editor", lambda: self.js(
            "return !!(window.jupyterapp && window.jupyterapp.shell.currentWidget "
            "&& window.jupyterapp.shell.currentWidget.content)") and self.panel().find_elements(
            By.CSS_SELECTOR, ".jp-Cell .cm-content"), 120)
        self.wait("the kernel to be idle", lambda: self.kernel_status() == "idle", 120)

    def open_in_page(self, notebook: str) -> None:
        """Open another notebook in the loaded JupyterLab, as its file browser does (after
        refreshing the running sessions, so one made through the REST API is found)."""
        self.js(f"""
            const app = window.jupyterapp;
            return app.serviceManager.sessions.refreshRunning().then(
                () => app.commands.execute('docmanager:open', {{path: {json.dumps(notebook)}}})).then(() => true);""")
        self.wait(f"{notebook} in front", lambda: self.js(
            "const w = window.jupyterapp.shell.currentWidget; return w && w.context && w.context.path")
            == notebook, 60)

    def panel_id(self) -> str:
        return str(self.js("return window.jupyterapp.shell.currentWidget.id"))

    def activate(self, panel_id: str) -> None:
        self.js(f"window.jupyterapp.shell.activateById({json.dumps(panel_id)})")
        self.wait("the notebook in front", lambda: self.panel_id() == panel_id, 30)

    def panel(self) -> Any:
        """The notebook panel in front (others stay in the page, hidden)."""
        return self.driver.find_element(By.ID, self.panel_id())

    def kernel_status(self) -> str | None:
        return self.js("""
            const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
            const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
            return k ? k.status : null;""")

    def kernel_id(self) -> str | None:
        return self.js("""
            const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
            const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
            return k ? k.id : null;""")

    def kernel_name(self) -> str | None:
        return self.js("""
            const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
            const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
            return k ? k.name : null;""")

    def dialogs(self) -> list[str]:
        return list(self.js("return window.__dialogs || []") or [])

    def dismiss_dialogs(self) -> None:
        for button in self.driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog .jp-mod-accept"):
            try:
                button.click()
            except WebDriverException:
                pass

    def type_and_run(self, code: str) -> Any:
        """Type ``code`` into a new cell at the end of the notebook and run it (Shift+Enter);
        returns the cell. (A new cell each time: after a reload the active cell is wherever
        JupyterLab restored it, and Shift+Enter moves on to an existing cell.)"""
        self.js("""
            const nb = window.jupyterapp.shell.currentWidget.content;
            nb.activeCellIndex = nb.widgets.length - 1;
            return window.jupyterapp.commands.execute('notebook:insert-cell-below');""")
        cell = self.wait("a new active cell at the end", lambda: self.panel().find_element(
            By.CSS_SELECTOR, ".jp-Cell.jp-mod-active:last-child"))
        editor = cell.find_element(By.CSS_SELECTOR, ".cm-content")
        editor.click()
        editor.send_keys(Keys.CONTROL, "a")
        editor.send_keys(Keys.DELETE)
        editor.send_keys(code)
        editor.send_keys(Keys.SHIFT, Keys.ENTER)
        return cell

    @staticmethod
    def output(cell: Any) -> str:
        return "\n".join(o.text for o in cell.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output"))

    @staticmethod
    def prompt(cell: Any) -> str:
        return str(cell.find_element(By.CSS_SELECTOR, ".jp-InputPrompt").text)

    def run(self, code: str, expect: str, timeout: float = 60) -> Any:
        """Run ``code`` and wait until its output contains ``expect`` and it finished."""
        cell = self.type_and_run(code)
        self.wait(f"{expect!r} in the output of {code!r}",
                  lambda: expect in self.output(cell) and "*" not in self.prompt(cell), timeout)
        return cell

    def toolbar(self, command: str) -> None:
        self.panel().find_element(
            By.CSS_SELECTOR, f".jp-NotebookPanel-toolbar [data-command='{command}']").click()


@pytest.fixture(scope="module")
def page(browser: Any, lab: str) -> Page:
    p = Page(browser, lab)
    p.open()
    assert p.kernel_name() == KERNEL
    return p


@keep_evidence
def test_run_a_cell(page: Page, shots: Path) -> None:
    page.run("print(6 * 7)", "42")


@keep_evidence
def test_interrupt_a_runaway_loop(page: Page, shots: Path) -> None:
    page.run("kept = 'still here'", "")
    # the interrupt must land in the loop, not in ipykernel before the cell's code starts
    cell = page.type_and_run("print('spinning', flush=True)\nwhile True: pass")
    page.wait("the loop to run", lambda: "spinning" in page.output(cell), 60)
    page.toolbar("notebook:interrupt-kernel")
    page.wait("KeyboardInterrupt", lambda: "KeyboardInterrupt" in page.output(cell), 60)
    page.wait("the kernel to be idle", lambda: page.kernel_status() == "idle", 30)
    page.run("print(kept)", "still here")


@keep_evidence
def test_restart_clears_state_without_a_died_dialog(page: Page, shots: Path) -> None:
    page.run("gone = 1; print('set')", "set")
    before = len(page.dialogs())
    page.toolbar("notebook:restart-kernel")
    page.wait("the restart confirmation", lambda: page.driver.find_elements(
        By.CSS_SELECTOR, ".jp-Dialog .jp-mod-accept"), 30)
    page.dismiss_dialogs()  # "Restart" accepts
    page.wait("the kernel to be back", lambda: page.kernel_status() == "idle", 120)
    page.run("print(gone)", "NameError")
    new = page.dialogs()[before:]
    assert [d for d in new if "Restart" in d and DIED not in d], new  # the confirmation only
    assert not [d for d in new if DIED in d], new


@keep_evidence
def test_reload_while_a_cell_prints_and_keep_working(page: Page, shots: Path) -> None:
    cell = page.type_and_run("import time\nfor i in range(30): print('line', i, flush=True); time.sleep(0.25)")
    page.wait("some output", lambda: "line 3" in page.output(cell), 60)
    assert "line 29" not in page.output(cell)  # still printing when the page goes
    page.driver.refresh()
    page.ready()  # the same notebook, reconnected to the same kernel (a new session id), idle
    page.run("print('after', 'reload')", "after reload")


@keep_evidence
def test_crash_shows_the_died_notice_then_a_working_kernel(page: Page, shots: Path) -> None:
    page.run("doomed = 1; print('ready')", "ready")
    before = len(page.dialogs())
    page.type_and_run("import os; os._exit(1)")
    page.wait("the died notice", lambda: any(DIED in d for d in page.dialogs()[before:]), 60)
    page.dismiss_dialogs()
    page.wait("the kernel to be back", lambda: page.kernel_status() == "idle", 120)
    page.run("print('alive', 'doomed' in dir())", "alive False", timeout=120)


@keep_evidence
def test_fork_from_a_cell_and_attach_a_notebook_to_a_branch(page: Page, shots: Path, lab: str) -> None:
    parent = page.kernel_id()
    cell = page.run("shared = 'from the parent'\n%fork 1", "1 branch(es) of kernel", timeout=300)
    assert parent in page.output(cell) and "Change Kernel" in page.output(cell)
    m = re.search(r"branch 0\s+([0-9a-f-]{36})", page.output(cell))  # the display's HTML table
    assert m, page.output(cell)
    branch = m.group(1)
    # a second notebook, switched to the branch as a user would: Kernel > Change Kernel...
    # offers it among the running kernels (vmkg_client.jupyter.GatewayKernelManager adopts
    # the branches of the kernels JupyterLab started)
    r = requests.put(f"{lab}/api/contents/branch.ipynb?token={LAB_TOKEN}", timeout=30, json={
        "type": "notebook", "format": "json", "content": {
            "cells": [{"cell_type": "code", "execution_count": None, "id": "b0", "metadata": {},
                       "outputs": [], "source": ""}],
            "metadata": {"kernelspec": {"name": KERNEL, "display_name": "Python 3 (microVM)",
                                        "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}})
    assert r.status_code in (200, 201), r.text
    parent_panel = page.panel_id()
    page.open_in_page("branch.ipynb")
    page.wait("the new notebook's own kernel", lambda: page.kernel_id() not in (None, parent), 120)
    own = page.kernel_id()
    # the selector lists the running kernels JupyterLab knows; it polls for them with a
    # backoff (up to minutes when nothing changes), so ask it now, as a user's refresh would
    services = "window.jupyterapp.serviceManager"
    page.js(f"{services}.kernels.refreshRunning();")
    page.wait("JupyterLab to list the branch among running kernels", lambda: page.js(
        f"{services}.kernels.refreshRunning(); "
        f"return Array.from({services}.kernels.running()).some(k => k.id === {json.dumps(branch)})"), 60)
    page.js("window.jupyterapp.commands.execute('notebook:change-kernel')")
    choice = json.dumps({"id": branch}, separators=(",", ":"))

    def pick_branch() -> bool:
        options = [o for o in page.driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog select option")
                   if o.get_attribute("value") == choice]
        if not options:
            return False
        options[0].click()
        return True

    page.wait("Change Kernel offering the branch", pick_branch, 30)
    page.driver.find_element(By.CSS_SELECTOR, ".jp-Dialog .jp-mod-accept").click()
    page.wait("the notebook on the branch", lambda: page.kernel_id() == branch, 120)
    # jupyter_server shuts the kernel the notebook left down
    page.wait("the notebook's first kernel gone", lambda: own not in {
        k["id"] for k in requests.get(f"{lab}/api/kernels?token={LAB_TOKEN}", timeout=30).json()}, 60)
    page.run("print(shared, __fork__['index'], __fork__['parent_id'])", f"from the parent 0 {parent}",
             timeout=180)
    page.run("shared = 'changed in the branch'; print(shared)", "changed in the branch")
    page.activate(parent_panel)  # back to the parent's notebook
    assert page.kernel_id() == parent
    page.run("print('parent has', shared)", "parent has from the parent")


@keep_evidence
def test_dashboard_tree_fork_and_delete(page: Page, shots: Path, gw: Gateway) -> None:
    driver = page.driver
    driver.get(f"{gw.url}/?token={gw.token}")
    page.wait("the token dropped from the address", lambda: driver.current_url == f"{gw.url}/", 30)

    def rows() -> dict[str, Any]:
        return {tr.get_attribute("data-id"): tr for tr in driver.find_elements(By.CSS_SELECTOR, "#kernels tbody tr")}

    listed = {k["id"]: k for k in gw.request("GET", "/api/kernels").json()}
    page.wait("every kernel in the tree", lambda: set(rows()) == set(listed), 30)
    root = next(k for k, m in listed.items() if m["parent_id"] is None)

    def click(kid: str, button: str) -> bool:
        """Click a row's button (rows are redrawn every 2 s: retried by wait on staleness)."""
        rows()[kid].find_element(By.CSS_SELECTOR, f"button.{button}").click()
        return True

    page.wait("the Fork button clicked", lambda: click(root, "fork"), 10)

    def new_branch() -> str | None:
        for kid, tr in rows().items():
            if kid not in listed and tr.get_attribute("data-parent") == root:
                return kid
        return None

    child = page.wait("the new branch under its parent", new_branch, 300)
    page.wait("the branch one level below its parent", lambda: rows()[child].get_attribute("data-depth")
              == str(int(rows()[root].get_attribute("data-depth")) + 1), 10)
    page.wait("the branch idle with its memory shown", lambda: "idle" in rows()[child].text
              and "MB" in rows()[child].find_element(By.CSS_SELECTOR, ".memory").text, 60)
    driver.save_screenshot(str(shots / "dashboard.png"))
    if os.environ.get("VMKG_DOCS_SCREENSHOTS"):
        driver.save_screenshot(str(REPO / "docs" / "dashboard.png"))
    page.wait("the Delete button clicked", lambda: click(child, "delete"), 10)
    page.wait("the delete confirmed", lambda: click(child, "confirm"), 10)
    page.wait("the branch gone from the tree", lambda: child not in rows(), 60)
    assert child not in {k["id"] for k in gw.request("GET", "/api/kernels").json()}
