"""A sender blocklist for twisted-mta: refuse mail from listed senders.

Install it by copying this file into a ``twisted/plugins/`` folder on the
Python path of the daemon (a folder of that name, without ``__init__.py``,
in any directory on ``PYTHONPATH``), then enable it in the config::

    [plugins]
    enabled = ["sender-blocklist"]

    [plugins.sender-blocklist]
    senders = ["spammer@example.net", "@bad.example"]

Mail from those senders is refused with ``550 5.7.1`` over SMTP, and
bounced to the local user for ``twisted-mta-sendmail``.
"""

from twisted.plugin import IPlugin
from zope.interface import implementer

from twisted_mta.interfaces import IMailPolicy, IMailPolicyFactory, Verdict


@implementer(IMailPolicy)
class SenderBlocklist:
    def __init__(self, senders):
        self.senders = {sender.lower() for sender in senders}

    def mail_from(self, session, sender, params):
        address = sender.lower()
        if address in self.senders or "@" + address.rpartition("@")[2] in self.senders:
            return Verdict.reject(550, "5.7.1", f"<{sender}>: Sender address rejected: blocked")
        return None


@implementer(IPlugin, IMailPolicyFactory)
class SenderBlocklistFactory:
    name = "sender-blocklist"
    description = "Refuse mail from the addresses and @domains listed in 'senders'"

    def policy(self, options, context):
        senders = options.get("senders")
        if not isinstance(senders, list) or not all(isinstance(s, str) for s in senders):
            raise ValueError("senders: expected a list of addresses and @domains")
        return SenderBlocklist(senders)


sender_blocklist = SenderBlocklistFactory()
