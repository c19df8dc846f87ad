"""The six backend selectors and pick_many.

The pure twin of ``selectors.pxi``, part of the pure-Python core (``fastlb._core_py``).
"""
from bisect import bisect_right as _bisect_right
from operator import index as _index

from fastlb.balance.hashing import _M64, hash64

# ---------------------------------------------------------------- selection
#
# Every selector works on integer indices (0..n-1) with a weight, an
# eligibility flag and an in-flight count per backend, and has the same
# surface: ``select(key=b"") -> int`` (a backend index; -1 when no backend is
# eligible; Maglev only: -2 for an empty key), ``release(idx)``,
# ``set_eligible(idx, ok)``, ``is_eligible(idx)``, ``set_weight(idx, w)``,
# ``in_flight(idx)`` and ``n``. A backend is *live* when it is eligible and
# its weight is above 0; only live backends are picked. Every select that
# returns ``idx >= 0`` counts one request in flight on ``idx``, and
# ``release(idx)`` ends one (never below 0).
#
# ``select_excluding(exclude, key=b"")`` is ``select`` with the backends in
# ``exclude`` (an iterable of indices, a set in the data path) taken out for
# this one pick, in the spirit of Pingora's ``select_with``: each algorithm runs
# its own logic over the remaining live backends (round robin goes on with its
# rotation, WRR runs its smooth pass over them only, least-conn takes the
# least loaded of them, p2c draws two of them, random draws among them by
# weight, Maglev walks its table from the key's entry past excluded backends),
# and -1 when none remains. With an empty ``exclude`` it is exactly ``select``
# (the same answer and the same state afterwards). Excluded backends' state is
# left as it is (WRR: their current weights are not touched). TypeError for an
# element that is not an integer, IndexError for one out of range.
#
# Derived state (usable lists,
# cumulative weights, the Maglev table) is rebuilt on set_weight and
# set_eligible only, never per request. Walks are bounded by ``n`` (Maglev:
# by ``table_size``).

_MAX_WEIGHT = 1000000
_MAX_TABLE = 1 << 24
_GOLDEN = 0x9E3779B97F4A7C15


def _check_weight(w):
    try:
        w = _index(w)
    except TypeError:
        raise TypeError(f"weight must be an integer, got {w!r}") from None
    if w < 0 or w > _MAX_WEIGHT:
        raise ValueError(f"weight must be between 0 and {_MAX_WEIGHT}, got {w}")
    return w


def _is_prime(m):
    if m < 2:
        return False
    if m % 2 == 0:
        return m == 2
    d = 3
    while d * d <= m:
        if m % d == 0:
            return False
        d += 2
    return True


