"""The Helm chart (helm/vm-kernel-gateway), rendered and installed by Helm's own code.

Helm's Go library comes from helm-sdkpy, which needs Python >= 3.12: it runs in a venv of
its own (helm/toolchain.py, made by ./vmkg-dev and cached outside the repo; made here too
if missing). helm/render.py installs the chart for each value set below into a recording
API server on loopback (Helm's ``memory`` driver keeps the release) and validates every
object Helm sent against the Kubernetes OpenAPI schemas (kubernetes-validate, strict,
for the oldest Kubernetes the chart supports and a current one). No cluster, no network
besides loopback; one subprocess for the whole module.

Skips only when the toolchain cannot be set up here (no Python >= 3.12, or pip cannot
reach PyPI); under CI=true a pip failure fails instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "vm-kernel-gateway"
_spec = importlib.util.spec_from_file_location("vmkg_helm_toolchain", ROOT / "helm" / "toolchain.py")
assert _spec is not None and _spec.loader is not None
toolchain = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toolchain)

KUBE_VERSIONS = ["1.30.0", "1.33.0"]  # the chart's kubeVersion floor and a current release
HOST_CAPS = ["SYS_ADMIN", "SETUID", "SETGID", "SETPCAP", "CHOWN", "FOWNER", "DAC_OVERRIDE", "KILL", "SYS_PTRACE"]
SHA = "sha256:" + "ab" * 32

GOOD: dict[str, dict[str, Any]] = {
    "default": {},
    "full": {
        "image": {"repository": "registry.example/vmkg", "tag": "1.2.3", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "auth": {"token": "admin-token", "routerSecret": "shared-secret"},
        "users": {"entries": {"alice": SHA, "bob": SHA}},
        "store": {"url": "s3://vmkg-templates/prod", "endpoint": "http://seaweedfs.storage:8333",
                  "region": "us-east-1", "accessKeyId": "AKIA", "secretAccessKey": "s3cret"},
        "env": {"VMKG_MAX_KERNELS_PER_USER": "4", "VMKG_POOL_SIZE": 2},
        "router": {"replicas": 3, "service": {"type": "LoadBalancer", "port": 443,
                                              "loadBalancerSourceRanges": ["192.0.2.0/24"]},
                   "extraArgs": ["--log-level=DEBUG"]},
        "host": {"cache": {"type": "hostPath", "hostPath": "/var/cache/vmkg"},
                 "appArmorProfile": {"type": "Localhost", "localhostProfile": "vmkg-host"},
                 "tolerations": [{"key": "kvm", "operator": "Exists", "effect": "NoSchedule"}]},
        "networkPolicy": {"allowedNamespaces": ["jupyterhub"], "metricsNamespaces": ["monitoring"]},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    },
    "existing-secrets": {
        "auth": {"existingSecret": "my-auth"},
        "users": {"existingSecret": "my-users"},
        "store": {"url": "s3://bucket", "existingSecret": "my-s3"},
    },
    "device-plugin": {"host": {"kvm": {"mode": "resource"}}},
    "tcg-minimal": {"host": {"kvm": {"mode": "none"}, "accel": "tcg", "jail": {"delegateCgroup": False},
                             "podDisruptionBudget": {"enabled": False}},
                    "router": {"podDisruptionBudget": {"enabled": False}},
                    "networkPolicy": {"enabled": False}},
    "open-router": {"networkPolicy": {"allowExternal": True}, "fullnameOverride": "vmkg"},
    "networking": {"host": {"networking": {"enabled": True}}},
}

BAD: dict[str, dict[str, Any]] = {
    "one-router": {"router": {"replicas": 1}},
    "unknown-top-level": {"replicas": 3},
    "unknown-nested": {"host": {"kvm": {"path": "/dev/kvm"}}},
    "privileged-knob": {"host": {"securityContext": {"privileged": True}}},
    "bad-store-url": {"store": {"url": "http://bucket"}},
    "bad-user-entry": {"users": {"entries": {"alice": "plaintext-token"}}},
    "reserved-user-name": {"users": {"entries": {"gateway": SHA}}},
    "kvm-without-device": {"host": {"kvm": {"mode": "none"}, "accel": "kvm"}},
    "chart-owned-env": {"env": {"VMKG_AUTH_TOKEN": "x"}},
    "bad-pull-policy": {"image": {"pullPolicy": "Sometimes"}},
    "bad-service-type": {"router": {"service": {"type": "ExternalName"}}},
    "bad-namespace": {"networkPolicy": {"allowedNamespaces": ["Not_A_Namespace"]}},
    "bad-networking": {"host": {"networking": {"enabled": "yes"}}},
    "networking-extra": {"host": {"networking": {"enabled": True, "privileged": True}}},
}


@pytest.fixture(scope="module")
def helm_python() -> Path:
    try:
        return toolchain.ensure(log=lambda msg: print(msg, file=sys.stderr))
    except toolchain.Unavailable as exc:
        if os.environ.get("CI") and "pip" in str(exc):
            pytest.fail(f"Helm toolchain: {exc}")
        pytest.skip(f"Helm toolchain unavailable: {exc}")


@pytest.fixture(scope="module")
def rendered(helm_python: Path) -> dict[str, Any]:
    cases = [{"name": n, "values": v} for n, v in {**GOOD, **BAD}.items()]
    req = {"chart": str(CHART), "kube_versions": KUBE_VERSIONS, "lint": True, "cases": cases}
    out = subprocess.run([str(helm_python), str(ROOT / "helm" / "render.py")], input=json.dumps(req),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


def objects(rendered: dict[str, Any], case: str) -> dict[str, dict[str, Any]]:
    c = rendered["cases"][case]
    assert c["ok"], c.get("error")
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in c["objects"]}


def one(rendered: dict[str, Any], case: str, kind: str) -> dict[str, Any]:
    found = [o for o in objects(rendered, case).values() if o["kind"] == kind]
    assert len(found) == 1, f"{case}: {len(found)} {kind}s"
    return found[0]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def test_lint_is_clean(rendered: dict[str, Any]) -> None:
    lint = rendered["lint"]
    assert lint["Errors"] is None
    # Severity: 1 info (e.g. "icon is recommended"), 2 warning, 3 error
    assert all(m["Severity"] < 2 for m in lint["Messages"]), lint["Messages"]


@pytest.mark.parametrize("case", list(GOOD))
def test_installs_and_every_object_is_valid_kubernetes(rendered: dict[str, Any], case: str) -> None:
    c = rendered["cases"][case]
    assert c["ok"], c.get("error")
    assert c["objects"], "Helm sent nothing to the API server"
    assert c["invalid"] == []
    # a CRD: kubernetes-validate has no schema for it; test_service_monitor checks its shape
    assert all(n.startswith("ServiceMonitor/") for n in c["unvalidated"]), c["unvalidated"]
    # what Helm sent is what its release manifest says (no object missing or extra)
    assert len(c["objects"]) == c["manifest"].count("\nkind: ")


@pytest.mark.parametrize("case", list(BAD))
def test_schema_refuses_bad_values(rendered: dict[str, Any], case: str) -> None:
    c = rendered["cases"][case]
    assert not c["ok"]
    assert "don't meet the specifications of the schema" in c["error"], c["error"]
    assert c["objects"] == [], "nothing may reach the cluster"


def test_default_release(rendered: dict[str, Any]) -> None:
    objs = objects(rendered, "default")
    assert sorted(n.split("/")[0] for n in objs) == sorted([
        "Deployment", "DaemonSet", "Service", "Service", "Secret", "PodDisruptionBudget",
        "PodDisruptionBudget", "NetworkPolicy", "NetworkPolicy"])
    router = one(rendered, "default", "Deployment")
    assert router["spec"]["replicas"] >= 2
    hosts = one(rendered, "default", "DaemonSet")
    services = {o["metadata"]["name"]: o for o in objs.values() if o["kind"] == "Service"}
    headless = [s for s in services.values() if s["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1
    (hs,) = headless
    assert hs["spec"]["selector"].items() <= hosts["spec"]["template"]["metadata"]["labels"].items()
    # the routers find the hosts through that headless Service, at the hosts' port
    args = container(router)["args"]
    assert args[0] == "router"
    (dns,) = [a for a in args if a.startswith("--hosts-dns=")]
    assert dns == f"--hosts-dns={hs['metadata']['name']}.vmkg.svc:{hs['spec']['ports'][0]['port']}"
    assert container(hosts)["ports"][0]["containerPort"] == hs["spec"]["ports"][0]["port"]
    assert container(hosts)["args"][0] == "serve"
    # the KVM nodes only
    assert hosts["spec"]["template"]["spec"]["nodeSelector"] == {"vm-kernel-gateway/kvm": "true"}
    for w in (router, hosts):
        c = container(w)
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["path"] == "/api"
        assert c["resources"]["requests"]
        e = env(c)
        assert e["VMKG_IP"] == "0.0.0.0"
        assert e["VMKG_AUTH_TOKEN"]["secretKeyRef"]["key"] == "token"
        assert e["VMKG_ROUTER_SECRET"]["secretKeyRef"]["key"] == "router-secret"
        assert "VMKG_USERS_FILE" not in e and "VMKG_STORE" not in e
    assert env(container(hosts))["VMKG_ACCEL"] == "kvm"
    # a generated token and router secret, different from each other
    secret = one(rendered, "default", "Secret")
    assert secret["metadata"]["name"] == env(container(router))["VMKG_AUTH_TOKEN"]["secretKeyRef"]["name"]
    assert len(secret["data"]["token"]) >= 48 and secret["data"]["token"] != secret["data"]["router-secret"]


def test_host_privileges_are_exactly_the_jails(rendered: dict[str, Any]) -> None:
    for case in GOOD:
        pod = one(rendered, case, "DaemonSet")["spec"]["template"]["spec"]
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
        assert pod["automountServiceAccountToken"] is False
        sc = container({"spec": {"template": {"spec": pod}}})["securityContext"]
        assert sc["privileged"] is False, case
        net = GOOD[case].get("host", {}).get("networking", {}).get("enabled", False)
        assert sc["capabilities"] == {"drop": ["ALL"], "add": HOST_CAPS + ["NET_ADMIN"] * net}, case
        assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False
        # Kubernetes refuses allowPrivilegeEscalation=false with SYS_ADMIN; the jail sets
        # no_new_privs on each QEMU. Nothing else may turn it on.
        assert sc["allowPrivilegeEscalation"] is True and "SYS_ADMIN" in sc["capabilities"]["add"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert sc["appArmorProfile"]["type"] in ("Unconfined", "Localhost")
        # the only hostPath volumes: /dev/kvm (a character device) and, if asked, the cache
        host_paths = {v["name"]: v["hostPath"] for v in pod["volumes"] if "hostPath" in v}
        kvm = one(rendered, case, "DaemonSet")
        mode = GOOD[case].get("host", {}).get("kvm", {}).get("mode", "hostPath")
        expected = {}
        if mode == "hostPath":
            expected["kvm"] = {"path": "/dev/kvm", "type": "CharDevice"}
        if GOOD[case].get("host", {}).get("cache", {}).get("type") == "hostPath":
            expected["cache"] = {"path": "/var/cache/vmkg", "type": "DirectoryOrCreate"}
        if net:
            expected["tun"] = {"path": "/dev/net/tun", "type": "CharDevice"}
        assert host_paths == expected, case
        mounts = {m["mountPath"] for m in container(kvm)["volumeMounts"]}
        assert ("/dev/kvm" in mounts) == (mode == "hostPath")
        assert ("/dev/net/tun" in mounts) == net, case
    sc = container(one(rendered, "full", "DaemonSet"))["securityContext"]
    assert sc["appArmorProfile"] == {"type": "Localhost", "localhostProfile": "vmkg-host"}


def test_router_holds_no_privilege(rendered: dict[str, Any]) -> None:
    for case in GOOD:
        router = one(rendered, case, "Deployment")
        pod = router["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert not any("hostPath" in v for v in pod["volumes"])
        sc = container(router)["securityContext"]
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
        assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


def test_every_privilege_is_documented_with_a_reason() -> None:
    values = (CHART / "values.yaml").read_text()
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Kubernetes"):]
    section = section[:section.find("\n## ", 4)] if "\n## " in section[4:] else section
    for cap in HOST_CAPS:
        assert re.search(rf"#\s+(\w+, )*{cap}\b.* - \S", values), f"values.yaml gives no reason for {cap}"
        assert re.search(rf"^\| [^|]*`{cap}`[^|]* \| \S", section, re.M), \
            f"README's Kubernetes section gives no reason for {cap}"
    for setting in ("runAsUser", "allowPrivilegeEscalation", "seccompProfile", "appArmorProfile",
                    "readOnlyRootFilesystem", "privileged", "/dev/kvm"):
        assert setting in values and setting in section, setting
    # networking (opt-in): NET_ADMIN and /dev/net/tun, each with its reason
    assert re.search(r"#\s+NET_ADMIN - \S", values) and re.search(r"#\s+/dev/net/tun - \S", values)
    assert re.search(r"^\| `NET_ADMIN` [^|]*\| \S", section, re.M)
    assert re.search(r"^\| `/dev/net/tun` [^|]*\| \S", section, re.M)
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert "NET_ADMIN" in schema["properties"]["host"]["properties"]["networking"]["description"]


def test_kvm_from_a_device_plugin(rendered: dict[str, Any]) -> None:
    c = container(one(rendered, "device-plugin", "DaemonSet"))
    assert c["resources"]["limits"]["devices.kubevirt.io/kvm"] == "1"
    assert c["resources"]["requests"]["devices.kubevirt.io/kvm"] == "1"
    assert c["resources"]["limits"]["memory"] == "32Gi"  # the user's limits are kept
    tcg = one(rendered, "tcg-minimal", "DaemonSet")
    assert env(container(tcg))["VMKG_ACCEL"] == "tcg"
    assert "command" not in container(tcg)  # no cgroup delegation asked for
    assert "mount -o remount,rw /sys/fs/cgroup" in " ".join(container(one(rendered, "default", "DaemonSet"))["command"])


def test_users_store_and_tokens(rendered: dict[str, Any]) -> None:
    objs = objects(rendered, "full")
    secrets = {o["metadata"]["name"].rsplit("-", 1)[1]: o for o in objs.values() if o["kind"] == "Secret"}
    assert set(secrets) == {"auth", "users", "store"}
    assert json.loads(secrets["users"]["stringData"]["users.json"]) == {"alice": SHA, "bob": SHA}
    assert secrets["store"]["stringData"] == {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "s3cret"}
    import base64
    assert base64.b64decode(secrets["auth"]["data"]["token"]) == b"admin-token"
    assert base64.b64decode(secrets["auth"]["data"]["router-secret"]) == b"shared-secret"
    hosts, router = container(one(rendered, "full", "DaemonSet")), container(one(rendered, "full", "Deployment"))
    e = env(hosts)
    assert e["VMKG_STORE"] == "s3://vmkg-templates/prod"
    assert e["AWS_ENDPOINT_URL"] == "http://seaweedfs.storage:8333" and e["AWS_DEFAULT_REGION"] == "us-east-1"
    assert hosts["envFrom"] == [{"secretRef": {"name": secrets["store"]["metadata"]["name"]}}]
    assert "envFrom" not in router and "VMKG_STORE" not in env(router)  # routers never touch S3
    assert e["VMKG_MAX_KERNELS_PER_USER"] == "4" and e["VMKG_POOL_SIZE"] == "2"
    for c, w in ((hosts, one(rendered, "full", "DaemonSet")), (router, one(rendered, "full", "Deployment"))):
        assert env(c)["VMKG_USERS_FILE"] == "/etc/vmkg/users/users.json"
        (m,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/etc/vmkg/users"]
        assert "subPath" not in m  # a subPath mount never sees the Secret change
        (v,) = [v for v in w["spec"]["template"]["spec"]["volumes"] if v["name"] == m["name"]]
        assert v["secret"]["secretName"] == secrets["users"]["metadata"]["name"]
    assert container(one(rendered, "full", "Deployment"))["image"] == "registry.example/vmkg:1.2.3"
    svc = [o for o in objs.values() if o["kind"] == "Service" and o["spec"].get("type") == "LoadBalancer"]
    assert svc and svc[0]["spec"]["loadBalancerSourceRanges"] == ["192.0.2.0/24"]

    # existing Secrets: none made, all referenced by name
    objs = objects(rendered, "existing-secrets")
    assert not [o for o in objs.values() if o["kind"] == "Secret"]
    hosts = container(one(rendered, "existing-secrets", "DaemonSet"))
    assert env(hosts)["VMKG_AUTH_TOKEN"]["secretKeyRef"]["name"] == "my-auth"
    assert hosts["envFrom"] == [{"secretRef": {"name": "my-s3"}}]
    vols = one(rendered, "existing-secrets", "DaemonSet")["spec"]["template"]["spec"]["volumes"]
    assert {"secretName": "my-users", "defaultMode": 0o444} in [v.get("secret") for v in vols]


def test_network_policies(rendered: dict[str, Any]) -> None:
    def policies(case: str) -> dict[str, dict[str, Any]]:
        return {o["metadata"]["name"].rsplit("-", 1)[1]: o["spec"]
                for o in objects(rendered, case).values() if o["kind"] == "NetworkPolicy"}

    router_labels = one(rendered, "default", "Deployment")["spec"]["template"]["metadata"]["labels"]
    p = policies("default")
    (rule,) = p["host"]["ingress"]
    # hosts: the routers of this release only
    assert rule["from"] == [{"podSelector": {"matchLabels": {
        k: router_labels[k] for k in rule["from"][0]["podSelector"]["matchLabels"]}}}]
    assert rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "router"
    (rule,) = p["router"]["ingress"]
    assert rule["from"] == [{"podSelector": {}}]  # its own namespace
    p = policies("full")
    allowed = {f["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
               for f in p["router"]["ingress"][0]["from"] if "namespaceSelector" in f}
    assert allowed == {"jupyterhub", "monitoring"}
    scrapers = [f for f in p["host"]["ingress"][0]["from"] if "namespaceSelector" in f]
    assert scrapers == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert "from" not in policies("open-router")["router"]["ingress"][0]
    assert policies("tcg-minimal") == {}


def test_service_monitor(rendered: dict[str, Any]) -> None:
    assert not [o for c in GOOD if c != "full" for o in objects(rendered, c).values()
                if o["kind"] == "ServiceMonitor"]
    monitors = [o for o in objects(rendered, "full").values() if o["kind"] == "ServiceMonitor"]
    assert len(monitors) == 2
    services = [o for o in objects(rendered, "full").values() if o["kind"] == "Service"]
    for m in monitors:
        assert m["apiVersion"] == "monitoring.coreos.com/v1"
        assert m["metadata"]["labels"]["release"] == "prometheus"
        (ep,) = m["spec"]["endpoints"]
        assert ep["path"] == "/metrics" and ep["port"] == "http"
        assert ep["authorization"]["credentials"]["key"] == "token"
        # it selects exactly one of the release's Services, which has that port
        sel = m["spec"]["selector"]["matchLabels"]
        (svc,) = [s for s in services if sel.items() <= s["metadata"]["labels"].items()]
        assert "http" in [p["name"] for p in svc["spec"]["ports"]]


def test_pod_disruption_budgets(rendered: dict[str, Any]) -> None:
    pdbs = {o["metadata"]["name"].rsplit("-", 1)[1]: o["spec"]
            for o in objects(rendered, "default").values() if o["kind"] == "PodDisruptionBudget"}
    assert pdbs["router"]["minAvailable"] == 1
    assert pdbs["host"]["maxUnavailable"] == 1
    router = one(rendered, "default", "Deployment")
    assert pdbs["router"]["selector"]["matchLabels"] == router["spec"]["selector"]["matchLabels"]
    assert not [o for o in objects(rendered, "tcg-minimal").values() if o["kind"] == "PodDisruptionBudget"]


# ---------------------------------------------------------------------------
# with real VMs: the capability set is enough for the jail

# the capabilities of a root process that kept only these in its bounding set, then exec'd
CAPS_EXEC = """
import ctypes, os, sys
names = {"CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4, "KILL": 5,
         "SETGID": 6, "SETUID": 7, "SETPCAP": 8, "NET_BIND_SERVICE": 10, "NET_ADMIN": 12,
         "NET_RAW": 13, "SYS_CHROOT": 18, "SYS_PTRACE": 19, "SYS_ADMIN": 21, "SYS_RESOURCE": 24,
         "MKNOD": 27}
