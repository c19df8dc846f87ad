"""TLS (README, "TLS"), on the active core.

A test CA and its certificates are made here (the ``cryptography``
package): two names, a wildcard, a CN-only certificate, an expired one, a
second certificate for the same name (to see a reload), a backend's. Then,
with real clients (Python's ``ssl``, ``curl --resolve``) and real backends:
the certificate each name gets (SNI), ALPN, the versions refused, plain
HTTP and other wrong clients on a TLS port (clean close, no traceback, the
process serves on), the handshake timeout, reload by SIGHUP (a new
certificate is served; an expired one, a key that does not match or is
missing keeps the old one and says why), X-Forwarded-Proto per listener,
https backends (verified against the test CA, refused without it, without
verification, with a server name), pooled TLS connections, health checks
in TLS, TLS with workers, WebSocket tunnels over TLS, the configuration's
checks of all of it.
"""
import asyncio
import datetime
import ipaddress
import json
import logging
import os
import random
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect as ws_connect

from fastlb.config import loads
from fastlb.errors import ConfigError
from fastlb.runtime.shm import L_NAMES
from helpers import (HANG, HOST, FastlbProcess, Reader, access_log_lines, echo_response, get,
                     raw_connect, recv_until_close, run_fastlb, send_raw, wait_for)
from helpers import (active_core, backend_loop, make_backend, make_config_lb,  # noqa: F401
                     make_lb)
from test_tunnels import SWITCHED, UPGRADE, TunnelBackend, tunnel_backend  # noqa: F401
from test_body_relay import SlowReader, chunked, pattern, slow_socket
from test_tunnels import ws_backend  # noqa: F401  (fixtures, used by name)

