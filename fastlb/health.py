"""Health checking: active HTTP checks, passive ejection, slow start, admin drain.

Plain asyncio, independent of the data path: it only talks to the balancer
through ``set_eligible(idx, ok)`` and ``set_weight(idx, w)``, and is told about
real traffic through ``on_success`` / ``on_failure`` / ``on_response``. Every
method must be called on the event loop's thread.

Per backend it keeps four independent facts; the backend is *eligible* (the
balancer may pick it) when all four allow it::

    eligible = UP (active checks) and admin-enabled and not ejected (passive)

and the balancer is written only when that changes.

Active checks (``HealthConfig.path`` set): one task per backend, each opening
a fresh TCP connection (never the request pool) every ``interval`` seconds,
sending ``GET path HTTP/1.1`` with ``Connection: close`` and reading the
status line, the whole check bounded by ``timeout``. Counting is HAProxy's: a
DOWN backend needs ``rise`` consecutive passing checks to come UP, an UP one
``fall`` consecutive failing checks to go DOWN. First checks are spread at
random over the first interval so backends are not all checked at once.

Initial state: every backend starts UP and *unconfirmed*, and the first
failed check takes an unconfirmed backend DOWN at once (``fall`` applies from
the first check on). Starting UP means the balancer serves from the first
second (a health check needing ``rise`` passes before any traffic would turn
every restart into an outage of ``rise * interval``); the data path already
fails over on a failed connect, passive ejection reacts to the first real
failures, and the one-strike rule for the first check bounds how long a dead
backend stays in rotation to the jitter of its first check (< ``interval``).

Passive checks (``eject_after`` > 0): the data path reports each outcome on
real traffic. After ``eject_after`` consecutive failures the backend is
ejected for a back-off that starts at ``eject_base`` and doubles with each
consecutive ejection up to ``eject_max``. When the back-off ends:

* with active checks on, it returns only after a check that *started after*
  the back-off ended passes (the check is run at once, not at the next tick);
* with active checks off, it is re-admitted on trial.

Either way it comes back on trial: its first failure on traffic ejects it
again at once (doubled back-off); its first success ends the trial and sets
the back-off level back to the base (so does staying in rotation
``eject_reset`` seconds since its return without a failure).

Passive ejection never empties the pool. The *pool* is the backends with a
configured weight above 0 (the others are never chosen), ``n`` of them:

* the share: at most ``floor(n * max_ejected_percent / 100)`` of them are out
  by ejection at a time; ``max_ejected_percent=None`` (the default) allows
  ``n - 1``, all but one. An ejection beyond the share is not applied: the
  backend stays in rotation (on trial or not), its failures keep counting,
  and its next failure after another backend returned ejects it. Logged once
  per such episode.
* the fallback: when no working backend of the pool is left in rotation
  while some are ejected (none is left: the share allows all, or the others
  are DOWN or drained; or every one left is *held*: due for ejection but kept
  in by the share), the ejected one whose back-off ends soonest is
  re-admitted at once, on trial. Its next failure ejects it again (doubled
  back-off) and the next soonest takes its place, so in a total outage each
  failure tries one more backend, in back-off order, and a backend that
  recovers is found at once rather than after its back-off. Only backends
  that are UP and admin-enabled qualify: with active checks on, a backend the
  checks found DOWN is never forced back in. Until a backend answers or comes
  back by itself (a *dry spell*), the ejections and re-admissions this causes
  are logged at debug level: one warning per spell.

Slow start (``slow_start`` > 0): when a backend becomes eligible again (not
at startup) its weight ramps from 10% of its configured weight to 100% in
``SLOW_START_STEPS`` steps over ``slow_start`` seconds. Weights given to the
balancer are ints scaled by ``WEIGHT_SCALE`` (100): configured weight ``w`` is
``w * 100`` at full weight, so 10% of weight 1 is 10. With slow start on,
``start()`` sets every backend's weight to ``w * WEIGHT_SCALE`` so all weights
share the scale; with it off the checker never calls ``set_weight``.
"""
import asyncio
import dataclasses
import errno
import logging
import math
import random
import re
import ssl
import time
from typing import Optional

from fastlb.errors import ConfigError, ConfigIssue
from fastlb.validate import number_problem, show

__all__ = [
    "HealthConfig",
    "HealthChecker",
    "FLAGS",
    "parse_expect",
    "WEIGHT_SCALE",
    "SLOW_START_STEPS",
]

