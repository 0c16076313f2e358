"""The built-in ``milter`` policy plugin (``docs/plugins/milter.md``)."""

from twisted.plugin import IPlugin
from zope.interface import implementer

from twisted_mta.interfaces import IMailPolicyFactory
from twisted_mta.policies.milter import make_policy


@implementer(IPlugin, IMailPolicyFactory)
class MilterFactory:
    name = "milter"
    description = "Ask a Sendmail milter (OpenDKIM, rspamd...) about each message, as smtpd_milters"

    def policy(self, options, context):
        return make_policy(options, context)


milter = MilterFactory()
