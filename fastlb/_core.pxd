# cython: language_level=3
"""C-level interface of the compiled core's selectors, for other Cython modules.

    from fastlb._core cimport Selector

    cdef Selector sel = <Selector?>balancer     # TypeError unless a Selector (or subclass)
    cdef Py_ssize_t idx = sel.select(key)       # C call through the vtable, no Python call
    if idx >= 0:
        ...
        sel.release(idx)
    idx = sel.select_excluding(tried)           # a retry: never a backend in ``tried``

Every selector of ``fastlb._core`` (RoundRobin, WeightedRoundRobin,
LeastConn, P2C, Random, Maglev) is a subclass of ``Selector`` and overrides
``select`` and ``select_excluding`` (and Maglev ``release``); a call on a
``Selector``-typed variable dispatches to the subclass in C. A Python subclass
that overrides them in Python is honoured too (Cython's cpdef dispatch), at
the cost of a Python call.

``select`` returns a backend index >= 0 (counted in flight), -1 when no backend
is live, or -2 (Maglev only) for an empty key; -3 means an exception is set
(Cython checks it for you). ``key`` must be bytes for Maglev (TypeError
otherwise) and is ignored by the others. ``select_excluding(exclude, key)``
returns the same codes; ``exclude`` is an iterable of backend indices (a set
in the data path: the backends the request failed on), left out of this one
pick: each algorithm runs its own logic over the other live backends, and -1
means none is left. ``release`` takes the index as any Python int (a C integer
is boxed; small ints are cached) so that Python sees ``IndexError`` for every
out-of-range index, however large; it returns None.

The attributes after ``n`` are the implementation's state (read-only by
convention outside ``_core.pyx``): change them only through the Python methods.
"""
from libc.stdint cimport int64_t


cdef class Selector:
    cdef readonly Py_ssize_t n              # number of backends
    cdef unsigned char* _eligible            # per backend: set_eligible flag
    cdef unsigned char* _live                # per backend: eligible and weight > 0
    cdef int64_t* _weight
    cdef int64_t* _inflight
    cdef unsigned char* _mask                # scratch of select_excluding: live and not excluded

    cpdef Py_ssize_t select(self, key=*) except -3
    cpdef Py_ssize_t select_excluding(self, exclude, key=*) except -3
    cpdef release(self, idx)

    cdef void _free_base(self) noexcept
    cdef _setup(self, weights, bint checked)
    cdef Py_ssize_t _index(self, idx) except -1
    cdef Py_ssize_t _exclude(self, exclude) except -1   # fills _mask; returns its count
    cdef int _changed(self) except -1
