"""The agents' SDK (vmkg_client.sdk, vmkg_client.sync), ``vmkg run`` and the README's agent
example, against a live ``vmkg serve`` with real VMs.

One gateway serves the module: a warm pool of one, and a 2 s ``disconnect_grace`` so the
kernel of a killed client is interrupted quickly. Every test opens its own SDK Gateway,
whose close shuts down the kernels the test started.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from gateway_helpers import Gateway as LiveGateway
from vmkg_client import sdk

pytestmark = pytest.mark.vm
REPO = Path(__file__).resolve().parents[1]
GRACE = 2.0
MAX_FILE = 8 << 20


@pytest.fixture(scope="module")
def gateway_options() -> tuple[list[str], dict[str, str]]:
    return ["--pool-size=1"], {"VMKG_DISCONNECT_GRACE": str(GRACE), "VMKG_MAX_FILE_SIZE": str(MAX_FILE)}


@pytest.fixture(scope="module")
def live(gw: LiveGateway) -> LiveGateway:
    """conftest's ``gw`` under this module's name for it."""
    return gw


def client(live: LiveGateway, url: str | None = None) -> sdk.Gateway:
    return sdk.Gateway(url or live.url, live.token)


# -- outputs ----------------------------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3
JPEG = b"\xff\xd8\xff\xe0" + bytes(range(255, -1, -1)) * 3
PDF = b"%PDF-1.4\n" + b"\x00\x01binary\xff" * 20

RICH = f"""
import base64
from IPython.display import display, HTML, Markdown, SVG, Image, JSON, Latex, Javascript
import matplotlib.pyplot as plt
import pandas as pd

class Pdf:
    def _repr_mimebundle_(self, include=None, exclude=None):
        return {{"application/pdf": {base64.b64encode(PDF).decode()!r}, "text/plain": "<pdf>"}}

