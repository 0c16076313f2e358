"""The reply to an exception from a validator, an avatar or a message.

Twisted wants a str ``resp`` from validators and bytes from messages and
hangs the client otherwise (S11); we take either, and the intake's own
``Refusal``.  Anything else is a fault of ours: logged, and answered with
a temporary error so that the client tries again.
"""

from __future__ import annotations

import re

from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from twisted_mta.intake.refusal import Refusal

_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3} ")
_LOCAL_ERROR = (451, "4.3.0", "Error: local error in processing")

_log = Logger()



def failure_reply(failure: Failure) -> tuple[int, str, str]:
    """``(code, enhanced, text)`` for ``failure``."""
    error = failure.value
    if isinstance(error, Refusal):
        return error.code, error.enhanced, error.text
    if not isinstance(error, smtp.SMTPServerError):
        _log.failure("unexpected error in SMTP session", failure)
        return _LOCAL_ERROR
    resp = error.resp
    if isinstance(resp, bytes):
        resp = resp.decode("utf-8", "replace")
    if not _ENHANCED.match(resp):
        return error.code, f"{error.code // 100}.0.0", resp
    enhanced, _, text = resp.partition(" ")
    return error.code, enhanced, text
