"""The built-in ``greylist`` policy plugin (docs/plugins/greylist.md)."""

from twisted_mta.policies.greylist import GreylistFactory

greylist = GreylistFactory()
