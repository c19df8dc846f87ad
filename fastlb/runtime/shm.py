"""Shared-memory tables: backend state and traffic counters.

One table per fastlb instance, a fixed layout in one ``mmap``. With workers
the master creates it on a ``memfd`` and every worker maps the same pages;
a single process maps a private copy of the same layout, so that the code
that reads it (metrics, status) is the same either way.

::

    header     64 bytes    magic, version, capacities
    health     capacity.backends records of 32 bytes, written by the master only
    counters   slots x (backends x NB + listeners x NL) unsigned 64-bit ints;
               slot 0 holds the totals of workers that are gone, slot k >= 1
               is written by one worker only

Every field has a single writer, so readers need no lock: they read plain
values, aligned and at most 8 bytes wide (x86 and arm64 keep those whole).
The health writer bumps ``version`` after it changes records; a worker
compares the version before it looks at the records.

A backend has one record and one row of counters per slot for as long as
it is configured: it is identified by pool and address (``Layout``), so a
reload that keeps it keeps its index, and its counters carry on.
"""
import mmap
import os
import struct

__all__ = ["Tables", "Layout", "TableFull", "NB", "NL", "B_NAMES", "L_NAMES", "LAT_BOUNDS",
           "B_LAT", "B_LAT_SUM_US",
           "B_GAUGES", "L_GAUGES", "FLAG_UP", "FLAG_ADMIN", "FLAG_EJECTED",
           "FLAG_AWAITING", "FLAG_WANT", "FLAG_SET", "FLAG_MAINT"]

MAGIC = b"fastlbT1"
HEADER = 64
_HEAD = struct.Struct("=8sQIII")     # magic, version, backends, listeners, slots
_VERSION_AT = 8

# a backend's health record: eligible, weight (-1: as configured), trial
# (bumped each time it comes back on trial), flags, end of its ejection
# (time.monotonic(), 0: not ejected), 8 bytes spare
_HEALTH = struct.Struct("=iiIId8x")
HEALTH_REC = _HEALTH.size
assert HEALTH_REC == 32

FLAG_UP = 1         # active checks say UP (or checks are off)
FLAG_ADMIN = 2      # enabled by the admin (not drained)
FLAG_EJECTED = 4    # out by passive ejection
FLAG_AWAITING = 8   # ejection over, waiting for a passing check
FLAG_WANT = 16      # report its next success (failures are counting, or on trial)
FLAG_SET = 32       # the record has been written
FLAG_MAINT = 64     # in maintenance (the admin's): pooled connections closed

# A backend's counters (one row per slot). B_ACTIVE is a gauge (requests on
# it now); the others only grow.
B_NAMES = ("requests", "responses_1xx", "responses_2xx", "responses_3xx", "responses_4xx",
           "responses_5xx", "bytes_in", "bytes_out", "connect_errors", "retries",
           "failures", "active")
(B_REQUESTS, B_1XX, B_2XX, B_3XX, B_4XX, B_5XX, B_BYTES_IN, B_BYTES_OUT,
 B_CONNECT_ERRORS, B_RETRIES, B_FAILURES, B_ACTIVE) = range(len(B_NAMES))
# The response-time histogram (the time from sending the request to the end
# of the response head, as ``fastlb_server_response_time_seconds``): one
# counter per bucket, not cumulative (an observation counts in the first
# bucket whose bound it does not exceed; the last is +Inf), and the sum of
# the observations in microseconds.
LAT_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
B_LAT = 16                              # the first bucket
B_LAT_SUM_US = B_LAT + len(LAT_BOUNDS) + 1
NB = 32             # room to grow without changing the layout's shape
B_GAUGES = (B_ACTIVE,)

# A listener's counters: connections accepted, open now (gauge), requests,
# responses sent to clients by class (fastlb's own answers included), bytes
# from and to clients; Upgrade tunnels open now (gauge) and opened, the bytes
# they relayed from clients and to them (also in bytes_in and bytes_out);
# connections closed for a missing or invalid PROXY protocol header.
L_NAMES = ("connections", "active", "requests", "responses_1xx", "responses_2xx",
           "responses_3xx", "responses_4xx", "responses_5xx", "bytes_in", "bytes_out",
           "tunnels", "tunnels_total", "tunnel_bytes_in", "tunnel_bytes_out", "proxy_errors")
