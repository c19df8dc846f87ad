"""The admin listener: /metrics, /status, /status.json and the admin API, on a
real ``fastlb serve`` (one process, and a master with two workers), real
backends, real HTTP clients."""
import json
import os
import re
import signal
import threading
import time

import httpx
import pytest

from helpers import wait_for as _wait_for
from helpers import (  # noqa: F401  (fixtures are used by name)
    FastlbProcess, Reader, active_core, backend_loop, make_backend, ok_response, raw_connect)

pytestmark = pytest.mark.usefixtures("active_core")

TOKEN = "s3cret-token-for-tests-0123456789"


def log_text(lb):
    return lb.startup.decode("utf-8", "replace") + b"".join(lb.stderr_lines).decode(
        "utf-8", "replace")


def wait_for(cond, timeout=10.0, every=0.05):
    return _wait_for(cond, timeout, every)


class Admin:
    """fastlb with an admin listener; ``api`` is an httpx client on it."""

    def __init__(self, tmp_path, backends, workers=1, token=True, extra=()):
        args = ["--admin", "127.0.0.1:0", "--workers", str(workers)]
        if token:
            tf = tmp_path / "token"
            tf.write_text(TOKEN + "\n")
            args += ["--admin-token-file", str(tf)]
        self.lb = FastlbProcess([b.addr for b in backends], *args, *extra)
        m = wait_for(lambda: re.search(r"admin listening on 127\.0\.0\.1:(\d+)",
                                       log_text(self.lb)), 15)
        assert m, log_text(self.lb)
        self.port = int(m.group(1))
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = httpx.Client(base_url=self.url, timeout=10)
        self.auth = {"Authorization": f"Bearer {TOKEN}"}

    def status(self):
        r = self.api.get("/status.json")
        assert r.status_code == 200
        return r.json()

    def backend(self, address, pool="default"):
        for p in self.status()["pools"]:
            if p["name"] == pool:
                for b in p["backends"]:
                    if b["address"] == address:
                        return b
        return None

    def close(self):
        self.api.close()
        code = self.lb.terminate(timeout=30)
        assert code == 0, log_text(self.lb)


@pytest.fixture(params=[1, 2], ids=["one-process", "two-workers"])
def workers(request):
    return request.param


@pytest.fixture
def admin_of(tmp_path):
    made = []

    def make(backends, **kw):
        a = Admin(tmp_path, backends, **kw)
        made.append(a)
        return a

    yield make
    for a in made:
        a.close()


def traffic(port, n, path="/"):
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        return [c.get(path) for _ in range(n)]


def test_status_page_json_and_metrics_parse(make_backend, admin_of, workers):
    from prometheus_client.parser import text_string_to_metric_families

    a = make_backend("A")
    b = make_backend("B")
    adm = admin_of([a, b], workers=workers)
    page = adm.api.get("/status")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "status.json" in page.text and "<script>" in page.text
    # no external assets: works offline
    assert not re.search(r"(src|href)\s*=", page.text) and "http://" not in page.text \
        and "https://" not in page.text
    st = adm.status()
    assert st["process"]["workers"] == workers
    assert [b_["address"] for b_ in st["pools"][0]["backends"]] == [
        f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]
    assert all(b_["state"] == "UP" for b_ in st["pools"][0]["backends"])
    text = adm.api.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("fastlb_process_workers", "fastlb_server_status", "fastlb_server_http_responses",
                 "fastlb_frontend_connections", "fastlb_server_response_time_seconds"):
        assert name in families, sorted(families)
    status = {(s.labels["server"], s.labels["state"]): s.value
              for s in families["fastlb_server_status"].samples}
    assert status[(f"127.0.0.1:{a.port}", "UP")] == 1
    assert status[(f"127.0.0.1:{a.port}", "DOWN")] == 0
    # every metric the README documents is exposed, and the other way round
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    documented = set(re.findall(r"^\| `(fastlb_[a-z_]+)` \|", readme, re.M))
    from fastlb.observe.status import METRICS
    assert documented == set(METRICS)


