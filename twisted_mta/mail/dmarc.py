"""DMARC (RFC 7489): the policy record, the organizational domain,
identifier alignment and the evaluation of one message.

Pure: no DNS and no Twisted.  The policy plugin fetches the records
through ``twisted.names`` and hands their text here; the DMARC libraries
on PyPI resolve with blocking calls, which would stall every session, so
the record parser is our own (section 6.3, small and strict).

The organizational domain (section 3.2) comes from the Public Suffix
List through ``publicsuffixlist``: maintained, updated with its releases,
and it works offline from the copy it ships, so no list is fetched at
run time.
"""

from __future__ import annotations

import email.utils
import functools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from publicsuffixlist import PublicSuffixList

PASS, FAIL, NONE, TEMPERROR, PERMERROR = "pass", "fail", "none", "temperror", "permerror"
POLICIES = ("none", "quarantine", "reject")
# What a message that is not in the pct= sample gets (section 6.6.4).
_WEAKER = {"reject": "quarantine", "quarantine": "none", "none": "none"}
_VERSION = re.compile(r"v[ \t]*=[ \t]*DMARC1[ \t]*(;|$)")
_TAG = re.compile(r"([A-Za-z][A-Za-z0-9_]*)[ \t]*=[ \t]*(.*?)[ \t]*", re.DOTALL)
_PERCENT = re.compile(r"[0-9]{1,3}")
_INTERVAL = re.compile(r"[0-9]+")
_FAILURE_OPTIONS = re.compile(r"[01ds]([ \t]*:[ \t]*[01ds])*")
_REPORT_FORMATS = re.compile(r"[A-Za-z0-9-]+([ \t]*:[ \t]*[A-Za-z0-9-]+)*")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^ \t,!]+(![0-9]+[kmgt]?)?")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


class RecordError(ValueError):
    """A DMARC record that breaks the syntax of section 6.4."""


@dataclass(frozen=True)
class Record:
    """A DMARC policy record: ``policy`` is ``p=``, ``subdomain_policy``
    ``sp=`` (None when absent), ``percent`` ``pct=``, ``dkim`` and ``spf``
    the alignment modes ``adkim=`` and ``aspf=`` (``r`` or ``s``)."""

    policy: str
    subdomain_policy: str | None = None
    percent: int = 100
    dkim: str = "r"
    spf: str = "r"


@dataclass(frozen=True)
class Evaluation:
    """The DMARC result for one From: domain: ``result`` as RFC 8601 names
    it, ``disposition`` what the domain asks for this message (``none``,
    ``quarantine`` or ``reject``, after ``pct=`` sampling)."""

    result: str
    disposition: str = "none"


def is_dmarc(text: str) -> bool:
    """Whether a TXT record is a DMARC record: it starts with ``v=DMARC1``
    (others at ``_dmarc`` names are to be ignored, section 6.6.3)."""
    return _VERSION.match(text) is not None


def parse_record(text: str) -> Record:
    """The record ``text``; raises RecordError for one that is not DMARC,
    repeats a tag, or has a bad value in a tag we know.  Unknown tags are
    ignored (section 6.3); a missing or bad ``p=`` (or a bad ``sp=``)
    reads as ``p=none`` when ``rua=`` names a report address (6.6.3)."""
    if not is_dmarc(text):
        raise RecordError("the record does not start with v=DMARC1")
    tags = _tags(text)
    percent = _checked(tags, "pct", _PERCENT.fullmatch, "100")
    if int(percent) > 100:
        raise RecordError(f"pct={percent}: not from 0 to 100")
    _checked(tags, "ri", _INTERVAL.fullmatch, "86400")
    _checked(tags, "fo", _FAILURE_OPTIONS.fullmatch, "0")
    _checked(tags, "rf", _REPORT_FORMATS.fullmatch, "afrf")
    policy, subdomain_policy = _policies(tags)
    return Record(
        policy=policy,
        subdomain_policy=subdomain_policy,
        percent=int(percent),
        dkim=_mode(tags, "adkim"),
        spf=_mode(tags, "aspf"),
    )


