# C types for fastlb/runtime/_routing.py when Cython compiles it (an augmenting
# .pxd, as fastlb/_proxy.pxd): the data path calls Router.route through C.
cimport cython

cdef Py_ssize_t CACHE_SIZE


@cython.final
cdef class Route:
    cdef public object pool           # fastlb.proxy.Pool
    cdef public object strip          # bytes of the target to strip, or None
    cdef public object config         # the RouteConfig


@cython.final
cdef class Entry:
    cdef public Py_ssize_t index
    cdef public bytes path, prefix
    cdef public tuple headers
    cdef public Route route
    cdef public bint plain            # no path or header condition


@cython.final
cdef class Router:
    cdef public Py_ssize_t count
    cdef public Route default
    cdef public tuple _any
    cdef public dict _wild, _exact, _cache, _seen

    @cython.locals(lst=tuple, e=Entry, path=bytes, q=Py_ssize_t, fields=dict, ok=bint, got=bytes)
    cpdef Route route(self, req, bytes head)