class Selector:
    """The surface every selector shares: the base class of the six algorithms.

    Backends are indices 0..n-1 with a weight (an int, 0..1_000_000; 0: never
    picked), an eligibility flag (initially True) and a count of requests in
    flight. A backend is *live* when eligible with a weight above 0; only live
    backends are picked. Every ``select`` returning ``idx >= 0`` counts one
    request in flight on ``idx``; the caller calls ``release(idx)`` exactly
    once when that request ends. Out-of-range indices raise
    IndexError("backend index out of range"). ``select_excluding(exclude,
    key)`` is the same pick with the backends in ``exclude`` left out (a
    retry's pick: never a backend the request failed on). Subclasses override
    ``select`` and ``select_excluding`` (the compiled twin's ``Selector`` is
    declared in ``_core.pxd``, for compiled callers to cimport).
    """

    __slots__ = ("n", "_eligible", "_weight", "_inflight", "_live")

    def _setup(self, weights, checked=True):
        n = len(weights)
        if n == 0:
            raise ValueError("a balancer needs at least one backend")
        if checked:
            ws = [_check_weight(w) for w in weights]
        else:
            ws = [1 if w > 0 else 0 for w in weights]
        self.n = n
        self._weight = ws
        self._eligible = [True] * n
        self._inflight = [0] * n
        self._live = [w > 0 for w in ws]

    def _check(self, idx):
        if not 0 <= idx < self.n:
            raise IndexError("backend index out of range")

    def _changed(self):
        pass

    def select(self, key=b""):
        """A live backend's index (counted in flight), or -1 when none is live.

        ``key`` is ignored except by Maglev (which returns -2 for b"").
        """
        raise NotImplementedError(f"{type(self).__name__}.select")

    def select_excluding(self, exclude, key=b""):
        """As ``select``, among the live backends whose index is not in ``exclude``.

        ``exclude`` is an iterable of backend indices (the backends a request
        already failed on); -1 when every live backend is in it.
        """
        raise NotImplementedError(f"{type(self).__name__}.select_excluding")

    def _exclude(self, exclude):
        """Per backend: live and not in ``exclude``; and how many are."""
        mask = list(self._live)
        n = self.n
        for x in exclude:
            i = _index(x)
            if not 0 <= i < n:
                raise IndexError("backend index out of range")
            mask[i] = False
        return mask, mask.count(True)

    def release(self, idx):
        """End of one request on backend ``idx``: its in-flight count drops by 1 (never below 0)."""
        self._check(idx)
        if self._inflight[idx] > 0:
            self._inflight[idx] -= 1

    def acquire(self, idx):
        """Count one more request in flight on backend ``idx`` without
        choosing it (a request that a reload moved to this selector)."""
        self._check(idx)
        self._inflight[idx] += 1

    def in_flight(self, idx):
        """Requests in flight on backend ``idx`` (selected and not yet released)."""
        self._check(idx)
        return self._inflight[idx]

    def set_eligible(self, idx, ok):
        """Mark backend ``idx`` eligible or not (e.g. from health checks)."""
        self._check(idx)
        ok = bool(ok)
        if ok != self._eligible[idx]:
            self._eligible[idx] = ok
            self._live[idx] = ok and self._weight[idx] > 0
            self._changed()

    def is_eligible(self, idx):
        """Whether backend ``idx`` is eligible."""
        self._check(idx)
        return self._eligible[idx]

    def set_weight(self, idx, w):
        """Set backend ``idx``'s weight (an int, 0..1_000_000; 0: never picked); rebuilds tables."""
        self._check(idx)
        w = _check_weight(w)
        self._weight[idx] = w
        self._live[idx] = self._eligible[idx] and w > 0
        self._changed()


class RoundRobin(Selector):
    """Round robin over ``len(weights)`` backends; a weight of 0 is never picked.

    Other weights are only "above 0" (use WeightedRoundRobin for shares).
    ``seed`` sets the first backend tried (``seed % n``), so runs repeat.
    """

    __slots__ = ("_next",)

    def __init__(self, weights, seed=0):
        self._setup(weights, checked=False)
        self._next = seed % self.n

    def select(self, key=b""):
        n = self.n
        i = self._next
        live = self._live
        for _ in range(n):
            if live[i]:
                self._next = i + 1 if i + 1 < n else 0
                self._inflight[i] += 1
                return i
            i = i + 1 if i + 1 < n else 0
        return -1

    def select_excluding(self, exclude, key=b""):
        live, _ = self._exclude(exclude)
        n = self.n
        i = self._next
        for _ in range(n):
            if live[i]:
                self._next = i + 1 if i + 1 < n else 0
                self._inflight[i] += 1
                return i
            i = i + 1 if i + 1 < n else 0
        return -1


class WeightedRoundRobin(Selector):
    """Smooth weighted round robin (nginx's): weights 5, 1, 1 give a a b a c a a.

    Each pick adds every live backend's weight to its current weight, takes
    the highest (ties: the first in scan order, which starts at ``seed % n``)
    and subtracts the total live weight from it. set_weight resets the
    current weights; set_eligible leaves them (a backend coming back resumes).
    """

    __slots__ = ("_current", "_start")

    def __init__(self, weights, seed=0):
        self._setup(weights)
        self._current = [0] * self.n
        self._start = seed % self.n

    def set_weight(self, idx, w):
        Selector.set_weight(self, idx, w)
        self._current = [0] * self.n

    def select(self, key=b""):
        n = self.n
        i = self._start
        live = self._live
        weight = self._weight
        cur = self._current
        total = 0
        best = -1
        bestc = 0
        for _ in range(n):
            if live[i]:
                w = weight[i]
                c = cur[i] + w
                cur[i] = c
                total += w
                if best < 0 or c > bestc:
                    best = i
                    bestc = c
            i = i + 1 if i + 1 < n else 0
        if best < 0:
            return -1
        cur[best] = bestc - total
        self._inflight[best] += 1
        return best

    def select_excluding(self, exclude, key=b""):
        # nginx's pass over the peers not tried yet: excluded backends neither
        # gain their weight nor count in the total, so their current weights
        # stay as they were and the current weights still sum to what they did.
        live, _ = self._exclude(exclude)
        n = self.n
        i = self._start
        weight = self._weight
        cur = self._current
        total = 0
        best = -1
        bestc = 0
        for _ in range(n):
            if live[i]:
                w = weight[i]
                c = cur[i] + w
                cur[i] = c
                total += w
                if best < 0 or c > bestc:
                    best = i
                    bestc = c
            i = i + 1 if i + 1 < n else 0
        if best < 0:
            return -1
        cur[best] = bestc - total
        self._inflight[best] += 1
        return best


