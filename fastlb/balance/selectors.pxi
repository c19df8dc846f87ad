# Included by fastlb/_core.pyx: one extension module with the rest of the core.
# The pure twin is fastlb/balance/selectors.py.

# ---------------------------------------------------------------- selection
#
# Twins of the selectors of ``selectors.py`` (see the comment there): the same
# state in malloc'd C arrays, the same arithmetic (int64 where the twin uses
# Python ints, within the bounds set by _MAX_WEIGHT), the same splitmix64.

_MAX_WEIGHT = 1000000
_MAX_TABLE = 1 << 24


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


cdef inline uint64_t _splitmix(uint64_t* state) noexcept nogil:
    cdef uint64_t z = state[0] + GOLDEN
    state[0] = z
    z = (z ^ (z >> 30)) * SM1
    z = (z ^ (z >> 27)) * SM2
    return z ^ (z >> 31)


cdef class Selector:
    """The surface every selector shares; see ``fastlb._core_py.Selector`` (its twin).

    Declared in ``_core.pxd``: ``select``, ``select_excluding`` and
    ``release`` are cpdef, so compiled code that cimports ``Selector`` calls
    them in C, dispatched to the subclass through the vtable (see
    ``pick_many``). ``select_excluding`` works on ``_mask``, a scratch copy of
    ``_live`` with the excluded backends cleared (``_exclude``), so each
    algorithm's loop is its ``select`` loop reading the mask instead.
    """

    def __dealloc__(self):
        self._free_base()

    cdef void _free_base(self) noexcept:
        free(self._eligible)
        free(self._live)
        free(self._weight)
        free(self._inflight)
        free(self._mask)
        self._eligible = self._live = self._mask = NULL
        self._weight = self._inflight = NULL

    cdef _setup(self, weights, bint checked):
        cdef Py_ssize_t n = len(weights), i
        if n == 0:
            raise ValueError("a balancer needs at least one backend")
        if checked:
            ws = [_check_weight(w) for w in weights]
        else:
            ws = [1 if w > 0 else 0 for w in weights]
        self._free_base()
        self.n = 0
        self._eligible = <unsigned char*>malloc(n)
        self._live = <unsigned char*>malloc(n)
        self._weight = <int64_t*>malloc(n * sizeof(int64_t))
        self._inflight = <int64_t*>malloc(n * sizeof(int64_t))
        self._mask = <unsigned char*>malloc(n)
        if (self._eligible == NULL or self._live == NULL or self._weight == NULL
                or self._inflight == NULL or self._mask == NULL):
            raise MemoryError()
        for i in range(n):
            self._weight[i] = ws[i]
            self._eligible[i] = 1
            self._inflight[i] = 0
            self._live[i] = 1 if self._weight[i] > 0 else 0
        self.n = n

    cdef Py_ssize_t _index(self, idx) except -1:
        cdef Py_ssize_t i
        try:
            i = idx
        except OverflowError:
            raise IndexError("backend index out of range") from None
        if i < 0 or i >= self.n:
            raise IndexError("backend index out of range")
        return i

    cdef int _changed(self) except -1:
        return 0

    cdef Py_ssize_t _exclude(self, exclude) except -1:
        # _mask = _live with every backend in ``exclude`` cleared; the count left.
        # Rewritten whole on every call, so an error half-way leaves nothing behind.
        cdef Py_ssize_t n = self.n, i, m = 0
        cdef unsigned char* mask = self._mask
        memcpy(mask, self._live, n)
        if type(exclude) is set:      # the data path's: walked in place, no iterator object
            for x in <set>exclude:
                mask[self._index(x)] = 0
        else:
            for x in exclude:
                mask[self._index(x)] = 0
        for i in range(n):
            m += mask[i]
        return m

    cpdef Py_ssize_t select(self, key=b"") except -3:
        """A live backend's index (counted in flight), or -1 when none is live.

        ``key`` is ignored except by Maglev (which returns -2 for b"").
        """
        raise NotImplementedError(f"{type(self).__name__}.select")

    cpdef Py_ssize_t select_excluding(self, exclude, key=b"") except -3:
        """As ``select``, among the live backends whose index is not in ``exclude``.

        ``exclude`` is an iterable of backend indices; -1 when none is left.
        """
        raise NotImplementedError(f"{type(self).__name__}.select_excluding")

    cpdef release(self, idx):
        """End of one request on backend ``idx``: its in-flight count drops by 1 (never below 0)."""
        cdef Py_ssize_t i = self._index(idx)
        if self._inflight[i] > 0:
            self._inflight[i] -= 1

    def acquire(self, idx):
        self._inflight[self._index(idx)] += 1

    def in_flight(self, idx):
        return self._inflight[self._index(idx)]

    def set_eligible(self, idx, ok):
        cdef Py_ssize_t i = self._index(idx)
        cdef unsigned char e = 1 if ok else 0
        if e != self._eligible[i]:
            self._eligible[i] = e
            self._live[i] = 1 if (e and self._weight[i] > 0) else 0
            self._changed()

    def is_eligible(self, idx):
        return self._eligible[self._index(idx)] != 0

    def set_weight(self, idx, w):
        cdef Py_ssize_t i = self._index(idx)
        self._weight[i] = _check_weight(w)
        self._live[i] = 1 if (self._eligible[i] and self._weight[i] > 0) else 0
        self._changed()


