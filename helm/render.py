"""Install the chart with Helm's own code into a recording API server; validate what it sent.

Runs in the Helm toolchain venv (``helm/toolchain.py``: Python >= 3.12 with ``helm-sdkpy``,
which bundles Helm's Go library, and ``kubernetes-validate``), not in the project's venv.

helm-sdkpy exposes ``install`` but no ``template``/dry run, and an install needs an API
server. So this script starts a minimal one on loopback (stdlib ``http.server``) that
answers what Helm asks before and while installing: ``/version``, API discovery
(``/api``, ``/apis``, each group version's resource list, so Helm's REST mapper knows
every kind the chart uses), ``GET`` of each object (404: nothing exists yet) and
``POST`` (recorded, echoed back with a uid). Releases are kept by Helm's ``memory``
driver (``HELM_DRIVER=memory``), so the server needs no Secrets store. What Helm POSTs
is exactly what a cluster would receive, and the release's ``manifest`` is what
``helm template`` prints.

Each object sent is then validated offline by ``kubernetes_validate`` (strict: unknown
fields are errors) against each Kubernetes version given (the API server reports the last); kinds it has no schema for
(``ServiceMonitor``, a CRD) are reported as such.

Input (stdin): ``{"chart": DIR, "kube_versions": ["1.30.0", "1.33.0"], "cases": [{"name": N,
"values": {...}}, ...], "lint": true}``. Output (stdout): one JSON object with per case
``ok``, ``error``, ``objects`` (what was POSTed), ``manifest``, ``invalid`` (validation
errors by object) and ``unvalidated`` (kinds without a schema); ``lint`` is Helm's lint
result for the chart's own values.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# group/version -> [(plural, Kind, namespaced)]: every kind the chart may render
RESOURCES: dict[str, list[tuple[str, str, bool]]] = {
    "v1": [("secrets", "Secret", True), ("services", "Service", True),
           ("serviceaccounts", "ServiceAccount", True), ("configmaps", "ConfigMap", True),
           ("pods", "Pod", True), ("namespaces", "Namespace", False)],
    "apps/v1": [("deployments", "Deployment", True), ("daemonsets", "DaemonSet", True)],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    "networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy", True)],
    "monitoring.coreos.com/v1": [("servicemonitors", "ServiceMonitor", True)],
}


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects: list[dict[str, Any]] = []

    def take(self) -> list[dict[str, Any]]:
        with self.lock:
            out, self.objects = self.objects, []
        return out


def make_handler(rec: Recorder, kube_version: str) -> type[BaseHTTPRequestHandler]:
    major, minor = kube_version.split(".")[:2]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

        def send(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def not_found(self) -> None:
            self.send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "reason": "NotFound", "code": 404, "message": "not found"})

        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/version":
                return self.send(200, {"major": major, "minor": minor, "gitVersion": f"v{kube_version}",
                                       "platform": "linux/amd64"})
            if path == "/api":
                return self.send(200, {"kind": "APIVersions", "versions": ["v1"],
                                       "serverAddressByClientCIDRs": []})
            if path == "/apis":
                groups = []
                for gv in RESOURCES:
                    if "/" in gv:
                        g, v = gv.split("/")
                        ver = {"groupVersion": gv, "version": v}
                        groups.append({"name": g, "versions": [ver], "preferredVersion": ver})
                return self.send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
            gv = path[len("/api/"):] if path.startswith("/api/") else path[len("/apis/"):]
            if gv in RESOURCES:
                res = [{"name": p, "singularName": k.lower(), "namespaced": ns, "kind": k,
                        "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
                       for p, k, ns in RESOURCES[gv]]
                return self.send(200, {"kind": "APIResourceList", "apiVersion": "v1",
                                       "groupVersion": gv, "resources": res})
            return self.not_found()  # every object: not there yet

        def do_POST(self) -> None:  # noqa: N802
            n = int(self.headers.get("Content-Length") or 0)
            obj = json.loads(self.rfile.read(n) or b"{}")
            with rec.lock:
                rec.objects.append(json.loads(json.dumps(obj)))
            obj.setdefault("metadata", {})["uid"] = str(uuid.uuid4())
            obj["metadata"]["resourceVersion"] = "1"
            self.send(201, obj)

        def do_PUT(self) -> None:  # noqa: N802
            self.do_POST()

        def do_PATCH(self) -> None:  # noqa: N802
            self.do_POST()

        def do_DELETE(self) -> None:  # noqa: N802
            self.send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

    return Handler


def validate(objects: list[dict[str, Any]], kube_versions: list[str]) -> tuple[list[str], list[str]]:
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

    invalid: list[str] = []
    unvalidated: list[str] = []
    for obj in objects:
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        for version in kube_versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except SchemaNotFoundError:
                unvalidated.append(name)
                break
            except ValidationError as exc:
                invalid.append(f"{name} ({version}): {exc.message} at {'.'.join(str(p) for p in exc.path)}")
    return invalid, unvalidated


def main() -> int:
    if os.environ.get("HELM_DRIVER") != "memory":
        # Helm's Go library reads the environment the process started with: re-exec
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "HELM_DRIVER": "memory"})
    req = json.load(sys.stdin)
    rec = Recorder()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(rec, req["kube_versions"][-1]))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    kubeconfig = f"""apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "http://127.0.0.1:{port}"}}}}]
users: [{{name: fake, user: {{token: fake}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: vmkg}}}}]
current-context: fake
"""
    import helm_sdkpy

    out: dict[str, Any] = {"helm": helm_sdkpy.get_version(), "cases": {}}
    cfg = helm_sdkpy.Configuration(namespace="vmkg", kubeconfig=kubeconfig)
    if req.get("lint"):
        out["lint"] = asyncio.run(helm_sdkpy.Lint(cfg).run(req["chart"]))
    for i, case in enumerate(req["cases"]):
        result: dict[str, Any] = {"ok": False}
        try:
            rel = asyncio.run(helm_sdkpy.Install(cfg).run(
                f"r{i}", req["chart"], values=case.get("values") or None, wait=False, timeout=60))
            result["ok"] = True
            result["manifest"] = rel.get("manifest", "")
        except helm_sdkpy.HelmError as exc:
            result["error"] = str(exc)
        result["objects"] = rec.take()
        result["invalid"], result["unvalidated"] = validate(result["objects"], req["kube_versions"])
        out["cases"][case["name"]] = result
    server.shutdown()
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
