"""The built-in ``dkim`` policy plugin (``docs/plugins/dkim.md``)."""

from twisted_mta.policies.dkim import DKIMFactory

dkim = DKIMFactory()
