"""TLS: certificates and their names, the listeners' contexts chosen by SNI,
and the contexts of https:// backends.

Loading (configuration time, ``load_certificate`` / ``load_ca``): a
certificate and its key are read once, checked (PEM, the key unencrypted and
matching the certificate, the certificate valid now), and kept as bytes in
the model (``CertificateConfig``), with the DNS names the certificate is for:
its subjectAltName DNS names, or its subject's CN when it has none (RFC 6125
6.4.4), read from the DER here (the ``ssl`` module parses no certificate it
is not given in a handshake). Problems raise ``CertificateProblem`` naming
the file (``which`` says whether it is the certificate's or the key's); the
configuration loader and the flags turn them into their messages.

Serving (``ServerTLS``, one per TLS listener): the context given to the
listening server never changes; its SNI callback, which OpenSSL runs for
every ClientHello (with ``None`` when the client sent no name), gives the
handshake the context of the certificate for that name: an exact name
first, then a wildcard for the name with its first label removed
(``*.example.com`` covers ``a.example.com``, not ``a.b.example.com`` nor
``example.com``, as clients check it), else the first certificate (the
default). A reload swaps the table the callback reads (``use``), so new
handshakes get the new certificates at once and open connections keep
theirs. Every context: TLS 1.2 at least, the ``ssl`` module's default
ciphers for servers, ALPN ``http/1.1``.

Backends (``client_context``): the system's CAs (or the pool's ``ca_file``
instead), the name checked, ALPN ``http/1.1``; or no check at all with
``verify = false``.

Contexts are built from the kept bytes: OpenSSL loads certificates from
files only, so each is written to a memfd and loaded from /proc/self/fd
(nothing touches the disk; fastlb runs on Linux).
"""
import base64
import calendar
import json
import os
import re
import ssl
import time

__all__ = ["CertificateProblem", "load_certificate", "load_ca", "expiring", "cert_info",
           "ServerTLS", "Certificates", "client_context", "describe_error", "ALPN"]

ALPN = ["http/1.1"]
MIN_VERSION = ssl.TLSVersion.TLSv1_2
# seconds a closing TLS connection waits for the peer's close_notify (uvloop's
# default is 30; a client that never answers would hold its fd that long)
SHUTDOWN_TIMEOUT = 5.0
EXPIRES_SOON = 7 * 86400    # a certificate expiring within this is a warning at load

_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.S)
_OID_CN = bytes.fromhex("550403")           # 2.5.4.3 commonName
_OID_SAN = bytes.fromhex("551d11")          # 2.5.29.17 subjectAltName


class CertificateProblem(Exception):
    """A certificate or key that cannot be used: ``which`` is ``"cert"`` or
    ``"key"`` (whose file the message is about), ``str()`` the reason,
    naming the file."""

    def __init__(self, which, message):
        super().__init__(message)
        self.which = which


# ---------------------------------------------------------------- reading certificates

def _pem_blocks(data):
    return [(m.group(1).decode("ascii"), m.group(2)) for m in _PEM.finditer(data)]


def _der_item(data, pos, end):
    """(tag, start, stop) of the DER element at ``pos`` (its contents are
    data[start:stop]); ValueError if it runs past ``end``."""
    if pos + 2 > end:
        raise ValueError("truncated")
    tag = data[pos]
    n = data[pos + 1]
    pos += 2
    if n & 0x80:
        k = n & 0x7F
        if not 1 <= k <= 4 or pos + k > end:
            raise ValueError("bad length")
        n = int.from_bytes(data[pos:pos + k], "big")
        pos += k
    if pos + n > end:
        raise ValueError("truncated")
    return tag, pos, pos + n


def _der_items(data, start, stop):
    out = []
    while start < stop:
        tag, s, e = _der_item(data, start, stop)
        out.append((tag, s, e))
        start = e
    return out


def _der_time(tag, raw):
    text = raw.decode("ascii")
    if tag == 0x17:     # UTCTime YYMMDDHHMMSSZ (RFC 5280 4.1.2.5.1)
        year = int(text[:2])
        text = ("19" if year >= 50 else "20") + text
    elif tag != 0x18:   # GeneralizedTime YYYYMMDDHHMMSSZ
        raise ValueError("bad time")
    if not text.endswith("Z") or len(text) != 15:
        raise ValueError("bad time")
    return float(calendar.timegm((int(text[:4]), int(text[4:6]), int(text[6:8]),
                                  int(text[8:10]), int(text[10:12]), int(text[12:14]))))


def _der_string(tag, raw):
    if tag == 0x1E:     # BMPString
        return raw.decode("utf-16-be")
    if tag in (0x0C, 0x13, 0x16, 0x14, 0x1A):   # UTF8, Printable, IA5, T61, Visible
        return raw.decode("utf-8" if tag == 0x0C else "latin-1")
    raise ValueError("not a string")


