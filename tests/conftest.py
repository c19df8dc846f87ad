import os

import pytest

from fastlb import core as _switch


def _core_params():
    return [pytest.param("py", id="py-core"), pytest.param("c", id="c-core")]


@pytest.fixture(params=_core_params())
def core(request):
    """Each core implementation as a module: fastlb._core_py and fastlb._core.

    The compiled one is skipped when it is not built, and fails instead when
    FASTLB_REQUIRE_EXTENSIONS=1 (so CI never passes on a silent fallback).
    With FASTLB_NO_EXTENSIONS=1 only the pure core runs.
    """
    name = request.param
    if name == "c":
        if os.environ.get("FASTLB_NO_EXTENSIONS") == "1":
            pytest.skip("FASTLB_NO_EXTENSIONS=1")
        mod = _switch.implementation("c")
        if mod is None:
            if os.environ.get("FASTLB_REQUIRE_EXTENSIONS") == "1":
                pytest.fail("compiled core fastlb._core is not built")
            pytest.skip("compiled core fastlb._core is not built")
        return mod
    return _switch.implementation("py")