WEIGHT_SCALE = 100          # balancer weight = configured weight * WEIGHT_SCALE
SLOW_START_STEPS = 10       # the ramp: 10%, 19%, ..., 91%, then 100%
# fastlb's own shortages: a check that fails with these is not held against the backend
_LOCAL_ERRNOS = frozenset([errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])
_STATUS_LINE_MAX = 4096     # a longer first line is garbage
_STATUS_RE = re.compile(rb"HTTP/1\.[01] ([1-9][0-9][0-9])[ \r\n]")
_VISIBLE = re.compile(r"[!-~]+\Z")                 # visible ASCII, no space
_HOST_VALUE = re.compile(r"[!-~](?:[ -~]*[!-~])?\Z")  # visible ASCII, inner spaces


# ---------------------------------------------------------------- configuration

# The flag that sets each field: messages of the command line name it (a
# configuration file names the field itself, see fastlb.config).
FLAGS = {
    "path": "--health-path",
    "interval": "--health-interval",
    "timeout": "--health-timeout",
    "rise": "--health-rise",
    "fall": "--health-fall",
    "expect": "--health-expect",
    "host": "--health-host",
    "slow_start": "--slow-start",
    "eject_after": "--eject-after",
    "eject_base": "--eject-base",
    "eject_max": "--eject-max",
    "eject_reset": "--eject-reset",
    "eject_5xx": "--eject-5xx",
    "max_ejected_percent": "--max-ejected-percent",
    "send_proxy_protocol": "--health-send-proxy-protocol",
}


def _flag(field):
    return FLAGS.get(field, field)


