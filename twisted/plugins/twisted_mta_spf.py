"""The built-in ``spf`` policy plugin (docs/plugins/spf.md)."""

from twisted_mta.policies.spf import factory as spf  # noqa: F401 (found by getPlugins)
