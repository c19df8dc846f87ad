"""Health with workers: one checker in the master, a view of it in each worker.

The master runs the ``fastlb.health.HealthChecker`` of every pool, exactly
as a single process does (active checks once per backend per interval, the
passive-ejection rules, slow start), and writes what it decided into each
backend's record of the shared table (``fastlb.runtime.shm``): eligible,
weight, UP/admin/ejected flags, the end of an ejection, and a counter
bumped each time the backend comes back on trial (``MasterHealth``).

A worker's pool has a ``WorkerHealth`` where a single process has its
checker. It has the checker's surface for the data path (``on_failure``,
``on_success``, ``retry_after``) and:

* tells the master what traffic shows: a failure, or the success that ends
  a run of failures or a trial, as one datagram each (successes only while
  the master asks for them: ``FLAG_WANT``; the data path reports a success
  only when the backend's ``fail_streak`` is set, which this sets then), so
  that a backend failing on one worker is ejected on every worker;
* reads the records when the table's version moved (the worker polls it
  every ``POLL`` seconds) and applies changes to its own selector.

A worker sees a decision within ``POLL`` (plus the master's ``PUBLISH``)
seconds; a failure report reaches the master at once. Datagrams that do not
fit (the master is far behind) are dropped: the next failure repeats it.
"""
import logging
import socket

from fastlb.runtime.shm import (FLAG_ADMIN, FLAG_AWAITING, FLAG_EJECTED, FLAG_MAINT, FLAG_SET,
                                FLAG_UP, FLAG_WANT)

__all__ = ["WorkerHealth", "MasterHealth", "POLL", "PUBLISH", "encode", "decode"]

POLL = 0.05         # seconds between a worker's looks at the table's version
PUBLISH = 0.05      # seconds between the master's writes of what its checkers know

log = logging.getLogger("fastlb.health")


def encode(kind, *fields):
    """A report datagram: ``kind`` (F failure, S success, R ready) and text fields."""
    return "\t".join((kind,) + tuple(str(f).replace("\t", " ") for f in fields)).encode(
        "utf-8", "replace")[:1024]


def decode(data):
    parts = data.decode("utf-8", "replace").split("\t")
    return parts[0], parts[1:]


