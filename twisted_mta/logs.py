"""Log observers for ``twistd --logger``.

Every event the server logs carries its fields (``queue_id``,
``client_ip``, ``status``...) beside its text; a text log shows only the
text.  ``twistd --logger twisted_mta.logs.json_lines mta`` writes each
event as one JSON record (RFC 7464 JSON text sequences, as
``twisted.logger.jsonFileLogObserver`` writes them) to standard output,
for journald or a log shipper.
"""

from __future__ import annotations

import sys

from twisted.logger import FileLogObserver, jsonFileLogObserver


def json_lines() -> FileLogObserver:
    """Every event as a JSON record on standard output."""
    return jsonFileLogObserver(sys.stdout)
