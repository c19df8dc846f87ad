"""The switch for the data path: the compiled ``fastlb._proxy`` or the same file as Python.

``fastlb/_proxy.py`` is plain Python. When the package is built with its
extensions, Cython also compiles it (with the C types in ``_proxy.pxd``) into
an extension module of the same name, which Python then imports in its place.
``FASTLB_NO_EXTENSIONS=1`` loads the Python source even when the extension is
built; ``FASTLB_REQUIRE_EXTENSIONS=1`` refuses to run without it. ``IMPL``
says which runs: "c" or "py".
"""
import importlib.util
import os
import sys

if os.environ.get("FASTLB_NO_EXTENSIONS") == "1":
    _name = "fastlb._proxy"
    _mod = sys.modules.get(_name)
    if _mod is None or not _mod.__file__.endswith(".py"):
        _spec = importlib.util.spec_from_file_location(
            _name, os.path.join(os.path.dirname(__file__), "_proxy.py"))
        _mod = importlib.util.module_from_spec(_spec)
        sys.modules[_name] = _mod
        _spec.loader.exec_module(_mod)
else:
    try:
        from fastlb import _proxy as _mod
    except ImportError:
        # the compiled data path needs the compiled core; without it, run the source
        if os.environ.get("FASTLB_REQUIRE_EXTENSIONS") == "1":
            raise
        _spec = importlib.util.spec_from_file_location(
            "fastlb._proxy", os.path.join(os.path.dirname(__file__), "_proxy.py"))
        _mod = importlib.util.module_from_spec(_spec)
        sys.modules["fastlb._proxy"] = _mod
        _spec.loader.exec_module(_mod)

IMPL = "py" if _mod.__file__.endswith(".py") else "c"
if IMPL == "py" and os.environ.get("FASTLB_REQUIRE_EXTENSIONS") == "1":
    raise ImportError("compiled data path fastlb._proxy is not built (FASTLB_REQUIRE_EXTENSIONS=1)")

Backend = _mod.Backend
Proxy = _mod.Proxy
ClientProtocol = _mod.ClientProtocol
UpstreamProtocol = _mod.UpstreamProtocol
Pool = _mod.Pool
Front = _mod.Front
