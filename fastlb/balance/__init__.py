"""Choosing a backend: XXH64 hashing, the hash key of a request, the six selectors.

Each ``.pxi`` file here is a piece of the compiled core ``fastlb._core`` (which
includes it) and has its pure twin beside it: ``selectors.pxi`` and
``selectors.py``. Import the public names from ``fastlb.core`` (the switch
between the two); these modules import nothing of asyncio.

``discovery/`` beside them finds the backend sets of pools in DNS SRV
records and etcd, on the event loop (``fastlb.balance.discovery``).
"""
