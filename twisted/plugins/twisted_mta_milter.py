"""The built-in ``milter`` policy plugin (``docs/plugins/milter.md``)."""

from twisted_mta.policies import BuiltinFactory
from twisted_mta.policies.milter import make_policy

milter = BuiltinFactory(
    "milter",
    "Ask a Sendmail milter (OpenDKIM, rspamd...) about each message, as smtpd_milters",
    make_policy,
)
