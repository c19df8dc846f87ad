"""Discovery: the backends of a pool, found in DNS SRV records or under an etcd prefix.

Each source yields backend sets and nothing else; ``fastlb.runtime.discovery``
runs them and hands each new set to the process's controller (a reload of
that pool).

* ``fastlb.balance.discovery.srv``: ``DnsSrvSource`` looks the SRV name up
  (dnspython's ``asyncresolver``), then the A and AAAA records of each
  target, again when the shortest TTL runs out (``interval`` at most).
* ``fastlb.balance.discovery.etcd``: ``EtcdClient``, a small client of
  etcd v3's JSON gateway (``/v3/kv/range``, ``/v3/watch``) over asyncio
  streams; ``EtcdWatch`` keeps a copy of a key range current; and
  ``EtcdPrefixSource``, one backend per key under a prefix.

Every set is given in a canonical order (``canonical``: by address), so that
nodes that find the same backends build the same pool, whatever order DNS or
etcd return them in; Maglev's table then agrees key for key
(``fastlb.balance.selectors.Maglev`` fills its table in the order of the
backends' names).

A source reports through a *sink*: ``found(backends)`` with a complete set
(which may be empty: the runner keeps the last set then, discovery never
empties a pool), ``failed(reason)`` when a lookup or a connection failed
(the last set stays; the source retries with a back-off), ``recovered()``
when it reaches its server again without news, and ``warn(message)`` for
an entry it left out.
"""
from fastlb.config.model import BackendConfig
from fastlb.validate import format_address

__all__ = ["canonical", "Backoff", "backend"]


def backend(host, port, weight=1, priority=0, url=None, scheme="http"):
    """A ``BackendConfig`` for a discovered backend (``scheme`` https: spoken
    to in TLS, as its pool's ``tls`` says)."""
    host = host.lower()
    return BackendConfig(url=url or f"{scheme}://{format_address(host, port)}", host=host,
                         port=port, weight=weight, priority=priority, scheme=scheme)


def canonical(backends):
    """``backends`` (BackendConfig) as a tuple in the order every node gives
    them: by priority, then address; one per address (the first in that
    order)."""
    out = {}
    for b in sorted(backends, key=lambda b: (b.priority, b.address, -b.weight, b.url)):
        out.setdefault(b.address, b)
    return tuple(sorted(out.values(), key=lambda b: (b.priority, b.address)))


class Backoff:
    """Delays between retries: ``first``, doubled at each failure, up to ``most``."""

    def __init__(self, first, most):
        self.first = first
        self.most = max(first, most)
        self._next = first

    def next(self):
        delay = self._next
        self._next = min(self._next * 2, self.most)
        return delay

    def reset(self):
        self._next = self.first

    @property
    def failing(self):
        """A failure was counted since the last reset."""
        return self._next != self.first
