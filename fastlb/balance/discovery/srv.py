"""DNS SRV discovery: a pool's backends from the SRV records of one name.

A round looks the SRV name up, then the A and AAAA records of every target
(at once), with dnspython's ``asyncresolver`` (the system's resolvers, or
the one ``resolver`` names). Each address of a target, with the record's
port, is a backend:

* its ``priority`` is the record's: the pool uses the backends of the
  lowest priority, and a higher group only while no backend of the lower
  ones is eligible (``fastlb.selection.PriorityGate``), as RFC 2782 says;
* its weight is the record's weight (relative within its priority group),
  scaled down when the group's largest is over fastlb's 10000; a weight of
  0 stays 0 (never chosen while its group has weighted backends), and a
  group whose weights are all 0 gets 1 each;
* a target of ``.`` (the service is decidedly not available) and a target
  without addresses are left out.

The next round comes when the shortest TTL of the answers runs out, and at
the latest ``interval`` seconds after this one (at the soonest
``MIN_REFRESH``). A round that fails (timeout, SERVFAIL, refused, no
server) reports the failure and changes nothing: the next try comes after a
back-off (``RETRY_FIRST`` doubling, up to ``interval``). An answer without
backends (NXDOMAIN, no SRV record, no address) is a round that found none;
the runner keeps the last set then.
"""
import asyncio
import logging

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from fastlb.balance.discovery import Backoff, backend
from fastlb.validate import MAX_WEIGHT

__all__ = ["DnsSrvSource", "lookup", "DnsFailure", "MIN_REFRESH"]

log = logging.getLogger("fastlb")

MIN_REFRESH = 1.0       # seconds: the soonest next round, whatever the TTLs say
RETRY_FIRST = 0.5       # seconds: the first retry after a failed round, doubling...
LIFETIME = 3.0          # seconds: one query (every try of every server) at most


class DnsFailure(Exception):
    """A lookup that got no answer (as opposed to an answer with no records)."""


def _resolver(address):
    if address is None:
        r = dns.asyncresolver.Resolver()
    else:
        r = dns.asyncresolver.Resolver(configure=False)
        r.nameservers = [address[0]]
        r.port = address[1]
    r.lifetime = LIFETIME
    r.timeout = min(r.timeout, LIFETIME)
    r.cache = None
    return r


async def _query(resolver, name, rdtype):
    """The answer's records and TTL; ``([], None)`` for NXDOMAIN or no such records;
    DnsFailure when there was no answer."""
    try:
        answer = await resolver.resolve(name, rdtype, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return [], None
    except dns.resolver.NoNameservers as e:
        raise DnsFailure(f"{name} {rdtype}: no server answered ({_first_error(e)})") from None
    except dns.exception.Timeout:
        raise DnsFailure(f"{name} {rdtype}: timed out") from None
    except dns.exception.DNSException as e:
        raise DnsFailure(f"{name} {rdtype}: {e}") from None
    except OSError as e:
        raise DnsFailure(f"{name} {rdtype}: {e.strerror or e}") from None
    return list(answer), answer.rrset.ttl if answer.rrset is not None else None


def _first_error(exc):
    errors = exc.kwargs.get("errors") if hasattr(exc, "kwargs") else None
    if errors:
        err = errors[0]
        return f"{err[0]}: {err[3]}" if len(err) > 3 else str(err)
    return "all failed"


def _weights(records):
    """fastlb weights for the SRV weights of one priority group."""
    top = max(r.weight for r in records)
    if top == 0:
        return [1] * len(records)
    if top <= MAX_WEIGHT:
        return [r.weight for r in records]
    return [0 if r.weight == 0 else max(1, round(r.weight * MAX_WEIGHT / top))
            for r in records]


async def lookup(name, resolver_address=None, resolver=None):
    """One round: ``(backends, ttl)``; ``ttl`` is the shortest of the answers
    (None when nothing said one). Raises DnsFailure."""
    r = resolver if resolver is not None else _resolver(resolver_address)
    records, ttl = await _query(r, name, "SRV")
    records = [rec for rec in records if rec.target.to_text() != "."]
    if not records:
        return [], ttl
    targets = sorted({rec.target.to_text() for rec in records})
    answers = await asyncio.gather(*[_query(r, t, kind) for t in targets
                                     for kind in ("A", "AAAA")])
    addresses = {}
    ttls = [ttl] if ttl is not None else []
    for i, t in enumerate(targets):
        found = []
        for rrs, t_ttl in answers[2 * i: 2 * i + 2]:
            found += [rr.address for rr in rrs]
            if t_ttl is not None and rrs:
                ttls.append(t_ttl)
        addresses[t] = found
    groups = {}
    for rec in records:
        groups.setdefault(rec.priority, []).append(rec)
    out = []
    for priority, recs in groups.items():
        for rec, weight in zip(recs, _weights(recs)):
            for ip in addresses[rec.target.to_text()]:
                out.append(backend(ip, rec.port, weight=weight, priority=priority))
    return out, (min(ttls) if ttls else None)


class DnsSrvSource:
    """Rounds of ``lookup`` for a pool's ``DiscoveryConfig`` (see the module)."""

    def __init__(self, spec):
        self.spec = spec
        self.rounds = 0         # rounds that got an answer

    async def run(self, sink):
        spec = self.spec
        resolver = None
        backoff = Backoff(RETRY_FIRST, spec.interval)
        while True:
            try:
                if resolver is None:
                    try:
                        resolver = _resolver(spec.resolver)
                    except dns.exception.DNSException as e:
                        raise DnsFailure(f"no resolver ({e})") from None
                backends, ttl = await lookup(spec.dns_srv, resolver=resolver)
            except DnsFailure as e:
                delay = backoff.next()
                sink.failed(f"DNS lookup failed: {e}; trying again in {delay:g}s")
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            self.rounds += 1
            sink.found(backends)
            wait = spec.interval if ttl is None else min(spec.interval, max(MIN_REFRESH, ttl))
            await asyncio.sleep(wait)