cdef class RoundRobin(Selector):
    """Round robin over ``len(weights)`` backends; a weight of 0 is never picked.

    See ``fastlb._core_py.RoundRobin``: this is its compiled twin.
    """

    cdef Py_ssize_t _next

    def __init__(self, weights, seed=0):
        self._setup(weights, False)
        self._next = seed % self.n

    cpdef Py_ssize_t select(self, key=b"") except -3:
        cdef Py_ssize_t n = self.n, i = self._next, k
        cdef const unsigned char* u = self._live
        for k in range(n):
            if u[i]:
                self._next = i + 1 if i + 1 < n else 0
                self._inflight[i] += 1
                return i
            i = i + 1 if i + 1 < n else 0
        return -1

    cpdef Py_ssize_t select_excluding(self, exclude, key=b"") except -3:
        self._exclude(exclude)
        cdef Py_ssize_t n = self.n, i = self._next, k
        cdef const unsigned char* u = self._mask
        for k in range(n):
            if u[i]:
                self._next = i + 1 if i + 1 < n else 0
                self._inflight[i] += 1
                return i
            i = i + 1 if i + 1 < n else 0
        return -1


cdef class WeightedRoundRobin(Selector):
    """Smooth weighted round robin (nginx's): weights 5, 1, 1 give a a b a c a a.

    See ``fastlb._core_py.WeightedRoundRobin``: this is its compiled twin.
    """

    cdef int64_t* _current
    cdef Py_ssize_t _start

    def __init__(self, weights, seed=0):
        cdef Py_ssize_t i
        self._setup(weights, True)
        free(self._current)
        self._current = <int64_t*>malloc(self.n * sizeof(int64_t))
        if self._current == NULL:
            raise MemoryError()
        for i in range(self.n):
            self._current[i] = 0
        self._start = seed % self.n

    def __dealloc__(self):
        free(self._current)
        self._current = NULL

    def set_weight(self, idx, w):
        cdef Py_ssize_t i
        Selector.set_weight(self, idx, w)
        for i in range(self.n):
            self._current[i] = 0

    cpdef Py_ssize_t select(self, key=b"") except -3:
        return self._pick(self._live)

    cpdef Py_ssize_t select_excluding(self, exclude, key=b"") except -3:
        # nginx's pass over the peers not tried: excluded ones keep their current weight
        self._exclude(exclude)
        return self._pick(self._mask)

    cdef inline Py_ssize_t _pick(self, const unsigned char* live):
        """nginx's smooth weighted pass over the backends ``live`` allows."""
        cdef Py_ssize_t n = self.n, i = self._start, k, best = -1
        cdef int64_t total = 0, c, bestc = 0, w
        cdef const int64_t* weight = self._weight
        cdef int64_t* cur = self._current
        for k in range(n):
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

cdef class LeastConn(Selector):
    """Fewest requests in flight per unit of weight; ties to the first in rotation.

    See ``fastlb._core_py.LeastConn``: this is its compiled twin.
    """

    cdef Py_ssize_t _next

    def __init__(self, weights, seed=0):
        self._setup(weights, True)
        self._next = seed % self.n

    cpdef Py_ssize_t select(self, key=b"") except -3:
        return self._pick(self._live)

    cpdef Py_ssize_t select_excluding(self, exclude, key=b"") except -3:
        self._exclude(exclude)
        return self._pick(self._mask)

    cdef inline Py_ssize_t _pick(self, const unsigned char* live):
        """The fewest in flight per unit of weight among the backends ``live``
        allows, ties in rotation."""
        cdef Py_ssize_t n = self.n, i = self._next, k, best = -1
        cdef int64_t bf = 0, bw = 1, f, w
        cdef const int64_t* weight = self._weight
        cdef int64_t* inf = self._inflight
        for k in range(n):
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