(L_CONNECTIONS, L_ACTIVE, L_REQUESTS, L_1XX, L_2XX, L_3XX, L_4XX, L_5XX, L_BYTES_IN,
 L_BYTES_OUT, L_TUNNELS, L_TUNNELS_TOTAL, L_TUNNEL_BYTES_IN, L_TUNNEL_BYTES_OUT,
 L_PROXY_ERRORS) = range(len(L_NAMES))
NL = 16
L_GAUGES = (L_ACTIVE, L_TUNNELS)
assert len(L_NAMES) <= NL and len(B_NAMES) <= B_LAT


_ROW_B = struct.Struct(f"={NB}Q")
_ROW_L = struct.Struct(f"={NL}Q")


class TableFull(Exception):
    """More backends or listeners than the table was made for."""


class Tables:
    """The mapped table. ``Tables.create`` makes one; ``Tables.attach(fd)``
    maps the one another process made (``fd`` from ``create(shared=True)``)."""

    def __init__(self, mm, fd, backends, listeners, slots):
        self.mm = mm
        self.fd = fd
        self.backends = backends
        self.listeners = listeners
        self.slots = slots
        self._words = memoryview(mm).cast("Q")
        self._health_at = HEADER
        self._counters_at = HEADER + backends * HEALTH_REC
        self._row = backends * NB + listeners * NL      # 64-bit words per slot

    @classmethod
    def create(cls, backends=256, listeners=16, slots=2, shared=False):
        size = HEADER + backends * HEALTH_REC + slots * (backends * NB + listeners * NL) * 8
        size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        fd = -1
        if shared:
            fd = os.memfd_create("fastlb-tables", 0)    # inherited by exec'd workers
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        else:
            mm = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                           mmap.PROT_READ | mmap.PROT_WRITE)
        _HEAD.pack_into(mm, 0, MAGIC, 0, backends, listeners, slots)
        return cls(mm, fd, backends, listeners, slots)

    @classmethod
    def attach(cls, fd):
        size = os.fstat(fd).st_size
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        magic, _, backends, listeners, slots = _HEAD.unpack_from(mm, 0)
        if magic != MAGIC:
            raise ValueError("not a fastlb table")
        return cls(mm, fd, backends, listeners, slots)

    def close(self):
        self._words.release()
        self.mm.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # ---------------------------------------------------------------- health

    @property
    def version(self):
        return self._words[1]

    def bump(self):
        """After writing records: tell readers to look again."""
        self._words[1] = (self._words[1] + 1) & 0xFFFFFFFFFFFFFFFF

    def write_health(self, b, eligible, weight, trial, flags, eject_end):
        _HEALTH.pack_into(self.mm, self._health_at + b * HEALTH_REC, 1 if eligible else 0,
                          weight, trial & 0xFFFFFFFF, flags | FLAG_SET, eject_end)

    def read_health(self, b):
        """``(eligible, weight, trial, flags, eject_end)``; flags lack FLAG_SET
        until the record has been written."""
        return _HEALTH.unpack_from(self.mm, self._health_at + b * HEALTH_REC)

    def clear_health(self, b):
        _HEALTH.pack_into(self.mm, self._health_at + b * HEALTH_REC, 0, 0, 0, 0, 0.0)

    # ---------------------------------------------------------------- counters

    def _check(self, slot, i, cap):
        if not (0 <= slot < self.slots and 0 <= i < cap):
            raise IndexError(f"slot {slot} / index {i} outside the table")

    def backend_counters(self, slot, b):
        """Slot ``slot``'s counters of backend ``b``: a writable memoryview
        of NB unsigned 64-bit ints (format ``Q``)."""
        self._check(slot, b, self.backends)
        at = self._counters_at // 8 + slot * self._row + b * NB
        return self._words[at:at + NB]

    def listener_counters(self, slot, li):
        self._check(slot, li, self.listeners)
        at = self._counters_at // 8 + slot * self._row + self.backends * NB + li * NL
        return self._words[at:at + NL]

    def backend_totals(self, b):
        """Backend ``b``'s NB counters summed over every slot (``B_*`` indices)."""
        self._check(0, b, self.backends)
        return self._sum(self._counters_at + b * NB * 8, _ROW_B)

    def listener_totals(self, li):
        """Listener ``li``'s NL counters summed over every slot (``L_*`` indices)."""
        self._check(0, li, self.listeners)
        return self._sum(self._counters_at + (self.backends * NB + li * NL) * 8, _ROW_L)

    def _sum(self, at, fmt):
        step = self._row * 8
        unpack = fmt.unpack_from
        mm = self.mm
        rows = [unpack(mm, at + slot * step) for slot in range(self.slots)]
        return [sum(col) for col in zip(*rows)]

    def fold(self, slot):
        """Worker ``slot`` is gone (no process writes it any more): add its
        counters into slot 0 and zero it, so totals never go backwards.
        Gauges are not carried (what was open is closed now)."""
        if slot == 0:
            raise ValueError("slot 0 holds the folded totals")
        for b in range(self.backends):
            self._fold_row(self.backend_counters(slot, b), self.backend_counters(0, b),
                           B_GAUGES)
        for li in range(self.listeners):
            self._fold_row(self.listener_counters(slot, li), self.listener_counters(0, li),
                           L_GAUGES)

    @staticmethod
    def _fold_row(src, dst, gauges):
        for k in range(len(src)):
            v = src[k]
            if v:
                if k not in gauges:
                    dst[k] = (dst[k] + v) & 0xFFFFFFFFFFFFFFFF
                src[k] = 0

    def zero_backend(self, b):
        """Backend index ``b`` is given to another backend: start it afresh."""
        self.clear_health(b)
        for slot in range(self.slots):
            r = self.backend_counters(slot, b)
            for k in range(NB):
                r[k] = 0

    def zero_listener(self, li):
        for slot in range(self.slots):
            r = self.listener_counters(slot, li)
            for k in range(NL):
                r[k] = 0