class LeastConn(Selector):
    """Fewest requests in flight per unit of weight (in_flight / weight, compared exactly).

    Ties go to the first in rotation: the scan starts just after the last
    pick (at ``seed % n`` for the first one).
    """

    __slots__ = ("_next",)

    def __init__(self, weights, seed=0):
        self._setup(weights)
        self._next = seed % self.n

    def select(self, key=b""):
        n = self.n
        i = self._next
        live = self._live
        weight = self._weight
        inf = self._inflight
        best = -1
        bf = 0
        bw = 1
        for _ in range(n):
            if live[i]:
                f = inf[i]
                w = weight[i]
                if best < 0 or f * bw < bf * w:
                    best = i
                    bf = f
                    bw = w
            i = i + 1 if i + 1 < n else 0
        if best < 0:
            return -1
        self._next = best + 1 if best + 1 < n else 0
        inf[best] += 1
        return best

    def select_excluding(self, exclude, key=b""):
        live, _ = self._exclude(exclude)
        n = self.n
        i = self._next
        weight = self._weight
        inf = self._inflight
        best = -1
        bf = 0
        bw = 1
        for _ in range(n):
            if live[i]:
                f = inf[i]
                w = weight[i]
                if best < 0 or f * bw < bf * w:
                    best = i
                    bf = f
                    bw = w
            i = i + 1 if i + 1 < n else 0
        if best < 0:
            return -1
        self._next = best + 1 if best + 1 < n else 0
        inf[best] += 1
        return best