class WorkerHealth:
    """A worker's view of the master's checker of one pool (see the module)."""

    def __init__(self, pool, config, tables, rows, sock, loop):
        self.pool = pool
        self.config = config
        self._tables = tables
        self._rows = [rows[(pool.name, b.address)] for b in pool.backends]
        self._sock = sock
        self._loop = loop
        n = len(self._rows)
        self._seen = [None] * n     # last record applied
        self._eligible = [True] * n
        self._serving = sum(1 for w in pool.weights if w > 0)
        self._started = False

    # -------------------------------------------------------- what the data path calls

    def _report(self, kind, idx, *more):
        b = self.pool.backends[idx]
        try:
            self._sock.send(encode(kind, self.pool.name, b.address, *more))
        except (BlockingIOError, InterruptedError):
            pass        # the master is far behind: dropped (the next failure says it again)
        except OSError:
            pass        # the master is gone: the worker is stopped by its parent-death signal

    def on_failure(self, idx, reason="failure"):
        if self.config.eject_after > 0:
            self._report("F", idx, reason)

    def on_success(self, idx):
        self._report("S", idx)

    def on_response(self, idx, status):
        if status >= 500 and self.config.eject_5xx:
            self.on_failure(idx, f"status {status}")
        else:
            self.on_success(idx)

    def all_down(self):
        return self._serving == 0

    def is_eligible(self, idx):
        return self._eligible[idx]

    def backend_state(self, idx):
        """What the master's checker says of backend ``idx`` (as
        ``fastlb.health.state_name``): UP, DOWN, EJECTED, DRAIN or MAINT."""
        flags = self._tables.read_health(self._rows[idx])[3]
        if not flags & FLAG_SET:
            return "UP"     # not written yet: as configured
        if flags & FLAG_MAINT:
            return "MAINT"
        if not flags & FLAG_ADMIN:
            return "DRAIN"
        if not flags & FLAG_UP:
            return "DOWN"
        if flags & FLAG_EJECTED:
            return "EJECTED"
        return "UP"

    def retry_after(self):
        """As the checker's: the nearest end of an ejection, else one check
        interval (active checks), else 1 second; at least 1."""
        now = self._loop.time()
        best = None
        for row in self._rows:
            _, _, _, flags, end = self._tables.read_health(row)
            if flags & FLAG_EJECTED and not flags & FLAG_AWAITING and flags & FLAG_UP \
                    and flags & FLAG_ADMIN and end > 0:
                left = end - now
                if best is None or left < best:
                    best = left
        if best is None:
            best = self.config.interval if self.config.active else 1.0
        return max(1, int(-(-best // 1)))

    # -------------------------------------------------------- lifecycle

    def start(self):
        self._started = True
        self.sync(True)

    async def stop(self):
        self._started = False

    def sync(self, again=False):
        """Apply the master's records that changed since the last look
        (``again``: re-arm the success reports it still wants)."""
        tables = self._tables
        bal = self.pool.balancers
        backends = self.pool.backends
        weights = self.pool.weights
        for i, row in enumerate(self._rows):
            rec = tables.read_health(row)
            eligible, weight, trial, flags, _ = rec
            if not flags & FLAG_SET:
                continue        # not written yet: as configured
            old = self._seen[i]
            b = backends[i]
            if flags & FLAG_WANT and b.fail_streak == 0 and (again or old is None
                                                             or old[3] != flags
                                                             or old[2] != trial):
                b.fail_streak = 1   # the data path reports its next success
            if flags & FLAG_MAINT and (old is None or not old[3] & FLAG_MAINT):
                b.close_idle()      # in maintenance: nothing stays pooled to it
            if old is not None and old[:3] == rec[:3]:
                self._seen[i] = rec
                continue
            self._seen[i] = rec
            ok = bool(eligible)
            if ok != self._eligible[i]:
                self._eligible[i] = ok
                if weights[i] > 0:
                    self._serving += 1 if ok else -1
            if bal.is_eligible(i) != ok:
                bal.set_eligible(i, ok)
            if weight >= 0 and (old is None or old[1] != weight):
                bal.set_weight(i, weight)


class MasterHealth:
    """Writes the decisions of the master's checkers into the table.

    ``pools``: the master's own (never serving) ``Pool`` objects with their
    checkers; ``rows``: ``(pool, address) -> row``."""

    def __init__(self, tables):
        self.tables = tables
        self._last = {}         # row -> record written
        self._trial = {}        # row -> (readmitted_at seen, trial counter)
        self.pools = {}
        self.rows = {}

    def use(self, pools, rows):
        self.pools = pools
        self.rows = rows

    def publish(self):
        """Write every backend's record that changed; bump the version if any did."""
        changed = False
        for pool in self.pools.values():
            checker = pool.health
            for i, b in enumerate(pool.backends):
                row = self.rows.get((pool.name, b.address))
                if row is None:
                    continue
                rec = self._record(checker, pool, i, row)
                if self._last.get(row) != rec:
                    self._last[row] = rec
                    self.tables.write_health(row, *rec)
                    changed = True
        if changed:
            self.tables.bump()
        return changed

    def _record(self, checker, pool, i, row):
        if checker is None:
            return (1, -1, 0, FLAG_UP | FLAG_ADMIN, 0.0)
        st = checker._states[i]
        flags = 0
        if st.up:
            flags |= FLAG_UP
        if st.admin:
            flags |= FLAG_ADMIN
        if st.ejected:
            flags |= FLAG_EJECTED
        if st.awaiting:
            flags |= FLAG_AWAITING
        if st.pfails or st.trial or checker._dry:
            flags |= FLAG_WANT
        if st.mode == "maint":
            flags |= FLAG_MAINT
        seen, trial = self._trial.get(row, (st.readmitted_at, 0))
        if st.readmitted_at != seen:
            trial += 1
        self._trial[row] = (st.readmitted_at, trial)
        weight = st.cur_weight if st.cur_weight is not None else -1
        end = st.ejected_until if st.ejected and not st.awaiting else 0.0
        return (1 if st.eligible else 0, weight, trial, flags, end)

    def report(self, kind, fields):
        """A worker's datagram (F or S): hand it to the checker of that pool."""
        if len(fields) < 2:
            return
        pool = self.pools.get(fields[0])
        if pool is None or pool.health is None:
            return          # a pool a reload removed: its last requests
        address = fields[1]
        for i, b in enumerate(pool.backends):
            if b.address == address:
                if kind == "F":
                    pool.health.on_failure(i, fields[2] if len(fields) > 2 else "failure")
                else:
                    pool.health.on_success(i)
                return


def report_socket():
    """``(master end, worker end)`` of the datagram channel workers report on."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    b.setblocking(False)
    return a, b