def test_writes_need_the_token_and_change_nothing_without_it(make_backend, admin_of, workers):
    a = make_backend("A")
    adm = admin_of([a], workers=workers)
    path = f"/api/pools/default/backends/127.0.0.1:{a.port}/drain"
    r = adm.api.post(path)
    assert r.status_code == 401 and "Bearer" in r.json()["error"]
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = adm.api.post(path, headers={"Authorization": "Bearer wrong-token-wrong-token"})
    assert r.status_code == 403 and r.json()["error"] == "wrong token"
    r = adm.api.put(f"/api/pools/default/backends/127.0.0.1:{a.port}/weight",
                    json={"weight": 5}, headers={"Authorization": "Basic abc"})
    assert r.status_code == 401
    time.sleep(0.2)
    b = adm.backend(f"127.0.0.1:{a.port}")
    assert b["state"] == "UP" and b["weight"] == 1
    assert all(r.status_code == 200 for r in traffic(adm.lb.port, 5))


def test_without_a_token_the_api_is_read_only(make_backend, admin_of):
    a = make_backend("A")
    adm = admin_of([a], token=False)
    assert adm.api.get("/api/pools").status_code == 200
    r = adm.api.post(f"/api/pools/default/backends/127.0.0.1:{a.port}/drain",
                     headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 403 and "read-only" in r.json()["error"]
    assert adm.backend(f"127.0.0.1:{a.port}")["state"] == "UP"


def test_unknown_pool_backend_and_bad_bodies(make_backend, admin_of, workers):
    a = make_backend("A")
    adm = admin_of([a], workers=workers)
    h = adm.auth
    r = adm.api.post("/api/pools/nope/backends/127.0.0.1:1/drain", headers=h)
    assert r.status_code == 404 and "no pool named 'nope'" in r.json()["error"]
    r = adm.api.post("/api/pools/default/backends/127.0.0.1:1/drain", headers=h)
    assert r.status_code == 404 and "has no backend" in r.json()["error"]
    w = f"/api/pools/default/backends/127.0.0.1:{a.port}/weight"
    for body, field in ((b"not json", None), (b"[1]", None), (b'{"weight": -1}', "weight"),
                        (b'{"weight": "3"}', "weight"), (b'{"weight": 10001}', "weight"),
                        (b'{"weight": true}', "weight")):
        r = adm.api.put(w, content=body, headers=h)
        assert r.status_code == 400, (body, r.text)
        assert r.json().get("field") == field, (body, r.text)
    r = adm.api.post("/api/pools/default/backends", json={"url": "ftp://x"}, headers=h)
    assert r.status_code == 400 and r.json()["field"] == "url"
    r = adm.api.post("/api/pools/default/backends", json={"weight": 1}, headers=h)
    assert r.status_code == 400 and r.json()["field"] == "url"
    r = adm.api.post("/api/pools/default/backends",
                     json={"url": f"http://127.0.0.1:{a.port}"}, headers=h)
    assert r.status_code == 409
    r = adm.api.delete(f"/api/pools/default/backends/127.0.0.1:{a.port}", headers=h)
    assert r.status_code == 409 and "last backend" in r.json()["error"]
    assert adm.api.get("/nope").status_code == 404
    assert adm.api.post("/metrics", headers=h).status_code == 405
    # malformed HTTP gets a 400, and the admin listener keeps serving
    with raw_connect(adm.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n")
        assert Reader(s).read_response().status == 400
    assert adm.api.get("/status.json").status_code == 200


def _load(port, stop_at, errors, count):
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        while time.monotonic() < stop_at:
            try:
                r = c.get("/")
                if r.status_code != 200:
                    errors.append(r.status_code)
                count.append(1)
            except httpx.HTTPError as e:
                errors.append(repr(e))


def test_drain_under_load_no_error_and_no_new_request(make_backend, admin_of, workers):
    a = make_backend("A", handler=lambda be, req: ok_response(b"A"))
    b = make_backend("B", handler=lambda be, req: ok_response(b"B"))
    adm = admin_of([a, b], workers=workers)
    errors, count = [], []
    stop_at = time.monotonic() + 2.5
    ts = [threading.Thread(target=_load, args=(adm.lb.port, stop_at, errors, count))
          for _ in range(3)]
    for t in ts:
        t.start()
    time.sleep(0.8)
    r = adm.api.post(f"/api/pools/default/backends/127.0.0.1:{b.port}/drain", headers=adm.auth)
    assert r.status_code == 200 and r.json()["state"] == "DRAIN"
    assert "undoes it" in r.json()["note"]
    time.sleep(0.3)     # every worker has applied it (it polls every 50 ms)
    seen = len(b.requests)
    for t in ts:
        t.join(20)
    assert errors == []
    assert len(count) > 30
    assert len(b.requests) == seen, "a drained backend got new requests"
    assert adm.backend(f"127.0.0.1:{b.port}")["state"] == "DRAIN"
    assert "draining (admin)" in log_text(adm.lb)
    # enable: it takes requests again
    r = adm.api.post(f"/api/pools/default/backends/127.0.0.1:{b.port}/enable", headers=adm.auth)
    assert r.json()["state"] == "UP"
    time.sleep(0.3)
    bodies = [r.content for r in traffic(adm.lb.port, 20)]
    assert bodies.count(b"B") >= 5


def test_disable_is_maintenance_and_closes_pooled_connections(make_backend, admin_of, workers):
    a = make_backend("A", handler=lambda be, req: ok_response(b"A"))
    b = make_backend("B", handler=lambda be, req: ok_response(b"B"))
    adm = admin_of([a, b], workers=workers)
    traffic(adm.lb.port, 20)
    assert wait_for(lambda: len(b.open_conns) > 0, 2)
    r = adm.api.post(f"/api/pools/default/backends/127.0.0.1:{b.port}/disable",
                     headers=adm.auth)
    assert r.json()["state"] == "MAINT"
    assert wait_for(lambda: len(b.open_conns) == 0, 3), "pooled connections stayed open"
    bodies = [r.content for r in traffic(adm.lb.port, 20)]
    assert bodies == [b"A"] * 20
    text = adm.api.get("/metrics").text
    assert (f'fastlb_server_status{{pool="default",server="127.0.0.1:{b.port}",'
            f'state="MAINT"}} 1') in text


def test_weight_changes_the_share(make_backend, admin_of, workers):
    a = make_backend("A", handler=lambda be, req: ok_response(b"A"))
    b = make_backend("B", handler=lambda be, req: ok_response(b"B"))
    adm = admin_of([a, b], workers=workers, extra=("--algorithm", "weighted-round-robin"))
    r = adm.api.put(f"/api/pools/default/backends/127.0.0.1:{a.port}/weight",
                    json={"weight": 4}, headers=adm.auth)
    assert r.status_code == 200 and r.json()["weight"] == 4
    time.sleep(0.3)
    # one keep-alive connection: one worker, whose rotation is exact
    bodies = [r.content for r in traffic(adm.lb.port, 50)]
    assert bodies.count(b"A") == 40 and bodies.count(b"B") == 10, bodies
    r = adm.api.put(f"/api/pools/default/backends/127.0.0.1:{b.port}/weight",
                    json={"weight": 0}, headers=adm.auth)
    time.sleep(0.3)
    assert [r.content for r in traffic(adm.lb.port, 10)] == [b"A"] * 10
    assert adm.backend(f"127.0.0.1:{b.port}")["weight"] == 0


def test_add_and_remove_a_backend(make_backend, admin_of, workers):
    a = make_backend("A", handler=lambda be, req: ok_response(b"A"))
    b = make_backend("B", handler=lambda be, req: ok_response(b"B"))
    adm = admin_of([a], workers=workers)
    r = adm.api.post("/api/pools/default/backends",
                     json={"url": f"http://127.0.0.1:{b.port}", "weight": 1}, headers=adm.auth)
    assert r.status_code == 200, r.text
    assert r.json()["backend"] == f"127.0.0.1:{b.port}"
    assert wait_for(lambda: b"B" in [x.content for x in traffic(adm.lb.port, 6)], 5)
    assert [x["address"] for x in adm.status()["pools"][0]["backends"]] == [
        f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]
    assert "added to pool default" in log_text(adm.lb)
    r = adm.api.delete(f"/api/pools/default/backends/127.0.0.1:{a.port}", headers=adm.auth)
    assert r.status_code == 200 and r.json()["state"] == "REMOVED"
    time.sleep(0.5)
    assert [x.content for x in traffic(adm.lb.port, 10)] == [b"B"] * 10
    assert [x["address"] for x in adm.status()["pools"][0]["backends"]] == [
        f"127.0.0.1:{b.port}"]


def test_protect_reads(tmp_path, make_backend):
    a = make_backend("A")
    tf = tmp_path / "token"
    tf.write_text(TOKEN)
    cfg = tmp_path / "f.toml"
    cfg.write_text(f'[admin]\nbind = "127.0.0.1:0"\ntoken_file = "{tf}"\nprotect_reads = true\n'
                   '[listeners.web]\nbind = "127.0.0.1:0"\ndefault_pool = "app"\n'
                   f'[pools.app]\nbackends = ["http://127.0.0.1:{a.port}"]\n')
    lb = FastlbProcess(None, "--config", str(cfg))
    try:
        m = wait_for(lambda: re.search(r"admin listening on 127\.0\.0\.1:(\d+)", log_text(lb)))
        url = f"http://127.0.0.1:{m.group(1)}"
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.get(url + "/status.json").status_code == 401
        r = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and "fastlb_server_status" in r.text
    finally:
        assert lb.terminate() == 0


def test_admin_config_errors(tmp_path):
    from fastlb.config import loads
    from fastlb.errors import ConfigError

    base = ('[listeners.web]\nbind = "127.0.0.1:8080"\ndefault_pool = "a"\n'
            '[pools.a]\nbackends = ["http://127.0.0.1:1"]\n')
    cases = [
        ('[admin]\nbind = "127.0.0.1:8080"\n', "admin.bind: 127.0.0.1:8080 is already the "
                                              "address of listener web"),
        ('[admin]\nbind = "nope"\n', "admin.bind"),
        ('[admin]\ntoken_file = "/nonexistent/t"\n', "admin.token_file"),
        ('[admin]\nprotect = true\n', 'unknown key "protect"'),
        ('admin = 3\n', "expected the admin table"),
    ]
    short = tmp_path / "short"
    short.write_text("abc\n")
    cases.append((f'[admin]\ntoken_file = "{short}"\n', "at least 16 characters"))
    for text, want in cases:
        with pytest.raises(ConfigError) as e:
            loads(text + base if not text.startswith("admin =") else text + base, "f.toml",
                  resolve=False)
        assert want in str(e.value), (text, str(e.value))


def _status_handler(be, req):
    code = int(req.target.rsplit("/", 1)[1])
    reason = {200: b"OK", 301: b"Moved", 404: b"Not Found", 503: b"Unavailable"}[code]
    return b"HTTP/1.1 %d %s\r\nContent-Length: 2\r\n\r\nok" % (code, reason)


def _families(text):
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_counters_are_exact_across_workers_and_survive_a_killed_worker(make_backend, admin_of):
    import signal as _signal

    a = make_backend("A", handler=_status_handler)
    adm = admin_of([a], workers=2)
    sent = {200: 23, 301: 5, 404: 7, 503: 3}
    for code, n in sent.items():
        for _ in range(n):      # a new connection each: spread over both workers
            with httpx.Client(timeout=10) as c:
                assert c.get(f"{adm.lb.url}/s/{code}").status_code == code
    server = f"127.0.0.1:{a.port}"
    total = sum(sent.values())

    def scrape():
        return _families(adm.api.get("/metrics").text)

    def check(m):
        srv = (("pool", "default"), ("server", server))
        assert m[("fastlb_server_requests_total", srv)] == total
        for cls_, n in (("2xx", 23), ("3xx", 5), ("4xx", 7), ("5xx", 3), ("1xx", 0)):
            assert m[("fastlb_server_http_responses_total",
                      tuple(sorted(srv + (("code", cls_),))))] == n, cls_
            assert m[("fastlb_frontend_http_responses_total",
                      (("code", cls_), ("listener", "default")))] == n, cls_
            assert m[("fastlb_backend_http_responses_total",
                      (("code", cls_), ("pool", "default")))] == n, cls_
        assert m[("fastlb_frontend_http_requests_total", (("listener", "default"),))] == total
        assert m[("fastlb_frontend_connections_total", (("listener", "default"),))] == total
        assert m[("fastlb_server_current_requests", srv)] == 0
        assert m[("fastlb_server_response_time_seconds_count", srv)] == total

    m = wait_for(lambda: (lambda x: x if x[("fastlb_frontend_current_connections",
                                             (("listener", "default"),))] == 0 else None)(
        scrape()), 5)
    check(m)
    # both workers served some: each has its own slot
    st = adm.status()
    assert st["pools"][0]["backends"][0]["requests"] == total
    # a worker killed: its slot is folded into the retired one, nothing is lost
    pids = [int(p) for p in re.findall(r"pids ([\d, ]+)\)", log_text(adm.lb))[0].split(", ")]
    os.kill(pids[0], _signal.SIGKILL)
    assert wait_for(lambda: "restarting it" in log_text(adm.lb), 5)
    time.sleep(0.5)
    check(scrape())
