"""Real parts for the discovery tests: an etcd server, a DNS server, a cuttable TCP relay.

* ``Etcd``: Debian's ``etcd`` (etcd-server) on free loopback ports, its data
  in a temporary directory; ``stop()`` / ``start()`` keep the data (a
  restart); ``put``, ``delete``, ``compact`` go to its JSON gateway with
  httpx (not fastlb's own client).
* ``Dnsmasq``: Debian's ``dnsmasq`` (dnsmasq-base) with a configuration
  file of its own on a free loopback port: SRV records (``srv-host=``) and
  addresses (``host-record=``), nothing forwarded; ``restart(records)``
  changes them, ``stop()`` takes the server away.
* ``Gate``: a TCP relay on its own loop thread in front of a server;
  ``block()`` cuts every connection through it and refuses new ones until
  ``unblock()``, so a test can decide when a client is away; ``accepted``
  counts the connections it relayed.

Both servers are skipped (``needs_etcd``, ``needs_dnsmasq``) when their
binaries are missing; ``.ci/run`` installs them.
"""
import asyncio
import base64
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from helpers import HOST, LoopThread

ETCD = shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)
DNSMASQ = shutil.which("dnsmasq") or (
    "/usr/sbin/dnsmasq" if os.path.exists("/usr/sbin/dnsmasq") else None)

needs_etcd = pytest.mark.skipif(ETCD is None, reason="etcd is not installed (Debian: "
                                                     "apt-get install etcd-server)")
needs_dnsmasq = pytest.mark.skipif(DNSMASQ is None, reason="dnsmasq is not installed "
                                                           "(Debian: apt-get install "
                                                           "dnsmasq-base)")


def free_port():
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _b64(text):
    if isinstance(text, str):
        text = text.encode()
    return base64.b64encode(text).decode()


