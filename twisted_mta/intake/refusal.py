"""A refusal of the intake: the reply an SMTP client would be sent."""

from __future__ import annotations


class Refusal(Exception):
    """``code``, ``enhanced`` status and ``text``, sent as they are.

    A temporary refusal (4xx) asks for the whole message to be offered
    again later; a permanent one (5xx) is final for what it refused.
    """

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text

    @property
    def reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"
