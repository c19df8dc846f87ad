"""Python hooks for examples/fastlb.toml (pools app, api and canary).

    fastlb serve --config examples/fastlb.toml --hooks examples/hooks.py --demo-backends

Each function is optional and runs on the event loop for every request:
compute, never wait (no network, no disk, no sleep).
"""

# read once, at import (a reload imports this file again)
BETA_USERS = {"alice", "bob"}


def route(request):
    """Before the listener's routes: a pool's name, or None (the routes decide)."""
    if request.header("X-Canary") == "1" or request.header("X-User") in BETA_USERS:
        return "canary"
    if request.path.startswith("/v2/"):
        return "api"
    return None


def select(request, pool):
    """Before the pool's algorithm: one of pool.backends (or its address), or None."""
    want = request.header("X-Debug-Backend")
    for backend in pool.backends:
        if backend.address == want and backend.eligible:
            return backend
    return None


def request_headers(request):
    """Fields for the head sent upstream, each replacing those of its name."""
    return [("X-Client-Listener", request.listener), ("X-Path-Seen", request.path)]
