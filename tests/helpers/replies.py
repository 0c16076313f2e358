"""A parsed SMTP reply, shared by the raw-socket and in-memory test clients."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    lines: list[bytes]

    @property
    def text(self) -> bytes:
        return b"\n".join(self.lines)