cdef class _Seeded(Selector):
    cdef uint64_t _rng
    cdef Py_ssize_t* _usable
    cdef Py_ssize_t _m

    def __dealloc__(self):
        free(self._usable)
        self._usable = NULL

    cdef _seeded(self, seed):
        free(self._usable)
        self._m = 0
        self._usable = <Py_ssize_t*>malloc(self.n * sizeof(Py_ssize_t))
        if self._usable == NULL:
            raise MemoryError()
        self._rng = seed & 0xFFFFFFFFFFFFFFFF
        self._changed()

    cdef int _changed(self) except -1:
        cdef Py_ssize_t i, m = 0
        if self._usable == NULL:
            return 0
        for i in range(self.n):
            if self._live[i]:
                self._usable[m] = i
                m += 1
        self._m = m
        return 0


cdef class P2C(_Seeded):
    """Power of two random choices on requests in flight per unit of weight.

    See ``fastlb._core_py.P2C``: this is its compiled twin.
    """

    def __init__(self, weights, seed=0):
        self._setup(weights, True)
        self._seeded(seed)

    cpdef Py_ssize_t select(self, key=b"") except -3:
        cdef Py_ssize_t m = self._m, a, b
        cdef uint64_t i, j
        cdef int64_t* inf = self._inflight
        if m == 0:
            return -1
        if m == 1:
            a = self._usable[0]
        else:
            i = _splitmix(&self._rng) % <uint64_t>m
            j = _splitmix(&self._rng) % <uint64_t>(m - 1)
            if j >= i:
                j += 1
            a = self._usable[i]
            b = self._usable[j]
            if inf[b] * self._weight[a] < inf[a] * self._weight[b]:
                a = b
        inf[a] += 1
        return a

    cpdef Py_ssize_t select_excluding(self, exclude, key=b"") except -3:
        # select's draws, over the usable backends left in (the i-th and j-th of them)
        cdef Py_ssize_t m = self._exclude(exclude), k, a = -1, b = -1
        cdef uint64_t i = 0, j = 0, t = 0
        cdef const unsigned char* mask = self._mask
        cdef const Py_ssize_t* u = self._usable
        cdef int64_t* inf = self._inflight
        if m == 0:
            return -1
        if m > 1:
            i = _splitmix(&self._rng) % <uint64_t>m
            j = _splitmix(&self._rng) % <uint64_t>(m - 1)
            if j >= i:
                j += 1
        for k in range(self._m):
            if mask[u[k]]:
                if t == i:
                    a = u[k]
                if t == j:
                    b = u[k]
                t += 1
        if m > 1 and inf[b] * self._weight[a] < inf[a] * self._weight[b]:
            a = b
        inf[a] += 1
        return a


cdef class Random(_Seeded):
    """Weighted random: each live backend with probability weight / total live weight.

    See ``fastlb._core_py.Random``: this is its compiled twin.
    """

    cdef uint64_t* _cum

    def __init__(self, weights, seed=0):
        self._setup(weights, True)
        free(self._cum)
        self._cum = <uint64_t*>malloc(self.n * sizeof(uint64_t))
        if self._cum == NULL:
            raise MemoryError()
        self._seeded(seed)

    def __dealloc__(self):
        free(self._cum)
        self._cum = NULL

    cdef int _changed(self) except -1:
        cdef Py_ssize_t k
        cdef uint64_t t = 0
        _Seeded._changed(self)
        if self._cum == NULL:
            return 0
        for k in range(self._m):
            t += <uint64_t>self._weight[self._usable[k]]
            self._cum[k] = t
        return 0

    cpdef Py_ssize_t select(self, key=b"") except -3:
        cdef Py_ssize_t m = self._m, a, lo, hi, mid
        cdef uint64_t r
        if m == 0:
            return -1
        if m == 1:
            a = self._usable[0]
        else:
            r = _splitmix(&self._rng) % self._cum[m - 1]
            lo = 0
            hi = m - 1
            while lo < hi:
                mid = (lo + hi) >> 1
                if self._cum[mid] > r:
                    hi = mid
                else:
                    lo = mid + 1
            a = self._usable[lo]
        self._inflight[a] += 1
        return a

    cpdef Py_ssize_t select_excluding(self, exclude, key=b"") except -3:
        # select's draw, over the running weights of the usable backends left in
        cdef Py_ssize_t m = self._exclude(exclude), k, a = -1
        cdef uint64_t r = 0, t = 0, total = 0
        cdef const unsigned char* mask = self._mask
        cdef const Py_ssize_t* u = self._usable
        cdef const int64_t* weight = self._weight
        if m == 0:
            return -1
        if m > 1:
            for k in range(self._m):
                if mask[u[k]]:
                    total += <uint64_t>weight[u[k]]
            r = _splitmix(&self._rng) % total
        for k in range(self._m):
            if mask[u[k]]:
                t += <uint64_t>weight[u[k]]
                if t > r:
                    a = u[k]
                    break
        self._inflight[a] += 1
        return a