display(HTML("<b>bold</b>"))
display(Markdown("# Title"))
display(SVG('<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"><circle r="2"/></svg>'))
display(Image(data=base64.b64decode({base64.b64encode(PNG).decode()!r}), format="png"))
display(Image(data=base64.b64decode({base64.b64encode(JPEG).decode()!r}), format="jpeg"))
display(JSON({{"a": [1, 2], "b": {{"c": None}}}}))
display(Latex(r"$\\alpha^2$"))
display(Javascript("console.log('hi')"))
display(Pdf())
display({{"application/vnd.vmkg.test+json": {{"k": 1}}, "text/plain": "custom"}}, raw=True)
plt.plot([1, 3, 2]); plt.show()
pd.DataFrame({{"x": [1, 2], "y": ["a", "b"]}})
"""


async def test_every_rich_output_type_round_trips(live: LiveGateway) -> None:
    seen: list[sdk.Result] = []
    async with client(live) as gw:
        kernel = await gw.start_kernel("python3")
        ex = await kernel.run_code(RICH, on_result=seen.append, timeout=120)
    assert ex.error is None, ex.error
    assert seen == ex.results
    by_format: dict[str, sdk.Result] = {}  # the first result carrying each format
    for r in ex.results:
        for fmt in r.formats():
            by_format.setdefault(fmt, r)
    assert by_format["html"].html == "<b>bold</b>"
    assert by_format["markdown"].markdown == "# Title"
    assert by_format["svg"].svg.startswith("<svg") and "circle" in by_format["svg"].svg
    assert by_format["png"].decoded("png") == PNG
    assert by_format["jpeg"].decoded("jpeg") == JPEG
    assert by_format["json"].json == {"a": [1, 2], "b": {"c": None}}
    assert by_format["latex"].latex == r"$\alpha^2$"
    assert "console.log" in by_format["javascript"].javascript
    assert by_format["pdf"].decoded("pdf") == PDF and by_format["pdf"].text == "<pdf>"
    assert by_format["application/vnd.vmkg.test+json"].extra == {"application/vnd.vmkg.test+json": {"k": 1}}
    # the matplotlib figure: a real PNG from the inline backend
    plots = [r for r in ex.results if r.png and r.decoded("png") != PNG]
    assert len(plots) == 1 and plots[0].decoded("png").startswith(b"\x89PNG")
    assert plots[0].text and "Figure" in plots[0].text
    # the value of the last expression is the one main result, with text and html
    mains = [r for r in ex.results if r.is_main_result]
    assert mains == [ex.results[-1]] and ex.main_result is mains[0]
    assert ex.text is not None and "x" in ex.text and "<table" in (mains[0].html or "")
    assert ex.execution_count == 1
    assert not any(r.is_main_result for r in ex.results[:-1])


async def test_logs_and_an_exception_with_name_value_and_traceback(live: LiveGateway) -> None:
    stdout: list[str] = []
    stderr: list[str] = []
    errors: list[sdk.ExecutionError] = []

    async def on_stderr(text: str) -> None:  # callbacks may be coroutines too
        stderr.append(text)

    code = textwrap.dedent("""
        import sys
        print("to stdout")
        print("to stderr", file=sys.stderr)
        def parse(v):
            raise ValueError(f"bad value: {v!r}")
        parse("x")
    """)
    async with client(live) as gw:
        kernel = await gw.start_kernel()
        ex = await kernel.run_code(code, on_stdout=stdout.append, on_stderr=on_stderr,
                                   on_error=errors.append)
        assert "".join(ex.logs.stdout) == "".join(stdout) == "to stdout\n"
        assert "".join(ex.logs.stderr) == "".join(stderr) == "to stderr\n"
        assert ex.error is not None and errors == [ex.error]
        assert ex.error.name == "ValueError"
        assert ex.error.value == "bad value: 'x'"
        assert "parse" in ex.error.traceback and "ValueError" in ex.error.traceback
        assert "\x1b[" not in ex.error.traceback and any("\x1b[" in line for line in ex.error.raw_traceback)
        assert ex.results == [] and ex.text is None
        # the kernel is fine afterwards, and counts cells
        ok = await kernel.run_code("6 * 7")
        assert ok.error is None and ok.text == "42" and ok.execution_count == ex.execution_count + 1
        # a syntax error is an error too
        bad = await kernel.run_code("def (")
        assert bad.error is not None and bad.error.name == "SyntaxError"


async def test_env_interrupt_restart_and_kernel_gone(live: LiveGateway) -> None:
    async with client(live) as gw:
        kernel = await gw.start_kernel("python3", env={"KERNEL_USERNAME": "agent-7", "MODEL": "m1"})
        got = await kernel.run_code("import os; os.environ['KERNEL_USERNAME'], os.environ['MODEL']")
        assert got.text == "('agent-7', 'm1')"
        assert (await kernel.info())["execution_state"] in ("idle", "busy")
        # interrupt from another task: the cell ends with KeyboardInterrupt, state is kept
        await kernel.run_code("x = 1")
        # (interrupted once the loop runs: the cell says so; the model's "busy" can still be
        # the previous cell's, and an interrupt before the cell's code is not this case)
        looping = asyncio.Event()
        run = asyncio.ensure_future(kernel.run_code("import time\nprint('looping', flush=True)\n"
                                                    "while True: time.sleep(0.05)",
                                                    on_stdout=lambda text: looping.set()))
        await asyncio.wait_for(looping.wait(), 60)
        assert (await kernel.info())["execution_state"] == "busy"
        await kernel.interrupt()
        ex = await asyncio.wait_for(run, 60)
        assert ex.error is not None and ex.error.name == "KeyboardInterrupt", ex
        assert (await kernel.run_code("x")).text == "1"
        # restart: state gone, the environment is back
        await kernel.restart()
        assert (await kernel.run_code("'x' in dir()")).text == "False"
        assert (await kernel.run_code("import os; os.environ['MODEL']")).text == "'m1'"
        # a kernel shut down behind our back
        await gw.request("DELETE", f"/api/kernels/{kernel.id}")
        with pytest.raises(sdk.KernelGone):
            await kernel.run_code("1", timeout=30)
        with pytest.raises(sdk.KernelGone):
            await kernel.info()
    async with sdk.Gateway(live.url, "wrong") as stranger:
        with pytest.raises(sdk.GatewayError) as bad_token:
            await stranger.list_kernels()
    assert bad_token.value.status == 401
    async with client(live) as gw:
        with pytest.raises(sdk.GatewayError) as no_template:
            await gw.start_kernel("no-such-template")
    assert no_template.value.status == 404 and "no-such-template" in no_template.value.message


# -- time limits and disconnects ------------------------------------------------------------------


async def test_a_runaway_cell_times_out_and_the_kernel_keeps_its_state(live: LiveGateway) -> None:
    async with client(live) as gw:
        kernel = await gw.start_kernel()
        await kernel.run_code("x = 41")
        for runaway in ("while True: pass", "import time; time.sleep(3600)"):
            t0 = time.monotonic()
            with pytest.raises(sdk.ExecutionTimeout) as exc:
                await kernel.run_code(f"print('started')\n{runaway}", timeout=2)
            took = time.monotonic() - t0
            assert 2 <= took < 2 + sdk.INTERRUPT_WAIT, took
            assert isinstance(exc.value, TimeoutError)
            assert exc.value.interrupted and "timeout of 2 s" in str(exc.value)
            partial = exc.value.execution
            assert partial.logs.stdout == ["started\n"]
            assert partial.error is not None and partial.error.name == "KeyboardInterrupt"
            ex = await kernel.run_code("x + 1", timeout=30)
            assert ex.error is None and ex.text == "42"


KILLED_CLIENT = """
import sys
from vmkg_client.sync import Gateway
kernel = Gateway().connect_kernel(sys.argv[1])
kernel.run_code("import time\\nwhile True: time.sleep(0.05)", timeout=None)
"""


async def test_a_client_killed_mid_cell_does_not_leave_the_kernel_busy(live: LiveGateway) -> None:
    async with client(live) as gw:
        kernel = await gw.start_kernel()
        await kernel.run_code("x = 'kept'")
        await kernel.close()  # nobody else connected: the killed client is the last one
        child = await asyncio.create_subprocess_exec(sys.executable, "-c", KILLED_CLIENT, kernel.id,
                                                     cwd=REPO, env=live.client_env())
        try:
            deadline = time.monotonic() + 60
            while (await kernel.info())["execution_state"] != "busy":
                assert child.returncode is None and time.monotonic() < deadline, "the cell never started"
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            child.send_signal(signal.SIGKILL)
            await asyncio.wait_for(child.wait(), 10)
            killed = time.monotonic()
            while (await kernel.info())["execution_state"] == "busy":
                assert time.monotonic() - killed < GRACE + 30, "still busy long after its client died"
                await asyncio.sleep(0.2)
            assert time.monotonic() - killed >= GRACE - 0.5  # the grace period was granted
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
        assert (await kernel.run_code("x")).text == "'kept'"
        assert "interrupt_on_disconnect" in live.log()
        assert live.metric("vmkg_disconnect_interrupts_total") >= 1


class Proxy:
    """A TCP relay between the SDK and the gateway whose connections can be cut (both sides
    reset, whatever is in flight lost), like a network failure."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self.cuts = 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.pairs.append((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    def cut(self) -> None:
        self.cuts += 1
        for a, b in self.pairs:
            a.transport.abort()
            b.transport.abort()
        self.pairs.clear()

    async def close(self) -> None:
        self.cut()
        self.server.close()
        await self.server.wait_closed()


