# Included by fastlb/_core.pyx: one extension module with the rest of the core.
# The pure twin is fastlb/wire/proxyproto.py (its docstring says what is read).

# ---------------------------------------------------------------- PROXY protocol headers

cdef extern from "<sys/socket.h>":
    int AF_INET
    int AF_INET6

cdef extern from "<arpa/inet.h>":
    int inet_pton(int af, const char* src, void* dst)
    const char* inet_ntop(int af, const void* src, char* dst, unsigned int size)

cdef enum:
    PP_V2_SIG_LEN = 12
    PP_TEXT = 64            # room for an address as text, NUL included (46 for IPv6)

cdef const char* PP_V1_PREFIX = b"PROXY "
cdef const char* PP_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

_ProxyHeaderError = _errors.ProxyHeaderError


def _pp_start(data):
    return repr(bytes(data[:16]))


def _pp_show(b):
    return repr(bytes(b[:40]))[1:]


cdef inline bint _pp_digit(unsigned char c) noexcept:
    return 48 <= c <= 57


cdef long _pp_decimal(const unsigned char* p, Py_ssize_t n, Py_ssize_t digits) noexcept:
    """p[:n] as a decimal of at most ``digits`` digits without leading
    zeros, or -1."""
    cdef long v = 0
    cdef Py_ssize_t i
    if n < 1 or n > digits or (n > 1 and p[0] == 48):
        return -1
    for i in range(n):
        if not _pp_digit(p[i]):
            return -1
        v = v * 10 + (p[i] - 48)
    return v


cdef bint _pp_ipv4(const unsigned char* p, Py_ssize_t n) noexcept:
    """p[:n] is an IPv4 address in canonical form (four decimal octets 0-255
    without leading zeros, dot-separated)."""
    cdef Py_ssize_t i = 0, j
    cdef int octet
    cdef long v
    for octet in range(4):
        j = i
        while j < n and p[j] != 46:
            j += 1
        v = _pp_decimal(p + i, j - i, 3)
        if v < 0 or v > 255:
            return False
        if octet < 3:
            if j >= n:
                return False
            i = j + 1
        elif j != n:
            return False
    return True


cdef object _pp_ipv6(const unsigned char* p, Py_ssize_t n):
    """p[:n] as an IPv6 address in inet_ntop's form, or None."""
    cdef char text[PP_TEXT]
    cdef unsigned char packed[16]
    cdef char out[PP_TEXT]
    cdef Py_ssize_t i
    cdef unsigned char c
    if n < 2 or n > 45:
        return None
    for i in range(n):
        c = p[i]
        if not (_pp_digit(c) or 65 <= c <= 70 or 97 <= c <= 102 or c == 58 or c == 46):
            return None
    memcpy(text, p, n)
    text[n] = 0
    if inet_pton(AF_INET6, text, packed) != 1:
        return None
    if inet_ntop(AF_INET6, packed, out, PP_TEXT) == NULL:
        return None
    return out.decode("ascii")


