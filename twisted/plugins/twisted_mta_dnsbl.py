"""The built-in ``dnsbl`` policy plugin (``docs/plugins/dnsbl.md``)."""

from twisted_mta.policies.dnsbl import DnsblFactory

dnsbl = DnsblFactory()
