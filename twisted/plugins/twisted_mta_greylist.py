"""The built-in ``greylist`` policy plugin (docs/plugins/greylist.md)."""

from twisted_mta.policies.greylist import factory as greylist  # noqa: F401 (found by getPlugins)
