"""A DNS server for tests: ``python dns_server.py ZONES.json``.

Serves the records of a JSON file ``{"name": [["MX", 10, "mx1.test"],
["A", "127.0.0.2"], ["AAAA", "::1"], ["CNAME", "other.test"],
["TXT", "first string", "second string"]], "broken.test": [["SERVFAIL"]],
...}`` authoritatively over UDP and TCP on 127.0.0.1, on a free port it
prints as ``port N`` once it listens.  Names not in the file are
NXDOMAIN; a name with ``SERVFAIL`` answers every query with that error.
"""

import json
import sys

from twisted.internet import defer, reactor
from twisted.internet.error import CannotListenError
from twisted.names import authority, dns, server

BUILDERS = {
    "A": lambda ttl, address: dns.Record_A(address, ttl),
    "AAAA": lambda ttl, address: dns.Record_AAAA(address, ttl),
    "MX": lambda ttl, preference, name: dns.Record_MX(preference, name, ttl),
    "CNAME": lambda ttl, name: dns.Record_CNAME(name, ttl),
    # One record of one or more strings: a DKIM key is longer than the
    # 255 bytes of one string.
    "TXT": lambda ttl, *texts: dns.Record_TXT(*(text.encode() for text in texts), ttl=ttl),
}


class Zones(authority.FileAuthority):
    def __init__(self, zones):
        authority.FileAuthority.__init__(self, None)
        self.soa = (b"test", dns.Record_SOA(mname="ns.test", rname="root.test", ttl=60))
        self.failing = {
            name.lower().encode()
            for name, entries in zones.items()
            if ["SERVFAIL"] in entries
        }
        self.records = {
            name.lower().encode(): [BUILDERS[kind](60, *args) for kind, *args in entries]
            for name, entries in zones.items()
            if name.lower().encode() not in self.failing
        }

    def _lookup(self, name, cls, type, timeout=None):
        if name.lower() in self.failing:
            # Not a DomainError: the server factory answers SERVFAIL.
            return defer.fail(RuntimeError(f"{name!r} is set to fail"))
        return authority.FileAuthority._lookup(self, name, cls, type, timeout)

    def loadFile(self, filename):
        """Records come from the constructor."""


def listen_both(factory, attempts=20):
    """UDP and TCP on the same free port: take a TCP port, then its UDP twin,
    trying again if the UDP side happens to be taken."""
    for _ in range(attempts):
        tcp = reactor.listenTCP(0, factory, interface="127.0.0.1")
        port = tcp.getHost().port
        try:
            reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        except CannotListenError:
            tcp.stopListening()
            continue
        return port
    raise SystemExit("no free port for UDP and TCP")


def main():
    with open(sys.argv[1]) as zones_file:
        zones = json.load(zones_file)
    factory = server.DNSServerFactory(authorities=[Zones(zones)])
    port = listen_both(factory)
    print(f"port {port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
