"""Value checks shared by the command line, the configuration file and ``HealthConfig``.

Each check takes a value and returns it normalised, or raises ``ConfigError``
whose message is the bare reason ("must be greater than 0, got 0"): no flag
or key name, because the caller knows where the value came from and says so
(``--connect-timeout: ...`` on the command line, ``fastlb.toml:7:
pools.app.connect_timeout: ...`` in a file). ``number_problem`` returns the
reason instead of raising, for callers that collect every problem at once.

Nothing here imports the rest of fastlb but ``fastlb.errors``, so the command
line, the health checker and the configuration loader can all use it.
"""
import ipaddress
import json
import math
import os
import re
import socket
import urllib.parse

from fastlb.errors import ConfigError

MAX_WEIGHT = 10000
LOG_LEVELS = ("debug", "info", "warning", "error")

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")     # RFC 9110 token
_FIELD_VALUE = re.compile(r"[\t -~\x80-\xff]*\Z")          # no CR, LF, NUL or controls
_HOST_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
_PATH = re.compile(r"/[!-~]*\Z")                           # visible ASCII, no spaces


def show(value):
    """A value as the user wrote it, for messages: TOML syntax for scalars."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (list, tuple)):
        return "an array"
    return str(value)


LARGEST = 2 ** 31 - 1     # counts, sizes and seconds the data path keeps in C ints


def number_problem(value, *, integer=False, minimum=0.0, strict=False):
    """None if ``value`` is a finite number (an ``int`` if ``integer``) at least
    ``minimum`` (greater than it if ``strict``); else the reason it is not."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        return f"expected {'an integer' if integer else 'a number'}, got {show(value)}"
    if not math.isfinite(value):
        return f"expected a finite number, got {show(value)}"
    if value > LARGEST:
        return f"too large (at most {LARGEST}), got {show(value)}"
    if value < minimum or (strict and value == minimum):
        rel = "greater than" if strict else "at least"
        return f"must be {rel} {minimum:g}, got {show(value)}"
    return None


# Names a request id cannot use: the fields fastlb reads or writes itself.
RESERVED_FIELDS = frozenset([
    "host", "content-length", "transfer-encoding", "connection", "keep-alive",
    "proxy-connection", "te", "trailer", "upgrade", "expect", "x-forwarded-for",
    "x-forwarded-proto", "x-forwarded-host", "forwarded", "via", "content-type",
    "retry-after"])


def request_id_header(value):
    """The name of the request-id field (``request_id_header``,
    ``--request-id-header``): a field name (an RFC 9110 token, at most 64
    characters) that is none of the fields fastlb reads or writes itself."""
    if not isinstance(value, str) or not _TOKEN.match(value) or len(value) > 64:
        raise ConfigError(f"expected a header field name such as X-Request-Id (letters, "
                          f"digits and !#$%&'*+-.^_`|~, at most 64), got {show(value)}")
    if value.lower() in RESERVED_FIELDS:
        raise ConfigError(f"{show(value)} is a field fastlb reads or writes itself; "
                          f"use another name, such as X-Request-Id")
    return value


