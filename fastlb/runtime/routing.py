"""The switch for the route lookup: the compiled ``fastlb.runtime._routing``
or the same file as Python, chosen as ``fastlb.proxy`` chooses the data
path (``FASTLB_NO_EXTENSIONS=1``: the Python source). See ``_routing.py``."""
import importlib.util
import os
import sys

_NAME = "fastlb.runtime._routing"


def _source():
    mod = sys.modules.get(_NAME)
    if mod is not None and mod.__file__.endswith(".py"):
        return mod
    spec = importlib.util.spec_from_file_location(
        _NAME, os.path.join(os.path.dirname(__file__), "_routing.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = mod
    spec.loader.exec_module(mod)
    return mod


if os.environ.get("FASTLB_NO_EXTENSIONS") == "1":
    _mod = _source()
else:
    try:
        from fastlb.runtime import _routing as _mod
    except ImportError:
        if os.environ.get("FASTLB_REQUIRE_EXTENSIONS") == "1":
            raise
        _mod = _source()

IMPL = "py" if _mod.__file__.endswith(".py") else "c"

Route = _mod.Route
Entry = _mod.Entry
Router = _mod.Router
request_host = _mod.request_host
