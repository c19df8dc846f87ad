"""Build script: only the Cython extension lives here; metadata is in pyproject.toml.

Environment:
  FASTLB_NO_EXTENSIONS=1  build a pure-Python package (the core falls back to _core_py)
  FASTLB_DEBUG=1          compile with line tracing and write the annotated HTML
"""
import os
import re

from setuptools import setup
from setuptools.command.build_ext import build_ext as _build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(HERE, "fastlb", "_version.py")) as f:
        m = re.search(r'^__version__\s*=\s*"([^"]+)"', f.read(), re.M)
    if not m:
        raise RuntimeError("cannot find __version__ in fastlb/_version.py")
    return m.group(1)


class build_ext(_build_ext):
    user_options = _build_ext.user_options + [
        ("cython-annotate", None, "write the Cython annotated HTML next to the .pyx"),
        ("cython-directives=", None, "extra Cython directives, e.g. 'boundscheck=True,wraparound=True'"),
    ]
    boolean_options = _build_ext.boolean_options + ["cython-annotate"]

    def initialize_options(self):
        super().initialize_options()
        self.cython_annotate = None
        self.cython_directives = None

    def finalize_options(self):
        if getattr(self, "_fastlb_finalized", False):
            super().finalize_options()
            return
        self._fastlb_finalized = True
        from Cython.Build import cythonize

        debug = os.environ.get("FASTLB_DEBUG") == "1"
        directives = {
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        }
        if debug:
            directives["linetrace"] = True
        if self.cython_directives:
            for item in self.cython_directives.split(","):
                k, _, v = item.partition("=")
                directives[k.strip()] = v.strip().lower() in ("1", "true", "yes")
        macros = [("CYTHON_TRACE", "1")] if debug else []
        for ext in self.distribution.ext_modules:
            ext.define_macros = list(ext.define_macros or []) + macros
        self.distribution.ext_modules[:] = cythonize(
            self.distribution.ext_modules,
            compiler_directives=directives,
            annotate=bool(self.cython_annotate) or debug,
        )
        super().finalize_options()


ext_modules = []
if os.environ.get("FASTLB_NO_EXTENSIONS") != "1":
    from setuptools import Extension

    ext_modules += [
        Extension("fastlb._core", ["fastlb/_core.pyx"], extra_compile_args=["-O2"]),
        # The data path: plain Python, compiled with the C types of _proxy.pxd.
        Extension("fastlb._proxy", ["fastlb/_proxy.py"], extra_compile_args=["-O2"]),
        # The route lookup the data path calls: plain Python, typed by _routing.pxd.
        Extension("fastlb.runtime._routing", ["fastlb/runtime/_routing.py"],
                  extra_compile_args=["-O2"]),
    ]

setup(
    version=read_version(),
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