cdef object _pp_ntop(int af, const unsigned char* p):
    cdef char out[PP_TEXT]
    cdef Py_ssize_t k = 0
    cdef int i, v
    if af == AF_INET:
        # dotted decimal, as inet_ntop writes it (without its printf)
        for i in range(4):
            v = p[i]
            if v >= 100:
                out[k] = <char>(48 + v // 100)
                k += 1
            if v >= 10:
                out[k] = <char>(48 + v // 10 % 10)
                k += 1
            out[k] = <char>(48 + v % 10)
            k += 1
            out[k] = 46
            k += 1
        return out[:k - 1].decode("ascii")
    if inet_ntop(af, p, out, PP_TEXT) == NULL:
        raise OSError("inet_ntop failed")
    return out.decode("ascii")


def parse_proxy_header(data):
    """The PROXY protocol header at the start of ``data``: None (more bytes
    needed), ``(end, addrs)``, or ``ProxyHeaderError``.

    See ``fastlb.wire.proxyproto.parse_proxy_header``: this is its compiled twin.
    """
    if type(data) is not bytes:
        raise TypeError("data must be bytes")
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    if n == 0:
        return None
    if p[0] == 0x50:
        return _pp_v1(data, p, n)
    if p[0] == 0x0D:
        return _pp_v2(data, p, n)
    raise _ProxyHeaderError(f"no PROXY protocol header: the connection starts with "
                            f"{_pp_start(data)}")


cdef object _pp_v1(bytes data, const unsigned char* p, Py_ssize_t n):
    cdef Py_ssize_t lf, end, i, a, b, nparts, f0
    cdef Py_ssize_t starts[5]
    cdef Py_ssize_t ends[5]
    cdef const void* q
    cdef int family
    cdef long sport, dport
    cdef object src, dst
    if n < 6:
        if memcmp(p, PP_V1_PREFIX, n) == 0:
            return None
        raise _ProxyHeaderError(f"no PROXY protocol header: the connection starts with "
                                f"{_pp_start(data)}")
    if memcmp(p, PP_V1_PREFIX, 6) != 0:
        raise _ProxyHeaderError(f"no PROXY protocol header: the connection starts with "
                                f"{_pp_start(data)}")
    q = memchr(p, 10, n if n < PP_V1_MAX else PP_V1_MAX)
    if q == NULL:
        if n >= PP_V1_MAX:
            raise _ProxyHeaderError(f"PROXY v1 line longer than {PP_V1_MAX} bytes")
        if memchr(p, 13, n - 1) != NULL:
            raise _ProxyHeaderError("PROXY v1 line with a CR not followed by LF")
        return None
    lf = <const unsigned char*>q - p
    if p[lf - 1] != 13:
        raise _ProxyHeaderError("PROXY v1 line ends with a bare LF (CRLF expected)")
    # the line is p[6:lf - 1]
    if memchr(p + 6, 13, lf - 1 - 6) != NULL:
        raise _ProxyHeaderError("PROXY v1 line with a CR not followed by LF")
    end = lf + 1
    # split on single spaces, as bytes.split(b" "): empty fields count
    nparts = 0
    a = 6
    i = 6
    while i <= lf - 1:
        if i == lf - 1 or p[i] == 32:
            if nparts < 5:
                starts[nparts] = a
                ends[nparts] = i
            nparts += 1
            a = i + 1
        i += 1
    f0 = ends[0] - starts[0]
    if f0 == 7 and memcmp(p + 6, b"UNKNOWN", 7) == 0:
        return end, None
    if f0 == 4 and memcmp(p + 6, b"TCP4", 4) == 0:
        family = 4
    elif f0 == 4 and memcmp(p + 6, b"TCP6", 4) == 0:
        family = 6
    else:
        raise _ProxyHeaderError(f"PROXY v1 protocol {_pp_show(data[starts[0]:ends[0]])} "
                                "(TCP4, TCP6 or UNKNOWN expected)")
    if nparts != 5:
        raise _ProxyHeaderError(f"PROXY v1 TCP{family} line with {nparts - 1} fields after "
                                "the protocol (4 expected, one space apart)")
    src = _pp_v1_address(data, p, starts[1], ends[1], family, "source")
    dst = _pp_v1_address(data, p, starts[2], ends[2], family, "destination")
    sport = _pp_decimal(p + starts[3], ends[3] - starts[3], 5)
    if sport < 0 or sport > 65535:
        raise _ProxyHeaderError(f"PROXY v1 source port {_pp_show(data[starts[3]:ends[3]])} "
                                "is not a port (0 to 65535, no leading zeros)")
    dport = _pp_decimal(p + starts[4], ends[4] - starts[4], 5)
    if dport < 0 or dport > 65535:
        raise _ProxyHeaderError(f"PROXY v1 destination port "
                                f"{_pp_show(data[starts[4]:ends[4]])} is not a port "
                                "(0 to 65535, no leading zeros)")
    return end, (src, sport, dst, dport)


cdef object _pp_v1_address(bytes data, const unsigned char* p, Py_ssize_t a, Py_ssize_t b,
                           int family, str which):
    cdef object got
    if family == 4:
        if _pp_ipv4(p + a, b - a):
            return (<const char*>p + a)[:b - a].decode("ascii")
        raise _ProxyHeaderError(f"PROXY v1 {which} address {_pp_show(data[a:b])} is not an "
                                "IPv4 address in canonical form")
    got = _pp_ipv6(p + a, b - a)
    if got is None:
        raise _ProxyHeaderError(f"PROXY v1 {which} address {_pp_show(data[a:b])} is not an "
                                "IPv6 address")
    return got


cdef object _pp_v2(bytes data, const unsigned char* p, Py_ssize_t n):
    cdef Py_ssize_t k = PP_V2_SIG_LEN if n >= PP_V2_SIG_LEN else n
    cdef int ver_cmd, fam, family, proto, command, need
    cdef Py_ssize_t length, end
    if memcmp(p, PP_V2_SIGNATURE, k) != 0:
        raise _ProxyHeaderError(f"no PROXY protocol header (not the v2 signature): the "
                                f"connection starts with {_pp_start(data)}")
    if n < 16:
        return None
    ver_cmd = p[12]
    fam = p[13]
    length = (<Py_ssize_t>p[14] << 8) | p[15]
    if ver_cmd >> 4 != 2:
        raise _ProxyHeaderError(f"PROXY v2 header of version {ver_cmd >> 4} (2 expected)")
    command = ver_cmd & 0x0F
    if command > 1:
        raise _ProxyHeaderError(f"PROXY v2 command {command} (0, LOCAL, or 1, PROXY, "
                                "expected)")
    family = fam >> 4
    proto = fam & 0x0F
    if family > 3 or proto > 2:
        raise _ProxyHeaderError(f"PROXY v2 address family and protocol 0x{fam:02x} are "
                                "not defined")
    end = 16 + length
    if end > PP_V2_MAX:
        raise _ProxyHeaderError(f"PROXY v2 header of {end} bytes (at most {PP_V2_MAX})")
    need = 12 if family == 1 else 36 if family == 2 else 216 if family == 3 else 0
    if command == 1 and length < need:
        raise _ProxyHeaderError(f"PROXY v2 address block of {length} bytes: family "
                                f"0x{fam:02x} needs {need}")
    if n < end:
        return None
    if command == 0 or proto != 1 or family == 0 or family == 3:
        return end, None
    if family == 1:
        return end, (_pp_ntop(AF_INET, p + 16), (p[24] << 8) | p[25],
                     _pp_ntop(AF_INET, p + 20), (p[26] << 8) | p[27])
    return end, (_pp_ntop(AF_INET6, p + 16), (p[48] << 8) | p[49],
                 _pp_ntop(AF_INET6, p + 32), (p[50] << 8) | p[51])
