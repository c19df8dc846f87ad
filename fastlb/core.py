"""The one switch between the compiled core and its pure-Python twin.

``FASTLB_NO_EXTENSIONS=1`` selects the pure-Python core. Otherwise the
compiled ``fastlb._core`` is used when it imports, and the pure core when it
does not, unless ``FASTLB_REQUIRE_EXTENSIONS=1``, which makes a missing
compiled module an ImportError. ``IMPL`` says which one is in use ("c" or
"py"); the ``*_Py`` and ``*_C`` aliases stay importable for tests and
benchmarks (``*_C`` is None when the compiled core is not built).
"""
import os

from fastlb import _core_py

_NAMES = ("Selector", "RoundRobin", "WeightedRoundRobin", "LeastConn", "P2C", "Random", "Maglev",
          "hash64", "hash_key", "field_value", "ChunkedScanner", "RequestHead",
          "parse_request_head", "assign_request_id", "write_request_head",
          "rewrite_response_head", "rewrite_response_head_with_id", "find_head_end",
          "read_buffer", "buffer_bytes",
          "parse_proxy_header", "pick_many", "access_log_line", "AccessLogBuffer", "monotonic_us",
          "new_request_id", "seed_request_ids", "valid_request_id", "add_request_id")

Selector_Py = _core_py.Selector
RoundRobin_Py = _core_py.RoundRobin
WeightedRoundRobin_Py = _core_py.WeightedRoundRobin
LeastConn_Py = _core_py.LeastConn
P2C_Py = _core_py.P2C
Random_Py = _core_py.Random
Maglev_Py = _core_py.Maglev
hash64_Py = _core_py.hash64
hash_key_Py = _core_py.hash_key
field_value_Py = _core_py.field_value
ChunkedScanner_Py = _core_py.ChunkedScanner
RequestHead_Py = _core_py.RequestHead
parse_request_head_Py = _core_py.parse_request_head
write_request_head_Py = _core_py.write_request_head
rewrite_response_head_Py = _core_py.rewrite_response_head
find_head_end_Py = _core_py.find_head_end
read_buffer_Py = _core_py.read_buffer
buffer_bytes_Py = _core_py.buffer_bytes
parse_proxy_header_Py = _core_py.parse_proxy_header
pick_many_Py = _core_py.pick_many
access_log_line_Py = _core_py.access_log_line
AccessLogBuffer_Py = _core_py.AccessLogBuffer
monotonic_us_Py = _core_py.monotonic_us
new_request_id_Py = _core_py.new_request_id
assign_request_id_Py = _core_py.assign_request_id
add_request_id_Py = _core_py.add_request_id
rewrite_response_head_with_id_Py = _core_py.rewrite_response_head_with_id
seed_request_ids_Py = _core_py.seed_request_ids
valid_request_id_Py = _core_py.valid_request_id

_c = None
if os.environ.get("FASTLB_NO_EXTENSIONS") != "1":
    try:
        from fastlb import _core as _c
    except ImportError:
        if os.environ.get("FASTLB_REQUIRE_EXTENSIONS") == "1":
            raise
        _c = None
elif os.environ.get("FASTLB_REQUIRE_EXTENSIONS") == "1":
    raise ImportError("FASTLB_NO_EXTENSIONS=1 and FASTLB_REQUIRE_EXTENSIONS=1 contradict each other")

