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
convention outside ``balance/selectors.pxi``): change them only through the
Python methods.
"""
from libc.stdint cimport int64_t


# The monotonic clock in whole microseconds (time.monotonic's clock): a C call.
cpdef long long monotonic_us() noexcept

# A new request id (36 bytes, UUID-shaped; see wire/requestid.pxi): a C call.
cpdef bytes new_request_id()


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


# ---------------------------------------------------------------- request heads
#
# ``parse_request_head`` returns a RequestHead; compiled callers that cimport
# it read ``flags``, ``framing``, ``length`` and ``key`` as C fields. The rest
# is the plan ``write_request_head`` follows: offsets into ``_head`` (never
# copied) and the segments of the output, so writing the head for a backend
# is a run of memcpy into one buffer.

cdef enum:
    SEG_COPY = 0          # p[a:b] as it is (runs of verbatim lines, the request line)
    SEG_FIELD = 1         # name p[a:b], value p[c:d], written "name: value\r\n"
    SEG_XFF = 2           # an X-Forwarded-For value p[a:b], joined before the client's address
                          # (written only for a trusted proxy)
    SEG_TFIELD = 3        # as SEG_FIELD, written only for a trusted proxy (X-Forwarded-Proto,
                          # X-Forwarded-Host, Forwarded)
    SEG_RID = 4           # the request's new id: "_rid_name: _rid" (after the client's fields)
    INLINE_SEGS = 8       # segments held without a heap allocation


cdef struct Seg:
    Py_ssize_t a
    Py_ssize_t b
    Py_ssize_t c
    Py_ssize_t d
    int kind


cdef class RequestHead:
    cdef readonly int flags              # REQ_*
    cdef readonly int framing            # BODY_NONE, BODY_LENGTH or BODY_CHUNKED
    cdef readonly long long length       # Content-Length bytes (BODY_LENGTH)
    cdef readonly bytes key              # the hash key asked for; b"" when absent
    cdef bytes _head                     # the raw head, every offset below is into it
    cdef Py_ssize_t _sp1, _sp2, _eol     # request line: method p[:sp1], version p[sp2+1:eol]
    cdef Py_ssize_t _hs, _he             # the validated authority p[hs:he]; hs < 0: none
    cdef Py_ssize_t _ps, _pe             # the origin-form target p[ps:pe], after "/" if _slash
    cdef Py_ssize_t _size                # output bytes, without those write adds
    cdef Py_ssize_t _tsize               # ... and those written only for a trusted proxy
    cdef bint _slash                     # absolute form with an empty path: "/" precedes p[ps:pe]
    cdef bint _line_copied               # the request line is the start of the first segment
    cdef bint _host_field                # a Host field is among the segments
    cdef bint _chunked, _http10
    cdef bint _xfp, _xfh                 # an X-Forwarded-Proto / X-Forwarded-Host field was sent
    # its request id (assign_request_id): valid while _rid_on (a recycled
    # head's are stale)
    cdef bint _rid_on                    # _rid is this parse's (the request_id property)
    cdef bytes _rid                      # the request's id: the client's, or a new one
    cdef bytes _rid_name                 # its field's name, as configured
    cdef Py_ssize_t _nseg, _cap
    cdef Seg* _segs
    cdef Seg _inline[INLINE_SEGS]


# ---------------------------------------------------------------- head functions
#
# The per-request head functions, callable at C level by compiled callers
# (``from fastlb._core cimport parse_request_head``): no Python call, no boxed
# arguments or results. Python callers see the same functions as before.

cpdef Py_ssize_t find_head_end(data, Py_ssize_t start=*) except -2
# read buffers (the data path's BufferedProtocol): a new one, not cleared; bytes out of one
cpdef bytearray read_buffer(Py_ssize_t n)
cpdef bytes buffer_bytes(buf, Py_ssize_t start, Py_ssize_t end)
cpdef RequestHead parse_request_head(head, int key_kind=*, key_name=*)
cpdef bytes write_request_head(parsed, client_ip, proto=*, via=*, backend_authority=*,
                               bint trusted=*)
cpdef tuple rewrite_response_head(head, req_flags, Py_ssize_t start=*, Py_ssize_t end=*,
                                  Py_ssize_t tail_max=*)
# Request ids (C calls for the data path; the Python-level twins are in fastlb.core):
# a parsed head given its id, and the id added to a head fastlb wrote.
cpdef bytes assign_request_id(parsed, request_id_header)
cpdef tuple rewrite_response_head_with_id(head, req_flags, request_id_header, request_id,
                                          Py_ssize_t start=*, Py_ssize_t end=*,
                                          Py_ssize_t tail_max=*)
cpdef bytes add_request_id(msg, request_id_header, request_id)
