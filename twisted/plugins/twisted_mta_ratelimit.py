"""The built-in ``ratelimit`` policy plugin (``docs/plugins/ratelimit.md``)."""

from twisted_mta.policies.ratelimit import factory as ratelimit  # noqa: F401 (found by getPlugins)