if _c is not None:
    Selector_C = _c.Selector
    RoundRobin_C = _c.RoundRobin
    WeightedRoundRobin_C = _c.WeightedRoundRobin
    LeastConn_C = _c.LeastConn
    P2C_C = _c.P2C
    Random_C = _c.Random
    Maglev_C = _c.Maglev
    hash64_C = _c.hash64
    hash_key_C = _c.hash_key
    field_value_C = _c.field_value
    ChunkedScanner_C = _c.ChunkedScanner
    RequestHead_C = _c.RequestHead
    parse_request_head_C = _c.parse_request_head
    write_request_head_C = _c.write_request_head
    rewrite_response_head_C = _c.rewrite_response_head
    find_head_end_C = _c.find_head_end
    read_buffer_C = _c.read_buffer
    buffer_bytes_C = _c.buffer_bytes
    parse_proxy_header_C = _c.parse_proxy_header
    pick_many_C = _c.pick_many
    access_log_line_C = _c.access_log_line
    AccessLogBuffer_C = _c.AccessLogBuffer
    monotonic_us_C = _c.monotonic_us
    new_request_id_C = _c.new_request_id
    assign_request_id_C = _c.assign_request_id
    add_request_id_C = _c.add_request_id
    rewrite_response_head_with_id_C = _c.rewrite_response_head_with_id
    seed_request_ids_C = _c.seed_request_ids
    valid_request_id_C = _c.valid_request_id
    Selector = Selector_C
    RoundRobin = RoundRobin_C
    WeightedRoundRobin = WeightedRoundRobin_C
    LeastConn = LeastConn_C
    P2C = P2C_C
    Random = Random_C
    Maglev = Maglev_C
    hash64 = hash64_C
    hash_key = hash_key_C
    field_value = field_value_C
    ChunkedScanner = ChunkedScanner_C
    RequestHead = RequestHead_C
    parse_request_head = parse_request_head_C
    write_request_head = write_request_head_C
    rewrite_response_head = rewrite_response_head_C
    find_head_end = find_head_end_C
    read_buffer = read_buffer_C
    buffer_bytes = buffer_bytes_C
    parse_proxy_header = parse_proxy_header_C
    pick_many = pick_many_C
    access_log_line = access_log_line_C
    AccessLogBuffer = AccessLogBuffer_C
    monotonic_us = monotonic_us_C
    new_request_id = new_request_id_C
    assign_request_id = assign_request_id_C
    add_request_id = add_request_id_C
    rewrite_response_head_with_id = rewrite_response_head_with_id_C
    seed_request_ids = seed_request_ids_C
    valid_request_id = valid_request_id_C
    IMPL = "c"
else:
    RoundRobin_C = ChunkedScanner_C = rewrite_response_head_C = None
    RequestHead_C = parse_request_head_C = write_request_head_C = None
    WeightedRoundRobin_C = LeastConn_C = P2C_C = Random_C = Maglev_C = None
    hash64_C = hash_key_C = field_value_C = find_head_end_C = Selector_C = pick_many_C = None
    parse_proxy_header_C = read_buffer_C = buffer_bytes_C = None
    access_log_line_C = AccessLogBuffer_C = monotonic_us_C = None
    new_request_id_C = seed_request_ids_C = valid_request_id_C = None
    assign_request_id_C = add_request_id_C = rewrite_response_head_with_id_C = None
    Selector = Selector_Py
    RoundRobin = RoundRobin_Py
    WeightedRoundRobin = WeightedRoundRobin_Py
    LeastConn = LeastConn_Py
    P2C = P2C_Py
    Random = Random_Py
    Maglev = Maglev_Py
    hash64 = hash64_Py
    hash_key = hash_key_Py
    field_value = field_value_Py
    ChunkedScanner = ChunkedScanner_Py
    RequestHead = RequestHead_Py
    parse_request_head = parse_request_head_Py
    write_request_head = write_request_head_Py
    rewrite_response_head = rewrite_response_head_Py
    find_head_end = find_head_end_Py
    read_buffer = read_buffer_Py
    buffer_bytes = buffer_bytes_Py
    parse_proxy_header = parse_proxy_header_Py
    pick_many = pick_many_Py
    access_log_line = access_log_line_Py
    AccessLogBuffer = AccessLogBuffer_Py
    monotonic_us = monotonic_us_Py
    new_request_id = new_request_id_Py
    assign_request_id = assign_request_id_Py
    add_request_id = add_request_id_Py
    rewrite_response_head_with_id = rewrite_response_head_with_id_Py
    seed_request_ids = seed_request_ids_Py
    valid_request_id = valid_request_id_Py
    IMPL = "py"


def implementation(name):
    """Return the module-like namespace of one core: "py" or "c" (None if not built)."""
    if name == "py":
        return _core_py
    if name == "c":
        return _c
    raise ValueError(name)