async def test_reconnect_in_the_middle_of_10000_lines_loses_nothing(live: LiveGateway) -> None:
    n = 10_000
    code = textwrap.dedent(f"""
        import sys
        for i in range({n}):
            print(f"line {{i}}")
            if i % 10 == 9:
                sys.stdout.flush()
    """)
    proxy = Proxy(int(live.url.rsplit(":", 1)[1]))
    url = await proxy.start()
    received = 0

    def on_stdout(text: str) -> None:
        nonlocal received
        received += text.count("\n")
        if received > n // 3 and not proxy.cuts:
            proxy.cut()  # the network fails mid-output

    try:
        async with client(live, url) as gw:
            kernel = await gw.start_kernel()
            await kernel.run_code("pass")
            ex = await kernel.run_code(code, on_stdout=on_stdout, timeout=240)
            assert proxy.cuts == 1 and kernel._conn is not None and kernel._conn.reconnects == 1
            assert ex.error is None, ex.error  # not interrupted: it came back within the grace
            lines = "".join(ex.logs.stdout).splitlines()
            assert len(lines) == n and lines == [f"line {i}" for i in range(n)]
            assert received == n
            assert (await kernel.run_code("i")).text == str(n - 1)
    finally:
        await proxy.close()


# -- files and forks ---------------------------------------------------------------------------


CSV = "city,temp\nOslo,4\nLima,19\nCairo,28\nQuito,14\n"
ANALYSIS = textwrap.dedent("""
    import pandas as pd
    import matplotlib
    matplotlib.use("agg")
    df = pd.read_csv("data/cities.csv")
    ax = df.plot.bar(x="city", y="temp")
    ax.figure.savefig("out/chart.png")
    float(df.temp.mean())
""")


