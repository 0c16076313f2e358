"""HMAC-MD5 from Dovecot's saved CRAM-MD5 context.

``doveadm pw -s CRAM-MD5`` stores neither the password nor a hash of it,
but the two MD5 states an HMAC-MD5 reaches after absorbing the padded key
(``key ^ opad`` and ``key ^ ipad``): 8 little-endian 32-bit words, outer
state first.  Verifying a CRAM-MD5 response (RFC 2195) from that needs the
MD5 compression step resumed from a given state, which ``hashlib`` cannot
do, so the compression function (RFC 1321) is written out here.  It runs
only on short inputs: a challenge and a 16-byte digest.
"""

from __future__ import annotations

import hashlib
import math
import struct

_BLOCK = 64
_SHIFTS = [7, 12, 17, 22] * 4 + [5, 9, 14, 20] * 4 + [4, 11, 16, 23] * 4 + [6, 10, 15, 21] * 4
_CONSTANTS = [int(abs(math.sin(i + 1)) * 2**32) & 0xFFFFFFFF for i in range(64)]
_INITIAL = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_MASK = 0xFFFFFFFF


def _rotate(value: int, amount: int) -> int:
    return ((value << amount) | (value >> (32 - amount))) & _MASK


def _compress(state: tuple[int, int, int, int], block: bytes) -> tuple[int, int, int, int]:
    words = struct.unpack("<16I", block)
    a, b, c, d = state
    for i in range(64):
        if i < 16:
            f, g = (b & c) | (~b & d), i
        elif i < 32:
            f, g = (d & b) | (~d & c), (5 * i + 1) % 16
        elif i < 48:
            f, g = b ^ c ^ d, (3 * i + 5) % 16
        else:
            f, g = c ^ (b | ~d), (7 * i) % 16
        f = (f + a + _CONSTANTS[i] + words[g]) & _MASK
        a, d, c = d, c, b
        b = (b + _rotate(f, _SHIFTS[i])) & _MASK
    return tuple((x + y) & _MASK for x, y in zip(state, (a, b, c, d), strict=True))


def md5_resume(state: tuple[int, int, int, int], absorbed: int, data: bytes) -> bytes:
    """MD5 digest of (``absorbed`` bytes that led to ``state``) + ``data``.

    ``absorbed`` must be a multiple of the 64-byte block size.
    """
    length = absorbed + len(data)
    padded = data + b"\x80" + b"\0" * ((55 - len(data)) % _BLOCK) + struct.pack("<Q", length * 8)
    for offset in range(0, len(padded), _BLOCK):
        state = _compress(state, padded[offset : offset + _BLOCK])
    return struct.pack("<4I", *state)


def _padded_key(secret: bytes) -> bytes:
    if len(secret) > _BLOCK:
        secret = hashlib.md5(secret).digest()
    return secret.ljust(_BLOCK, b"\0")


def cram_context(secret: bytes) -> str:
    """The 64-hex context Dovecot stores for ``{CRAM-MD5}`` passwords."""
    key = _padded_key(secret)
    outer = _compress(_INITIAL, bytes(k ^ 0x5C for k in key))
    inner = _compress(_INITIAL, bytes(k ^ 0x36 for k in key))
    return struct.pack("<8I", *outer, *inner).hex()


def hmac_md5_from_context(context: str, message: bytes) -> str:
    """HMAC-MD5(key, message) as hex, given only ``cram_context(key)``."""
    words = struct.unpack("<8I", bytes.fromhex(context))
    outer, inner = words[:4], words[4:]
    inner_digest = md5_resume(inner, _BLOCK, message)
    return md5_resume(outer, _BLOCK, inner_digest).hex()


def is_context(value: str) -> bool:
    """Whether ``value`` looks like a stored context (64 hex digits)."""
    if len(value) != 64:
        return False
    try:
        bytes.fromhex(value)
    except ValueError:
        return False
    return True