class Etcd:
    """One etcd member on 127.0.0.1 (see the module)."""

    def __init__(self, directory):
        os.makedirs(directory, exist_ok=True)
        self.dir = str(directory)
        self.port = free_port()
        self.peer = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.proc = None
        self._http = None
        self.log_path = os.path.join(self.dir, "etcd.log")
        self.start()

    def start(self):
        peer = f"http://{HOST}:{self.peer}"
        cmd = [ETCD, "--name", "t", "--data-dir", os.path.join(self.dir, "data"),
               "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
               "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
               "--initial-cluster", f"t={peer}", "--logger", "zap", "--log-level", "error"]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                with open(self.log_path, "rb") as f:
                    raise AssertionError(f"etcd exited: {f.read()[-2000:]!r}")
            try:
                self.revision()
                return
            except Exception:
                time.sleep(0.05)
        raise AssertionError("etcd did not answer within 20s")

    def _post(self, path, doc, timeout=5.0):
        import httpx

        if self._http is None:
            self._http = httpx.Client()
        try:
            r = self._http.post(self.url + path, json=doc, timeout=timeout)
        except httpx.TransportError:
            self._http.close()      # a connection to an etcd that was restarted
            self._http = httpx.Client()
            raise
        r.raise_for_status()
        return r.json()

    def revision(self):
        return int(self._post("/v3/kv/range", {"key": _b64("\0")}, 1.0)["header"]["revision"])

    def put(self, key, value):
        """Put ``value`` (str or bytes) at ``key``; returns the new revision."""
        doc = self._post("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})
        return int(doc["header"]["revision"])

    def delete(self, key, prefix=False):
        """Delete ``key`` (``prefix``: every key under it, at once); the new revision."""
        req = {"key": _b64(key)}
        if prefix:
            end = bytearray(key.encode())
            end[-1] += 1
            req["range_end"] = _b64(bytes(end))
        doc = self._post("/v3/kv/deleterange", req)
        return int(doc["header"]["revision"])

    def compact(self, revision):
        self._post("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self._http is not None:
            self._http.close()
            self._http = None


class Dnsmasq:
    """A DNS server answering for ``*.test`` from its own records (see the module)."""

    def __init__(self, directory, records, ttl=1):
        self.dir = str(directory)
        self.port = free_port()
        self.ttl = ttl
        self.proc = None
        self.resolver = f"{HOST}:{self.port}"
        self.records = list(records)
        self.start()

    def _write(self):
        path = os.path.join(self.dir, "dnsmasq.conf")
        lines = [f"port={self.port}", f"listen-address={HOST}", "bind-interfaces",
                 "no-resolv", "no-hosts", "local=/test/", f"local-ttl={self.ttl}",
                 ]
        with open(path, "w") as f:
            f.write("\n".join(lines + self.records) + "\n")
        return path

    def start(self):
        conf = self._write()
        log = open(os.path.join(self.dir, "dnsmasq.log"), "ab")
        self.proc = subprocess.Popen(
            [DNSMASQ, f"--conf-file={conf}", "--keep-in-foreground", "--pid-file=",
             "--log-facility=-", f"--user={getpass.getuser()}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        import dns.resolver

        r = dns.resolver.Resolver(configure=False)
        r.nameservers = [HOST]
        r.port = self.port
        r.lifetime = 0.3
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("dnsmasq exited")
            try:
                r.resolve("nothing.test", "A")
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                return      # it answers
            except Exception:
                time.sleep(0.05)
        raise AssertionError("dnsmasq did not answer within 10s")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)

    def restart(self, records=None, ttl=None):
        """Stop, then start again on the same port with ``records`` (and ``ttl``)."""
        self.stop()
        if records is not None:
            self.records = list(records)
        if ttl is not None:
            self.ttl = ttl
        self.start()


def srv_records(name, backends, ttl=None):
    """dnsmasq lines for SRV ``name`` over ``backends``: (ip, port, priority,
    weight) each; every backend gets a target name of its own."""
    lines = []
    for i, (ip, port, prio, weight) in enumerate(backends):
        target = f"t{i}-{port}.{name.split('.', 2)[-1]}"
        lines.append(f"srv-host={name},{target},{port},{prio},{weight}")
        lines.append(f"host-record={target},{ip}")
    return lines


class Gate:
    """A TCP relay to ``(host, port)`` on its own loop thread (see the module)."""

    def __init__(self, target_port, host=HOST):
        self.lt = LoopThread("gate")
        self.target = (host, target_port)
        self.blocked = False
        self.accepted = 0
        self._conns = set()

        async def go():
            return await asyncio.start_server(self._client, HOST, 0)

        self.server = self.lt.call(go())
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"

    async def _client(self, reader, writer):
        if self.blocked:
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        pair = (writer, up_w)
        self._conns.add(pair)

        async def pipe(r, w):
            try:
                while True:
                    data = await r.read(65536)
                    if not data:
                        break
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                w.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        finally:
            self._conns.discard(pair)

    def block(self):
        """Cut every connection through the gate; refuse new ones."""
        def run():
            self.blocked = True
            for a, b in list(self._conns):
                a.transport.abort()
                b.transport.abort()
        self.lt.call_soon(run)

    def unblock(self):
        def run():
            self.blocked = False
        self.lt.call_soon(run)

    def open_connections(self):
        return self.lt.call_soon(lambda: len(self._conns))

    def close(self):
        def run():
            self.server.close()
            for a, b in list(self._conns):
                a.transport.abort()
                b.transport.abort()
        try:
            self.lt.call_soon(run)
        finally:
            self.lt.stop()


@pytest.fixture
def etcd(tmp_path):
    if ETCD is None:
        pytest.skip("etcd is not installed (Debian: apt-get install etcd-server)")
    e = Etcd(tmp_path / "etcd")
    yield e
    e.kill()


@pytest.fixture
def make_dnsmasq(tmp_path):
    if DNSMASQ is None:
        pytest.skip("dnsmasq is not installed (Debian: apt-get install dnsmasq-base)")
    made = []

    def make(records, ttl=1):
        d = tmp_path / f"dns{len(made)}"
        d.mkdir()
        server = Dnsmasq(d, records, ttl)
        made.append(server)
        return server

    yield make
    for s in made:
        s.stop()


@pytest.fixture
def make_gate():
    made = []

    def make(port):
        g = Gate(port)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


class LogWatch:
    """Lines of a ``FastlbProcess``'s stderr, waited for."""

    def __init__(self, proc):
        self.proc = proc

    def text(self):
        return (self.proc.startup + b"".join(self.proc.stderr_lines)).decode("utf-8",
                                                                            "replace")

    def wait(self, needle, timeout=10.0, count=1):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.text().count(needle) >= count:
                return True
            time.sleep(0.02)
        return self.text().count(needle) >= count


def run_backends(names):
    """One demo backend process (``tests/backend_proc.py``) per name, on free
    ports: ``{name: (port, Popen)}``; they answer ``hello from NAME``."""
    here = os.path.dirname(os.path.abspath(__file__))
    out = {}
    for name in names:
        port = free_port()
        proc = subprocess.Popen([sys.executable, os.path.join(here, "backend_proc.py"),
                                 str(port), name], stdout=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        out[name] = (port, proc)
    for name, (port, proc) in out.items():
        line = proc.stdout.readline()
        assert line.strip() == b"ready", (name, line)
    return out


def stop_backends(backends):
    for _, proc in backends.values():
        if proc.poll() is None:
            proc.terminate()
    for _, proc in backends.values():
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


def threads_run(fn, args_list):
    """``fn(*args)`` for each args on its own thread; their results, in order."""
    out = [None] * len(args_list)
    errors = []

    def run(i, args):
        try:
            out[i] = fn(*args)
        except BaseException as e:  # noqa: BLE001 (re-raised below)
            errors.append(e)

    ts = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(args_list)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    if errors:
        raise errors[0]
    return out
