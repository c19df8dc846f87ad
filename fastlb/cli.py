"""Command line: ``fastlb serve``, ``fastlb check-config``, ``fastlb demo``, ``fastlb --version``.

Every bad flag, bad backend URL or listening error ends in one line on
standard error and a non-zero exit status, never a traceback; a bad
configuration file (``serve --config FILE``) in one line per problem.
Backend host names are looked up once, before listening
(``check_backends_resolve``); a name that does not resolve is such an error
unless ``--allow-unresolved``.
"""
import argparse
import concurrent.futures
import logging
import re
import sys

from fastlb import validate
from fastlb.errors import ConfigError

EXIT_USAGE = 2
_LARGEST = 2 ** 31 - 1      # counts, sizes and seconds the data path keeps in C ints
EXIT_RUNTIME = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive(kind):
    def conv(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0: {text!r}")
        if not value <= _LARGEST:
            raise argparse.ArgumentTypeError(f"too large (at most {_LARGEST}): {text!r}")
        return value

    conv.__name__ = kind.__name__
    return conv


def _workers(text):
    from fastlb.validate import workers

    try:
        return workers(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_workers.__name__ = "workers"


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value > _LARGEST:
        raise argparse.ArgumentTypeError(f"too large (at most {_LARGEST}): {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _percent(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be from 0 to 100: {text!r}")
    return value


def _non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def parse_listen(text):
    """``[HOST:]PORT`` (HOST may be ``[v6]``) -> (host, port)."""
    try:
        return validate.listen_address(text)
    except ConfigError as e:
        raise ConfigError(f"--listen: {e}") from None


_PLAIN = re.compile(r"[!-~]+\Z")     # visible ASCII: shown as typed, else quoted


def _shown(text):
    return text if _PLAIN.match(text) else repr(text)


def parse_backend_spec(text):
    """``URL[,weight=N]`` -> ((host, port), weight); ``backend_scheme`` gives its scheme."""
    url, sep, opt = text.partition(",")
    weight = 1
    if sep:
        key, eq, value = opt.partition("=")
        if key.strip() != "weight" or not eq:
            raise ConfigError(f"--backend {_shown(text)}: expected URL or URL,weight=N")
        try:
            weight = int(value)
        except ValueError:
            raise ConfigError(f"--backend {_shown(text)}: weight must be a whole number") \
                from None
        if validate.weight_problem(weight):
            raise ConfigError(f"--backend {_shown(text)}: weight must be from 0 to "
                              f"{validate.MAX_WEIGHT}")
    return parse_backend(url), weight


def parse_hash_key(text):
    """``ip``, ``path``, ``header:NAME``, ``cookie:NAME`` or ``query:NAME``."""
    try:
        return validate.hash_key(text)
    except ConfigError as e:
        raise ConfigError(f"--hash-key {text!r}: {e}") from None


def parse_backend(text):
    """``http://HOST[:PORT]`` or ``https://HOST[:PORT]`` -> (host, port); the
    scheme is required.

    HOST is a name, an IPv4 address or ``[IPv6]``; PORT defaults to 80 (443).
    """
    try:
        return validate.backend_url(text)
    except ConfigError as e:
        raise ConfigError(f"--backend {_shown(text)}: {e}") from None


def backend_scheme(spec):
    """The scheme of a ``--backend URL[,weight=N]`` already parsed: http or https."""
    return spec.partition(",")[0].partition("://")[0].lower()


def check_backends_resolve(backends, urls, allow_unresolved=False, log=None):
    """Look up every backend host name once (IP literals need none), all at once.

    ``backends``: ((host, port), ...); ``urls``: the URLs as given, for messages.
    A name that does not resolve raises ``ConfigError``; with ``allow_unresolved``
    it is a warning on ``log`` instead (the data path resolves it again on
    every new connection, so a backend that comes up later is served).
    """
    names = {}
    for (host, port), url in zip(backends, urls):
        if not validate.is_ip(host):
            names.setdefault((host, port), url)
    if not names:
        return
    with concurrent.futures.ThreadPoolExecutor(min(16, len(names))) as pool:
        reasons = list(pool.map(lambda hp: validate.lookup_problem(*hp), names))
    for url, reason in zip(names.values(), reasons):
        if reason is None:
            continue
        msg = f"--backend {_shown(url)}: host does not resolve ({reason})"
        if not allow_unresolved:
            raise ConfigError(msg)
        (log or logging.getLogger("fastlb")).warning(
            f"warning: {msg}; starting anyway (--allow-unresolved)")


def _add_common(p):
    from fastlb.selection import ALGORITHMS

    p.add_argument("--listen", default="127.0.0.1:8080", metavar="[HOST:]PORT",
                   help="address to accept clients on (default 127.0.0.1:8080)")
    b = p.add_argument_group("balancing (see README)")
    b.add_argument("--algorithm", default="round-robin", choices=ALGORITHMS,
                   help="how a backend is chosen (default round-robin)")
    b.add_argument("--hash-key", default="ip", metavar="KEY",
                   help="maglev: ip, path, header:NAME, cookie:NAME or query:NAME (default ip); "
                        "requests without the key go by weighted round robin")
    b.add_argument("--hash-balance-factor", type=_non_negative_float, default=0.0, metavar="F",
                   help="maglev: a key moves on when its backend has more than F times the "
                        "mean in-flight requests (0, the default: off; else >= 1)")
    t = p.add_argument_group("timeouts (seconds) and limits")
    t.add_argument("--connect-timeout", type=_positive(float), default=5.0,
                   help="upstream connect timeout (default 5)")
    t.add_argument("--response-timeout", type=_positive(float), default=60.0,
                   help="a backend silent this long gets the client a 504 (default 60)")
    t.add_argument("--header-timeout", type=_positive(float), default=10.0,
                   help="a client must send a whole request head within this (default 10)")
    t.add_argument("--keepalive-timeout", type=_positive(float), default=75.0,
                   help="idle client keep-alive connections close after this (default 75)")
    t.add_argument("--upstream-idle-timeout", type=_positive(float), default=60.0,
                   help="idle pooled backend connections close after this (default 60)")
    t.add_argument("--upstream-max-idle", type=_positive(int), default=64,
                   help="idle pooled connections kept per backend (default 64)")
    t.add_argument("--max-header-size", type=_positive(int), default=65536,
                   help="largest request head in bytes; larger gets 431 (default 65536)")
    t.add_argument("--retries", type=_non_negative_int, default=2,
                   help="other backends tried for a failed request (default 2)")
    t.add_argument("--retry-timeout", type=_positive(float), default=10.0, metavar="S",
                   help="no new try starts this long after the request arrived (default 10)")
    t.add_argument("--max-interim", type=_non_negative_int, default=10, metavar="N",
                   help="1xx interim responses relayed per request; more gets the client "
                        "a 502 (default 10)")
    t.add_argument("--body-timeout", type=_non_negative_float, default=60.0, metavar="S",
                   help="a request body must arrive within S seconds of its head, plus 1 s "
                        "per --body-min-rate bytes; else 408 (default 60; 0: off)")
    t.add_argument("--body-min-rate", type=_non_negative_float, default=500.0, metavar="B",
                   help="bytes per second of body that extend --body-timeout by a second "
                        "(default 500; 0: the timeout is a hard total)")
    t.add_argument("--drain-timeout", type=_non_negative_float, default=30.0, metavar="S",
                   help="on SIGTERM/SIGINT, requests in flight and tunnels get this long to "
                        "finish (default 30)")
    t.add_argument("--tunnel-timeout", type=_positive(float), default=3600.0, metavar="S",
                   help="an Upgrade tunnel (WebSocket) with no byte either way for S seconds "
                        "is closed (default 3600)")
    p.add_argument("--no-upgrade", dest="upgrade", action="store_false",
                   help="answer Upgrade requests (WebSocket) with 501 instead of tunnelling them")
    p.add_argument("--trusted-proxy", dest="trusted_proxies", action="append", default=[],
                   metavar="CIDR",
                   help="a network (10.0.0.0/8, 127.0.0.1) of proxies whose X-Forwarded-For "
                        "is believed and extended; repeatable (default: none, the fields "
                        "clients send are replaced)")
    p.add_argument("--proxy-protocol", action="store_true",
                   help="connections start with a PROXY protocol header (v1 or v2) that "
                        "gives the client's address; from peers of --proxy-protocol-from "
                        "only, if given (default: off)")
    p.add_argument("--proxy-protocol-from", dest="proxy_protocol_from", action="append",
                   default=[], metavar="CIDR",
                   help="with --proxy-protocol: the networks whose connections must start "
                        "with the header (others are plain HTTP); repeatable (default: "
                        "every peer)")
    p.add_argument("--send-proxy-protocol", choices=["v1", "v2"], default=None,
                   help="start every connection to a backend with a PROXY protocol header "
                        "of this version (each such connection serves one client)")
    h = p.add_argument_group("health checks (see README)")
    h.add_argument("--health-path", metavar="PATH",
                   help="URL path probed on every backend; active checks are off without it")
    h.add_argument("--health-interval", type=_positive(float), default=10.0, metavar="S",
                   help="seconds between checks of a backend (default 10)")
    h.add_argument("--health-timeout", type=_positive(float), metavar="S",
                   help="a check taking longer fails (default: the smaller of 2 and the interval)")
    h.add_argument("--health-rise", type=_positive(int), default=2, metavar="N",
                   help="passed checks in a row to bring a backend up (default 2)")
    h.add_argument("--health-fall", type=_positive(int), default=3, metavar="N",
                   help="failed checks in a row to take a backend down (default 3)")
    h.add_argument("--health-expect", default="200", metavar="STATUS",
                   help="healthy statuses: 200, 2xx, 200-399, 200,204 (default 200)")
    h.add_argument("--health-host", metavar="HOST",
                   help="Host header of checks (default: the backend's host:port)")
    h.add_argument("--slow-start", type=_non_negative_float, default=0.0, metavar="S",
                   help="a recovered backend's share grows to full over S seconds (default 0: off)")
    h.add_argument("--eject-after", type=_non_negative_int, default=3, metavar="N",
                   help="failures in a row on real traffic that eject a backend (default 3; 0: off)")
    h.add_argument("--eject-base", type=_positive(float), default=5.0, metavar="S",
                   help="first ejection lasts S seconds, doubling while it keeps failing (default 5)")
    h.add_argument("--eject-max", type=_positive(float), default=300.0, metavar="S",
                   help="longest ejection (default 300)")
    h.add_argument("--eject-5xx", action="store_true",
                   help="count 5xx responses as failures for ejection")
    h.add_argument("--health-send-proxy-protocol", action="store_true",
                   help="health checks start with a PROXY protocol header too "
                        "(v2: LOCAL; needs --send-proxy-protocol)")
    h.add_argument("--max-ejected-percent", type=_percent, metavar="P",
                   help="at most P %% of the backends (rounded down) are ejected at a time "
                        "(default: all but one; 100: all, then the one whose ejection ends "
                        "soonest is put back on trial)")
    p.add_argument("--access-log", default="off", metavar="-|PATH|off",
                   help="one line per request to stdout (-), a file, or nowhere (off, default)")
    p.add_argument("--access-log-format", default="combined",
                   choices=["combined", "json", "combined_id"],
                   help="access log lines: nginx's combined plus backend and times (default), "
                        "JSON, or combined_id: combined then the request id")
    p.add_argument("--request-id", action=argparse.BooleanOptionalAction, default=False,
                   help="give every request an id: the client's X-Request-Id if it sent a "
                        "valid one, else a new one (UUID-shaped), sent to the backend, "
                        "returned to the client and logged (default: off)")
    p.add_argument("--request-id-header", default="X-Request-Id", metavar="NAME",
                   help="the request id's field (default X-Request-Id)")
    p.add_argument("--no-via", dest="via", action="store_false",
                   help="do not add a Via header to forwarded requests")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"], help="diagnostic log level")


def build_parser():
    from fastlb import __version__, core, proxy

    parser = _Parser(prog="fastlb", description="fastlb: a fast HTTP/1.1 load balancer")
    parser.add_argument("--version", action="version",
                        version=f"fastlb {__version__} ({core.IMPL} core, {proxy.IMPL} data path)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    serve = sub.add_parser("serve", help="balance requests over backends")
    serve.add_argument("--config", metavar="FILE",
                       help="run the configuration file FILE (TOML, see README), or the one "
                            "in etcd (etcd://HOST:PORT/KEY: each change there is a reload); "
                            "the global flags given with it override its settings")
    serve.add_argument("--backend", action="append", default=[], metavar="URL[,weight=N]",
                       help="backend as http://HOST[:PORT], optionally with a weight "
                            "(default 1); repeat for more")
    serve.add_argument("--allow-unresolved", action="store_true",
                       help="start even if a backend host name does not resolve (a warning)")
    serve.add_argument("--demo-backends", action="store_true",
                       help="with --config: first start a small demo backend on every "
                            "loopback backend address of the file, to try the file out")
    serve.add_argument("--workers", type=_workers, default=1, metavar="N|auto",
                       help="processes serving traffic: N, or auto (one per CPU); with more "
                            "than 1 a master process holds the sockets, runs the health "
                            "checks and restarts workers (default 1: one process)")
    serve.add_argument("--hooks", metavar="MODULE|FILE",
                       help="Python hooks: a module (myhooks) or a file (./myhooks.py) "
                            "defining route, select and/or request_headers (see README, "
                            "Python hooks); with --config it replaces the file's [hooks]")
    serve.add_argument("--admin", metavar="HOST:PORT",
                       help="serve /metrics, /status and the admin API on this address "
                            "(off by default; see README, Observability)")
    serve.add_argument("--admin-token-file", metavar="FILE",
                       help="the admin API's bearer token is the first line of FILE; "
                            "without it the API is read-only")
    serve.add_argument("--pid-file", metavar="FILE",
                       help="write the process id to FILE (removed at exit), for "
                            "fastlb reload --pid-file FILE")
    _add_common(serve)
    tls = serve.add_argument_group("TLS (see README)")
    tls.add_argument("--tls-cert", action="append", default=[], metavar="FILE",
                     help="serve HTTPS: a certificate (PEM, its chain after it); repeat with "
                          "--tls-key for more, chosen by the name the client asks for (SNI), "
                          "the first being the default")
    tls.add_argument("--tls-key", action="append", default=[], metavar="FILE",
                     help="the private key of the --tls-cert before it (PEM, unencrypted)")
    tls.add_argument("--tls-handshake-timeout", type=_positive(float), default=10.0,
                     metavar="S", help="a TLS handshake not done within S seconds is closed "
                                       "(default 10)")
    tls.add_argument("--backend-ca-file", metavar="FILE",
                     help="https:// backends: trust the CAs of FILE (PEM) instead of the "
                          "system's")
    tls.add_argument("--backend-server-name", metavar="NAME",
                     help="https:// backends: send NAME as SNI and check their certificate "
                          "against it (default: each backend's host)")
    tls.add_argument("--backend-no-verify", dest="backend_verify", action="store_false",
                     help="https:// backends: do not check their certificates (test setups "
                          "only)")
    demo = sub.add_parser("demo", help="run three demo backends behind the balancer and load them")
    _add_common(demo)
    demo.set_defaults(listen="127.0.0.1:0")
    demo.add_argument("--requests", type=_positive(int), default=600,
                      help="requests in the burst (default 600)")
    demo.add_argument("--concurrency", type=_positive(int), default=16,
                      help="connections sending the burst (default 16)")
    demo.add_argument("--exit", dest="exit_after", action="store_true",
                      help="exit after the burst instead of serving until Ctrl-C")
    check = sub.add_parser("check-config", help="validate a configuration file (or "
                                                "etcd://HOST:PORT/KEY) without starting "
                                                "(exit status 0: valid, 1: not)")
    check.add_argument("file", metavar="FILE")
    reload_ = sub.add_parser("reload", help="make a running fastlb serve --config reload its "
                                            "file (SIGHUP), after checking the file")
    reload_.add_argument("--pid-file", required=True, metavar="FILE",
                         help="the --pid-file of the running fastlb serve")
    reload_.add_argument("--config", metavar="FILE",
                         help="check this file first, and signal only if it is valid "
                              "(the running process reads its own --config file)")
    parser.subcommands = {"serve": serve, "demo": demo, "check-config": check,
                          "reload": reload_}
    return parser


def given_flags(parser, argv, command):
    """The dests of the flags typed on the command line after ``command``
    (the others are at their defaults, whatever their values)."""
    sub = build_parser().subcommands[command]
    for action in sub._actions:
        action.default = argparse.SUPPRESS
    rest = argv[argv.index(command) + 1:]
    return set(vars(sub.parse_args(rest)))


def options_from_args(args, backends, weights=(), schemes=()):
    from fastlb.config.flags import backend_tls_from_flags, tls_from_flags
    from fastlb.health import HealthConfig
    from fastlb.server import Options

    host, port = parse_listen(args.listen)
    hash_key = parse_hash_key(args.hash_key)
    if args.hash_balance_factor and args.hash_balance_factor < 1:
        raise ConfigError(f"--hash-balance-factor {args.hash_balance_factor:g}: "
                          "must be 0 (off) or at least 1")
    if args.health_send_proxy_protocol and args.send_proxy_protocol is None:
        raise ConfigError("--health-send-proxy-protocol: "
                          + validate.HEALTH_PROXY_ALONE.format("--send-proxy-protocol"))
    if args.proxy_protocol and getattr(args, "tls_cert", None):
        raise ConfigError(f"--proxy-protocol: {validate.PROXY_WITH_TLS}")
    health = HealthConfig(
        path=args.health_path, interval=args.health_interval, timeout=args.health_timeout,
        rise=args.health_rise, fall=args.health_fall, expect=args.health_expect,
        host=args.health_host, slow_start=args.slow_start, eject_after=args.eject_after,
        eject_base=args.eject_base, eject_max=max(args.eject_max, args.eject_base),
        eject_5xx=args.eject_5xx, max_ejected_percent=args.max_ejected_percent,
        send_proxy_protocol=args.health_send_proxy_protocol)
    if args.access_log not in ("off", "-"):
        try:
            open(args.access_log, "a").close()
        except OSError as e:
            raise ConfigError(f"--access-log {args.access_log!r}: {e.strerror}") from None
    return Options(
        listen_host=host, listen_port=port, backends=tuple(backends),
        connect_timeout=args.connect_timeout, response_timeout=args.response_timeout,
        header_timeout=args.header_timeout, keepalive_timeout=args.keepalive_timeout,
        upstream_idle_timeout=args.upstream_idle_timeout,
        upstream_max_idle=args.upstream_max_idle, max_header_size=args.max_header_size,
        access_log=args.access_log, access_log_format=args.access_log_format,
        via=args.via, retries=args.retries,
        retry_timeout=args.retry_timeout, health=health,
        max_interim=args.max_interim, drain_timeout=args.drain_timeout,
        body_timeout=args.body_timeout, body_min_rate=args.body_min_rate,
        upgrade=args.upgrade, tunnel_timeout=args.tunnel_timeout,
        trusted_proxies=_trusted_networks(args.trusted_proxies),
        proxy_protocol=args.proxy_protocol,
        proxy_protocol_from=_proxy_from(args.proxy_protocol, args.proxy_protocol_from),
        send_proxy_protocol=args.send_proxy_protocol,
        request_id=args.request_id, request_id_header=_request_id_header(args),
        weights=tuple(weights), algorithm=args.algorithm, hash_key=hash_key,
        hash_balance_factor=args.hash_balance_factor, workers=getattr(args, "workers", 1),
        schemes=tuple(schemes), tls=tls_from_flags(args), backend_tls=backend_tls_from_flags(args),
    )


def _request_id_header(args):
    try:
        return validate.request_id_header(args.request_id_header)
    except ConfigError as e:
        raise ConfigError(f"--request-id-header: {e}") from None


def _trusted_networks(values, flag="--trusted-proxy"):
    try:
        return validate.trusted_networks(tuple(values or ()))
    except ConfigError as e:
        raise ConfigError(f"{flag}: {e}") from None


def _proxy_from(enabled, values):
    if values and not enabled:
        raise ConfigError("--proxy-protocol-from: "
                          + validate.PROXY_FROM_ALONE.format("--proxy-protocol"))
    return _trusted_networks(values, "--proxy-protocol-from")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command == "check-config":
        return check_config(args.file)
    if args.command == "reload":
        return send_reload(args.pid_file, args.config)
    logging.basicConfig(level=args.log_level.upper(), format="fastlb: %(message)s",
                        stream=sys.stderr)
    try:
        if args.command == "serve":
            if args.config is not None:
                return _serve_config(args, given_flags(parser, argv, "serve"))
            if args.demo_backends:
                raise ConfigError("--demo-backends: needs --config (fastlb demo runs demo "
                                  "backends behind flags)")
            if not args.backend:
                raise ConfigError("serve: give at least one --backend http://HOST:PORT")
            specs = [parse_backend_spec(b) for b in args.backend]
            opts = options_from_args(args, [s[0] for s in specs], [s[1] for s in specs],
                                     [backend_scheme(b) for b in args.backend])
            check_backends_resolve(opts.backends, [b.partition(",")[0] for b in args.backend],
                                   args.allow_unresolved)
            if args.admin is not None or args.admin_token_file is not None:
                from fastlb.runtime import build

                opts = _with_admin(build.as_config(opts), args)
            if args.hooks is not None:
                opts = _with_hooks(opts, args.hooks)
            return _run_serve(opts, pid_file=args.pid_file)
        from fastlb.demo import run_demo

        return run_demo(args)
    except ConfigError as e:
        for issue in e.errors:
            print(f"fastlb: error: {issue}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"fastlb: error: {e.strerror or e}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return 0


def _etcd_text(url):
    """The configuration text in etcd at ``url`` and its ``EtcdConfig``;
    ConfigError when etcd cannot be read."""
    from fastlb.runtime.discovery import EtcdConfig

    source = EtcdConfig(url)
    try:
        text = source.fetch()
    except OSError as e:
        raise ConfigError(f"cannot read the configuration from {url}: {e}") from None
    except ValueError:
        raise ConfigError(f"{url}: not UTF-8 text") from None
    return text, source


def _load(path):
    """``fastlb.config.load`` of a file, or of the text in etcd (``etcd://...``)."""
    from fastlb.config import load, loads
    from fastlb.runtime.discovery import is_etcd_url

    if is_etcd_url(path):
        return loads(_etcd_text(path)[0], path)
    return load(path)


def check_config(path):
    """``fastlb check-config FILE``: every problem on standard output, one per
    line (warnings too), then exit status 1; or a summary line and 0."""
    try:
        config = _load(path)
    except ConfigError as e:
        for issue in e.errors:
            print(issue)
        return EXIT_RUNTIME
    for issue in config.warnings:
        print(issue)
    print(f"{path}: OK ({config.summary()})")
    return 0


def send_reload(pid_file, config_path=None):
    """``fastlb reload --pid-file F``: SIGHUP to the process named in F
    (after checking ``config_path``, when given: an invalid file is not
    signalled). The running process logs what the reload changed, or every
    problem of a file it refused."""
    import os
    import signal

    if config_path is not None and check_config(config_path) != 0:
        print(f"fastlb: error: {config_path} is not valid: not reloading", file=sys.stderr)
        return EXIT_RUNTIME
    try:
        with open(pid_file, "rb") as f:
            text = f.read(64).strip()
    except OSError as e:
        print(f"fastlb: error: --pid-file {pid_file}: {e.strerror}", file=sys.stderr)
        return EXIT_RUNTIME
    # a process id: ASCII digits, more than 1, within what the kernel hands out
    if not (text.isdigit() and 1 < int(text) <= 4194304):
        print(f"fastlb: error: --pid-file {pid_file}: no process id in it ({text[:40]!r})",
              file=sys.stderr)
        return EXIT_RUNTIME
    pid = int(text)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"fastlb: error: --pid-file {pid_file}: no process {pid} (stale file?)",
              file=sys.stderr)
        return EXIT_RUNTIME
    except PermissionError:
        print(f"fastlb: error: not allowed to signal process {pid}", file=sys.stderr)
        return EXIT_RUNTIME
    print(f"fastlb: sent SIGHUP to {pid}: it reloads its configuration (see its log)")
    return 0


def _serve_config(args, given):
    """``serve --config FILE``: load and validate it all (ConfigError lists
    every problem), apply the global flags given, run it. SIGHUP loads the
    file again, with the same flags over it.

    ``--config etcd://HOST:PORT/KEY``: the text is read from etcd (and must
    be valid to start); each change of the key is loaded the same way and
    applied as a reload, and SIGHUP applies the last valid one again."""
    from fastlb.config import apply_flags, load, loads
    from fastlb.runtime.discovery import is_etcd_url

    etcd_config = None
    if is_etcd_url(args.config):
        text, etcd_config = _etcd_text(args.config)

        def load_text(text):
            new, _ = apply_flags(loads(text, args.config), args, given)
            return _with_admin(new, args)

        etcd_config.load_text = load_text
        config, overrides = apply_flags(loads(text, args.config), args, given)
    else:
        config, overrides = apply_flags(load(args.config), args, given)
    config = _with_admin(config, args)
    logging.getLogger().setLevel(config.log_level.upper())
    log = logging.getLogger("fastlb")
    for issue in config.warnings:
        log.warning("%s", issue)
    for override in overrides:
        log.info("%s", override)

    def load_again():
        if etcd_config is not None:
            return etcd_config.config       # the last valid one read from etcd
        new, _ = apply_flags(load(args.config), args, given)
        new = _with_admin(new, args)
        for issue in new.warnings:
            log.warning("%s", issue)
        return new

    if etcd_config is not None:
        etcd_config.config = config
    demo = None
    if args.demo_backends:
        demo = _demo_addresses(config)
    return _run_serve(config, config=config, load_config=load_again, pid_file=args.pid_file,
                      demo=demo, etcd_config=etcd_config)


def _with_admin(config, args):
    """``config`` with ``--admin`` / ``--admin-token-file`` over its ``[admin]``."""
    import dataclasses

    from fastlb.config.load import _token_problem
    from fastlb.config.model import AdminConfig

    if args.admin is None and args.admin_token_file is None:
        return config
    admin = config.admin
    if args.admin is None and admin is None:
        raise ConfigError("--admin-token-file: needs --admin HOST:PORT (or [admin] bind)")
    if admin is None:
        admin = AdminConfig()
    if args.admin is not None:
        try:
            host, port = validate.listen_address(args.admin)
        except ConfigError as e:
            raise ConfigError(f"--admin: {e}") from None
        admin = dataclasses.replace(admin, host=host, port=port)
    if args.admin_token_file is not None:
        problem = _token_problem(args.admin_token_file)
        if problem:
            raise ConfigError(f"--admin-token-file: {problem}")
        admin = dataclasses.replace(admin, token_file=args.admin_token_file)
    for name, li in config.listeners.items():
        if (li.host, li.port) == (admin.host, admin.port) and admin.port:
            raise ConfigError(f"--admin: {admin.bind} is already the address of listener {name}")
    return dataclasses.replace(config, admin=admin)


def _with_hooks(opts, spec):
    """``opts`` (Options or a Config) as a Config with the hooks of ``--hooks spec``."""
    import dataclasses

    from fastlb.hooks import configure
    from fastlb.runtime import build

    try:
        hooks = configure(spec)
    except ConfigError as e:
        raise ConfigError(f"--hooks: {e}") from None
    return dataclasses.replace(build.as_config(opts), hooks=hooks)


def _demo_addresses(config):
    """The backend addresses of ``config`` for --demo-backends: every one
    must be on a loopback address (ConfigError otherwise)."""
    import ipaddress

    out = {}
    for pool in config.pools.values():
        for i, b in enumerate(pool.backends):
            try:
                loopback = ipaddress.ip_address(b.host).is_loopback
            except ValueError:
                loopback = b.host == "localhost"
            if not loopback:
                raise ConfigError(f"--demo-backends: pools.{pool.name}.backends[{i}]: "
                                  f"{b.url} is not a loopback address")
            out.setdefault((b.host, b.port), f"{pool.name}-{len(out) + 1}")
    return out


def _run_serve(opts, config=None, load_config=None, pid_file=None, demo=None,
               etcd_config=None):
    import os

    from fastlb import server

    async def go():
        servers = []
        if demo:
            from fastlb.demo import start_backends

            try:
                servers = await start_backends(demo)
            except OSError as e:
                raise ConfigError(f"--demo-backends: {e.strerror or e}") from None
            logging.getLogger("fastlb").info(
                "demo backends on %s", ", ".join(f"{h}:{p}" for h, p in demo))
        def ready(*_):
            # the signal handlers are in place: SIGHUP reloads from now on
            if pid_file is not None:
                with open(pid_file, "w") as f:
                    f.write(f"{os.getpid()}\n")

        try:
            workers = opts.workers
            if workers > 1:
                from fastlb.runtime import build
                from fastlb.runtime.master import run_master

                await run_master(build.as_config(opts), ready=ready, load_config=load_config,
                                 etcd_config=etcd_config)
            else:
                await server.serve(opts, ready=ready, load_config=load_config,
                                   etcd_config=etcd_config)
        except server.ListenError as e:
            key = "admin.bind" if e.listener == "admin" else f"listeners.{e.listener}.bind"
            where = config.where(key) if config is not None else None
            at = f" ({where})" if where else ""
            raise ConfigError(f"cannot listen on {e.bind}{at}: {e.strerror or e}") from None
        finally:
            for srv in servers:
                srv.close()

    if pid_file is not None:
        try:    # writable? (written once listening, with the signal handlers in place)
            open(pid_file, "a").close()
        except OSError as e:
            print(f"fastlb: error: --pid-file {pid_file}: {e.strerror}", file=sys.stderr)
            return EXIT_RUNTIME
    try:
        server.run(go())
    except ConfigError as e:
        print(f"fastlb: error: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    except RuntimeError as e:      # workers that cannot start
        print(f"fastlb: error: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    finally:
        if pid_file is not None:
            try:
                os.unlink(pid_file)
            except OSError:
                pass
    return 0