pytestmark = [pytest.mark.usefixtures("active_core"),
              # the clients of old TLS versions that must be refused
              pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")]

DAY = datetime.timedelta(days=1)


# ---------------------------------------------------------------- a test CA

class PKI:
    """A CA and the certificates it issues, as PEM files under ``root``."""

    def __init__(self, root):
        self.root = str(root)
        self.now = datetime.datetime.now(datetime.timezone.utc)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fastlb test CA")])
        ca = (x509.CertificateBuilder().subject_name(self.ca_name).issuer_name(self.ca_name)
              .public_key(self.ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(self.now - DAY).not_valid_after(self.now + 30 * DAY)
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .sign(self.ca_key, hashes.SHA256()))
        self.ca = self._path("ca.pem")
        with open(self.ca, "wb") as f:
            f.write(ca.public_bytes(serialization.Encoding.PEM))

    def _path(self, name):
        return os.path.join(self.root, name)

    def issue(self, name, dns=(), ips=(), cn=None, start=-1, days=30):
        """``name.pem`` and ``name.key``: a certificate for ``dns`` names and
        ``ips`` (subjectAltName; none: only the subject's CN ``cn``), valid
        from ``start`` days from now for ``days`` days. Returns a Cert."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn or name)])
        serial = x509.random_serial_number()
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.ca_name)
             .public_key(key.public_key()).serial_number(serial)
             .not_valid_before(self.now + start * DAY)
             .not_valid_after(self.now + (start + days) * DAY))
        sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i))
                                                 for i in ips]
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = b.sign(self.ca_key, hashes.SHA256())
        c = Cert(self._path(f"{name}.pem"), self._path(f"{name}.key"), serial)
        with open(c.cert, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(c.key, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        return c

    def server_context(self, cert):
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert.cert, cert.key)
        return ctx


class Cert:
    def __init__(self, cert, key, serial):
        self.cert, self.key, self.serial = cert, key, serial

    def copy_to(self, cert, key):
        shutil.copyfile(self.cert, cert)
        shutil.copyfile(self.key, key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    p = PKI(tmp_path_factory.mktemp("pki"))
    p.a = p.issue("a", dns=["a.test", "www.a.test"])
    p.b = p.issue("b", dns=["b.test"])
    p.wild = p.issue("wild", dns=["*.wild.test"])
    p.exact = p.issue("exact", dns=["exact.wild.test"])
    p.cn = p.issue("cn", cn="cn.test")                      # no subjectAltName
    p.a2 = p.issue("a2", dns=["a.test", "www.a.test"])      # a.test again: another serial
    p.expired = p.issue("expired", dns=["a.test"], start=-10, days=5)
    p.backend = p.issue("backend", dns=["localhost"], ips=["127.0.0.1"])
    p.internal = p.issue("internal", dns=["backend.internal"])   # not for 127.0.0.1
    return p


def certificates(*certs):
    return ", ".join(f'{{ cert = "{c.cert}", key = "{c.key}" }}' for c in certs)


def tls_listener(pki, *certs, extra="", name="web", pool="app"):
    return (f'[listeners.{name}]\nbind = "127.0.0.1:0"\ndefault_pool = "{pool}"\n'
            f"[listeners.{name}.tls]\ncertificates = [{certificates(*certs)}]\n{extra}\n")


def pool(name, *urls, extra=""):
    backends = ", ".join(f'"{u}"' for u in urls)
    return f"[pools.{name}]\nbackends = [{backends}]\n{extra}\n"


# ---------------------------------------------------------------- clients

def client_context(pki=None, alpn=None, minimum=None, maximum=None):
    """A client context trusting the test CA (the name is checked by the
    tests themselves, from the certificate served)."""
    ctx = ssl.create_default_context(cafile=pki.ca if pki is not None else None)
    ctx.check_hostname = False
    if pki is None:
        ctx.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    if minimum is not None:
        ctx.minimum_version = minimum
    if maximum is not None:
        ctx.maximum_version = maximum
    return ctx


def serial_of(sslsock):
    return x509.load_der_x509_certificate(sslsock.getpeercert(binary_form=True)).serial_number


def tls_connect(port, sni=None, ctx=None, pki=None, timeout=5.0):
    raw = socket.create_connection((HOST, port), timeout=timeout)
    try:
        return (ctx or client_context(pki)).wrap_socket(raw, server_hostname=sni)
    except BaseException:
        raw.close()
        raise


def tls_get(port, sni="a.test", pki=None, path="/", ctx=None, headers=b""):
    """One GET over a new TLS connection: (serial served, response)."""
    with tls_connect(port, sni, ctx, pki) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {sni or 't'}\r\n".encode() + headers + b"\r\n")
        return serial_of(s), Reader(s).read_response()


def served(port, sni, pki):
    with tls_connect(port, sni, pki=pki) as s:
        return serial_of(s)


# ---------------------------------------------------------------- SNI, ALPN, versions

@pytest.fixture
def sni_lb(pki, make_backend, make_config_lb):
    be = make_backend("A")
    lb = make_config_lb(tls_listener(pki, pki.a, pki.b, pki.wild, pki.cn, pki.exact)
                        + pool("app", f"http://{HOST}:{be.port}"))
    lb.be = be
    return lb


@pytest.mark.parametrize("sni, want", [
    ("a.test", "a"), ("www.a.test", "a"), ("WWW.A.Test", "a"), ("b.test", "b"),
    ("x.wild.test", "wild"), ("exact.wild.test", "exact"), ("a.b.wild.test", "a"),
    ("wild.test", "a"), ("cn.test", "cn"), ("unknown.test", "a"), (None, "a"),
], ids=["exact", "second-san", "case", "other-cert", "wildcard", "exact-beats-wildcard",
        "wildcard-one-label-only", "wildcard-not-the-domain", "cn-fallback", "unknown-default",
        "no-sni-default"])
def test_sni_chooses_the_certificate(pki, sni_lb, sni, want):
    serial, resp = tls_get(sni_lb.port("web"), sni, pki)
    assert serial == getattr(pki, want).serial
    assert resp.status == 200 and resp.json()["backend"] == "A"


def test_curl_checks_each_name_against_the_certificate_served(pki, sni_lb):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not installed")
    port = sni_lb.port("web")

    def fetch(name):
        r = subprocess.run([curl, "-sS", "--max-time", "10", "--cacert", pki.ca,
                            "--resolve", f"{name}:{port}:{HOST}", "-w", "\n%{http_version}",
                            f"https://{name}:{port}/x"], capture_output=True, text=True,
                           timeout=20)
        return r.returncode, r.stdout, r.stderr

    for name in ("a.test", "b.test", "x.wild.test", "cn.test", "exact.wild.test"):
        rc, out, err = fetch(name)
        assert rc == 0, (name, err)
        body, version = out.rsplit("\n", 1)
        assert version == "1.1"             # ALPN http/1.1 (curl offers h2 first)
        assert json.loads(body)["target"] == "/x"
        # the backend is told where the request came from and in which protocol
        assert dict(json.loads(body)["headers"])["X-Forwarded-Proto"] == "https"
    # a name no certificate has gets the default one, which curl refuses
    rc, _, err = fetch("other.test")
    assert rc == 60, err


def test_alpn_is_http11_and_tls12_is_the_minimum(pki, sni_lb):
    port = sni_lb.port("web")
    with tls_connect(port, "a.test", client_context(pki, alpn=["h2", "http/1.1"])) as s:
        assert s.selected_alpn_protocol() == "http/1.1"
        assert s.version() == "TLSv1.3"
    with tls_connect(port, "a.test", client_context(pki, alpn=["h2"])) as s:
        assert s.selected_alpn_protocol() is None   # no protocol in common: none said
    ctx = client_context(pki, maximum=ssl.TLSVersion.TLSv1_2)
    with tls_connect(port, "b.test", ctx) as s:
        assert s.version() == "TLSv1.2" and serial_of(s) == pki.b.serial
    old = client_context(pki)
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        tls_connect(port, "a.test", old)
    # and the listener serves on
    assert tls_get(port, "a.test", pki)[1].status == 200


def test_curl_tls11_is_refused(pki, sni_lb):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not installed")
    port = sni_lb.port("web")
    r = subprocess.run([curl, "-sS", "--max-time", "10", "--cacert", pki.ca, "--tlsv1.0",
                        "--tls-max", "1.1", "--resolve", f"a.test:{port}:{HOST}",
                        f"https://a.test:{port}/"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 35, r.stderr     # SSL connect error


@pytest.mark.parametrize("split", [None, "bytes", [3, 17, 40]], ids=["whole", "bytes", "pieces"])
def test_request_over_tls_whole_or_split(pki, sni_lb, split):
    """A request cut into many TLS records (one per piece) is read as a whole."""
    req = (b"POST /up?x=1 HTTP/1.1\r\nHost: a.test\r\nContent-Length: 11\r\n"
           b"X-Test: split\r\n\r\nhello world")
    # (send_raw stops at the first readable byte: the session tickets of TLS
    # 1.3 come right after the handshake, so the pieces are sent here)
    points = ([] if split is None else range(1, len(req)) if split == "bytes" else split)
    with tls_connect(sni_lb.port("web"), "a.test", pki=pki) as s:
        prev = 0
        for p in list(points) + [len(req)]:
            s.sendall(req[prev:p])      # one TLS record each
            prev = p
            time.sleep(0.0005)
        resp = Reader(s).read_response()
    doc = resp.json()
    assert resp.status == 200
    assert (doc["method"], doc["target"], doc["body"]) == ("POST", "/up?x=1", "hello world")
    assert dict(doc["headers"])["X-Test"] == "split"


@pytest.mark.parametrize("split", [None, "pieces"], ids=["whole", "pieces"])
def test_bad_request_over_tls_gets_its_400_while_the_client_keeps_sending(pki, sni_lb, split):
    """fastlb answers 400 and closes while the client is still sending a
    large body: the answer is not lost (the TLS close reads and discards
    what comes until the client's close_notify), nothing reaches a backend."""
    head = b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
    with tls_connect(sni_lb.port("web"), "a.test", pki=pki) as s:
        if split is None:
            s.sendall(head)
        else:
            for i in range(0, len(head), 7):
                s.sendall(head[i:i + 7])
                time.sleep(0.001)
        try:
            for _ in range(64):
                s.sendall(b"x" * 16384)
        except (ssl.SSLError, OSError):
            pass        # fastlb closed: what it answered is still to read
        resp = Reader(s).read_response()
    assert resp.status == 400 and resp.get("connection") == "close"
    assert sni_lb.be.requests == []


def test_keep_alive_and_pipelining_over_tls(pki, sni_lb):
    with tls_connect(sni_lb.port("web"), "a.test", pki=pki) as s:
        s.sendall(b"".join(b"GET /%d HTTP/1.1\r\nHost: a.test\r\n\r\n" % i for i in range(5)))
        r = Reader(s)
        got = [r.read_response().json()["target"] for _ in range(5)]
        s.sendall(b"GET /last HTTP/1.1\r\nHost: a.test\r\n\r\n")
        got.append(r.read_response().json()["target"])
    assert got == ["/0", "/1", "/2", "/3", "/4", "/last"]
    assert sni_lb.be.connections == 1


# ---------------------------------------------------------------- X-Forwarded-Proto

def test_x_forwarded_proto_is_https_on_the_tls_listener_only(pki, make_backend,
                                                             make_config_lb):
    be = make_backend("A")
    lb = make_config_lb(tls_listener(pki, pki.a)
                        + '[listeners.plain]\nbind = "127.0.0.1:0"\ndefault_pool = "app"\n'
                        + pool("app", f"http://{HOST}:{be.port}"))
    _, resp = tls_get(lb.port("web"), "a.test", pki,
                      headers=b"X-Forwarded-Proto: http\r\n")     # a client's word: replaced
    assert [v for k, v in resp.json()["headers"] if k == "X-Forwarded-Proto"] == ["https"]
    with raw_connect(lb.port("plain")) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nX-Forwarded-Proto: https\r\n\r\n")
        doc = Reader(s).read_response().json()
    assert [v for k, v in doc["headers"] if k == "X-Forwarded-Proto"] == ["http"]


# ---------------------------------------------------------------- wrong clients

def _plain_http(port, split):
    with raw_connect(port) as s:
        send_raw(s, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", split)
        return recv_until_close(s, 5)


def _rst_mid_handshake(port):
    s = raw_connect(port)
    s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")     # a ClientHello begun
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def _garbage_hello(port):
    with raw_connect(port) as s:
        s.sendall(b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\xff\xff\xff\xff" + b"\x00" * 64)
        return recv_until_close(s, 5)


def test_wrong_clients_get_a_clean_close_and_no_traceback(pki, make_backend):
    """Plain HTTP (whole, split), garbage, resets mid-handshake, old TLS, a
    client that goes away: each is closed, nothing but the start and the
    stop is logged (no traceback, no SSL error), and the port serves TLS
    clients on."""
    be = make_backend("A")
    lb = FastlbProcess([be.addr], "--tls-cert", pki.a.cert, "--tls-key", pki.a.key)
    try:
        for split in (None, "bytes", [4]):
            data, closed = _plain_http(lb.port, split)
            assert (data, closed) == (b"", True)
        data, closed = _garbage_hello(lb.port)
        assert closed and not data.startswith(b"HTTP")
        for _ in range(3):
            _rst_mid_handshake(lb.port)
        old = client_context(pki)
        old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("ALL:@SECLEVEL=0")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            tls_connect(lb.port, "a.test", old)
        # a TLS client that closes after its request, before the answer
        s = tls_connect(lb.port, "a.test", pki=pki)
        s.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        s.close()
        for _ in range(3):
            serial, resp = tls_get(lb.port, "a.test", pki)
            assert resp.status == 200 and serial == pki.a.serial
    finally:
        assert lb.terminate() == 0
    log = b"".join(lb.stderr_lines).decode()
    lines = [ln for ln in log.splitlines() if ln.strip()]
    assert all(not any(w in ln for w in ("Traceback", "Error", "error", "SSL", "Exception",
                                           "Fatal", "eof_received")) for ln in lines), log
    assert any("drained" in ln for ln in lines), log


def test_loop_exception_handler_makes_tls_errors_a_debug_line(caplog):
    """The event loop's exception handler of ``fastlb serve``: what a TLS peer
    does wrong is a debug line; anything else still goes to asyncio's default
    handler (a traceback: a bug of fastlb's)."""
    from fastlb import server

    class SSLProtocol:      # what uvloop's SSL protocol is called
        pass

    loop = asyncio.new_event_loop()
    try:
        caplog.set_level(logging.DEBUG)
        server._loop_exception(loop, {"message": "SSL handshake failed",
                                      "exception": ssl.SSLError(1, "[SSL: HTTP_REQUEST] http")})
        server._loop_exception(loop, {"message": "Fatal error", "exception": ConnectionResetError(),
                                      "protocol": SSLProtocol()})
        assert [(r.levelno, r.name) for r in caplog.records] == [(logging.DEBUG, "fastlb")] * 2
        caplog.clear()
        server._loop_exception(loop, {"message": "a bug", "exception": ValueError("x")})
        assert [(r.levelno, r.name) for r in caplog.records] == [(logging.ERROR, "asyncio")]
    finally:
        loop.close()


def test_handshake_timeout_closes_a_silent_client(pki, make_backend, make_config_lb):
    be = make_backend("A")
    lb = make_config_lb(tls_listener(pki, pki.a, extra="handshake_timeout = 0.5")
                        + pool("app", f"http://{HOST}:{be.port}"))
    port = lb.port("web")
    for opening in (b"", b"\x16\x03\x01\x02"):     # nothing, or a ClientHello begun
        with raw_connect(port) as s:
            t0 = time.monotonic()
            if opening:
                s.sendall(opening)
            data, closed = recv_until_close(s, 5)
            took = time.monotonic() - t0
        assert closed and data == b""
        assert 0.45 <= took < 4.0, took
    # a client as slow as that, under the default (10 s), is still connected
    lb2 = make_config_lb(tls_listener(pki, pki.a) + pool("app", f"http://{HOST}:{be.port}"))
    with raw_connect(lb2.port("web")) as s:
        data, closed = recv_until_close(s, 1.5)
        assert not closed
    assert tls_get(port, "a.test", pki)[1].status == 200


def test_client_close_notify_with_a_request_in_flight(pki, make_backend, make_config_lb,
                                                      tmp_path, caplog):
    """A TLS client that ends its side (close_notify) while its response is
    awaited has left: logged as 499, its backend connection dropped, and no
    warning from the TLS layer (over TLS there is no half-close to keep)."""
    be = make_backend("A", handler=lambda be, req: HANG if req.target == "/hang"
                      else echo_response(be, req))
    log_path = tmp_path / "access.log"
    lb = make_config_lb(f'access_log = "{log_path}"\n' + tls_listener(pki, pki.a)
                        + pool("app", f"http://{HOST}:{be.port}"))
    caplog.set_level(logging.WARNING)
    s = tls_connect(lb.port("web"), "a.test", pki=pki)
    s.sendall(b"GET /hang HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert wait_for(lambda: len(be.requests) == 1)
    s.unwrap().close()      # close_notify (answered), then the TCP connection
    assert wait_for(lambda: not be.open_conns, 5)   # the backend connection was dropped
    lines = access_log_lines(str(log_path), 1)
    assert len(lines) == 1 and '"GET /hang HTTP/1.1" 499 ' in lines[0], lines
    assert not [r for r in caplog.records if "eof_received" in r.getMessage()
                or "SSL" in r.getMessage()], caplog.records
    assert tls_get(lb.port("web"), "a.test", pki)[1].status == 200


# ---------------------------------------------------------------- reload

def _config_file(tmp_path, text):
    path = tmp_path / "fastlb.toml"
    path.write_text(text)
    return str(path)


def _wait_log(lb, words, after=0, timeout=10):
    def seen():
        text = b"".join(lb.stderr_lines[after:]).decode()
        return text if all(w in text for w in words) else None
    return wait_for(seen, timeout)


def test_sighup_reloads_certificates_and_keeps_the_old_ones_when_the_new_are_bad(
        pki, make_backend, tmp_path):
    be = make_backend("A")
    site = Cert(str(tmp_path / "site.pem"), str(tmp_path / "site.key"), None)
    pki.a.copy_to(site.cert, site.key)
    path = _config_file(tmp_path, tls_listener(pki, site)
                        + pool("app", f"http://{HOST}:{be.port}"))
    lb = FastlbProcess(None, "--config", path)
    try:
        assert served(lb.port, "a.test", pki) == pki.a.serial
        held = tls_connect(lb.port, "a.test", pki=pki)     # stays open through the reloads

        def reload(*words):
            n = len(lb.stderr_lines)
            lb.proc.send_signal(signal.SIGHUP)
            text = _wait_log(lb, words, n)
            assert text, (words, b"".join(lb.stderr_lines[n:]).decode())
            return text

        # a new valid certificate in the same files: served after the reload
        pki.a2.copy_to(site.cert, site.key)
        text = reload("reloaded", "listener web: certificates reloaded")
        assert served(lb.port, "a.test", pki) == pki.a2.serial
        # an expired one: refused, the one before stays, the file is named
        shutil.copyfile(pki.expired.cert, site.cert)
        shutil.copyfile(pki.expired.key, site.key)
        text = reload("reload refused")
        assert f'{path}:5: listeners.web.tls.certificates[0].cert: "{site.cert}": expired on ' \
            in text, text
        assert served(lb.port, "a.test", pki) == pki.a2.serial
        # a key that is not the certificate's
        shutil.copyfile(pki.a.cert, site.cert)
        shutil.copyfile(pki.b.key, site.key)
        text = reload("reload refused")
        assert f'listeners.web.tls.certificates[0].key: "{site.key}" is not the key of ' \
               f'"{site.cert}"' in text, text
        assert served(lb.port, "a.test", pki) == pki.a2.serial
        # no key at all
        os.unlink(site.key)
        text = reload("reload refused")
        assert f'certificates[0].key: "{site.key}": No such file or directory' in text, text
        assert served(lb.port, "a.test", pki) == pki.a2.serial
        # fixed: the new one is served
        pki.a.copy_to(site.cert, site.key)
        reload("reloaded", "certificates reloaded")
        assert served(lb.port, "a.test", pki) == pki.a.serial
        # the connection opened before the reloads kept its certificate, and works
        assert serial_of(held) == pki.a.serial
        held.sendall(b"GET /held HTTP/1.1\r\nHost: a.test\r\n\r\n")
        assert Reader(held).read_response().json()["target"] == "/held"
        held.close()
        assert not any(b"Traceback" in ln for ln in lb.stderr_lines)
    finally:
        lb.terminate()


def test_reload_turns_tls_on_and_off_on_a_kept_listener(pki, make_backend, make_config_lb):
    be = make_backend("A")
    plain = ('[listeners.web]\nbind = "127.0.0.1:0"\ndefault_pool = "app"\n'
             + pool("app", f"http://{HOST}:{be.port}"))
    lb = make_config_lb(plain)
    port = lb.port("web")
    with raw_connect(port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert Reader(s).read_response().status == 200
    text = plain.replace('default_pool = "app"\n', 'default_pool = "app"\n[listeners.web.tls]\n'
                         f'certificates = [{certificates(pki.b)}]\n', 1)
    summary = lb.reload(text)     # (the same bind: the listener and its port are kept)
    assert "listener web: TLS on" in summary
    assert wait_for(lambda: _serial_or_none(port, "b.test", pki) == pki.b.serial)
    summary = lb.reload(plain)
    assert "listener web: TLS off" in summary

    def plain_ok():
        try:
            with raw_connect(port) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                return Reader(s, 2).read_response().status == 200
        except (OSError, EOFError, TimeoutError):
            return False
    assert wait_for(plain_ok)


def _serial_or_none(port, sni, pki):
    try:
        return served(port, sni, pki)
    except (OSError, ssl.SSLError):
        return None


# ---------------------------------------------------------------- https backends

@pytest.fixture
def https_backend(pki, make_backend):
    """An HTTPS echo backend with the test CA's certificate for 127.0.0.1 and
    localhost; ``be.handshakes`` lists the server name of each handshake."""
    def make(cert=None, name="S", **kw):
        ctx = pki.server_context(cert or pki.backend)
        names = []

        def record(sslobj, server_name, _ctx):
            names.append(server_name)
        ctx.sni_callback = record
        be = make_backend(name, ssl=ctx, **kw)
        be.handshakes = names
        return be
    return make


def test_https_backend_verified_with_the_ca_file(pki, https_backend, make_config_lb):
    be = https_backend()
    lb = make_config_lb('[listeners.web]\nbind = "127.0.0.1:0"\ndefault_pool = "app"\n'
                        + pool("app", f"https://{HOST}:{be.port}",
                               extra=f'[pools.app.tls]\nca_file = "{pki.ca}"'))
    for i in range(5):
        resp = get(lb.port("web"), f"/{i}")
        assert resp.status == 200, resp
        assert resp.json()["target"] == f"/{i}"
    # pooled: one TLS connection (one handshake) carried the five requests
    assert be.connections == 1 and len(be.handshakes) == 1
    assert [r.index_on_conn for r in be.requests] == [0, 1, 2, 3, 4]
    assert be.handshakes == [None]      # an IP address: no SNI (RFC 6066 3)
    b = lb.proxy.pools["app"].backends[0]
    assert b.url == f"https://{HOST}:{be.port}"


@pytest.mark.parametrize("tls_listener_too", [False, True], ids=["http-listener", "tls-listener"])
def test_https_backend_big_bodies_to_a_slow_client_arrive_exact(pki, https_backend, make_config_lb,
                                                                 tls_listener_too):
    """A TLS backend's reads go into the proxy's read buffer too (uvloop's
    TLS transport decrypts into it): 4 MiB bodies of a known pattern, length
    framed and chunked, reach a client that reads slowly byte for byte, over
    a plain or a TLS listener (whose transport keeps views of the buffer)."""
    big = pattern(61, 4 << 20)

    def handler(be, req):
        if req.target == "/chunked":
            return [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                    chunked(big, random.Random(2))]
        return [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big), big]

    be = https_backend(handler=handler)
    listener = (tls_listener(pki, pki.a) if tls_listener_too
                else '[listeners.web]\nbind = "127.0.0.1:0"\ndefault_pool = "app"\n')
    lb = make_config_lb(listener + pool("app", f"https://{HOST}:{be.port}",
                                        extra=f'[pools.app.tls]\nca_file = "{pki.ca}"'))
    port = lb.port("web")
    if tls_listener_too:
        raw = slow_socket(port)
        s = client_context(pki).wrap_socket(raw, server_hostname="a.test")
    else:
        s = slow_socket(port)
    with s:
        s.sendall(b"GET /cl HTTP/1.1\r\nHost: t\r\n\r\nGET /chunked HTTP/1.1\r\nHost: t\r\n\r\n")
        rd = SlowReader(s)
        for _ in range(2):
            r = rd.read_response()
            assert r.status == 200 and r.body == big


def test_https_backend_without_the_ca_is_a_502_said_in_the_log(pki, https_backend,
                                                                make_config_lb, caplog):
    be = https_backend()
    lb = make_config_lb('[listeners.web]\nbind = "127.0.0.1:0"\ndefault_pool = "app"\n'
                        + pool("app", f"https://{HOST}:{be.port}"))    # the system's CAs
    caplog.set_level(logging.WARNING, logger="fastlb")
    assert get(lb.port("web")).status == 502
    assert get(lb.port("web")).status == 502
    assert be.requests == []
    lines = [r.getMessage() for r in caplog.records if r.name == "fastlb"]
    want = (f"backend https://{HOST}:{be.port}: TLS certificate not accepted: unable to get "
            "local issuer certificate")
    assert lines.count(want) == 1, lines    # once (not once per request)


def test_https_backend_without_verification(pki, https_backend, make_config_lb):
    be = https_backend(pki.internal)        # not even for this address
    lb = make_config_lb('[listeners.web]\nbind = "127.0.0.1:0"\ndefault_pool = "app"\n'
                        + pool("app", f"https://{HOST}:{be.port}",
                               extra="[pools.app.tls]\nverify = false"))
    assert get(lb.port("web")).json()["backend"] == "S"


def test_https_backend_server_name(pki, https_backend, make_config_lb):
    """A backend reached by address whose certificate is for a name: without
    server_name the name check fails (502), with it the name is sent as SNI
    and checked."""
    be = https_backend(pki.internal)
    base = ('[listeners.web]\nbind = "127.0.0.1:0"\ndefault_pool = "app"\n'
            + pool("app", f"https://{HOST}:{be.port}",
                   extra=f'[pools.app.tls]\nca_file = "{pki.ca}"\n'))
    lb = make_config_lb(base)
    assert get(lb.port("web")).status == 502
    lb2 = make_config_lb(base + 'server_name = "backend.internal"\n')
    resp = get(lb2.port("web"))
    assert resp.status == 200 and resp.json()["backend"] == "S"
    assert be.handshakes[-1] == "backend.internal"


def test_https_backend_flags(pki, https_backend):
    be = https_backend(pki.internal)
    lb = FastlbProcess(None, "--listen", f"{HOST}:0", "--backend", f"https://{HOST}:{be.port}",
                       "--backend-ca-file", pki.ca, "--backend-server-name", "backend.internal")
    try:
        for _ in range(3):
            assert get(lb.port).json()["backend"] == "S"
        assert be.connections == 1
    finally:
        lb.terminate()
    lb = FastlbProcess(None, "--listen", f"{HOST}:0", "--backend", f"https://{HOST}:{be.port}",
                       "--backend-no-verify")
    try:
        assert get(lb.port).json()["backend"] == "S"
    finally:
        lb.terminate()


def test_https_backend_health_checks_speak_tls(pki, https_backend, make_config_lb, caplog):
    good = https_backend(name="G")
    bad = https_backend(pki.internal, name="B")     # fails verification for 127.0.0.1
    caplog.set_level(logging.INFO, logger="fastlb.health")
    lb = make_config_lb('[listeners.web]\nbind = "127.0.0.1:0"\ndefault_pool = "app"\n'
                        + pool("app", f"https://{HOST}:{good.port}", f"https://{HOST}:{bad.port}",
                               extra=f'[pools.app.tls]\nca_file = "{pki.ca}"\n'
                               '[pools.app.health]\npath = "/health"\ninterval = 0.2\n'))
    assert wait_for(lambda: any(r.target == "/health" for r in good.requests))
    want = f"backend https://{HOST}:{bad.port} is DOWN: first check failed (TLS certificate " \
           "not accepted: IP address mismatch"
    assert wait_for(lambda: any(want in r.getMessage() for r in caplog.records)), \
        [r.getMessage() for r in caplog.records]
    assert bad.requests == []
    assert {get(lb.port("web")).json()["backend"] for _ in range(4)} == {"G"}


def test_reload_keeps_pooled_tls_connections_unless_the_tls_settings_change(
        pki, https_backend, make_config_lb):
    be = https_backend()
    text = ('[listeners.web]\nbind = "127.0.0.1:0"\ndefault_pool = "app"\n'
            + pool("app", f"https://{HOST}:{be.port}",
                   extra=f'retries = 0\n[pools.app.tls]\nca_file = "{pki.ca}"\n'))
    lb = make_config_lb(text)
    port = lb.port("web")
    assert get(port).json()["conn"] == 0
    counters = lambda: lb.lt.call_soon(lambda: lb.proxy.pools["app"].backends[0].requests)  # noqa
    # the same TLS settings: the same backend, its pooled connection reused
    lb.reload(text.replace("retries = 0", "retries = 1"))
    assert get(port).json()["conn"] == 0 and counters() == 2
    # other TLS settings: a new connection, made with them; the counters go on
    summary = lb.reload(text.replace(f'ca_file = "{pki.ca}"', "verify = false"))
    assert "pool app: TLS of 1 backend changed" in summary
    assert get(port).json()["conn"] == 1 and counters() == 3
    assert wait_for(lambda: len(be.open_conns) == 1)    # the old one was closed


# ---------------------------------------------------------------- workers

def test_tls_with_workers_serves_on_every_worker_and_reloads(pki, make_backend, tmp_path):
    from test_workers import children, owner

    be = make_backend("A")
    site = Cert(str(tmp_path / "site.pem"), str(tmp_path / "site.key"), None)
    pki.a.copy_to(site.cert, site.key)
    path = _config_file(tmp_path, "workers = 2\n" + tls_listener(pki, site, pki.b)
                        + pool("app", f"http://{HOST}:{be.port}"))
    lb = FastlbProcess(None, "--config", path)
    try:
        workers = wait_for(lambda: len(children(lb.proc.pid)) == 2 and children(lb.proc.pid))
        assert workers and len(workers) == 2
        seen = set()
        socks = []
        for i in range(24):
            s = tls_connect(lb.port, "b.test" if i % 2 else "a.test", pki=pki)
            socks.append(s)
            seen.add(owner(workers, lb.port, s))
            assert serial_of(s) == (pki.b.serial if i % 2 else pki.a.serial)
            s.sendall(b"GET /w HTTP/1.1\r\nHost: a.test\r\n\r\n")
            doc = Reader(s).read_response().json()
            assert dict(doc["headers"])["X-Forwarded-Proto"] == "https"
        for s in socks:
            s.close()
        assert seen == set(workers)
        # a reload with a new certificate: the new generation serves it everywhere
        pki.a2.copy_to(site.cert, site.key)
        n = len(lb.stderr_lines)
        lb.proc.send_signal(signal.SIGHUP)
        assert _wait_log(lb, ["reloaded", "generation 2 serves"], n, 30)
        assert wait_for(lambda: all(served(lb.port, "a.test", pki) == pki.a2.serial
                                    for _ in range(8)), 10)
    finally:
        assert lb.terminate(20) == 0
    assert not any(b"Traceback" in ln for ln in lb.stderr_lines)


# ---------------------------------------------------------------- tunnels

def test_websocket_over_a_tls_listener(pki, ws_backend, make_config_lb):
    lb = make_config_lb(tls_listener(pki, pki.a)
                        + pool("app", f"http://{ws_backend.addr[0]}:{ws_backend.addr[1]}"))
    port = lb.port("web")

    async def go():
        ctx = client_context(pki)
        async with ws_connect(f"wss://{HOST}:{port}/echo", ssl=ctx, server_hostname="a.test",
                              ping_interval=None, max_size=None) as ws:
            await ws.send("héllo over tls")
            assert await ws.recv() == "héllo over tls"
            blob = os.urandom(1 << 20)
            await ws.send(blob)
            assert await ws.recv() == blob
            pong = await ws.ping(b"p")
            await asyncio.wait_for(pong, 5)
        async with ws_connect(f"wss://{HOST}:{port}/close", ssl=ctx, server_hostname="a.test",
                              ping_interval=None) as ws:
            await ws.send("bye")
            with pytest.raises(Exception):
                await ws.recv()
            return ws.close_code

    code = asyncio.run(asyncio.wait_for(go(), 30))
    assert code == 4002
    assert wait_for(lambda: lb.lt.call_soon(lambda: (lb.proxy.tunnels, len(lb.proxy.clients)))
                    == (0, 0))
    assert lb.lt.call_soon(lambda: dict(zip(L_NAMES, lb.proxy.fronts["web"].ctr)))["tunnels_total"] == 2


def _tls_layer_warnings(caplog):
    """What uvloop's TLS layer says when a protocol misuses it (an EOF kept
    open, writes after the close)."""
    return [r.getMessage() for r in caplog.records
            if "eof_received" in r.getMessage() or "SSL connection is closed" in r.getMessage()]


def test_tunnel_over_tls_ends_at_the_clients_close_notify(pki, tunnel_backend, make_config_lb,
                                                          caplog):
    """Over TLS there is no half-close: a client's close_notify ends the
    tunnel (both connections close), with nothing written after it."""
    caplog.set_level(logging.WARNING)
    lb = make_config_lb(tls_listener(pki, pki.a)
                        + pool("app", f"http://{HOST}:{tunnel_backend.addr[1]}"))
    s = tls_connect(lb.port("web"), "a.test", pki=pki)
    s.sendall(UPGRADE % b"/")
    r = Reader(s)
    assert r._until(b"\r\n\r\n", time.monotonic() + 5) == SWITCHED
    s.sendall(b"over tls")
    assert r._exactly(8, time.monotonic() + 5) == b"over tls"
    s.unwrap().close()      # close_notify, answered
    assert wait_for(lambda: tunnel_backend.conns and tunnel_backend.conns[0].closed)
    assert wait_for(lambda: lb.lt.call_soon(lambda: (lb.proxy.tunnels, len(lb.proxy.clients),
                                                     lb.proxy.upstreams)) == (0, 0, 0))
    assert _tls_layer_warnings(caplog) == []


def test_client_half_close_ends_a_tunnel_to_a_tls_backend(pki, backend_loop, make_config_lb,
                                                          caplog):
    """A TLS backend cannot be half-closed: a plain client's EOF ends the
    tunnel instead of leaving it open until the tunnel timeout."""
    caplog.set_level(logging.WARNING)
    be = TunnelBackend(backend_loop, ssl=pki.server_context(pki.backend))
    try:
        lb = make_config_lb('[listeners.web]\nbind = "127.0.0.1:0"\ndefault_pool = "app"\n'
                            + pool("app", f"https://{HOST}:{be.addr[1]}",
                                   extra=f'[pools.app.tls]\nca_file = "{pki.ca}"'))
        with raw_connect(lb.port("web")) as s:
            s.sendall(UPGRADE % b"/")
            r = Reader(s)
            assert r._until(b"\r\n\r\n", time.monotonic() + 5) == SWITCHED
            s.sendall(b"to tls")
            assert r._exactly(6, time.monotonic() + 5) == b"to tls"
            s.shutdown(socket.SHUT_WR)
            data, closed = recv_until_close(s, 3)
        assert closed
        assert wait_for(lambda: lb.lt.call_soon(lambda: (lb.proxy.tunnels,
                                                         lb.proxy.upstreams)) == (0, 0))
        assert wait_for(lambda: be.conns and be.conns[0].closed)
    finally:
        be.stop()


def test_websocket_to_a_wss_backend(pki, backend_loop, make_config_lb, caplog):
    from websockets.asyncio.server import serve as ws_serve

    async def echo(ws):
        async for msg in ws:
            await ws.send(msg)

    async def start():
        return await ws_serve(echo, HOST, 0, ssl=pki.server_context(pki.backend),
                              ping_interval=None)
    server = backend_loop.call(start())
    try:
        bport = server.sockets[0].getsockname()[1]
        lb = make_config_lb(tls_listener(pki, pki.a)
                            + pool("app", f"https://{HOST}:{bport}",
                                   extra=f'[pools.app.tls]\nca_file = "{pki.ca}"'))

        async def go():
            async with ws_connect(f"wss://{HOST}:{lb.port('web')}/", ssl=client_context(pki),
                                  server_hostname="a.test", ping_interval=None) as ws:
                for i in range(20):
                    await ws.send(f"m{i}")
                    assert await ws.recv() == f"m{i}"

        caplog.set_level(logging.WARNING)
        asyncio.run(asyncio.wait_for(go(), 30))
        assert wait_for(lambda: lb.lt.call_soon(lambda: lb.proxy.tunnels) == 0)
        assert _tls_layer_warnings(caplog) == []
    finally:
        backend_loop.call(_close_server(server))


async def _close_server(server):
    server.close()
    await asyncio.wait_for(server.wait_closed(), 5)


# ---------------------------------------------------------------- configuration

def _errors(text):
    with pytest.raises(ConfigError) as info:
        loads(text, "t.toml", resolve=False)
    return [str(e) for e in info.value.errors]


def test_config_errors_name_the_file_and_the_problem(pki, tmp_path):
    enc = tmp_path / "enc.key"
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    k = load_pem_private_key(open(pki.a.key, "rb").read(), None)
    enc.write_bytes(k.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.BestAvailableEncryption(b"secret")))
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    missing = tmp_path / "missing.pem"
    certs = [f'{{ cert = "{pki.expired.cert}", key = "{pki.expired.key}" }}',
             f'{{ cert = "{pki.a.cert}", key = "{pki.b.key}" }}',
             f'{{ cert = "{pki.a.cert}", key = "{enc}" }}',
             f'{{ cert = "{junk}", key = "{pki.a.key}" }}',
             f'{{ cert = "{missing}", key = "{pki.a.key}" }}',
             f'{{ cert = "{pki.a.cert}", key = "{junk}" }}',
             f'{{ cert = "{pki.a.cert}" }}',
             f'{{ cert = "{pki.a.cert}", key = "{pki.a.key}", chain = "x" }}']
    text = ('[listeners.web]\nbind = "127.0.0.1:0"\ndefault_pool = "app"\n[listeners.web.tls]\n'
            "certificates = [\n" + ",\n".join(certs) + ",\n]\nhandshake_timout = 5\n"
            + pool("app", "https://127.0.0.1:9", extra='[pools.app.tls]\nca_file = "'
                   + str(junk) + '"\nserver_name = "bad name"\nverfy = false\n'))
    p = "listeners.web.tls"
    assert _errors(text) == [
        f't.toml:6: {p}.certificates[0].cert: "{pki.expired.cert}": expired on '
        + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(
            x509.load_pem_x509_certificate(open(pki.expired.cert, "rb").read())
            .not_valid_after_utc.timestamp())),
        f't.toml:7: {p}.certificates[1].key: "{pki.b.key}" is not the key of "{pki.a.cert}"',
        f't.toml:8: {p}.certificates[2].key: "{enc}": the key is encrypted (fastlb needs it '
        "without a passphrase)",
        f't.toml:9: {p}.certificates[3].cert: "{junk}": no certificate in it (expected PEM: '
        "-----BEGIN CERTIFICATE-----)",
        f't.toml:10: {p}.certificates[4].cert: "{missing}": No such file or directory',
        f't.toml:11: {p}.certificates[5].key: "{junk}": no private key in it (expected PEM: '
        "-----BEGIN PRIVATE KEY-----)",
        f"t.toml:12: {p}.certificates[6]: missing key (the key file, PEM)",
        f't.toml:13: {p}.certificates[7].chain: unknown key "chain" (known: cert, key)',
        f't.toml:15: {p}.handshake_timout: unknown key "handshake_timout" (did you mean '
        '"handshake_timeout"?)',
        f't.toml:19: pools.app.tls.ca_file: "{junk}": no certificate in it (expected PEM: '
        "-----BEGIN CERTIFICATE-----)",
        f't.toml:20: pools.app.tls.server_name: "bad name" is not a host name; expected a name '
        "such as api.internal (the name the backends' certificate is for)",
        't.toml:21: pools.app.tls.verfy: unknown key "verfy" (did you mean "verify"?)',
    ]
    assert _errors('[listeners.web]\ndefault_pool = "app"\n[listeners.web.tls]\n'
                   "handshake_timeout = 0\n" + pool("app", "http://127.0.0.1:9")) == [
        't.toml:3: listeners.web.tls: missing certificates (certificates = [{ cert = "a.pem", '
        'key = "a.key" }])',
        "t.toml:4: listeners.web.tls.handshake_timeout: must be greater than 0, got 0"]


def test_config_warnings(pki):
    text = (tls_listener(pki, pki.a, pki.a2) + pool("app", "http://127.0.0.1:9",
                                                    extra="[pools.app.tls]\nverify = false\n"))
    c = loads(text, "t.toml", resolve=False)
    assert [str(w) for w in c.warnings] == [
        "t.toml:5: listeners.web.tls.certificates[1].cert: warning: a.test is a name of "
        "certificates[0] too: that one is used for it",
        "t.toml:5: listeners.web.tls.certificates[1].cert: warning: www.a.test is a name of "
        "certificates[0] too: that one is used for it",
        "t.toml:9: pools.app.tls: warning: only used by https:// backends; this pool has none",
    ]
    tls = c.listeners["web"].tls
    assert [ce.names for ce in tls.certificates] == [("a.test", "www.a.test")] * 2
    assert tls.handshake_timeout == 10.0
    assert "PRIVATE" not in repr(c)     # the key's bytes are never shown


def test_check_config_reports_a_bad_certificate(pki, tmp_path):
    path = _config_file(tmp_path, tls_listener(pki, pki.expired)
                        + pool("app", "http://127.0.0.1:9"))
    r = run_fastlb("check-config", path)
    assert r.returncode == 1
    assert f'listeners.web.tls.certificates[0].cert: "{pki.expired.cert}": expired on' \
        in r.stdout, r.stdout
    path = _config_file(tmp_path, tls_listener(pki, pki.a) + pool("app", "http://127.0.0.1:9"))
    r = run_fastlb("check-config", path)
    assert r.returncode == 0 and r.stdout.endswith("OK (1 listener, 1 pool, 0 routes, 1 backend)\n")


def test_tls_flags_build_the_model_of_the_equivalent_file(pki):
    from fastlb import cli
    from fastlb.config import from_flags
    from fastlb.runtime import build

    argv = ["--backend", "https://127.0.0.1:9443", "--backend", "http://127.0.0.1:9001",
            "--tls-cert", pki.a.cert, "--tls-key", pki.a.key, "--tls-cert", pki.b.cert,
            "--tls-key", pki.b.key, "--tls-handshake-timeout", "3",
            "--backend-ca-file", pki.ca, "--backend-server-name", "Backend.Internal"]
    args = cli.build_parser().parse_args(["serve"] + argv)
    text = ('[listeners.default]\ndefault_pool = "default"\n[listeners.default.tls]\n'
            f"certificates = [{certificates(pki.a, pki.b)}]\nhandshake_timeout = 3\n"
            '[pools.default]\nbackends = ["https://127.0.0.1:9443", "http://127.0.0.1:9001"]\n'
            f'[pools.default.tls]\nca_file = "{pki.ca}"\nserver_name = "backend.internal"\n')
    from_file = loads(text, "eq.toml", resolve=False)
    assert from_flags(args) == from_file
    specs = [cli.parse_backend_spec(b) for b in args.backend]
    as_run = build.as_config(cli.options_from_args(
        args, [s[0] for s in specs], [s[1] for s in specs],
        [cli.backend_scheme(b) for b in args.backend]))
    assert (as_run.listeners, as_run.pools) == (from_file.listeners, from_file.pools)
    assert from_file.pools["default"].backends[0].port == 9443
    assert loads(text.replace("9443", ""), "eq.toml", resolve=False) \
        .pools["default"].backends[0].port == 443


@pytest.mark.parametrize("argv, message", [
    (["--tls-cert", "a.pem"], "--tls-key: 1 --tls-cert and 0 --tls-key: give each certificate "
                              "its key (--tls-cert FILE --tls-key FILE, repeated for more)"),
    (["--tls-cert", "/nonexistent/a.pem", "--tls-key", "a.key"],
     '--tls-cert: "/nonexistent/a.pem": No such file or directory'),
    (["--backend-server-name", "a b"], '--backend-server-name: "a b" is not a host name; '
                                       "expected a name such as api.internal (the name the "
                                       "backends' certificate is for)"),
], ids=["cert-without-key", "missing-cert", "bad-server-name"])
def test_tls_flag_errors_name_the_flag(argv, message):
    r = run_fastlb("serve", "--listen", f"{HOST}:0", "--backend", "http://127.0.0.1:9", *argv,
                   timeout=15)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"fastlb: error: {message}"], r.stderr


def test_tls_flags_cannot_be_combined_with_a_file(pki, tmp_path):
    path = _config_file(tmp_path, tls_listener(pki, pki.a) + pool("app", "http://127.0.0.1:9"))
    r = run_fastlb("serve", "--config", path, "--tls-cert", pki.b.cert, "--tls-key", pki.b.key,
                   timeout=15)
    assert r.returncode == 2
    assert "fastlb: error: --tls-cert: cannot be combined with --config: it is " \
           "tls.certificates[].cert in the file's [listeners.NAME] tables" in r.stderr, r.stderr


def test_certificate_files_as_servers_write_them(pki, tmp_path):
    """The certificate followed by its chain, CRLF line ends, the key in the
    certificate's file: all load, with the names of the first certificate."""
    from fastlb.runtime import tls

    chain = tmp_path / "chain.pem"
    chain.write_bytes((open(pki.wild.cert, "rb").read() + open(pki.ca, "rb").read())
                      .replace(b"\n", b"\r\n"))
    c = tls.load_certificate(str(chain), pki.wild.key)
    assert c.names == ("*.wild.test",)
    both = tmp_path / "both.pem"
    both.write_bytes(open(pki.b.key, "rb").read() + open(pki.b.cert, "rb").read())
    assert tls.load_certificate(str(both), str(both)).names == ("b.test",)


def test_damaged_certificates_are_refused_never_a_traceback(pki, tmp_path):
    """Every truncation of a certificate's DER and seeded byte changes in it:
    each loads or is refused with the reason, nothing else escapes."""
    import base64
    import random

    from fastlb.runtime import tls

    der = ssl.PEM_cert_to_DER_cert(open(pki.b.cert).read())
    path = tmp_path / "damaged.pem"
    rng = random.Random(12)
    cases = [der[:n] for n in range(0, len(der), 3)]
    for _ in range(300):
        b = bytearray(der)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        cases.append(bytes(b))
    refused = 0
    for case in cases:
        path.write_bytes(b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(case)
                         + b"-----END CERTIFICATE-----\n")
        try:
            tls.load_certificate(str(path), pki.b.key)
        except tls.CertificateProblem as e:
            refused += 1
            assert f'"{path}"' in str(e), e
    assert refused >= len(der) // 3     # every truncation at least


def test_certificate_names_and_dates_match_the_stdlib_decoder(pki):
    """The DER reading of fastlb.runtime.tls against CPython's own decoder of
    a certificate file (its test helper) on every test certificate."""
    from fastlb.runtime import tls

    decode = getattr(ssl._ssl, "_test_decode_cert", None)
    if decode is None:
        pytest.skip("this Python has no ssl._ssl._test_decode_cert")
    for name in ("a", "b", "wild", "exact", "cn", "expired", "backend", "internal"):
        c = getattr(pki, name)
        want = decode(c.cert)
        dns = [v.lower() for k, v in want.get("subjectAltName", ()) if k == "DNS"]
        cn = [v for rdn in want["subject"] for k, v in rdn if k == "commonName"]
        der = ssl.PEM_cert_to_DER_cert(open(c.cert).read())
        names, not_before, not_after = tls.cert_info(der)
        assert list(names) == (dns or cn[-1:])
        assert not_after == ssl.cert_time_to_seconds(want["notAfter"])
        assert not_before == ssl.cert_time_to_seconds(want["notBefore"])


def test_proxy_protocol_on_a_tls_listener_is_refused_naming_the_setting(pki, tmp_path):
    """The PROXY protocol header comes before the TLS handshake, and fastlb
    reads it only on plain listeners: asking for both is a configuration
    error (file and flags), never a listener that fails every connection."""
    path = _config_file(tmp_path, tls_listener(pki, pki.a).replace(
        "[listeners.web.tls]", "proxy_protocol = true\n[listeners.web.tls]")
        + pool("app", "http://127.0.0.1:9"))
    r = run_fastlb("check-config", path)
    assert r.returncode == 1
    assert "listeners.web.proxy_protocol: is not supported on a TLS listener" in r.stdout, r.stdout
    r = run_fastlb("serve", "--listen", f"{HOST}:0", "--backend", "http://127.0.0.1:9",
                   "--tls-cert", pki.a.cert, "--tls-key", pki.a.key, "--proxy-protocol",
                   timeout=15)
    assert r.returncode == 2
    assert "--proxy-protocol: is not supported on a TLS listener" in r.stderr, r.stderr