cdef class Maglev(Selector):
    """Maglev consistent hashing (Envoy's weighted variant), with optional bounded load.

    See ``fastlb._core_py.Maglev``: this is its compiled twin.
    """

    cdef readonly Py_ssize_t table_size
    cdef readonly double balance_factor
    cdef int32_t* _table
    cdef uint32_t* _offset
    cdef uint32_t* _skip
    cdef int32_t* _order
    cdef Py_ssize_t _nlive
    cdef int64_t _lw
    cdef int64_t _lf

    def __init__(self, weights, names, seed=0, table_size=65537, balance_factor=0.0):
        cdef Py_ssize_t n, i, m
        self._free_tables()  # a second __init__ must not keep a table of the old backends
        self._nlive = 0
        self._setup(weights, True)
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
            mm = _index(table_size)
        except TypeError:
            raise TypeError(f"table_size must be an integer, got {table_size!r}") from None
        if mm < n or mm >= _MAX_TABLE or not _is_prime(mm):
            raise ValueError(f"table_size must be a prime >= the number of backends and "
                             f"below 2**24, got {mm}")
        m = mm
        try:
            f = float(balance_factor)
        except (TypeError, ValueError):
            raise TypeError(f"balance_factor must be a number, got {balance_factor!r}") from None
        if not (f == 0.0 or 1.0 <= f < float("inf")):
            raise ValueError(f"balance_factor must be 0 (off) or >= 1.0, got {balance_factor!r}")
        self._free_tables()
        self._nlive = 0
        self._table = <int32_t*>malloc(m * sizeof(int32_t))
        self._offset = <uint32_t*>malloc(n * sizeof(uint32_t))
        self._skip = <uint32_t*>malloc(n * sizeof(uint32_t))
        self._order = <int32_t*>malloc(n * sizeof(int32_t))
        if self._table == NULL or self._offset == NULL or self._skip == NULL or self._order == NULL:
            self._free_tables()
            raise MemoryError()
        self.table_size = m
        self.balance_factor = f
        for i in range(n):
            nm = names[i]
            self._offset[i] = <uint32_t>(hash64(nm, 0) % m)
            self._skip[i] = <uint32_t>(hash64(nm, 1) % (m - 1) + 1)
        order = sorted(range(n), key=names.__getitem__)
        for i in range(n):
            self._order[i] = order[i]
        self._build()
        self._changed()

    cdef void _free_tables(self) noexcept:
        free(self._table)
        free(self._offset)
        free(self._skip)
        free(self._order)
        self._table = self._order = NULL
        self._offset = self._skip = NULL

    def __dealloc__(self):
        self._free_tables()

    cdef int _build(self) except -1:
        cdef Py_ssize_t m = self.table_size, n = self.n, i, k, ne = 0, filled = 0
        cdef int64_t wmax = 0, it = 1, w
        cdef uint64_t c, sk
        cdef int32_t* entries = <int32_t*>malloc(n * sizeof(int32_t))
        cdef uint64_t* pos = <uint64_t*>malloc(n * sizeof(uint64_t))
        cdef int64_t* target = <int64_t*>malloc(n * sizeof(int64_t))
        cdef int32_t* table = self._table
        if entries == NULL or pos == NULL or target == NULL:
            free(entries)
            free(pos)
            free(target)
            raise MemoryError()
        for c in range(<uint64_t>m):
            table[c] = -1
        for k in range(n):
            i = self._order[k]
            w = self._weight[i]
            if w > 0:
                entries[ne] = <int32_t>i
                pos[ne] = self._offset[i]
                target[ne] = 0
                ne += 1
                if w > wmax:
                    wmax = w
        if ne > 0:
            while filled < m:
                for k in range(ne):
                    i = entries[k]
                    w = self._weight[i]
                    if it * w < target[k]:
                        continue
                    target[k] += wmax
                    c = pos[k]
                    sk = self._skip[i]
                    while table[c] >= 0:
                        c += sk
                        if c >= <uint64_t>m:
                            c -= m
                    table[c] = <int32_t>i
                    c += sk
                    pos[k] = c - m if c >= <uint64_t>m else c
                    filled += 1
                    if filled == m:
                        break
                it += 1
        free(entries)
        free(pos)
        free(target)
        return 0

    cdef int _changed(self) except -1:
        cdef Py_ssize_t i, nlive = 0
        cdef int64_t lw = 0, lf = 0
        for i in range(self.n):
            if self._live[i]:
                nlive += 1
                lw += self._weight[i]
                lf += self._inflight[i]
        self._nlive = nlive
        self._lw = lw
        self._lf = lf
        return 0

    def set_weight(self, idx, w):
        cdef Py_ssize_t i = self._index(idx)
        cdef int64_t v = _check_weight(w)
        if v != self._weight[i]:
            self._weight[i] = v
            self._live[i] = 1 if (self._eligible[i] and v > 0) else 0
            if self._table != NULL:
                self._build()
        self._changed()

    cpdef release(self, idx):
        cdef Py_ssize_t i = self._index(idx)
        if self._inflight[i] > 0:
            self._inflight[i] -= 1
            if self._live[i]:
                self._lf -= 1

    def acquire(self, idx):
        cdef Py_ssize_t i = self._index(idx)
        self._inflight[i] += 1
        if self._live[i]:
            self._lf += 1

    cpdef Py_ssize_t select(self, key=b"") except -3:
        if type(key) is not bytes:
            raise TypeError("key must be bytes")
        return self._walk(key, self._live, self._nlive)

    cpdef Py_ssize_t select_excluding(self, exclude, key=b"") except -3:
        # select's walk from the key's entry, passing excluded backends too; the
        # bounded load still compares with the mean over every live backend
        cdef Py_ssize_t left = self._exclude(exclude)
        if type(key) is not bytes:
            raise TypeError("key must be bytes")
        return self._walk(key, self._mask, left)

    cdef inline Py_ssize_t _walk(self, bytes key, const unsigned char* live, Py_ssize_t nlive):
        """The table walk from the key's entry to the first backend ``live`` allows
        (and, with a balance factor, under the load bound)."""
        cdef Py_ssize_t kl = PyBytes_GET_SIZE(key)
        if kl == 0:
            return -2
        if nlive == 0 or self._table == NULL:
            return -1
        cdef uint64_t m = <uint64_t>self.table_size
        cdef uint64_t c = _xxh64(<const unsigned char*>PyBytes_AS_STRING(key), kl, 0) % m
        cdef uint64_t k
        cdef const int32_t* table = self._table
        cdef int64_t* inf = self._inflight
        cdef double f = self.balance_factor, lim, lw
        cdef Py_ssize_t b, pick = -1, first = -1
        if f == 0.0:
            for k in range(m):
                b = table[c]
                if live[b]:
                    pick = b
                    break
                c = c + 1 if c + 1 < m else 0
        else:
            lim = f * <double>(self._lf + 1)
            lw = <double>self._lw
            for k in range(m):
                b = table[c]
                if live[b]:
                    if <double>inf[b] * lw < lim * <double>self._weight[b]:
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

    See ``fastlb._core_py.pick_many``: this is its compiled twin. The loop runs
    in C and calls the cpdef ``Selector.select`` (with ``exclude``:
    ``select_excluding``) and ``release`` through the vtable, as the compiled
    data path does (no Python call per pick).
    """
    if not isinstance(selector, Selector):
        raise TypeError(f"selector must be a Selector, not {type(selector).__name__}")
    cdef Selector sel = <Selector>selector
    n = _index(n)
    if n < 0:
        raise ValueError("n must not be negative")
    cdef Py_ssize_t count = n, k, idx
    cdef long long total = 0
    if exclude is None:
        for k in range(count):
            idx = sel.select(key)
            if idx >= 0:
                sel.release(idx)
                total += idx
    else:
        for k in range(count):
            idx = sel.select_excluding(exclude, key)
            if idx >= 0:
                sel.release(idx)
                total += idx
    return total