class _Seeded(Selector):
    """A live-backend list (ascending index) and a splitmix64 generator seeded with ``seed``."""

    __slots__ = ("_rng", "_usable")

    def _seeded(self, seed):
        self._rng = seed & _M64
        self._changed()

    def _changed(self):
        self._usable = [i for i in range(self.n) if self._live[i]]

    def _next64(self):
        s = (self._rng + _GOLDEN) & _M64
        self._rng = s
        s = ((s ^ (s >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        s = ((s ^ (s >> 27)) * 0x94D049BB133111EB) & _M64
        return s ^ (s >> 31)


class P2C(_Seeded):
    """Power of two random choices: of two distinct live backends drawn at random,
    the one with fewer requests in flight per unit of weight (the first drawn on a tie).

    ``seed`` seeds the splitmix64 generator: the same seed and the same
    operations give the same answers on both cores.
    """

    __slots__ = ()

    def __init__(self, weights, seed=0):
        self._setup(weights)
        self._seeded(seed)

    def select(self, key=b""):
        u = self._usable
        m = len(u)
        if m == 0:
            return -1
        inf = self._inflight
        if m == 1:
            a = u[0]
        else:
            i = self._next64() % m
            j = self._next64() % (m - 1)
            if j >= i:
                j += 1
            a = u[i]
            b = u[j]
            w = self._weight
            if inf[b] * w[a] < inf[a] * w[b]:
                a = b
        inf[a] += 1
        return a

    def select_excluding(self, exclude, key=b""):
        # the same draws as select, over the usable backends left in (in index order)
        mask, m = self._exclude(exclude)
        if m == 0:
            return -1
        u = [i for i in self._usable if mask[i]]
        inf = self._inflight
        if m == 1:
            a = u[0]
        else:
            i = self._next64() % m
            j = self._next64() % (m - 1)
            if j >= i:
                j += 1
            a = u[i]
            b = u[j]
            w = self._weight
            if inf[b] * w[a] < inf[a] * w[b]:
                a = b
        inf[a] += 1
        return a


class Random(_Seeded):
    """Weighted random: each live backend with probability weight / total live weight.

    ``seed`` seeds the splitmix64 generator (identical on both cores).
    """

    __slots__ = ("_cum",)

    def __init__(self, weights, seed=0):
        self._setup(weights)
        self._seeded(seed)

    def _changed(self):
        _Seeded._changed(self)
        cum = []
        t = 0
        for i in self._usable:
            t += self._weight[i]
            cum.append(t)
        self._cum = cum

    def select(self, key=b""):
        u = self._usable
        m = len(u)
        if m == 0:
            return -1
        if m == 1:
            a = u[0]
        else:
            cum = self._cum
            a = u[_bisect_right(cum, self._next64() % cum[-1])]
        self._inflight[a] += 1
        return a

    def select_excluding(self, exclude, key=b""):
        # the same draw as select, over the cumulative weights of the backends left in
        mask, m = self._exclude(exclude)
        if m == 0:
            return -1
        u = [i for i in self._usable if mask[i]]
        if m == 1:
            a = u[0]
        else:
            weight = self._weight
            total = 0
            for i in u:
                total += weight[i]
            r = self._next64() % total
            t = 0
            for a in u:
                t += weight[a]
                if t > r:
                    break
        self._inflight[a] += 1
        return a


class Maglev(Selector):
    """Maglev consistent hashing (Eisenbud et al., NSDI 2016; Envoy's weighted variant).

    ``names`` are the backends' ids (distinct bytes, e.g. b"10.0.0.1:8080"):
    each backend's permutation of the table comes from ``hash64(name, 0)``
    (offset) and ``hash64(name, 1)`` (skip), and backends fill the table in
    the order of their names, so every node given the same names, weights
    and ``table_size`` builds the same table whatever the backends' order.
    A backend with weight w gets about ``table_size * w / total`` entries
    (a weight of 0: none). ``table_size`` must be a prime, at least ``n``
    and below 2**24. ``seed`` is accepted for the common surface and unused
    (the table must not depend on it).

    ``select(key)`` returns -2 for an empty key (the caller falls back to
    another algorithm), else the backend at ``table[hash64(key) % table_size]``;
    when that backend is not live the walk goes forward in the table to the
    next live entry (bounded by ``table_size``; -1 when no backend is live).
    The table is rebuilt by set_weight, never by set_eligible.

    ``balance_factor`` (0: off; else >= 1.0) bounds the load like HAProxy's
    hash-balance-factor: an entry's backend b is taken only if
    ``in_flight(b) < factor * (T + 1) * w_b / W``, T and W being the requests
    in flight on and the total weight of the live backends (with equal
    weights: fewer than factor x the mean, counting this request); otherwise
    the walk goes on to the next entry.
    """

    __slots__ = ("table_size", "balance_factor", "_names", "_offset", "_skip", "_order",
                 "_table", "_nlive", "_lw", "_lf")

    def __init__(self, weights, names, seed=0, table_size=65537, balance_factor=0.0):
        self._setup(weights)
        n = self.n
        names = list(names)
        if len(names) != n:
            raise ValueError(f"{len(names)} names for {n} backends")
        for nm in names:
            if type(nm) is not bytes:
                raise TypeError(f"backend names must be bytes, got {nm!r}")
        if len(set(names)) != n:
            raise ValueError("backend names must be distinct")
        try:
            m = _index(table_size)
        except TypeError:
            raise TypeError(f"table_size must be an integer, got {table_size!r}") from None
        if m < n or m >= _MAX_TABLE or not _is_prime(m):
            raise ValueError(f"table_size must be a prime >= the number of backends and "
                             f"below 2**24, got {m}")
        try:
            f = float(balance_factor)
        except (TypeError, ValueError):
            raise TypeError(f"balance_factor must be a number, got {balance_factor!r}") from None
        if not (f == 0.0 or 1.0 <= f < float("inf")):
            raise ValueError(f"balance_factor must be 0 (off) or >= 1.0, got {balance_factor!r}")
        self.table_size = m
        self.balance_factor = f
        self._names = names
        self._offset = [hash64(nm, 0) % m for nm in names]
        self._skip = [hash64(nm, 1) % (m - 1) + 1 for nm in names]
        self._order = sorted(range(n), key=names.__getitem__)
        self._build()
        self._changed()

    def _build(self):
        m = self.table_size
        table = [-1] * m
        weight = self._weight
        entries = [i for i in self._order if weight[i] > 0]
        if entries:
            wmax = max(weight[i] for i in entries)
            pos = {i: self._offset[i] for i in entries}
            target = {i: 0 for i in entries}
            filled = 0
            it = 1
            while filled < m:
                for i in entries:
                    w = weight[i]
                    if it * w < target[i]:
                        continue
                    target[i] += wmax
                    c = pos[i]
                    sk = self._skip[i]
                    while table[c] >= 0:
                        c += sk
                        if c >= m:
                            c -= m
                    table[c] = i
                    c += sk
                    pos[i] = c - m if c >= m else c
                    filled += 1
                    if filled == m:
                        break
                it += 1
        self._table = table

    def _changed(self):
        nlive = lw = lf = 0
        for i in range(self.n):
            if self._live[i]:
                nlive += 1
                lw += self._weight[i]
                lf += self._inflight[i]
        self._nlive = nlive
        self._lw = lw
        self._lf = lf

    def set_weight(self, idx, w):
        self._check(idx)
        w = _check_weight(w)
        if w != self._weight[idx]:
            self._weight[idx] = w
            self._live[idx] = self._eligible[idx] and w > 0
            self._build()
        self._changed()

    def release(self, idx):
        self._check(idx)
        if self._inflight[idx] > 0:
            self._inflight[idx] -= 1
            if self._live[idx]:
                self._lf -= 1

    def acquire(self, idx):
        self._check(idx)
        self._inflight[idx] += 1
        if self._live[idx]:
            self._lf += 1

    def select(self, key=b""):
        if type(key) is not bytes:
            raise TypeError("key must be bytes")
        return self._walk(key, self._live, self._nlive)

    def select_excluding(self, exclude, key=b""):
        # select's walk from the key's entry, passing excluded backends too; the
        # bounded load still compares with the mean over every live backend
        live, left = self._exclude(exclude)
        if type(key) is not bytes:
            raise TypeError("key must be bytes")
        return self._walk(key, live, left)

    def _walk(self, key, live, nlive):
        """The table walk from the key's entry to the first backend ``live`` allows
        (and, with a balance factor, under the load bound)."""
        if not key:
            return -2
        if nlive == 0:
            return -1
        m = self.table_size
        table = self._table
        c = hash64(key) % m
        f = self.balance_factor
        inf = self._inflight
        pick = -1
        if f == 0.0:
            for _ in range(m):
                b = table[c]
                if live[b]:
                    pick = b
                    break
                c = c + 1 if c + 1 < m else 0
        else:
            first = -1
            lim = f * float(self._lf + 1)
            lw = float(self._lw)
            weight = self._weight
            for _ in range(m):
                b = table[c]
                if live[b]:
                    if float(inf[b]) * lw < lim * float(weight[b]):
                        pick = b
                        break
                    if first < 0:
                        first = b
                c = c + 1 if c + 1 < m else 0
            if pick < 0:
                pick = first
        if pick < 0:
            return -1
        inf[pick] += 1
        self._lf += 1
        return pick


def pick_many(selector, n, key=b"", exclude=None):
    """``n`` picks (``select(key)``, then ``release(idx)`` if ``idx >= 0``); the sum of the indices.

    What the data path does per request, ``n`` times in a row (the compiled
    twin loops in C, calling the selector's methods as C calls). With
    ``exclude`` (not None) each pick is ``select_excluding(exclude, key)``, as
    a retry makes it. TypeError unless ``selector`` is a ``Selector`` or ``n``
    an integer; ValueError when ``n`` is negative; whatever ``select`` or
    ``select_excluding`` raises (Maglev: a non-bytes key).
    """
    if not isinstance(selector, Selector):
        raise TypeError(f"selector must be a Selector, not {type(selector).__name__}")
    n = _index(n)
    if n < 0:
        raise ValueError("n must not be negative")
    release = selector.release
    total = 0
    if exclude is None:
        select = selector.select
        for _ in range(n):
            idx = select(key)
            if idx >= 0:
                release(idx)
                total += idx
    else:
        select_excluding = selector.select_excluding
        for _ in range(n):
            idx = select_excluding(exclude, key)
            if idx >= 0:
                release(idx)
                total += idx
    return total
