"""The dashboard (``GET /``, gateway.dashboard) over plain HTTP against a live ``vmkg serve``:
sign-in with ``?token=`` (an HttpOnly, SameSite=Strict cookie, then a redirect that drops
the token), the cookie good for the dashboard only (never for ``/api``), the CSRF token on
its actions, the CSP and nosniff headers, and each user seeing and acting on their own
kernels only. The page in a real browser is in tests/test_browser.py."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import pytest
import requests
from gateway_helpers import Gateway

from gateway.users import hash_token

pytestmark = pytest.mark.vm
ALICE = "alice-" + uuid.uuid4().hex
BOB = "bob-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def gateway_options(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], dict[str, str]]:
    path = tmp_path_factory.mktemp("users") / "users.json"
    path.write_text(json.dumps({"alice": hash_token(ALICE), "bob": hash_token(BOB)}))
    return ["--pool-size=0", f"--users-file={path}"], {}


def sign_in(gw: Gateway, token: str) -> tuple[requests.Session, str]:
    """A browser-like session signed in to the dashboard; returns it and the page's CSRF token."""
    s = requests.Session()
    r = s.get(f"{gw.url}/?token={token}", allow_redirects=False, timeout=30)
    assert r.status_code == 302, (r.status_code, r.text)
    assert r.headers["Location"] == "/" and token not in r.headers["Location"]
    cookie = r.headers["Set-Cookie"]
    assert cookie.startswith("vmkg-dashboard=") and token not in cookie
    for flag in ("HttpOnly", "SameSite=Strict", "Path=/"):
        assert flag.lower() in cookie.lower(), cookie
    page = s.get(f"{gw.url}/", timeout=30)
    assert page.status_code == 200, page.text
    m = re.search(r'<meta name="vmkg-csrf" content="([0-9a-f]{64})">', page.text)
    assert m, page.text
    return s, m.group(1)


def post(s: requests.Session, gw: Gateway, kernel_id: str, action: str, csrf: str | None,
         **headers: str) -> requests.Response:
    h = {**({"X-VMKG-CSRF": csrf} if csrf is not None else {}), **headers}
    return s.post(f"{gw.url}/dashboard/api/kernels/{kernel_id}/{action}", headers=h, timeout=300)


def kernels(s: requests.Session, gw: Gateway) -> dict[str, Any]:
    r = s.get(f"{gw.url}/dashboard/api/kernels", timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    return {k["id"]: k for k in r.json()["kernels"]}


def test_headers_and_sign_in_rules(gw: Gateway) -> None:
    r = requests.get(f"{gw.url}/", timeout=30)
    assert r.status_code == 401 and "?token=" in r.text and "Set-Cookie" not in r.headers
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    bad = requests.get(f"{gw.url}/?token=nobody", allow_redirects=False, timeout=30)
    assert bad.status_code == 401 and "Set-Cookie" not in bad.headers
    s, _ = sign_in(gw, ALICE)
    page = s.get(f"{gw.url}/", timeout=30)
    assert page.headers["Content-Security-Policy"] == csp
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Referrer-Policy"] == "no-referrer"
    # no inline script or style: every <script> has a src, no style attributes or blocks
    assert re.findall(r"<script\b[^>]*>", page.text) == [
        '<script src="dashboard/static/dashboard.js" defer></script>'[:-len("</script>")]]
    assert "<style" not in page.text and " style=" not in page.text and "onclick" not in page.text
    js = s.get(f"{gw.url}/dashboard/static/dashboard.js", timeout=30)
    assert js.status_code == 200 and js.headers["Content-Type"].startswith("application/javascript")
    assert js.headers["X-Content-Type-Options"] == "nosniff"
    # a fixed list of files: nothing else of the package is served
    assert s.get(f"{gw.url}/dashboard/static/dashboard.html", timeout=30).status_code == 404
    assert s.get(f"{gw.url}/dashboard/static/..%2Fdashboard.py", timeout=30).status_code in (401, 404)
    # the cookie is the dashboard's only: the REST API stays token-only
    api = s.get(f"{gw.url}/api/kernels", timeout=30)
    assert api.status_code == 401, api.text
    # and the dashboard's JSON needs the cookie
    assert requests.get(f"{gw.url}/dashboard/api/kernels", timeout=30).status_code == 401
    assert requests.get(f"{gw.url}/dashboard/api/kernels", headers=gw.headers(), timeout=30).status_code == 401


def test_users_see_and_act_on_their_own_kernels_with_csrf(gw: Gateway) -> None:
    a = gw.request("POST", "/api/kernels", token=ALICE, json={"name": "python3-microvm"}).json()["id"]
    b = gw.request("POST", "/api/kernels", token=BOB, json={"name": "python3-microvm"}).json()["id"]
    try:
        sa, csrf_a = sign_in(gw, ALICE)
        sb, csrf_b = sign_in(gw, BOB)
        admin, _ = sign_in(gw, gw.token)
        ka = kernels(sa, gw)
        assert set(ka) == {a} and set(kernels(sb, gw)) == {b} and {a, b} <= set(kernels(admin, gw))
        k = ka[a]
        assert k["execution_state"] == "idle" and k["template"] == "python3" and k["connections"] == 0
        assert k["memory"]["pss"] > 1 << 20 and 0 <= k["vm_age"] < 3600 and k["parent_id"] is None
        # actions: no CSRF token, a wrong one, another session's, a foreign origin: 403
        assert post(sa, gw, a, "fork", None).status_code == 403
        assert post(sa, gw, a, "fork", "0" * 64).status_code == 403
        assert post(sa, gw, a, "fork", csrf_b).status_code == 403
        assert post(sa, gw, a, "delete", csrf_a, Origin="http://evil.example").status_code == 403
        # a cookie-less request with the right token in the header is not a session either
        r = requests.post(f"{gw.url}/dashboard/api/kernels/{a}/delete", timeout=30,
                          headers={**gw.headers(ALICE), "X-VMKG-CSRF": csrf_a})
        assert r.status_code == 401
        # bob's kernel is unknown to alice, even with her valid CSRF token
        r = post(sa, gw, b, "delete", csrf_a)
        assert r.status_code == 404, r.text
        assert b in gw.kernel_ids()
        # alice forks her kernel: the branch is hers, under its parent in the tree
        r = post(sa, gw, a, "fork", csrf_a)
        assert r.status_code == 201, r.text
        (child,) = r.json()["kernels"]
        ka = kernels(sa, gw)
        assert ka[child]["parent_id"] == a and child not in kernels(sb, gw)
        assert child in {k["id"] for k in gw.request("GET", "/api/kernels", token=ALICE).json()}
        r = post(sa, gw, child, "delete", csrf_a)
        assert r.status_code == 204, r.text
        assert set(kernels(sa, gw)) == {a}
    finally:
        for kid in gw.kernel_ids():
            gw.delete_kernel(kid)
