"""The built-in ``spf`` policy plugin (docs/plugins/spf.md)."""

from twisted_mta.policies.spf import SPFFactory

spf = SPFFactory()