async def test_upload_read_in_code_download_and_remove(live: LiveGateway) -> None:
    async with client(live) as gw:
        kernel = await gw.start_kernel()
        info = await kernel.upload("data/cities.csv", CSV)
        assert info.size == len(CSV) and info.name == "cities.csv"
        await kernel.upload("out/.keep", b"")
        ex = await kernel.run_code(ANALYSIS, timeout=120)
        assert ex.error is None, ex.error
        assert ex.text == "16.25"
        png = await kernel.download("out/chart.png")
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
        assert await kernel.download("data/cities.csv") == CSV.encode()
        names = {f.name: f for f in await kernel.list_files()}
        assert names["data"].type == "directory" and names["out"].type == "directory"
        listed = await kernel.list_files("out")
        assert {f.path for f in listed} == {"out/chart.png", "out/.keep"}
        assert next(f for f in listed if f.name == "chart.png").size == len(png)
        # binary, from a file object, with a name that needs quoting
        blob = os.urandom(3 << 20)
        await kernel.upload("bin/a file #1?.bin", io.BytesIO(blob))
        assert await kernel.download("bin/a file #1?.bin") == blob
        got = await kernel.run_code("import hashlib; hashlib.sha256(open('bin/a file #1?.bin','rb').read()).hexdigest()")
        assert got.text == repr(hashlib.sha256(blob).hexdigest())
        await kernel.remove_file("out/chart.png")
        with pytest.raises(sdk.GatewayError) as gone:
            await kernel.download("out/chart.png")
        assert gone.value.status == 404 and "chart.png" in gone.value.message
        assert not isinstance(gone.value, sdk.KernelGone)


async def test_the_upload_size_limit_is_a_clear_error(live: LiveGateway) -> None:
    async with client(live) as gw:
        kernel = await gw.start_kernel()
        for size in (MAX_FILE + 1, 3 * MAX_FILE):
            with pytest.raises(sdk.GatewayError) as exc:
                await kernel.upload("big.bin", b"\0" * size)
            assert exc.value.status == 413, exc.value
            assert f"{size} bytes exceeds the limit of {MAX_FILE} bytes" in exc.value.message
        assert (await kernel.upload("big.bin", b"\1" * MAX_FILE)).size == MAX_FILE  # the limit itself is fine
        assert (await kernel.run_code("import os; os.path.getsize('big.bin')")).text == str(MAX_FILE)


async def test_paths_outside_the_working_directory_are_refused(live: LiveGateway) -> None:
    async with client(live) as gw:
        kernel = await gw.start_kernel()
        await kernel.run_code("import os\nos.symlink('/etc', 'etc_link')\nos.symlink('/etc/passwd', 'pw_link')\n"
                              "os.makedirs('sub', exist_ok=True)\nos.symlink('..', 'sub/up')")
        reads = ["../../etc/passwd", "/etc/passwd", "sub/../../etc/passwd", "etc_link/passwd", "pw_link",
                 "sub/up/etc_link/passwd", ".."]
        for path in reads:
            with pytest.raises(sdk.GatewayError) as exc:
                await kernel.download(path)
            assert exc.value.status in (400, 403), (path, exc.value)
            assert exc.value.message, path
        writes = ["../evil.txt", "/tmp/evil.txt", "etc_link/evil.txt", "pw_link", "sub/up/evil.txt",
                  "a/../../evil.txt"]
        for path in writes:
            with pytest.raises(sdk.GatewayError) as exc:
                await kernel.upload(path, b"owned")
            assert exc.value.status == 403, (path, exc.value)
        for path, status in (("../", 403), ("/etc", 403), ("etc_link", 403)):
            # listing through a symlink is refused like reads and writes through it
            with pytest.raises(sdk.GatewayError) as exc:
                await kernel.list_files(path)
            assert exc.value.status == status, (path, exc.value)
        for path in ("etc_link/passwd", "../../etc/hostname"):
            with pytest.raises(sdk.GatewayError) as exc:
                await kernel.remove_file(path)
            assert exc.value.status == 403, (path, exc.value)
        check = await kernel.run_code(
            "import os\n[os.path.exists(p) for p in ('/evil.txt', '/tmp/evil.txt', '/etc/evil.txt', "
            "'/home/evil.txt')] + [open('/etc/passwd').read().startswith('root:'), os.path.islink('pw_link')]")
        assert check.text == "[False, False, False, False, True, True]"