def trusted_networks(values):
    """The networks of ``trusted_proxies`` / ``--trusted-proxy``: an iterable of
    strings such as ``"10.0.0.0/8"``, ``"127.0.0.1"`` (one address) or
    ``"::1/128"`` -> a tuple of normalised CIDR strings, each once. A network
    with host bits set (``10.0.0.1/8``) is refused, the message naming the
    network meant."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise ConfigError(f'expected an array of networks (["10.0.0.0/8", ...]), '
                          f"got {show(values)}")
    out = []
    for v in values:
        if not isinstance(v, str):
            raise ConfigError(f'expected a network such as "10.0.0.0/8", got {show(v)}')
        try:
            net = ipaddress.ip_network(v.strip(), strict=True)
        except ValueError as e:
            if "has host bits set" in str(e):
                meant = ipaddress.ip_network(v.strip(), strict=False)
                raise ConfigError(f"{show(v)} has host bits set (the network is "
                                  f'"{meant}")') from None
            raise ConfigError(f'{show(v)} is not an IP network (such as "10.0.0.0/8" or '
                              '"127.0.0.1")') from None
        if str(net) not in out:
            out.append(str(net))
    return tuple(out)


PROXY_PROTOCOL_VERSIONS = ("v1", "v2")
# with the name of the setting each needs: "proxy_protocol = true", "--proxy-protocol"
PROXY_FROM_ALONE = ("needs {} (without it no connection is expected to start with a PROXY "
                    "protocol header)")
HEALTH_PROXY_ALONE = "needs {} (the checks send the header of its version)"
PROXY_WITH_TLS = ("is not supported on a TLS listener (the PROXY protocol header comes before "
                  "the TLS handshake, and fastlb reads it only on plain HTTP listeners)")


def listen_address(text):
    """``[HOST:]PORT`` (HOST may be ``[v6]``; empty HOST: all IPv4 addresses;
    no HOST: 127.0.0.1) -> ``(host, port)``."""
    host, port = "127.0.0.1", text
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1:close + 2] != ":":
            raise ConfigError(f"expected [HOST]:PORT, got {text!r}")
        host, port = text[1:close], text[close + 2:]
    elif ":" in text:
        host, _, port = text.rpartition(":")
        host = host or "0.0.0.0"
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"invalid port in {text!r}")
    return host, int(port)


def format_address(host, port):
    """``host:port``, with IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def backend_url(text):
    """``http://HOST[:PORT]`` or ``https://HOST[:PORT]`` -> ``(host, port)``
    (``backend_endpoint`` without the scheme)."""
    return backend_endpoint(text)[1:]


DEFAULT_PORTS = {"http": 80, "https": 443}


