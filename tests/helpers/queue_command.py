"""The queue command, and a relay setting that keeps messages queued."""

import sys
from pathlib import Path

CLI = str(Path(sys.executable).with_name("twisted-mta"))
# A smart host that refuses connections: every attempt fails at once and
# the messages stay queued for an hour.
UNROUTABLE = """
[relay]
smarthost = "127.0.0.1:1"
smarthost_tls = "none"
[queue]
retry_min = "1h"
retry_max = "2h"
"""
