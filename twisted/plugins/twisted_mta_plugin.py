"""twistd plugin: ``twistd -n mta [--config FILE] [--auth ...]``."""

from twisted.application.service import ServiceMaker

mta = ServiceMaker(
    "twisted-mta",
    "twisted_mta.tap",
    "An ESMTP mail transfer agent: MX, submission, Maildir delivery, relay",
    "mta",
)
