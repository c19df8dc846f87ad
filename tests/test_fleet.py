"""A fleet: three ``fastlb serve`` processes on one etcd prefix, Maglev on a header.

Every node builds the same pool from what etcd lists, so each key reaches the
same backend whichever node it is sent to; a backend removed in etcd is
removed on every node within a second, and only its own keys move.
"""
import json
import threading
import time

import pytest

from discovery_parts import (  # noqa: F401  (fixtures are used by name)
    etcd, needs_etcd, run_backends, stop_backends, threads_run)
from helpers import HOST, FastlbProcess, Reader, active_core, raw_connect

pytestmark = pytest.mark.usefixtures("active_core")

PREFIX = "/fleet/app/"
KEYS = [b"user-%d" % i for i in range(10000)]
BATCH = 250         # requests pipelined on the connection at a time


def route(port, keys):
    """The backend that answers each key (``hello from NAME``), in order,
    over one keep-alive connection."""
    out = []
    with raw_connect(port, timeout=20) as s:
        r = Reader(s, 20)
        for i in range(0, len(keys), BATCH):
            part = keys[i:i + BATCH]
            s.sendall(b"".join(b"GET /k HTTP/1.1\r\nHost: fleet\r\nX-Key: %s\r\n\r\n" % k
                               for k in part))
            for _ in part:
                resp = r.read_response()
                assert resp.status == 200, resp
                out.append(resp.body.decode().strip().removeprefix("hello from "))
    return out


def maglev(backends, names):
    """Each key's backend by a Maglev table of ``names``' addresses, built here:
    what every node must route."""
    from fastlb import core

    addrs = [b"%s:%d" % (HOST.encode(), backends[n][0]) for n in names]
    table = core.Maglev([1] * len(names), addrs)
    return [names[table.select(k)] for k in KEYS]


def node_config(endpoint):
    return (f'[listeners.web]\nbind = "127.0.0.1:0"\ndefault_pool = "app"\n\n'
            f'[pools.app]\nalgorithm = "maglev"\nhash_key = "header:X-Key"\n'
            f'discovery = {{ etcd = ["{endpoint}"], prefix = "{PREFIX}" }}\n')


@needs_etcd
def test_three_nodes_route_every_key_alike_and_converge(tmp_path, etcd, capsys):
    names = ["b1", "b2", "b3", "b4"]
    backends = run_backends(names)
    nodes = []
    try:
        # written in an order unlike their names: etcd lists keys sorted, the
        # pool sorts by address, Maglev by name; none of it may matter
        for name in reversed(names):
            port = backends[name][0]
            etcd.put(PREFIX + f"k{port}", json.dumps({"url": f"http://{HOST}:{port}"}))
        path = tmp_path / "node.toml"
        path.write_text(node_config(etcd.url))
        nodes = [FastlbProcess(None, "--config", str(path)) for _ in range(3)]

        first = threads_run(route, [(n.port, KEYS) for n in nodes])
        assert first[0] == first[1] == first[2]
        assert first[0] == maglev(backends, names)
        owners = {name: first[0].count(name) for name in names}
        assert all(n > 1500 for n in owners.values()), owners   # ~2500 each

        # b2 goes: every node stops sending it keys, within a second
        gone = "b2"
        moved = [i for i, b in enumerate(first[0]) if b == gone][:50]
        probe = [KEYS[i] for i in moved]
        converged = [None] * len(nodes)

        def watch(k, port):
            deadline = time.monotonic() + 5
            with raw_connect(port, timeout=5) as s:
                r = Reader(s, 5)
                while time.monotonic() < deadline:
                    s.sendall(b"".join(b"GET /k HTTP/1.1\r\nHost: fleet\r\nX-Key: %s\r\n\r\n"
                                       % key for key in probe))
                    got = [r.read_response().body for _ in probe]
                    if not any(gone.encode() in body for body in got):
                        converged[k] = time.monotonic() - t0
                        return
                    time.sleep(0.005)

        t0 = time.monotonic()
        etcd.delete(PREFIX + f"k{backends[gone][0]}")
        watchers = [threading.Thread(target=watch, args=(k, n.port))
                    for k, n in enumerate(nodes)]
        for t in watchers:
            t.start()
        for t in watchers:
            t.join(10)
        assert None not in converged, converged
        with capsys.disabled():
            print(f"\nfleet: a backend removed in etcd left every node's routing within "
                  f"{max(converged) * 1000:.0f} ms (nodes: "
                  f"{', '.join(f'{c * 1000:.0f}' for c in converged)} ms)")
        assert max(converged) < 1.0, converged

        after = threads_run(route, [(n.port, KEYS) for n in nodes])
        assert after[0] == after[1] == after[2]
        left = [name for name in names if name != gone]
        assert after[0] == maglev(backends, left)
        assert set(after[0]) == set(left)
        # b2's keys all moved; of the others, only the few that Maglev's
        # rebuild of the table moves (its documented bound: 2 %)
        assert all(now != gone for now in after[0])
        others = [(was, now) for was, now in zip(first[0], after[0]) if was != gone]
        moved = sum(was != now for was, now in others)
        with capsys.disabled():
            print(f"fleet: {first[0].count(gone)} keys of {gone} moved, and {moved} of the "
                  f"{len(others)} others")
        assert moved <= 0.02 * len(others), moved
    finally:
        for n in nodes:
            n.terminate()
        stop_backends(backends)