def cert_info(der):
    """``(names, not_before, not_after)`` of a DER certificate: the DNS names
    of its subjectAltName (lower-cased, in order), else its subject's last
    CN; its validity as Unix times. ValueError if it is no certificate."""
    _, s, e = _der_item(der, 0, len(der))
    tbs_tag, ts, te = _der_items(der, s, e)[0]
    if tbs_tag != 0x30:
        raise ValueError("no TBSCertificate")
    fields = _der_items(der, ts, te)
    if fields and fields[0][0] == 0xA0:
        fields = fields[1:]                     # version
    # serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo, ...
    if len(fields) < 6:
        raise ValueError("short TBSCertificate")
    _, vs, ve = fields[3]
    (t1, a1, b1), (t2, a2, b2) = _der_items(der, vs, ve)[:2]
    not_before = _der_time(t1, der[a1:b1])
    not_after = _der_time(t2, der[a2:b2])
    cn = None
    _, ss, se = fields[4]
    for _, rs, re_ in _der_items(der, ss, se):             # RelativeDistinguishedName (SET)
        for _, as_, ae in _der_items(der, rs, re_):         # AttributeTypeAndValue
            parts = _der_items(der, as_, ae)
            if len(parts) == 2 and der[parts[0][1]:parts[0][2]] == _OID_CN:
                tag, vs2, ve2 = parts[1]
                cn = _der_string(tag, der[vs2:ve2])
    dns = []
    for tag, xs, xe in fields[6:]:
        if tag != 0xA3:                                     # [3] extensions
            continue
        (_, ls, le), = _der_items(der, xs, xe)
        for _, es, ee in _der_items(der, ls, le):           # Extension
            parts = _der_items(der, es, ee)
            if der[parts[0][1]:parts[0][2]] != _OID_SAN:
                continue
            _, os_, oe = parts[-1]                          # extnValue OCTET STRING
            (_, gs, ge), = _der_items(der, os_, oe)         # GeneralNames
            for gtag, ns, ne in _der_items(der, gs, ge):
                if gtag == 0x82:                            # dNSName [2] IA5String
                    dns.append(der[ns:ne].decode("latin-1"))
    names = dns if dns else ([cn] if cn else [])
    out = []
    for name in names:
        name = name.strip().lower().rstrip(".")
        # a wildcard only as a whole first label (*.example.com), as clients check it
        if name and "*" not in name.partition(".")[2] and (
                "*" not in name or (name.startswith("*.") and name.count(".") >= 2)):
            if name not in out:
                out.append(name)
    return tuple(out), not_before, not_after


def _read(path, which):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CertificateProblem(which, f"{_show(path)}: {e.strerror or e}") from None


def _show(path):
    return json.dumps(path, ensure_ascii=False)


def _when(t):
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def load_certificate(cert, key, now=None):
    """Read, check and keep ``cert`` and ``key`` (paths; one file may hold
    both). Returns a ``fastlb.config.model.CertificateConfig``; raises
    CertificateProblem. A certificate that expires within a week is
    accepted; ``expiring(c)`` says so, for a warning."""
    from fastlb.config.model import CertificateConfig

    cert_pem = _read(cert, "cert")
    blocks = _pem_blocks(cert_pem)
    certs = [b for label, b in blocks if label == "CERTIFICATE"]
    if not certs:
        raise CertificateProblem("cert", f"{_show(cert)}: no certificate in it (expected PEM: "
                                         "-----BEGIN CERTIFICATE-----)")
    try:
        der = base64.b64decode(b"".join(certs[0].split()), validate=True)
        names, not_before, not_after = cert_info(der)
    except (ValueError, IndexError, UnicodeDecodeError):
        raise CertificateProblem("cert", f"{_show(cert)}: not a valid certificate") from None
    now = time.time() if now is None else now
    if not_after < now:
        raise CertificateProblem("cert", f"{_show(cert)}: expired on {_when(not_after)}")
    if not_before > now:
        raise CertificateProblem("cert", f"{_show(cert)}: not valid before "
                                         f"{_when(not_before)}")
    key_pem = _read(key, "key")
    labels = [label for label, _ in _pem_blocks(key_pem)]
    if "ENCRYPTED PRIVATE KEY" in labels or b"Proc-Type: 4,ENCRYPTED" in key_pem:
        raise CertificateProblem("key", f"{_show(key)}: the key is encrypted (fastlb needs it "
                                        "without a passphrase)")
    if not any(label.endswith("PRIVATE KEY") for label in labels):
        raise CertificateProblem("key", f"{_show(key)}: no private key in it (expected PEM: "
                                        "-----BEGIN PRIVATE KEY-----)")
    try:
        _context(cert_pem, key_pem)
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e):
            raise CertificateProblem("key", f"{_show(key)} is not the key of {_show(cert)}") \
                from None
        raise CertificateProblem("cert", f"{_show(cert)} with {_show(key)}: cannot be "
                                         f"loaded ({e.reason or e})") from None
    return CertificateConfig(cert=cert, key=key, names=names, not_after=not_after,
                             cert_pem=cert_pem, key_pem=key_pem)