def backend_endpoint(text):
    """``http://HOST[:PORT]`` or ``https://HOST[:PORT]`` -> ``(scheme, host,
    port)``; the scheme is required, PORT defaults to 80 (http) or 443
    (https). HOST is a name, an IPv4 address or ``[IPv6]``; it comes back
    lower-cased and without brackets (as ``urllib.parse`` gives it)."""
    if "://" not in text:
        raise ConfigError("no scheme: expected http://HOST[:PORT] or https://HOST[:PORT]")
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if parts.scheme not in DEFAULT_PORTS:
        raise ConfigError("only http:// and https:// backends are supported")
    if not parts.hostname:
        raise ConfigError("missing host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError("a backend is host and port only, no path")
    if port == 0:
        raise ConfigError("port must be from 1 to 65535")
    return parts.scheme, parts.hostname, DEFAULT_PORTS[parts.scheme] if port is None else port


def server_name(text):
    """A TLS server name (SNI) for backends: a DNS name (no wildcard, no
    port), or an IP address (then no SNI is sent, and the certificate must
    name that address). Returned lower-cased, without a trailing dot."""
    host = text.strip().lower()
    if is_ip(host):
        return host
    labels = host.rstrip(".").split(".")
    if not host or len(host) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        raise ConfigError(f"{show(text)} is not a host name; expected a name such as "
                          "api.internal (the name the backends' certificate is for)")
    return host.rstrip(".")


def etcd_endpoint(text):
    """``http://HOST[:PORT]`` of an etcd server -> ``(host, port)``; PORT
    defaults to 2379 (etcd's client port)."""
    if "://" not in text:
        raise ConfigError("no scheme: expected http://HOST[:PORT]")
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if parts.scheme != "http":
        raise ConfigError("only http:// endpoints are supported (etcd's JSON gateway in "
                          "plain HTTP)")
    if not parts.hostname:
        raise ConfigError("missing host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError("an endpoint is host and port only, no path")
    if port == 0:
        raise ConfigError("port must be from 1 to 65535")
    return parts.hostname, 2379 if port is None else port


def weight_problem(value):
    """None if ``value`` is a valid backend weight (a whole number from 0 to 10000)."""
    problem = number_problem(value, integer=True)
    if problem is None and value > MAX_WEIGHT:
        return f"must be from 0 to {MAX_WEIGHT}, got {value}"
    return problem


def hash_key(text):
    """``ip``, ``path``, ``header:NAME``, ``cookie:NAME`` or ``query:NAME``."""
    kind, sep, name = text.partition(":")
    if kind in ("ip", "path") and not sep:
        return text
    if kind in ("header", "cookie", "query") and name and all(33 <= ord(c) < 127 for c in name):
        return text
    raise ConfigError("expected ip, path, header:NAME, cookie:NAME or query:NAME")


def hash_balance_factor_problem(value):
    """None if ``value`` is 0 (bounded load off) or at least 1."""
    problem = number_problem(value)
    if problem is None and 0 < value < 1:
        return f"must be 0 (off) or at least 1, got {show(value)}"
    return problem


def choice_problem(value, choices):
    if not isinstance(value, str) or value not in choices:
        return f"expected one of {', '.join(choices)}, got {show(value)}"
    return None


MAX_WORKERS = 512


def cpu_count():
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def workers(value):
    """``workers``: a number of worker processes, 1 to MAX_WORKERS, or
    ``"auto"`` (one per CPU). Returns the int; raises ConfigError with the reason."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return min(cpu_count(), MAX_WORKERS)
        if not text.isdigit():
            raise ConfigError(f"expected a number of workers (1 to {MAX_WORKERS}) or auto, "
                              f"got {show(value)}")
        value = int(text)
    problem = number_problem(value, integer=True, minimum=1)
    if problem is None and value > MAX_WORKERS:
        problem = f"at most {MAX_WORKERS}, got {value}"
    if problem is not None:
        raise ConfigError(problem)
    return value


def access_log_problem(value):
    """None if ``value`` is ``-``, ``off`` or a path fastlb could append to.

    Nothing is created: an existing file must be writable, a new one's
    directory must exist and be writable."""
    import os

    if value in ("-", "off"):
        return None
    if not value:
        return 'expected "-", "off" or a file path'
    if os.path.isdir(value):
        return f"{show(value)} is a directory"
    if os.path.exists(value):
        return None if os.access(value, os.W_OK) else f"{show(value)}: permission denied"
    parent = os.path.dirname(value) or "."
    if not os.path.isdir(parent):
        return f"{show(value)}: no such directory {show(parent)}"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{show(value)}: cannot create a file in {show(parent)} (permission denied)"
    return None


def header_name_problem(name):
    if not _TOKEN.match(name):
        return f"{show(name)} is not a header name (letters, digits and !#$%&'*+-.^_`|~)"
    return None


def header_value_problem(value):
    if not isinstance(value, str):
        return f"expected a string, got {show(value)}"
    if not _FIELD_VALUE.match(value):
        return f"{show(value)}: a header value has no control characters (CR, LF, NUL)"
    return None


def path_problem(value):
    """None if ``value`` is an absolute request path (visible ASCII, no spaces)."""
    if not _PATH.match(value):
        return f"expected a path starting with / (visible ASCII, no spaces), got {show(value)}"
    return None


def route_host(text):
    """A route's host: a name, ``*.`` + a name (any subdomain of it), or an IP
    address (IPv6 in brackets or bare). Returned lower-cased; no port (the
    port of a request's Host header is ignored when routing)."""
    host = text.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        bare = host[1:-1]
        try:
            ipaddress.IPv6Address(bare)
        except ValueError:
            raise ConfigError(f"{show(text)} is not an IPv6 address") from None
        return bare
    if is_ip(host):
        return host
    if ":" in host:
        raise ConfigError(f"{show(text)}: a route host has no port (the port of the "
                          "request's Host header is ignored when routing)")
    name = host[2:] if host.startswith("*.") else host
    labels = name.rstrip(".").split(".")
    if not name or not all(_HOST_LABEL.match(label) for label in labels):
        raise ConfigError(f"{show(text)} is not a host name; expected a name such as "
                          "api.example.com or a wildcard such as *.example.com")
    return ("*." if host.startswith("*.") else "") + name.rstrip(".")


def is_ip(host):
    """Whether ``host`` is an IPv4 or IPv6 address (no brackets)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def lookup_problem(host, port):
    """None if ``host`` resolves (an IP address always does), else the reason it does not."""
    if is_ip(host):
        return None
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return e.strerror or str(e)
    except (OSError, UnicodeError) as e:    # e.g. a label longer than 63 characters
        return str(e) or type(e).__name__
    return None