def _tags(text: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        found = _TAG.fullmatch(part.strip())
        if found is None:
            raise RecordError(f"{part.strip()!r} is not a tag=value pair")
        name, value = found.group(1).lower(), found.group(2)
        if name in tags:
            raise RecordError(f"{name}= is given twice")
        tags[name] = value
    return tags


def _checked(
    tags: dict[str, str], name: str, valid: Callable[[str], object], default: str
) -> str:
    value = tags.get(name, default)
    if not valid(value):
        raise RecordError(f"{name}={value}: not a valid value")
    return value


def _policies(tags: dict[str, str]) -> tuple[str, str | None]:
    policy = tags.get("p", "").lower()
    subdomain_policy = tags.get("sp")
    if subdomain_policy is not None:
        subdomain_policy = subdomain_policy.lower()
    if policy in POLICIES and subdomain_policy in (None, *POLICIES):
        return policy, subdomain_policy
    if _has_report_address(tags.get("rua", "")):
        return "none", None
    if policy not in POLICIES:
        raise RecordError(f"p={tags.get('p', '')}: not none, quarantine or reject")
    raise RecordError(f"sp={subdomain_policy}: not none, quarantine or reject")


def _has_report_address(rua: str) -> bool:
    return any(_URI.fullmatch(uri.strip()) for uri in rua.split(","))


def _mode(tags: dict[str, str], name: str) -> str:
    mode = tags.get(name, "r").lower()
    if mode not in ("r", "s"):
        raise RecordError(f"{name}={tags[name]}: not r or s")
    return mode


@functools.cache
def _suffixes() -> PublicSuffixList:
    # Reading the bundled list takes a moment: once, on first use.
    return PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """The organizational domain of ``domain`` (section 3.2): its public
    suffix and one label more; a public suffix itself, or a name the list
    does not know, is its own."""
    name = normal(domain)
    return _suffixes().privatesuffix(name) or name


def normal(domain: str) -> str:
    return domain.rstrip(".").lower()


def aligned(identifier: str, author: str, mode: str) -> bool:
    """Whether an authenticated domain is aligned with the From: domain:
    equal in strict mode (``s``), of one organizational domain in relaxed
    mode (``r``), section 3.1."""
    if mode == "s":
        return normal(identifier) == normal(author)
    return organizational_domain(identifier) == organizational_domain(author)


def author_domains(values: Iterable[str]) -> list[str] | None:
    """The distinct domains of the addresses in the From: header values
    (RFC 5322 section 3.6.2), lower case, in order; None when there is no
    address or one without a usable domain."""
    addresses = email.utils.getaddresses([str(value) for value in values])
    domains: list[str] = []
    for _, address in addresses:
        local, at, domain = address.rpartition("@")
        domain = _ascii_domain(domain)
        if not (local and at and domain):
            return None
        if domain not in domains:
            domains.append(domain)
    return domains or None


def _ascii_domain(domain: str) -> str | None:
    """The domain as DNS asks for it (A-labels), or None if it is not one."""
    try:
        name = normal(domain.strip()).encode("idna").decode("ascii")
    except UnicodeError:
        return None
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return None
    return name


def applicable_policy(record: Record, author: str, at_organizational: bool) -> str:
    """The policy for mail from ``author``: ``sp=`` (else ``p=``) when the
    record was found at the organizational domain of a subdomain, else
    ``p=`` (section 6.6.3)."""
    if at_organizational and normal(author) != organizational_domain(author):
        return record.subdomain_policy or record.policy
    return record.policy


def sampled_disposition(policy: str, percent: int, draw: float) -> str:
    """The disposition for a failing message: the policy when the draw (a
    random number from 0 to 1) falls in the ``pct=`` sample, else the next
    weaker one (section 6.6.4)."""
    if draw * 100 < percent:
        return policy
    return _WEAKER[policy]


@dataclass(frozen=True)
class Identifier:
    """One authentication result: ``result`` (``pass``, ``fail``,
    ``temperror``...) for ``domain``."""

    result: str
    domain: str


def evaluate(
    author: str,
    record: Record,
    at_organizational: bool,
    spf: Identifier | None,
    dkim: Sequence[Identifier],
    draw: float,
) -> Evaluation:
    """The DMARC result for mail from ``author`` under ``record``, found
    at the From: domain or at its organizational domain: ``pass`` when SPF
    or one DKIM signature passed for an aligned domain; ``temperror``
    when none did but one for an aligned domain met a temporary error;
    else ``fail``, with the disposition the record asks for."""
    checked = [(identifier, record.dkim) for identifier in dkim]
    if spf is not None:
        checked.append((spf, record.spf))
    results = {
        identifier.result
        for identifier, mode in checked
        if aligned(identifier.domain, author, mode)
    }
    policy = applicable_policy(record, author, at_organizational)
    if PASS in results:
        return Evaluation(PASS)
    disposition = sampled_disposition(policy, record.percent, draw)
    return Evaluation(TEMPERROR if TEMPERROR in results else FAIL, disposition)


def strictly_aligned_pass(author: str, spf: Identifier | None, dkim: Sequence[Identifier]) -> bool:
    """Whether SPF or DKIM passed for the From: domain itself: such a
    message passes under any record, whatever its alignment modes."""
    passed = [identifier for identifier in (spf, *dkim) if identifier is not None]
    return any(
        identifier.result == PASS and aligned(identifier.domain, author, "s")
        for identifier in passed
    )