def expiring(certificate, now=None):
    """A warning if ``certificate`` expires within a week, else None."""
    now = time.time() if now is None else now
    if certificate.not_after - now < EXPIRES_SOON:
        return f"{_show(certificate.cert)} expires on {_when(certificate.not_after)}"
    return None


def load_ca(path):
    """The PEM text of the CA file ``path`` (bytes), checked: at least one
    certificate that OpenSSL accepts. Raises CertificateProblem."""
    data = _read(path, "cert")
    if not any(label == "CERTIFICATE" for label, _ in _pem_blocks(data)):
        raise CertificateProblem("cert", f"{_show(path)}: no certificate in it (expected PEM: "
                                         "-----BEGIN CERTIFICATE-----)")
    try:
        ssl.create_default_context(cadata=data.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as e:
        raise CertificateProblem("cert", f"{_show(path)}: cannot be loaded "
                                         f"({getattr(e, 'reason', None) or e})") from None
    return data


# ---------------------------------------------------------------- contexts

def _memfd(data):
    fd = os.memfd_create("fastlb-tls", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        raise
    return fd


def _no_password():
    raise ssl.SSLError("the key is encrypted")


def _context(cert_pem, key_pem):
    """A server context with this certificate (its chain) and key."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = MIN_VERSION
    ctx.set_alpn_protocols(ALPN)
    fds = []
    try:
        fds.append(_memfd(cert_pem))
        fds.append(_memfd(key_pem))
        ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}",
                            password=_no_password)
    finally:
        for fd in fds:
            os.close(fd)
    return ctx


class Certificates:
    """The contexts of a listener's certificates and the SNI table over them
    (built at configuration time from a ``TLSConfig``)."""

    def __init__(self, config):
        self.config = config
        self.contexts = [_context(c.cert_pem, c.key_pem) for c in config.certificates]
        self.exact = {}
        self.wild = {}      # "example.com" -> the context of *.example.com
        for c, ctx in zip(config.certificates, self.contexts):
            for name in c.names:
                if name.startswith("*."):
                    self.wild.setdefault(name[2:], ctx)
                else:
                    self.exact.setdefault(name, ctx)
        self.default = self.contexts[0]

    def choose(self, name):
        """The context for a handshake asking for ``name`` (None: no SNI)."""
        if name:
            name = name.lower()
            if name.endswith("."):
                name = name[:-1]
            ctx = self.exact.get(name)
            if ctx is not None:
                return ctx
            dot = name.find(".")
            if dot > 0:
                ctx = self.wild.get(name[dot + 1:])
                if ctx is not None:
                    return ctx
        return self.default


class ServerTLS:
    """A TLS listener's side of the handshake (see the module docstring).
    ``context`` is given to the listening server once; ``use`` swaps the
    certificates."""

    def __init__(self, certificates):
        self.certificates = certificates
        # the default certificate is loaded here too, though the callback
        # always chooses (OpenSSL calls it for every ClientHello)
        first = certificates.config.certificates[0]
        self.context = _context(first.cert_pem, first.key_pem)
        self.context.sni_callback = self._choose

    @property
    def config(self):
        return self.certificates.config

    @property
    def handshake_timeout(self):
        return self.certificates.config.handshake_timeout

    def use(self, certificates):
        self.certificates = certificates

    def _choose(self, sslobj, name, _context):
        # runs inside OpenSSL's handshake: it must never raise (an exception
        # here would be printed and the handshake fail)
        try:
            sslobj.context = self.certificates.choose(name)
        except Exception:   # pragma: no cover - keeps the context given
            pass
        return None


def client_context(config):
    """The context for a pool's https:// backends (``BackendTLSConfig``)."""
    if config.verify:
        cadata = config.ca_pem.decode("ascii") if config.ca_pem else None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=cadata)
    else:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = MIN_VERSION
    ctx.set_alpn_protocols(ALPN)
    return ctx


def describe_error(exc):
    """A short reason for a TLS failure with a backend, for log lines."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not accepted: {exc.verify_message or exc.reason or exc}"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or str(exc)).replace("_", " ").lower()
        hint = " (does the backend speak TLS on this port?)" if "wrong version" in reason \
            or "packet length" in reason or "record layer" in reason else ""
        return f"TLS handshake failed: {reason}{hint}"
    return str(exc)
