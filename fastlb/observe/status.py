"""What the admin listener shows: one snapshot, three renderings.

``collect(source)`` reads the counters (summed over every worker's slot and
the retired slot of the shared table, ``fastlb.runtime.shm``) and the
health checkers' state into one dict: that dict is ``GET /status.json``,
``metrics_text`` renders it as Prometheus' text exposition format (``GET
/metrics``), and the status page (``PAGE``) fetches it every second.

Nothing here runs per request: a scrape reads the table once.
"""
import os
import time

from fastlb.health import STATES
from fastlb.validate import format_address
from fastlb.runtime.shm import (B_1XX, B_ACTIVE, B_BYTES_IN, B_BYTES_OUT, B_CONNECT_ERRORS,
                                B_FAILURES, B_LAT, B_LAT_SUM_US, B_REQUESTS, B_RETRIES,
                                L_1XX, L_ACTIVE, L_BYTES_IN, L_BYTES_OUT, L_CONNECTIONS,
                                L_PROXY_ERRORS, L_REQUESTS, L_TUNNEL_BYTES_IN,
                                L_TUNNEL_BYTES_OUT, L_TUNNELS, L_TUNNELS_TOTAL, LAT_BOUNDS)

__all__ = ["collect", "metrics_text", "METRICS", "PAGE", "quantile"]

CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


