"""Trusted proxies: which peers may speak for their clients in X-Forwarded-For.

A listener's ``trusted_proxies`` (CIDR networks) become one ``TrustedProxies``
when the configuration is loaded. The data path asks it once per client
connection whether the peer is one of them (``trusts``). Only then are the
X-Forwarded-* fields the peer sends believed: the head written for the
backend extends its X-Forwarded-For (``write_request_head(..., trusted=True)``)
and the client address of each request (the access log's, the ``ip`` hash
key's) is ``client(forwarded_for, peer)``: the right-most address of the
list that is not a trusted proxy, walking from the peer leftwards as nginx's
``real_ip_recursive on`` does. An entry that is not an IP address ends the
walk: the address kept is then the last trusted one seen (the peer itself
when the right-most entry is already unreadable). When every address is
trusted, the left-most one is the client.

Pure Python on purpose: it runs at configuration time, once per connection,
and per request only on connections from trusted proxies (with a cache of the
lists seen); connections from anyone else never reach it.
"""
import ipaddress

__all__ = ["TrustedProxies"]

CACHE_SIZE = 4096       # X-Forwarded-For lists remembered with their client address


def _address(text):
    """An IP address from an X-Forwarded-For entry or a peer name: ``1.2.3.4``,
    ``1.2.3.4:80``, ``2001:db8::1``, ``[2001:db8::1]``, ``[2001:db8::1]:80``;
    an IPv4-mapped IPv6 address as its IPv4 address. None if it is not one."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (end + 1 < len(text) and not (
                text[end + 1] == ":" and text[end + 2:].isdigit())):
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        text, _, port = text.partition(":")
        if not port.isdigit():
            return None
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class TrustedProxies:
    """The trusted networks of one listener (see the module docstring)."""

    __slots__ = ("networks", "_v4", "_v6", "_cache")

    def __init__(self, networks):
        """``networks``: CIDR strings, as ``fastlb.validate.trusted_networks``
        returns them (ValueError for one that is not a network)."""
        nets = [ipaddress.ip_network(n) for n in networks]
        self.networks = tuple(str(n) for n in nets)
        self._v4 = [(int(n.network_address), int(n.netmask)) for n in nets if n.version == 4]
        self._v6 = [(int(n.network_address), int(n.netmask)) for n in nets if n.version == 6]
        self._cache = {}

    def __bool__(self):
        return bool(self.networks)

    def __repr__(self):
        return f"TrustedProxies({list(self.networks)!r})"

    def _trusted(self, addr):
        n = int(addr)
        for net, mask in (self._v4 if addr.version == 4 else self._v6):
            if n & mask == net:
                return True
        return False

    def trusts(self, peer):
        """Whether the peer address ``peer`` (str or bytes, as a socket names
        it) is in a trusted network."""
        if isinstance(peer, bytes):
            peer = peer.decode("ascii", "replace")
        addr = _address(peer)
        return addr is not None and self._trusted(addr)

    def client(self, forwarded_for, peer):
        """The client address of a request from the trusted proxy ``peer``
        (bytes) whose X-Forwarded-For values are ``forwarded_for`` (bytes,
        joined by ", "): bytes, ``peer`` itself when the list says nothing."""
        if not forwarded_for:
            return peer
        cache = self._cache
        got = cache.get(forwarded_for)
        if got is None:
            got = self._walk(forwarded_for)
            if len(cache) >= CACHE_SIZE:
                cache.clear()
            cache[forwarded_for] = got
        return got if got else peer

    def _walk(self, forwarded_for):
        """The client address in an X-Forwarded-For list (b"": the peer's)."""
        found = b""
        for entry in reversed(forwarded_for.split(b",")):
            entry = entry.strip(b" \t")
            if not entry:
                continue
            addr = _address(entry.decode("latin-1"))
            if addr is None:
                return found        # unreadable: the last trusted address seen
            found = str(addr).encode("ascii")
            if not self._trusted(addr):
                return found
        return found                # all trusted: the left-most
