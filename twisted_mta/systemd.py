"""Telling systemd how the service is doing (``sd_notify``, for ``Type=notify``).

The protocol is one datagram of ``KEY=VALUE`` lines to the Unix socket
named by ``$NOTIFY_SOCKET`` (a leading ``@`` names an abstract socket);
it is a few lines, so it is written here rather than pulled in with
libsystemd's bindings.  Without ``$NOTIFY_SOCKET`` (not run by systemd)
nothing is sent.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

READY = "READY=1"
RELOADING = "RELOADING=1"
STOPPING = "STOPPING=1"


def notify(*states: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send ``states`` (``READY=1``, ``STATUS=...``) to systemd; whether a
    socket was there to take them.  OSError if it could not be reached."""
    address = environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sender:
        sender.connect(address)
        sender.sendall("\n".join(states).encode("utf-8"))
    return True


def status(text: str) -> str:
    """A ``STATUS=`` line: what ``systemctl status`` shows."""
    return "STATUS=" + " ".join(text.split())