def quantile(buckets, q):
    """The ``q`` quantile (0..1) of a histogram: ``buckets`` counts per bucket
    (``LAT_BOUNDS`` then +Inf, not cumulative), linear within a bucket as
    Prometheus' histogram_quantile. None without observations; the last
    finite bound when it falls in +Inf."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    lo = 0.0
    for i, n in enumerate(buckets):
        if i >= len(LAT_BOUNDS):
            return LAT_BOUNDS[-1]
        hi = LAT_BOUNDS[i]
        if n and seen + n >= rank:
            return lo + (hi - lo) * (rank - seen) / n
        seen += n
        lo = hi
    return LAT_BOUNDS[-1]


def _classes(row, first):
    return {c: row[first + k] for k, c in enumerate(CLASSES)}


def collect(source):
    """The snapshot (see the module). ``source``: the running process's (or
    master's) view, with ``tables``, ``rows()`` -> (backend rows, listener
    rows), ``pools()`` (the Pools the checkers steer), ``listeners()`` ->
    ``[(name, bind, [sockets])]`` and ``process()`` (a dict)."""
    tables = source.tables
    brows, lrows = source.rows()
    now = time.time()
    pools = []
    for pool in source.pools():
        snaps = pool.health.snapshot() if pool.health is not None else [None] * len(
            pool.backends)
        backends = []
        for b, snap in zip(pool.backends, snaps):
            row = brows.get((pool.name, b.address))
            c = tables.backend_totals(row) if row is not None else [0] * 32
            lat = c[B_LAT:B_LAT + len(LAT_BOUNDS) + 1]
            state = snap["status"] if snap is not None else "UP"
            check = snap["last_check"] if snap is not None else None
            backends.append({
                "address": b.address,
                "url": b.url,
                "state": state,
                "weight": snap["weight"] if snap is not None else 1,
                "active": c[B_ACTIVE],
                "requests": c[B_REQUESTS],
                "responses": _classes(c, B_1XX),
                "connect_errors": c[B_CONNECT_ERRORS],
                "retries": c[B_RETRIES],
                "failures": c[B_FAILURES],
                "bytes_in": c[B_BYTES_IN],
                "bytes_out": c[B_BYTES_OUT],
                "checks": snap["checks"] if snap is not None else 0,
                "check_failures": snap["check_failures"] if snap is not None else 0,
                "last_check": check,
                "since_change": (now - snap["changed_at"]) if snap is not None else None,
                "latency": {"buckets": lat, "sum_seconds": c[B_LAT_SUM_US] / 1e6,
                            "p50": quantile(lat, 0.5), "p99": quantile(lat, 0.99)},
            })
        pools.append({"name": pool.name,
                      "algorithm": pool.config.algorithm if pool.config is not None else None,
                      "backends": backends})
    listeners = []
    for name, bind, socks in source.listeners():
        if socks:       # where it really listens (a configured port 0 is chosen by the kernel)
            bind = ", ".join(format_address(*s.getsockname()[:2]) for s in socks)
        row = lrows.get(name)
        c = tables.listener_totals(row) if row is not None else [0] * 16
        listeners.append({"name": name, "bind": bind, "connections": c[L_CONNECTIONS],
                          "active": c[L_ACTIVE], "requests": c[L_REQUESTS],
                          "responses": _classes(c, L_1XX), "bytes_in": c[L_BYTES_IN],
                          "bytes_out": c[L_BYTES_OUT], "tunnels": c[L_TUNNELS],
                          "tunnels_total": c[L_TUNNELS_TOTAL],
                          "tunnel_bytes_in": c[L_TUNNEL_BYTES_IN],
                          "tunnel_bytes_out": c[L_TUNNEL_BYTES_OUT],
                          "proxy_errors": c[L_PROXY_ERRORS]})
    return {"time": now, "process": source.process(), "listeners": listeners, "pools": pools}


# ---------------------------------------------------------------- Prometheus

# name -> (type, labels, help): every metric /metrics has, in its order
METRICS = {
    "fastlb_process_workers": ("gauge", "", "Worker processes serving traffic (1: one process)."),
    "fastlb_process_start_time_seconds": ("gauge", "", "When fastlb started, Unix time."),
    "fastlb_process_uptime_seconds": ("gauge", "", "Seconds since fastlb started."),
    "fastlb_process_reloads_total": ("counter", "", "Configuration reloads applied."),
    "fastlb_frontend_connections_total": ("counter", "listener",
                                          "Client connections accepted."),
    "fastlb_frontend_current_connections": ("gauge", "listener", "Client connections open."),
    "fastlb_frontend_http_requests_total": ("counter", "listener", "Requests received."),
    "fastlb_frontend_http_responses_total": ("counter", "listener, code",
                                             "Responses sent to clients, by status class "
                                             "(fastlb's own answers included)."),
    "fastlb_frontend_bytes_in_total": ("counter", "listener", "Bytes received from clients."),
    "fastlb_frontend_bytes_out_total": ("counter", "listener", "Bytes sent to clients."),
    "fastlb_frontend_current_tunnels": ("gauge", "listener",
                                        "Upgrade tunnels (WebSocket) open now."),
    "fastlb_frontend_tunnels_total": ("counter", "listener",
                                      "Upgrade tunnels opened (a 101 relayed)."),
    "fastlb_frontend_tunnel_bytes_in_total": ("counter", "listener",
                                              "Bytes relayed in tunnels from clients to "
                                              "backends (also in bytes_in)."),
    "fastlb_frontend_tunnel_bytes_out_total": ("counter", "listener",
                                               "Bytes relayed in tunnels from backends to "
                                               "clients (also in bytes_out)."),
    "fastlb_frontend_proxy_protocol_errors_total": ("counter", "listener",
                                                    "Connections closed without an answer "
                                                    "for a missing, invalid or late PROXY "
                                                    "protocol header."),
    "fastlb_backend_http_responses_total": ("counter", "pool, code",
                                            "Responses received from a pool's backends, by "
                                            "status class."),
    "fastlb_backend_current_requests": ("gauge", "pool", "Requests on a pool's backends now."),
    "fastlb_server_status": ("gauge", "pool, server, state",
                             "1 for the backend's state (UP, DOWN, EJECTED, DRAIN, MAINT), "
                             "0 for the others."),
    "fastlb_server_weight": ("gauge", "pool, server", "The backend's configured weight."),
    "fastlb_server_requests_total": ("counter", "pool, server",
                                     "Requests sent to the backend (every try)."),
    "fastlb_server_current_requests": ("gauge", "pool, server", "Requests on the backend now."),
    "fastlb_server_http_responses_total": ("counter", "pool, server, code",
                                           "Responses received from the backend, by status "
                                           "class."),
    "fastlb_server_connect_errors_total": ("counter", "pool, server",
                                           "Connections to the backend that failed."),
    "fastlb_server_retries_total": ("counter", "pool, server",
                                    "Tries on the backend that failed and were retried on "
                                    "another."),
    "fastlb_server_failures_total": ("counter", "pool, server",
                                     "Failures blamed on the backend (passive health input)."),
    "fastlb_server_check_failures_total": ("counter", "pool, server",
                                           "Active health checks that failed."),
    "fastlb_server_bytes_in_total": ("counter", "pool, server", "Bytes received from the backend."),
    "fastlb_server_bytes_out_total": ("counter", "pool, server", "Bytes sent to the backend."),
    "fastlb_server_response_time_seconds": ("histogram", "pool, server",
                                            "From sending a request to the end of the "
                                            "response head."),
}


def _esc(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v):
    if isinstance(v, float):
        if v != v:
            return "NaN"
        if v in (float("inf"), float("-inf")):
            return "+Inf" if v > 0 else "-Inf"
        return repr(v)
    return str(v)


_LE = [repr(b) for b in LAT_BOUNDS] + ["+Inf"]


def metrics_text(data):
    """``data`` (from ``collect``) in Prometheus' text exposition format 0.0.4."""
    out = {name: [] for name in METRICS}
    proc = data["process"]
    out["fastlb_process_workers"].append(f"fastlb_process_workers {proc['workers']}")
    out["fastlb_process_start_time_seconds"].append(
        f"fastlb_process_start_time_seconds {_num(proc['started'])}")
    out["fastlb_process_uptime_seconds"].append(
        f"fastlb_process_uptime_seconds {_num(proc['uptime'])}")
    out["fastlb_process_reloads_total"].append(f"fastlb_process_reloads_total {proc['reloads']}")
    for li in data["listeners"]:
        lab = f'listener="{_esc(li["name"])}"'
        out["fastlb_frontend_connections_total"].append(
            f"fastlb_frontend_connections_total{{{lab}}} {li['connections']}")
        out["fastlb_frontend_current_connections"].append(
            f"fastlb_frontend_current_connections{{{lab}}} {li['active']}")
        out["fastlb_frontend_http_requests_total"].append(
            f"fastlb_frontend_http_requests_total{{{lab}}} {li['requests']}")
        resp = out["fastlb_frontend_http_responses_total"]
        for code, n in li["responses"].items():
            resp.append(f'fastlb_frontend_http_responses_total{{{lab},code="{code}"}} {n}')
        out["fastlb_frontend_bytes_in_total"].append(
            f"fastlb_frontend_bytes_in_total{{{lab}}} {li['bytes_in']}")
        out["fastlb_frontend_bytes_out_total"].append(
            f"fastlb_frontend_bytes_out_total{{{lab}}} {li['bytes_out']}")
        for metric, key in (("fastlb_frontend_current_tunnels", "tunnels"),
                            ("fastlb_frontend_tunnels_total", "tunnels_total"),
                            ("fastlb_frontend_tunnel_bytes_in_total", "tunnel_bytes_in"),
                            ("fastlb_frontend_tunnel_bytes_out_total", "tunnel_bytes_out"),
                            ("fastlb_frontend_proxy_protocol_errors_total", "proxy_errors")):
            out[metric].append(f"{metric}{{{lab}}} {li[key]}")
    status = out["fastlb_server_status"]
    hist = out["fastlb_server_response_time_seconds"]
    sresp = out["fastlb_server_http_responses_total"]
    simple = (("fastlb_server_weight", "weight"), ("fastlb_server_requests_total", "requests"),
              ("fastlb_server_current_requests", "active"),
              ("fastlb_server_connect_errors_total", "connect_errors"),
              ("fastlb_server_retries_total", "retries"),
              ("fastlb_server_failures_total", "failures"),
              ("fastlb_server_check_failures_total", "check_failures"),
              ("fastlb_server_bytes_in_total", "bytes_in"),
              ("fastlb_server_bytes_out_total", "bytes_out"))
    for pool in data["pools"]:
        pname = f'pool="{_esc(pool["name"])}"'
        by_class = dict.fromkeys(CLASSES, 0)
        active = 0
        for b in pool["backends"]:
            lab = f'{pname},server="{_esc(b["address"])}"'
            state = b["state"]
            for st in STATES:
                status.append(f'fastlb_server_status{{{lab},state="{st}"}} '
                              f'{1 if state == st else 0}')
            for metric, key in simple:
                out[metric].append(f"{metric}{{{lab}}} {b[key]}")
            for code, n in b["responses"].items():
                by_class[code] += n
                sresp.append(f'fastlb_server_http_responses_total{{{lab},code="{code}"}} {n}')
            active += b["active"]
            cum = 0
            for le, n in zip(_LE, b["latency"]["buckets"]):
                cum += n
                hist.append(f'fastlb_server_response_time_seconds_bucket{{{lab},le="{le}"}} '
                            f'{cum}')
            hist.append(f"fastlb_server_response_time_seconds_sum{{{lab}}} "
                        f"{_num(b['latency']['sum_seconds'])}")
            hist.append(f"fastlb_server_response_time_seconds_count{{{lab}}} {cum}")
        bresp = out["fastlb_backend_http_responses_total"]
        for code, n in by_class.items():
            bresp.append(f'fastlb_backend_http_responses_total{{{pname},code="{code}"}} {n}')
        out["fastlb_backend_current_requests"].append(
            f"fastlb_backend_current_requests{{{pname}}} {active}")
    lines = []
    for name, (kind, _, help_) in METRICS.items():
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(out[name])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the page

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>fastlb status</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .3em} h2{font-size:1.1em;margin:1.2em 0 .4em}
table{border-collapse:collapse;background:#fff;margin-bottom:.5em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right;white-space:nowrap}
th{background:#f0f0f0} td.l,th.l{text-align:left}
.st{font-weight:600;border-radius:3px;padding:0 .4em;color:#fff}
.UP{background:#2e7d32}.DOWN{background:#c62828}.EJECTED{background:#ef6c00}
.DRAIN{background:#1565c0}.MAINT{background:#6a1b9a}
#err{color:#c62828} .muted{color:#777}
</style></head>
<body>
<h1>fastlb</h1>
<div id="proc" class="muted">loading&hellip;</div><div id="err"></div>
<h2>Listeners</h2><div id="listeners"></div>
<div id="pools"></div>
<script>
"use strict";
function esc(s){return String(s).replace(/[&<>"]/g,function(c){
  return {"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c];});}
function dur(s){if(s===null||s===undefined)return "";s=Math.max(0,Math.floor(s));
  if(s<60)return s+"s";if(s<3600)return Math.floor(s/60)+"m"+(s%60)+"s";
  if(s<86400)return Math.floor(s/3600)+"h"+Math.floor(s%3600/60)+"m";
  return Math.floor(s/86400)+"d"+Math.floor(s%86400/3600)+"h";}
function ms(v){return v===null?"":(v*1000).toFixed(v<0.01?2:1)+" ms";}
function cls(r){return ["1xx","2xx","3xx","4xx","5xx"].map(function(k){return r[k];}).join(" / ");}
function render(d){
  var p=d.process;
  document.getElementById("proc").textContent="pid "+p.pid+" \\u00b7 "+p.workers+
    " worker"+(p.workers==1?"":"s")+" \\u00b7 up "+dur(p.uptime)+" \\u00b7 "+p.reloads+
    " reload"+(p.reloads==1?"":"s")+(p.last_reload?" (last: "+p.last_reload.result+", "+
    dur(d.time-p.last_reload.time)+" ago)":"")+" \\u00b7 fastlb "+p.version;
  var h="<table><tr><th class=l>listener</th><th class=l>bind</th><th>open</th>"+
    "<th>connections</th><th>requests</th><th>1xx / 2xx / 3xx / 4xx / 5xx</th></tr>";
  d.listeners.forEach(function(l){h+="<tr><td class=l>"+esc(l.name)+"</td><td class=l>"+
    esc(l.bind)+"</td><td>"+l.active+"</td><td>"+l.connections+"</td><td>"+l.requests+
    "</td><td>"+cls(l.responses)+"</td></tr>";});
  document.getElementById("listeners").innerHTML=h+"</table>";
  h="";
  d.pools.forEach(function(pl){
    h+="<h2>pool "+esc(pl.name)+" <span class=muted>("+esc(pl.algorithm)+")</span></h2>"+
      "<table data-pool=\\""+esc(pl.name)+"\\"><tr><th class=l>backend</th><th>state</th>"+
      "<th>weight</th><th>in flight</th><th>requests</th><th>1xx / 2xx / 3xx / 4xx / 5xx</th>"+
      "<th>errors</th><th>retries</th><th class=l>last check</th><th>since change</th>"+
      "<th>p50</th><th>p99</th></tr>";
    pl.backends.forEach(function(b){
      var c=b.last_check, chk=c?(c.passed?"passed":"failed: "+esc(c.reason))+" "+
        dur(d.time-c.time)+" ago":"<span class=muted>none</span>";
      h+="<tr data-backend=\\""+esc(b.address)+"\\"><td class=l>"+esc(b.address)+
        "</td><td><span class=\\"st "+b.state+"\\">"+b.state+"</span></td><td>"+b.weight+
        "</td><td>"+b.active+"</td><td>"+b.requests+"</td><td>"+cls(b.responses)+
        "</td><td>"+(b.connect_errors+b.failures)+"</td><td>"+b.retries+
        "</td><td class=l>"+chk+"</td><td>"+dur(b.since_change)+"</td><td>"+
        ms(b.latency.p50)+"</td><td>"+ms(b.latency.p99)+"</td></tr>";});
    h+="</table>";});
  document.getElementById("pools").innerHTML=h;
}
function tick(){
  var x=new XMLHttpRequest();
  x.open("GET","status.json");
  x.onload=function(){
    if(x.status==200){document.getElementById("err").textContent="";
      render(JSON.parse(x.responseText));}
    else document.getElementById("err").textContent="status.json: "+x.status;};
  x.onerror=function(){document.getElementById("err").textContent="fastlb is not answering";};
  x.send();
}
tick();setInterval(tick,1000);
</script></body></html>
"""


def process_info(workers, started, reloads, last_reload):
    from fastlb import __version__

    return {"pid": os.getpid(), "workers": workers, "started": started,
            "uptime": time.time() - started, "reloads": reloads,
            "last_reload": (None if last_reload is None else
                            {"time": last_reload[0], "result": last_reload[1]}),
            "version": __version__}
