"""The built-in ``dnsbl`` policy plugin (``docs/plugins/dnsbl.md``)."""

from twisted_mta.policies.dnsbl import factory as dnsbl  # noqa: F401 (found by getPlugins)
