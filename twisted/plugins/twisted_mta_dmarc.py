"""The built-in ``dmarc`` policy plugin (docs/plugins/dmarc.md)."""

from twisted_mta.policies.dmarc import factory as dmarc  # noqa: F401 (found by getPlugins)