class Layout:
    """Which row of the table is whose: backends by ``(pool, address)``,
    listeners by name. ``assign(config)`` keeps the rows of what the new
    configuration keeps and gives free rows to the rest; rows of what it
    dropped are freed then (their numbers may go to something new at the
    next assign, which zeroes them first)."""

    def __init__(self, tables):
        self.tables = tables
        self.backends = {}      # (pool, address) -> row
        self.listeners = {}     # name -> row
        self._free_b = list(range(tables.backends - 1, -1, -1))
        self._free_l = list(range(tables.listeners - 1, -1, -1))
        self._dropped_b = []
        self._dropped_l = []

    def assign(self, config):
        """Rows for every backend and listener of ``config``; raises
        TableFull (and changes nothing) when they do not fit."""
        want_b = [(p.name, bc.address) for p in config.pools.values() for bc in p.backends]
        want_l = list(config.listeners)
        new_b = [k for k in dict.fromkeys(want_b) if k not in self.backends]
        new_l = [k for k in want_l if k not in self.listeners]
        keep_b = set(want_b)
        keep_l = set(want_l)
        gone_b = [k for k in self.backends if k not in keep_b]
        gone_l = [k for k in self.listeners if k not in keep_l]
        # rows dropped by the previous assign are free now; this one's after
        if len(new_b) > len(self._free_b) + len(self._dropped_b):
            raise TableFull(f"more than {self.tables.backends} backends "
                            "(the table is sized at start: restart to grow it)")
        if len(new_l) > len(self._free_l) + len(self._dropped_l):
            raise TableFull(f"more than {self.tables.listeners} listeners "
                            "(the table is sized at start: restart to grow it)")
        self._free_b.extend(self._dropped_b)
        self._free_l.extend(self._dropped_l)
        self._dropped_b = [self.backends.pop(k) for k in gone_b]
        self._dropped_l = [self.listeners.pop(k) for k in gone_l]
        for k in new_b:
            row = self._free_b.pop()
            self.tables.zero_backend(row)
            self.backends[k] = row
        for k in new_l:
            row = self._free_l.pop()
            self.tables.zero_listener(row)
            self.listeners[k] = row
        return dict(self.backends), dict(self.listeners)

    @staticmethod
    def capacity(config, workers=1):
        """``(backends, listeners, slots)`` to size a table for ``config``:
        room for reloads to grow it fourfold, and slots for two
        generations of workers (plus the retired totals) and spare."""
        n_b = sum(len(p.backends) for p in config.pools.values())
        return (max(256, 4 * n_b), max(16, 4 * len(config.listeners)),
                1 + max(1, 4 * workers))
