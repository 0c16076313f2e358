"""The built-in ``dkim`` policy plugin (``docs/plugins/dkim.md``)."""

from twisted_mta.policies.dkim import factory as dkim  # noqa: F401 (found by getPlugins)
