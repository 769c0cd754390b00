"""
Who is trusted: sets of networks (CIDRs, IPv4 and IPv6).

Trust is computed once per connection from facts a client cannot forge (the
socket peer, the PROXY source from a trusted balancer, a verified client
certificate) and kept apart from the identity that the trusted verbs rewrite.
"""

import functools
import ipaddress


@functools.lru_cache(maxsize=4096)
def canonicalIP(text):
    """
    Parse an IP address (optionally C{IPv6:}-prefixed) into its canonical
    text, IPv4-mapped IPv6 as IPv4.  Raises C{ValueError} if it is not one.
    """
    if text[:5].lower() == "ipv6:":
        text = text[5:]
        addr = ipaddress.IPv6Address(text)
    else:
        addr = ipaddress.ip_address(text)
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        if addr.scope_id:
            raise ValueError("scoped IPv6 address")
    return str(addr)


class Networks:
    """
    An immutable set of networks; C{ip in networks} tests membership.
    IPv4-mapped IPv6 addresses match their IPv4 networks.
    """

    _CACHE_SIZE = 4096

    def __init__(self, cidrs=()):
        self.cidrs = tuple(cidrs)
        self._nets = tuple(ipaddress.ip_network(c, strict=False) for c in self.cidrs)
        self._answers = {}

    def __contains__(self, ip):
        ip = str(ip)
        answer = self._answers.get(ip)
        if answer is None:
            answer = self._lookup(ip)
            if len(self._answers) >= self._CACHE_SIZE:
                self._answers.clear()
            self._answers[ip] = answer
        return answer

    def _lookup(self, ip):
        try:
            addr = ipaddress.ip_address(canonicalIP(ip))
        except ValueError:
            return False
        return any(addr.version == n.version and addr in n for n in self._nets)

    def __bool__(self):
        return bool(self._nets)

    def __repr__(self):
        return "Networks(%r)" % (self.cidrs,)


def isLocalAddress(ip):
    """Whether C{ip} is loopback or private (used for start-up warnings)."""
    try:
        addr = ipaddress.ip_address(canonicalIP(ip))
    except ValueError:
        return False
    if addr.is_unspecified:
        return False  # 0.0.0.0 and :: bind every interface
    return addr.is_loopback or addr.is_private
