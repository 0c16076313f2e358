"""The built-in ``ratelimit`` policy plugin (``docs/plugins/ratelimit.md``)."""

from twisted_mta.policies.ratelimit import RateLimitFactory

ratelimit = RateLimitFactory()