keep = {names[c] for c in sys.argv[1].split(",")}
libc = ctypes.CDLL(None, use_errno=True)
for cap in range(int(open("/proc/sys/kernel/cap_last_cap").read()) + 1):
    if cap not in keep and libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
        sys.exit(f"cannot drop capability {cap}: errno {ctypes.get_errno()}")
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def jail_tests_with(caps: list[str], *selection: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CAPS_EXEC, ",".join(caps), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         str(ROOT / "tests" / "test_jail.py"), "-m", "vm", "-k", " or ".join(selection)],
        cwd=ROOT, capture_output=True, text=True, timeout=1800)


@pytest.mark.vm
@pytest.mark.skipif(os.geteuid() != 0, reason="the jail needs root")
def test_the_jail_works_with_exactly_the_charts_capabilities(rendered: dict[str, Any]) -> None:
    """tests/test_jail.py's VM tests (a jailed QEMU and its limits, a fork and its files, the
    reaper after the owner dies) in a process whose capability bounding set is the default
    release's host pod's list and nothing else, as in that pod."""
    caps = container(one(rendered, "default", "DaemonSet"))["securityContext"]["capabilities"]["add"]
    assert caps == HOST_CAPS
    out = jail_tests_with(caps, "runs_jailed", "fork_files_are_private", "dies_with_its_owner")
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "3 passed" in out.stdout, out.stdout[-3000:]
    assert "skipped" not in out.stdout.splitlines()[-1]


@pytest.mark.vm
@pytest.mark.skipif(os.geteuid() != 0, reason="the jail needs root")
@pytest.mark.parametrize("cap", HOST_CAPS)
def test_each_capability_of_the_chart_is_needed(cap: str) -> None:
    """Without any one of them a jailed start, a fork or the reaper fails (measured: the
    mount/uid/bounding-set/chown/chmod ones at the jailed start, DAC_OVERRIDE at the fork's
    qemu-img of the VM's own disk, SYS_PTRACE at the fork's /proc/<pid>/mem, KILL at the
    reaper)."""
    out = jail_tests_with([c for c in HOST_CAPS if c != cap], "dies_with_its_owner", "fork_files_are_private")
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-500:]
    assert out.returncode != 0 and ("failed" in last or "error" in last), last
