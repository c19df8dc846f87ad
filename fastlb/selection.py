"""The balancing algorithms by name: the registry the CLI and the data path use.

``make_balancer(name, weights, names, seed=0, **opts)`` builds a selector
from ``fastlb.core`` (so it follows the compiled/pure switch). Every selector
has the surface described in ``fastlb._core_py``: ``select(key=b"") -> int``
(a backend index; -1: no backend eligible; -2, Maglev only: empty key, fall
back to another algorithm), ``release(idx)`` once per request that select
gave ``idx >= 0``, ``set_eligible``, ``is_eligible``, ``set_weight``,
``in_flight`` and ``n``.
"""
from fastlb import core
from fastlb.errors import ConfigError

ALGORITHMS = ("round-robin", "weighted-round-robin", "least-conn", "p2c", "random", "maglev")

# name -> (class name in fastlb.core, options accepted besides seed)
_REGISTRY = {
    "round-robin": ("RoundRobin", ()),
    "weighted-round-robin": ("WeightedRoundRobin", ()),
    "least-conn": ("LeastConn", ()),
    "p2c": ("P2C", ()),
    "random": ("Random", ()),
    "maglev": ("Maglev", ("table_size", "balance_factor")),
}

# Algorithms that hash a key (the caller passes one to select; -2 means "no key").
HASHED = frozenset(["maglev"])


def make_balancer(name, weights, names, seed=0, **opts):
    """A selector for ``name`` (one of ``ALGORITHMS``) over ``len(weights)`` backends.

    ``names`` are the backends' ids as bytes (e.g. b"10.0.0.1:8080"), used by
    the hash-based algorithms so every node builds the same table; the others
    ignore them. ``opts`` are the algorithm's options (maglev: ``table_size``,
    ``balance_factor``). Raises ``ConfigError`` naming the bad value for an
    unknown algorithm, an option it does not take, or a bad weight/option.
    """
    try:
        cls_name, accepted = _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown balancing algorithm {name!r} "
                          f"(choose from {', '.join(ALGORITHMS)})") from None
    for opt in opts:
        if opt not in accepted:
            if accepted:
                raise ConfigError(f"unknown option {opt!r} for {name} "
                                  f"(it takes {', '.join(accepted)})")
            raise ConfigError(f"unknown option {opt!r} for {name} (it takes none)")
    cls = getattr(core, cls_name)
    try:
        if cls_name == "Maglev":
            names = [n.encode("latin-1") if isinstance(n, str) else n for n in names]
            return cls(weights, names, seed, **opts)
        if names is not None and len(names) != len(weights):
            raise ValueError(f"{len(names)} names for {len(weights)} backends")
        return cls(weights, seed)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}: {e}") from None


class BalancerSet:
    """Several selectors over the same backends, kept in step: what health
    checks (and the admin interface to come) steer. Not on the per-request path."""

    def __init__(self, *balancers):
        self.balancers = balancers
        self.n = balancers[0].n

    def set_eligible(self, idx, ok):
        for b in self.balancers:
            b.set_eligible(idx, ok)

    def set_weight(self, idx, w):
        for b in self.balancers:
            b.set_weight(idx, w)

    def is_eligible(self, idx):
        return self.balancers[0].is_eligible(idx)


class PriorityGate:
    """Priority groups over the selectors of one pool (DNS SRV priorities):
    only the backends of the lowest group that has a live backend (eligible,
    weight above 0) are eligible in the selectors; a higher group is used
    only while no backend of every lower one is.

    It stands where the selectors' ``BalancerSet`` stands for the health
    checker (``set_eligible``, ``set_weight``, ``is_eligible``, ``n``):
    ``is_eligible`` is what the checker said of the backend itself, and the
    selectors are written only when the effective answer changes. Not on the
    per-request path."""

    def __init__(self, inner, priorities, weights):
        self.inner = inner
        self.n = inner.n
        if len(priorities) != self.n or len(weights) != self.n:
            raise ValueError("one priority and one weight per backend")
        self._priority = list(priorities)
        self._own = [inner.is_eligible(i) for i in range(self.n)]
        self._weight = list(weights)
        self.active = None      # the priority whose group serves now
        self._apply()

    def set_eligible(self, idx, ok):
        self._own[idx] = bool(ok)
        self._apply()

    def set_weight(self, idx, w):
        self._weight[idx] = w
        self.inner.set_weight(idx, w)
        self._apply()

    def is_eligible(self, idx):
        return self._own[idx]

    def _apply(self):
        live = [p for p, ok, w in zip(self._priority, self._own, self._weight) if ok and w > 0]
        active = min(live) if live else min(self._priority, default=0)
        self.active = active
        inner = self.inner
        for i, p in enumerate(self._priority):
            want = self._own[i] and p == active
            if inner.is_eligible(i) != want:
                inner.set_eligible(i, want)