def parse_expect(spec):
    """Parse an expected-status spec into a tuple of inclusive ``(lo, hi)`` ranges.

    ``spec`` is a comma-separated list of codes (``200``), classes (``2xx``)
    and ranges (``200-399``), codes 100 to 599. Raises ``ConfigError`` naming
    ``--health-expect``.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"--health-expect: expected a string, got {spec!r}")
    try:
        return _expect_ranges(spec)
    except ConfigError as e:
        raise ConfigError(f"--health-expect {spec!r}: {e}") from None


def _expect_ranges(spec):
    """``parse_expect`` for a string; the ``ConfigError`` is the bare reason."""
    ranges = []
    for item in spec.split(","):
        item = item.strip().lower()
        if re.fullmatch(r"[1-5]xx", item):
            lo = int(item[0]) * 100
            ranges.append((lo, lo + 99))
            continue
        m = re.fullmatch(r"([0-9]{3})(?:\s*-\s*([0-9]{3}))?", item)
        if m is None:
            raise ConfigError(f"{item or 'an empty item'!s} is not a status code, "
                              "class (2xx) or range (200-399)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        if not (100 <= lo <= 599 and 100 <= hi <= 599):
            raise ConfigError("status codes are 100 to 599")
        if hi < lo:
            raise ConfigError(f"empty range {item}")
        ranges.append((lo, hi))
    return tuple(ranges)


@dataclasses.dataclass(frozen=True)
class HealthConfig:
    """Health-check settings; validated on construction (``ConfigError`` names
    the flag of every bad field: ``FLAGS``). ``HealthConfig.check`` validates
    without constructing.

    Flags in brackets; a configuration file's ``[pools.NAME.health]`` table
    has one key per field, named as the field.
    """

    path: Optional[str] = None      # [--health-path] None: active checks off
    interval: float = 10.0          # [--health-interval] seconds between check starts
    timeout: Optional[float] = None  # [--health-timeout] whole check; None: min(2, interval)
    rise: int = 2                   # [--health-rise] passes for DOWN -> UP
    fall: int = 3                   # [--health-fall] failures for UP -> DOWN
    expect: str = "200"             # [--health-expect] "200", "2xx", "200-399", "200,204"
    host: Optional[str] = None      # [--health-host] Host header; None: backend host:port
    slow_start: float = 0.0         # [--slow-start] seconds of weight ramp; 0: off
    eject_after: int = 3            # [--eject-after] consecutive traffic failures; 0: off
    eject_base: float = 5.0         # [--eject-base] first ejection, doubled each time
    eject_max: float = 300.0        # [--eject-max] longest ejection
    eject_reset: float = 60.0       # [--eject-reset] back in rotation this long: back-off reset
    eject_5xx: bool = False         # [--eject-5xx] count 5xx responses as failures
    max_ejected_percent: Optional[float] = None  # [--max-ejected-percent] share of the pool
    #                                 passive ejection may take out; None: all but one
    send_proxy_protocol: bool = False  # [--health-send-proxy-protocol] checks start with a
    #                                 PROXY header of the pool's version (HAProxy's check-send-proxy)
    expect_ranges: tuple = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        problems = self.check({f.name: getattr(self, f.name)
                               for f in dataclasses.fields(self) if f.init})
        if problems:
            raise ConfigError(errors=[ConfigIssue(msg, path=_flag(field))
                                      for field, msg in problems])
        if self.timeout is None:
            object.__setattr__(self, "timeout", min(2.0, float(self.interval)))
        object.__setattr__(self, "expect_ranges", _expect_ranges(self.expect))

    @classmethod
    def check(cls, values, name=_flag):
        """Every problem with the settings ``values`` (field -> value; fields
        left out take their defaults) as ``[(field, message)]``, in field order.

        A message says what is wrong with its field's value; ``name(field)`` is
        how it refers to another field (the flag by default; the configuration
        file passes the key's name)."""
        v = {f.name: f.default for f in dataclasses.fields(cls) if f.init}
        v.update(values)
        out = []

        def number(field, **kw):
            problem = number_problem(v[field], **kw)
            if problem is not None:
                out.append((field, problem))
            return problem is None

        path = v["path"]
        if path is not None and (not isinstance(path, str) or not path.startswith("/")
                                 or not _VISIBLE.match(path)):
            out.append(("path", "expected an absolute path such as /healthz (visible ASCII, "
                                f"no spaces), got {show(path)}"))
        interval_ok = number("interval", strict=True)
        if v["timeout"] is not None and number("timeout", strict=True) and interval_ok \
                and v["timeout"] > v["interval"]:
            out.append(("timeout", f"must not exceed {name('interval')} ({v['interval']:g}), "
                                   f"got {v['timeout']:g}"))
        number("rise", integer=True, minimum=1)
        number("fall", integer=True, minimum=1)
        expect = v["expect"]
        if not isinstance(expect, str):
            out.append(("expect", f"expected a string, got {show(expect)}"))
        else:
            try:
                _expect_ranges(expect)
            except ConfigError as e:
                out.append(("expect", f"{show(expect)}: {e}"))
        host = v["host"]
        if host is not None and (not isinstance(host, str) or not _HOST_VALUE.match(host)):
            out.append(("host", f"expected a host name (visible ASCII), got {show(host)}"))
        number("slow_start")
        number("eject_after", integer=True)
        base_ok = number("eject_base", strict=True)
        if number("eject_max", strict=True) and base_ok and v["eject_max"] < v["eject_base"]:
            out.append(("eject_max", f"must be at least {name('eject_base')} "
                                     f"({v['eject_base']:g}), got {v['eject_max']:g}"))
        number("eject_reset", strict=True)
        for flag in ("eject_5xx", "send_proxy_protocol"):
            if not isinstance(v[flag], bool):
                out.append((flag, f"expected true or false, got {show(v[flag])}"))
        pct = v["max_ejected_percent"]
        if pct is not None and number("max_ejected_percent") and pct > 100:
            out.append(("max_ejected_percent", f"must be at most 100, got {pct:g}"))
        return out

    def max_ejected(self, n):
        """How many of a pool of ``n`` backends passive ejection may take out at a time."""
        if self.max_ejected_percent is None:
            return max(0, n - 1)
        return math.floor(n * self.max_ejected_percent / 100)

    @property
    def active(self):
        """Active checks are on."""
        return self.path is not None

    @property
    def passive(self):
        """Passive ejection is on."""
        return self.eject_after > 0

    def status_ok(self, status):
        """Whether a health-check response status matches ``expect``."""
        for lo, hi in self.expect_ranges:
            if lo <= status <= hi:
                return True
        return False


# ---------------------------------------------------------------- the checker

class _State:
    """What the checker knows about one backend."""

    __slots__ = (
        "index", "url", "label", "host", "port", "request", "weight", "cur_weight",
        "up", "confirmed", "oks", "fails", "admin", "eligible",
        "pfails", "ejected", "ejected_until", "eject_count", "awaiting", "trial",
        "held", "readmitted_at", "timer", "ramp", "ramp_step", "wake", "last_failure",
        "mode", "checks", "check_failures", "last_check", "shown", "changed_at",
        "tls", "server_name",
    )

    def __init__(self, backend, weight, request, pool=None):
        self.index = backend.index
        self.url = backend.url
        # in log lines: which pool, when there are several (identity is pool + address)
        self.label = backend.url if pool is None else f"{backend.url} (pool {pool})"
        self.host = backend.host
        self.port = backend.port
        # an https:// backend is checked in TLS, as its traffic goes
        self.tls = getattr(backend, "tls", None)
        self.server_name = getattr(backend, "server_name", None)
        self.request = request
        self.weight = weight         # configured (unscaled)
        self.cur_weight = None       # last value given to set_weight
        self.up = True
        self.confirmed = False       # no check has completed yet
        self.oks = 0                 # consecutive passing checks
        self.fails = 0               # consecutive failing checks
        self.admin = True
        self.eligible = True         # last value given to set_eligible
        self.pfails = 0              # consecutive failures on real traffic
        self.ejected = False         # out by passive ejection (incl. waiting for a check)
        self.ejected_until = 0.0     # loop.time() the current back-off ends
        self.eject_count = 0         # consecutive ejections (back-off level)
        self.awaiting = False        # back-off over, waiting for a passing check
        self.trial = False           # back from ejection: next failure re-ejects
        self.held = False            # due for ejection, kept in by the share (logged)
        self.readmitted_at = 0.0
        self.timer = None            # back-off end (TimerHandle)
        self.ramp = None             # next slow-start step (TimerHandle)
        self.ramp_step = 0
        self.wake = asyncio.Event()  # set: run a check now
        self.last_failure = None
        self.mode = "enabled"        # the admin's: enabled, drain or maint (admin False)
        self.checks = 0              # checks run (with a verdict), since start
        self.check_failures = 0      # of them failed
        self.last_check = None       # (time.time(), passed, reason) of the last check
        self.shown = "UP"            # the state last reported (state_name)
        self.changed_at = time.time()  # when it last changed (wall clock)


def state_name(st):
    """A backend's state as the status page and the metrics say it: MAINT,
    DRAIN (the admin's), DOWN (active checks), EJECTED (passive), or UP."""
    if st.mode == "maint":
        return "MAINT"
    if st.mode == "drain":
        return "DRAIN"
    if not st.up:
        return "DOWN"
    if st.ejected:
        return "EJECTED"
    return "UP"


STATES = ("UP", "DOWN", "EJECTED", "DRAIN", "MAINT")


def _times(n, word):
    return f"{n} consecutive {word}" if n == 1 else f"{n} consecutive {word}s"


def _netloc(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_proxy_header(version, writer):
    """The PROXY protocol header a check starts with: v2 LOCAL; v1 the check
    connection's own addresses (the spec's advice for health checks)."""
    from fastlb.wire.proxyproto import local_proxy_header

    local = writer.get_extra_info("sockname")
    peer = writer.get_extra_info("peername")
    addrs = (local[0], local[1], peer[0], peer[1]) if local and peer else None
    return local_proxy_header(version, addrs)


class HealthChecker:
    """Active and passive health of ``backends``, applied to ``balancer``.

    ``backends``: objects with ``.index`` (0..n-1, the balancer index),
    ``.host``, ``.port``, ``.url``. ``balancer``: ``set_eligible(idx, ok)``,
    ``is_eligible(idx)``, and ``set_weight(idx, w)`` (ints) when slow start is
    on. ``weights``: configured weights (default all 1). ``seed`` seeds the
    first-check jitter. ``logger`` defaults to ``logging.getLogger("fastlb.health")``.
    ``proxy_protocol`` (1 or 2, the pool's ``send_proxy_protocol``): with
    ``config.send_proxy_protocol`` every check starts with a PROXY protocol
    header of that version (``fastlb.wire.proxyproto.local_proxy_header``).
    """

    def __init__(self, backends, balancer, config, loop, logger=None, weights=None,
                 seed=None, on_trial=None, pool=None, proxy_protocol=None):
        from fastlb import __version__

        backends = list(backends)
        if weights is None:
            weights = [1] * len(backends)
        weights = list(weights)
        if len(weights) != len(backends):
            raise ValueError("one weight per backend")
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, int) or w < 0:
                raise ValueError(f"weights are non-negative ints, got {w!r}")
        self.config = config
        self.pool = pool            # the pool's name (None: the only pool)
        # the PROXY protocol version checks start with (None: no header)
        self._pp = proxy_protocol if config.send_proxy_protocol else None
        self._loop = loop
        self._bal = balancer
        self._log = logger if logger is not None else logging.getLogger("fastlb.health")
        self._rng = random.Random(seed)
        self._states = []
        for pos, (b, w) in enumerate(zip(backends, weights)):
            if b.index != pos:
                raise ValueError("backends must be given in index order 0..n-1")
            host = config.host if config.host is not None else _netloc(b.host, b.port)
            request = (f"GET {config.path} HTTP/1.1\r\nHost: {host}\r\n"
                       f"User-Agent: fastlb-health/{__version__}\r\n"
                       "Connection: close\r\n\r\n").encode("ascii") if config.active else b""
            self._states.append(_State(b, w, request, pool))
        # the pool: backends that can be chosen (weight > 0); passive ejection
        # never leaves it without one in rotation (see the module docstring)
        self._n_pool = sum(1 for st in self._states if st.weight > 0)
        self._n_serving = self._n_pool    # of them eligible
        self._max_ejected = config.max_ejected(self._n_pool)
        self._n_ejected = 0
        self._n_held = 0         # in rotation, due for ejection but kept in by the share
        self._dry = False        # no working backend was left, and none came back since
        self._none_logged = False  # "no backend is available" was logged
        # called with the index of a backend put back on trial: the data path
        # then reports its next success, which ends the trial
        self._on_trial = on_trial
        self._tasks = []
        self._started = False
        self._stopped = False

    # -------------------------------------------------------- lifecycle

    # what a backend kept across a reload carries over (weights and the
    # slow-start ramp start afresh from the new configuration)
    _CARRIED = ("up", "confirmed", "oks", "fails", "admin", "eligible", "pfails", "ejected",
                "ejected_until", "eject_count", "awaiting", "trial", "readmitted_at",
                "last_failure", "mode", "checks", "check_failures", "last_check", "shown",
                "changed_at")

    def inherit(self, old, pairs):
        """Before ``start()``: take over what ``old`` (another checker) knows
        of the backends a reload keeps. ``pairs``: ``(new index, old index)``.
        A backend ejected stays ejected until its back-off ends; one DOWN
        stays DOWN until checks pass (or at once, if checks are now off)."""
        if self._started:
            raise RuntimeError("inherit before start")
        for new_i, old_i in pairs:
            src = old._states[old_i]
            dst = self._states[new_i]
            for name in self._CARRIED:
                setattr(dst, name, getattr(src, name))
            if not self.config.active:
                dst.up = True       # nothing would ever check it again
            dst.eligible = dst.up and dst.admin and not dst.ejected
        self._n_serving = sum(1 for st in self._states if st.weight > 0 and st.eligible)
        self._n_ejected = sum(1 for st in self._states if st.ejected)
        self._dry = old._dry
        self._none_logged = old._none_logged and self._n_serving == 0

    def start(self):
        """Start the active checks (if any); sync weights for slow start."""
        if self._started:
            raise RuntimeError("HealthChecker already started")
        self._started = True
        cfg = self.config
        for st in self._states:
            # The balancer starts with every backend eligible; keep it in step.
            if self._bal.is_eligible(st.index) != st.eligible:
                self._bal.set_eligible(st.index, st.eligible)
            if cfg.slow_start > 0:
                self._set_weight(st, st.weight * WEIGHT_SCALE)
            if st.ejected:
                # carried over by inherit(): the back-off goes on
                if st.awaiting and not cfg.active:
                    self._loop.call_soon(self._eject_expired, st)
                elif not st.awaiting:
                    st.timer = self._loop.call_at(st.ejected_until, self._eject_expired, st)
        if self._n_ejected:
            # carried over into a pool where they are too many (a smaller
            # pool, a smaller share): passive ejection never empties a pool,
            # nor keeps more out than the share
            while self._n_ejected > self._max_ejected and self._readmit_soonest():
                pass
            if self._n_serving == 0:
                self._fallback()
        if cfg.active:
            now = self._loop.time()
            for st in self._states:
                first = now + self._rng.uniform(0.0, cfg.interval)
                self._tasks.append(self._loop.create_task(
                    self._check_loop(st, first), name=f"fastlb-health {st.url}"))

    async def stop(self):
        """Cancel checks and timers and wait for the check tasks to end."""
        self._stopped = True
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        for st in self._states:
            if st.timer is not None:
                st.timer.cancel()
                st.timer = None
            if st.ramp is not None:
                self._cancel_ramp(st)
                self._set_weight(st, st.weight * WEIGHT_SCALE)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -------------------------------------------------------- queries

    def all_down(self):
        """True when no backend can be chosen (answer 503 + Retry-After at once)."""
        return self._n_serving == 0

    def retry_after(self):
        """Whole seconds (at least 1) a client told 503 might wait: the nearest
        end of an ejection, else one check interval (active checks), else 1."""
        now = self._loop.time()
        best = None
        for st in self._states:
            if st.ejected and not st.awaiting and st.admin and st.up:
                left = st.ejected_until - now
                if best is None or left < best:
                    best = left
        if best is None:
            best = self.config.interval if self.config.active else 1.0
        return max(1, math.ceil(best))

    def is_eligible(self, idx):
        return self._states[idx].eligible

    def backend_state(self, idx):
        """``state_name`` of backend ``idx``: UP, DOWN, EJECTED, DRAIN or MAINT."""
        return state_name(self._states[idx])

    def snapshot(self):
        """One dict per backend, for the status page and the admin API."""
        now = self._loop.time()
        out = []
        for st in self._states:
            out.append({
                "index": st.index,
                "url": st.url,
                "address": _netloc(st.host, st.port),
                "pool": self.pool,
                "state": "UP" if st.up else "DOWN",
                "checked": st.confirmed,
                "eligible": st.eligible,
                "admin": "enabled" if st.admin else "disabled",
                "ejected": st.ejected,
                "ejected_until": st.ejected_until if st.ejected else None,
                "eject_remaining": max(0.0, st.ejected_until - now) if st.ejected else 0.0,
                "awaiting_check": st.awaiting,
                "trial": st.trial,
                "held": st.held,
                "ejections": st.eject_count,
                "consecutive_successes": st.oks,
                "consecutive_failures": st.fails,
                "passive_failures": st.pfails,
                "last_failure": st.last_failure,
                "weight": st.weight,
                "effective_weight": st.cur_weight,
                "status": state_name(st),
                "mode": st.mode,
                "checks": st.checks,
                "check_failures": st.check_failures,
                "last_check": (None if st.last_check is None else
                               {"time": st.last_check[0], "passed": st.last_check[1],
                                "reason": st.last_check[2]}),
                "changed_at": st.changed_at,
            })
        return out

    # -------------------------------------------------------- admin

    def set_admin(self, idx, enabled):
        """Drain (``enabled=False``) or re-enable a backend; checks keep running."""
        self.set_mode(idx, "enabled" if enabled else "drain")

    MODES = ("enabled", "drain", "maint")

    def set_mode(self, idx, mode):
        """The admin's say: ``enabled``; ``drain`` (no new requests, those in
        flight finish, checks go on); ``maint`` (maintenance: as drain, and
        its checks pause, as HAProxy's MAINT). Returns True if it changed."""
        if mode not in self.MODES:
            raise ValueError(f"mode is one of {', '.join(self.MODES)}")
        st = self._states[idx]
        if st.mode == mode:
            return False
        was = st.mode
        st.mode = mode
        st.admin = mode == "enabled"
        if was == "maint":
            st.wake.set()       # check it now
        words = {"enabled": "enabled", "drain": "draining", "maint": "in maintenance"}
        self._log.info(f"backend {st.label} {words[mode]} (admin)")
        self._update(st)
        self._note_state(st)
        return True

    def set_configured_weight(self, idx, weight):
        """The admin sets a backend's weight (0 to 10000; 0: never chosen)."""
        st = self._states[idx]
        if weight == st.weight:
            return False
        was_pool = st.weight > 0
        st.weight = weight
        if was_pool != (weight > 0):
            self._n_pool += 1 if weight > 0 else -1
            if st.eligible:
                self._n_serving += 1 if weight > 0 else -1
            self._max_ejected = self.config.max_ejected(self._n_pool)
        scale = WEIGHT_SCALE if self.config.slow_start > 0 else 1
        self._cancel_ramp(st)
        st.cur_weight = None
        self._set_weight(st, weight * scale)
        self._log.info(f"backend {st.label}: weight {weight} (admin)")
        return True

    # -------------------------------------------------------- passive

    def on_success(self, idx):
        """A request to backend ``idx`` succeeded (response head received and valid)."""
        st = self._states[idx]
        if st.pfails:
            st.pfails = 0
            if st.held:
                self._unhold(st)
        if st.trial:
            st.trial = False
            st.eject_count = 0   # back and answering: the next ejection is short again
        if self._dry:
            self._dry = False
            self._log.info(f"backend {st.label} answered: the pool is serving again")

    def on_failure(self, idx, reason="failure"):
        """A request to backend ``idx`` failed: connect failure, reset, timeout,
        invalid response (or a 5xx when ``eject_5xx``)."""
        cfg = self.config
        if cfg.eject_after <= 0 or self._stopped:
            return
        st = self._states[idx]
        if not st.eligible:
            return  # already out (down, drained or ejected): leftovers in flight
        st.pfails += 1
        st.last_failure = reason
        if st.trial:
            self._eject(st, f"failed again after returning ({reason})")
        elif st.pfails >= cfg.eject_after:
            self._eject(st, f"{_times(st.pfails, 'failure')} ({reason})")

    def on_response(self, idx, status):
        """A final response status from backend ``idx``: a failure if it is a
        5xx and ``eject_5xx`` is set, else a success."""
        if status >= 500 and self.config.eject_5xx:
            self.on_failure(idx, f"status {status}")
        else:
            self.on_success(idx)

    def _eject(self, st, why):
        cfg = self.config
        if self._n_ejected >= self._max_ejected:
            # over the share: it stays in rotation, its failures keep counting
            if not st.held and st.weight:
                st.held = True
                self._n_held += 1
                msg = (f"backend {st.label} not ejected ({why}): at most {self._max_ejected} "
                       f"of {self._n_pool} may be out at a time (--max-ejected-percent)")
                if self._dry:
                    self._log.debug(msg)
                else:
                    self._log.warning(msg)
                if self._n_held == self._n_serving:
                    self._fallback()    # every backend in rotation is failing
            return
        now = self._loop.time()
        if st.eject_count and now - st.readmitted_at >= cfg.eject_reset:
            st.eject_count = 0
        backoff = min(cfg.eject_base * 2.0 ** min(st.eject_count, 62), cfg.eject_max)
        st.eject_count += 1
        st.ejected = True
        self._n_ejected += 1
        st.oks = 0          # only checks after the ejection count towards ending it
        st.trial = False
        st.awaiting = False
        st.pfails = 0
        st.ejected_until = now + backoff
        if st.timer is not None:
            st.timer.cancel()
        st.timer = self._loop.call_at(st.ejected_until, self._eject_expired, st)
        msg = f"backend {st.label} ejected for {backoff:g}s: {why}"
        if self._dry:
            self._log.debug(msg)    # the pool is still dry: said once already
        else:
            self._log.warning(msg)
        self._update(st)

    def _unhold(self, st):
        st.held = False
        self._n_held -= 1

    def _eject_expired(self, st):
        st.timer = None
        if self._stopped or not st.ejected:
            return
        if self.config.active:
            st.awaiting = True
            st.wake.set()  # check now rather than at the next tick
            return
        self._readmit(st, "re-admitted on trial after ejection")

    def _readmit(self, st, why, forced=False):
        st.ejected = False
        self._n_ejected -= 1
        st.awaiting = False
        st.trial = True
        st.readmitted_at = self._loop.time()
        if self._on_trial is not None:
            self._on_trial(st.index)
        if not forced:      # the fallback logs its own
            self._log.info(f"backend {st.label} {why}")
        self._update(st, forced)

    def _take_soonest(self, serving):
        """The ejected backend whose back-off ends soonest (``serving``: only
        one that is UP, enabled and weighted), its back-off timer cancelled;
        None if there is none."""
        best = None
        for st in self._states:
            if st.ejected and (not serving or (st.up and st.admin and st.weight)) and (
                    best is None or st.ejected_until < best.ejected_until):
                best = st
        if best is not None and best.timer is not None:
            best.timer.cancel()
            best.timer = None
        return best

    def _readmit_soonest(self):
        """Re-admit on trial the ejected backend whose back-off ends soonest
        (over the share after a reload); False if there is none."""
        best = self._take_soonest(False)
        if best is None:
            return False
        self._readmit(best, f"re-admitted on trial: at most {self._max_ejected} of "
                            f"{self._n_pool} may be out at a time")
        return True

    def _fallback(self):
        """No backend in rotation is working (none left, or all are held): re-admit
        on trial the ejected one (UP, enabled) whose back-off ends soonest.
        Returns True if one was."""
        best = self._take_soonest(True)
        if best is None:
            return False
        why = f"backend {best.label} re-admitted on trial early (its back-off ends soonest)"
        if self._dry:       # once per dry spell; the repeats at debug level
            self._log.debug(why)
        else:
            self._dry = True
            self._log.warning(f"no backend in rotation is working: {why}")
        self._readmit(best, None, forced=True)
        return True

    # -------------------------------------------------------- active

    async def _check_loop(self, st, first):
        loop = self._loop
        interval = self.config.interval
        next_at = first
        wake = st.wake
        while True:
            delay = next_at - loop.time()
            if delay > 0 and not wake.is_set():
                try:
                    async with asyncio.timeout(delay):
                        await wake.wait()
                except TimeoutError:
                    pass
            wake.clear()
            started = loop.time()
            if st.mode == "maint":
                next_at = started + interval    # paused: no probe, no verdict
                continue
            ok, reason = await self._probe(st)
            if ok is None:
                # fastlb itself is short of fds or memory: the check says
                # nothing about the backend, so nothing is recorded
                self._log.debug(f"check of {st.label} not run: {reason}")
            else:
                self._record_check(st, ok, reason, started)
            next_at = started + interval

    async def _probe(self, st):
        """One check: ``(True, None)``, ``(False, reason)``, or ``(None, reason)``
        when fastlb itself has no fd or memory to spare (no verdict)."""
        cfg = self.config
        writer = None
        try:
            async with asyncio.timeout(cfg.timeout):
                if st.tls is None:
                    reader, writer = await asyncio.open_connection(
                        st.host, st.port, limit=_STATUS_LINE_MAX)
                else:
                    reader, writer = await asyncio.open_connection(
                        st.host, st.port, limit=_STATUS_LINE_MAX, ssl=st.tls,
                        server_hostname=st.server_name, ssl_handshake_timeout=cfg.timeout)
                if self._pp is not None:
                    writer.write(_check_proxy_header(self._pp, writer))
                writer.write(st.request)
                line = await reader.readuntil(b"\n")
        except TimeoutError:
            return False, f"timed out after {cfg.timeout:g}s"
        except ConnectionRefusedError:
            return False, "connection refused"
        except ConnectionResetError:
            return False, "connection reset"
        except asyncio.IncompleteReadError as e:
            if e.partial:
                return False, "invalid status line"
            return False, "closed without a response"
        except asyncio.LimitOverrunError:
            return False, "invalid status line"
        except ssl.SSLError as e:
            from fastlb.runtime.tls import describe_error

            return False, describe_error(e)
        except OSError as e:
            if e.errno in _LOCAL_ERRNOS:
                return None, e.strerror or str(e)
            return False, e.strerror or str(e) or type(e).__name__
        except Exception as e:  # never let a check kill its task
            return False, f"check error: {e!r}"
        finally:
            if writer is not None:
                writer.close()
        m = _STATUS_RE.match(line)
        if m is None:
            return False, "invalid status line"
        status = int(m.group(1))
        if not cfg.status_ok(status):
            return False, f"status {status}, expected {cfg.expect}"
        return True, None

    def _record_check(self, st, ok, reason, started):
        if self._stopped:
            return
        cfg = self.config
        st.checks += 1
        st.last_check = (time.time(), ok, reason)
        if not ok:
            st.check_failures += 1
        if ok:
            st.fails = 0
            st.oks += 1
            if not st.up and st.oks >= cfg.rise:
                st.up = True
                self._log.info(f"backend {st.label} is UP: {_times(st.oks, 'successful check')}")
            if st.ejected and st.oks >= cfg.rise:
                # With active checks the checks judge, as in HAProxy: ``rise``
                # passing checks in a row since the ejection end it, back-off
                # or not (so a restarted backend is back within interval x rise).
                if st.timer is not None:
                    st.timer.cancel()
                    st.timer = None
                self._readmit(st, f"back after ejection: {_times(st.oks, 'successful check')}")
            elif st.awaiting and started >= st.ejected_until:
                self._readmit(st, "back after ejection: passed a health check")
        else:
            st.oks = 0
            st.fails += 1
            st.last_failure = reason
            if st.up and (st.fails >= cfg.fall or not st.confirmed):
                st.up = False
                if st.confirmed:
                    why = _times(st.fails, "failed check")
                else:
                    why = "first check failed"
                self._log.warning(f"backend {st.label} is DOWN: {why} ({reason})")
        st.confirmed = True
        self._update(st)

    # -------------------------------------------------------- eligibility and weights

    def _note_state(self, st):
        name = state_name(st)
        if name != st.shown:
            st.shown = name
            st.changed_at = time.time()

    def _update(self, st, forced=False):
        self._note_state(st)
        ok = st.up and st.admin and not st.ejected
        if ok == st.eligible:
            return
        st.eligible = ok
        st.pfails = 0
        if st.held:
            self._unhold(st)
        self._bal.set_eligible(st.index, ok)
        if ok:
            if st.weight:
                self._n_serving += 1
            if not forced:
                self._dry = False   # back by its own merit: log a next dry spell again
            if self._none_logged:
                self._none_logged = False
                self._log.info("a backend is available again")
            if self.config.slow_start > 0:
                self._start_ramp(st)
        else:
            self._cancel_ramp(st)
            if st.weight:
                self._n_serving -= 1
                # none left in rotation, or only failing ones: passive ejection
                # must not empty the pool
                if self._n_serving == self._n_held and not self._stopped \
                        and self._fallback():
                    return
                if self._n_serving == 0 and not self._none_logged:
                    self._none_logged = True
                    self._log.warning(
                        "no backend is available: all are down, ejected or disabled")

    def _set_weight(self, st, w):
        if w != st.cur_weight:
            st.cur_weight = w
            self._bal.set_weight(st.index, w)

    def _start_ramp(self, st):
        self._cancel_ramp(st)
        if st.weight == 0 or self._stopped:
            return
        st.ramp_step = 0
        self._ramp_tick(st)

    def _ramp_tick(self, st):
        st.ramp = None
        full = st.weight * WEIGHT_SCALE
        k = st.ramp_step
        if k >= SLOW_START_STEPS:
            self._set_weight(st, full)
            return
        # 10% at k=0, +90%/STEPS per step: 100% at k=STEPS
        pct = 10 + 90 * k // SLOW_START_STEPS
        self._set_weight(st, max(1, full * pct // 100))
        st.ramp_step = k + 1
        st.ramp = self._loop.call_later(self.config.slow_start / SLOW_START_STEPS,
                                        self._ramp_tick, st)

    def _cancel_ramp(self, st):
        if st.ramp is not None:
            st.ramp.cancel()
            st.ramp = None
