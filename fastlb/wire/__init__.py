"""The HTTP/1 wire format: field lines, the Host authority, request heads (parse,
then write for a backend), response heads, chunked bodies, head framing.

Each ``.pxi`` file here is a piece of the compiled core ``fastlb._core`` (which
includes it) and has its pure twin beside it: ``request.pxi`` and
``request.py``. Import the public names from ``fastlb.core`` (the switch
between the two); these modules import nothing of asyncio.
"""