async def test_fork_into_branches_that_continue_from_the_parent(live: LiveGateway) -> None:
    async with client(live) as gw:
        kernel = await gw.start_kernel()
        await kernel.run_code("import random\nstate = [1, 2, 3]")
        await kernel.upload("notes.txt", "parent")
        branches = await kernel.fork(3)
        assert len(branches) == 3 and all(b.parent_id == kernel.id for b in branches)
        assert len({b.id for b in branches} | {kernel.id}) == 4
        outs = await asyncio.gather(*(b.run_code(f"state.append({i}); state, open('notes.txt').read()")
                                      for i, b in enumerate(branches)))
        assert [o.text for o in outs] == [f"([1, 2, 3, {i}], 'parent')" for i in range(3)]
        assert (await kernel.run_code("state")).text == "[1, 2, 3]"  # branches are isolated
        rolls = await asyncio.gather(*(b.run_code("random.random()") for b in branches))
        assert len({r.text for r in rolls}) == 3  # reseeded
        ids = {b.id for b in branches}
        assert ids <= live.kernel_ids()
    assert not (ids | {kernel.id}) & live.kernel_ids()  # closing the Gateway shut them all down


# -- the sync wrapper, vmkg run, the README ----------------------------------------------------


def test_sync_wrapper_delegates_to_the_async_core(live: LiveGateway) -> None:
    from vmkg_client import sync as sdk_sync

    before = live.kernel_ids()
    with sdk_sync.Gateway(live.url, live.token) as gw:
        with gw.start_kernel("python3", env={"K": "v"}) as kernel:
            assert isinstance(kernel.aio, sdk.Kernel)
            chunks: list[str] = []
            ex = kernel.run_code("print('a'); import os; os.environ['K']", on_stdout=chunks.append)
            assert ex.text == "'v'" and chunks == ["a\n"]
            with pytest.raises(sdk_sync.ExecutionTimeout):
                kernel.run_code("while True: pass", timeout=1)
            kernel.upload("f.txt", "x")
            assert kernel.download("f.txt") == b"x"

            def reenter(_: str) -> None:
                kernel.run_code("1")

            with pytest.raises(sdk.SDKError, match="callbacks"):
                kernel.run_code("print(1)", on_stdout=reenter)
            kid = kernel.id
        assert kid not in live.kernel_ids()
    assert live.kernel_ids() == before


def vmkg_run(live: LiveGateway, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.app", "run", *args], input=stdin,
                          capture_output=True, text=True, env=live.client_env(), cwd=REPO, timeout=180)


def test_vmkg_run_prints_outputs_and_its_exit_status_says_whether_the_cell_raised(live: LiveGateway) -> None:
    before = live.kernel_ids()
    ok = vmkg_run(live, "--env=GREETING=out", "import os, sys; print(os.environ['GREETING']); "
                  "print('err', file=sys.stderr); 6 * 7")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "out\n42\n" and "err\n" in ok.stderr
    raised = vmkg_run(live, "raise KeyError('missing')")
    assert raised.returncode == 1
    assert "KeyError" in raised.stderr and "missing" in raised.stderr and "\x1b[" not in raised.stderr
    from_stdin = vmkg_run(live, "--json", "-", stdin="x = 20\nx + 1\n")
    assert from_stdin.returncode == 0, from_stdin.stderr
    doc = json.loads(from_stdin.stdout)
    assert doc["results"][0]["text"] == "21" and doc["results"][0]["is_main_result"] and doc["error"] is None
    timed_out = vmkg_run(live, "--timeout=1", "while True: pass")
    assert timed_out.returncode == 124 and "timeout" in timed_out.stderr
    bad = vmkg_run(live, "--token=wrong", "1")
    assert bad.returncode == 2 and "401" in bad.stderr
    assert live.kernel_ids() == before  # fresh kernels are shut down afterwards
    # an existing kernel: its state is there, and it stays
    kept = vmkg_run(live, "--keep", "y = 'from before'")
    kid = re.search(r"kernel (\S+) left running", kept.stderr).group(1)  # type: ignore[union-attr]
    try:
        again = vmkg_run(live, "--kernel", kid, "print(y)")
        assert again.returncode == 0 and again.stdout == "from before\n", again.stderr
        assert kid in live.kernel_ids()
    finally:
        live.delete_kernel(kid)


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Agents: the Python SDK", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's agent section has no python example"
    return match.group(1)


def test_the_readme_agent_example_runs(live: LiveGateway, tmp_path: Path) -> None:
    code = readme_example()
    assert len(code.strip().splitlines()) <= 12
    before = live.kernel_ids()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env=live.client_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "chart.png").read_bytes().startswith(b"\x89PNG")
    assert "mean" in out.stdout and "None" in out.stdout  # the describe() table, no error
    branch_lines = [line for line in out.stdout.splitlines() if " -> " in line]
    assert len(branch_lines) == 3 and all("Error" not in line for line in branch_lines), out.stdout
    assert live.kernel_ids() == before  # the kernel and its three branches are gone
