"""Sender Policy Framework: ``check_host()`` of RFC 7208, on twisted.names.

This is our own evaluator rather than pyspf: pyspf does its DNS queries
with blocking calls on the calling thread, and every SMTP session shares
the reactor thread, so one slow name server would stall them all.  Here
every query is a ``twisted.names`` Deferred.

Implemented: the mechanisms ``all``, ``include``, ``a``, ``mx``, ``ptr``
(evaluated, though RFC 7208 discourages it), ``ip4``, ``ip6`` and
``exists``; the qualifiers ``+ - ~ ?``; the ``redirect`` modifier; macro
expansion (``s l o d i p v h``, the digit and ``r`` transformers and
delimiters; ``%{p}`` is always ``unknown``, as section 7.3 allows); dual
CIDR lengths on ``a`` and ``mx``; the limits of 10 DNS-querying terms and
2 void lookups (section 4.6.4).  A ``fail`` explains itself with the
domain's ``exp`` text (section 6.2: macros ``c r t`` too, printable ASCII
only) when it has one that can be fetched, else with our own text.
"""

from __future__ import annotations

import ipaddress
import re
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.names import dns, error

PASS, FAIL, SOFTFAIL, NEUTRAL = "pass", "fail", "softfail", "neutral"
NONE, TEMPERROR, PERMERROR = "none", "temperror", "permerror"
RESULTS = (PASS, FAIL, SOFTFAIL, NEUTRAL, NONE, TEMPERROR, PERMERROR)
QUALIFIERS = {"+": PASS, "-": FAIL, "~": SOFTFAIL, "?": NEUTRAL}
MAX_LOOKUPS = 10
MAX_VOID_LOOKUPS = 2
MAX_MX_OR_PTR_NAMES = 10
QUERY_TIMEOUTS = (1, 3)

_MECHANISM = re.compile(
    r"([-+~?]?)(all|include|a|mx|ptr|ip4|ip6|exists)(?=$|[:/])(.*)", re.IGNORECASE | re.DOTALL
)
_MODIFIER = re.compile(r"([a-z][a-z0-9_.-]*)=(.*)", re.IGNORECASE | re.DOTALL)
_DUAL_CIDR = re.compile(r"(.*?)(?:/(0|[1-9][0-9]{0,2}))?(?://(0|[1-9][0-9]{0,2}))?", re.DOTALL)
_MACRO = re.compile(r"%(?:\{([a-zA-Z])([0-9]*)(r?)([-.+,/_=]*)\}|(.))", re.DOTALL)
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?", re.IGNORECASE)
_TOPLABEL = re.compile(r"[a-z0-9-]*[a-z][a-z0-9-]*", re.IGNORECASE)
_DOMAIN_LETTERS = "slodipvh"
_EXP_LETTERS = _DOMAIN_LETTERS + "crt"

_DNS_FAILURES = (error.DomainError, error.ResolverError, defer.TimeoutError, OSError)
_PRINTABLE = re.compile(r"[ -~]*")
MAX_EXPLANATION = 200

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class SPFError(Exception):
    """Ends the evaluation with ``result``; the message says why."""

    result = PERMERROR


class PermError(SPFError):
    result = PERMERROR


class TempError(SPFError):
    result = TEMPERROR


@dataclass(frozen=True)
class Term:
    """One mechanism of a record: its qualifier's result, its name, its
    domain-spec (None: the current domain) and its CIDR lengths."""

    result: str
    name: str
    domain: str | None = None
    cidr4: int = 32
    cidr6: int = 128
    network: Any = None


@dataclass(frozen=True)
class Record:
    """A parsed SPF record."""

    terms: tuple[Term, ...]
    redirect: str | None = None
    explanation: str | None = None


def check_host(
    ip: str, domain: str, sender: str, helo: str, lookup: Any
) -> defer.Deferred[tuple[str, str]]:
    """RFC 7208 ``check_host()``: fires with ``(result, explanation)``,
    ``result`` one of :data:`RESULTS`.  ``lookup`` is a twisted.names
    resolver; ``sender`` is the MAIL FROM address (``postmaster@HELO``
    when checking the HELO identity)."""
    local, _, sender_domain = sender.rpartition("@")
    sender = f"{local or 'postmaster'}@{sender_domain or domain}"
    evaluation = _Evaluation(_address(ip), sender, helo or "unknown", lookup)
    return defer.Deferred.fromCoroutine(evaluation.run(domain))


def _address(ip: str) -> Address:
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def valid_domain(domain: str) -> bool:
    """A fully qualified, multi-label domain name (section 4.3)."""
    name = domain.rstrip(".")
    labels = name.split(".")
    return 0 < len(name) <= 253 and len(labels) > 1 and all(_LABEL.fullmatch(x) for x in labels)


def parse_record(text: str) -> Record:
    """The terms of an SPF record (``v=spf1 ...``); raises PermError on
    any syntax error (section 4.6)."""
    parts = text.split(" ")
    if parts[0].lower() != "v=spf1":
        raise PermError(f"not an SPF record: {text!r}")
    terms: list[Term] = []
    modifiers: dict[str, str] = {}
    for part in filter(None, parts[1:]):
        mechanism = _MECHANISM.fullmatch(part)
        if mechanism:
            terms.append(_term(*mechanism.groups()))
        else:
            _modifier(part, modifiers)
    return Record(tuple(terms), modifiers.get("redirect"), modifiers.get("exp"))


def _modifier(part: str, modifiers: dict[str, str]) -> None:
    found = _MODIFIER.fullmatch(part)
    if not found:
        raise PermError(f"unknown mechanism {part!r}")
    name, value = found.group(1).lower(), found.group(2)
    if name in ("redirect", "exp"):
        if name in modifiers:
            raise PermError(f"{name} given twice")
        _check_domain_spec(value, _EXP_LETTERS if name == "exp" else _DOMAIN_LETTERS)
        modifiers[name] = value
    else:
        _check_macro_string(value, _EXP_LETTERS)


def _term(qualifier: str, name: str, rest: str) -> Term:
    result, name = QUALIFIERS[qualifier or "+"], name.lower()
    if name == "all":
        if rest:
            raise PermError(f"all takes no argument: {rest!r}")
        return Term(result, name)
    if name in ("ip4", "ip6"):
        return Term(result, name, network=_network(name, rest))
    if name in ("a", "mx"):
        spec, cidr4, cidr6 = _DUAL_CIDR.fullmatch(rest).groups()
        return Term(result, name, _optional_domain(spec), *_cidrs(cidr4, cidr6))
    if name == "ptr":
        return Term(result, name, _optional_domain(rest))
    if not rest.startswith(":"):
        raise PermError(f"{name} needs a domain")
    return Term(result, name, _check_domain_spec(rest[1:], _DOMAIN_LETTERS))


def _optional_domain(spec: str) -> str | None:
    if not spec:
        return None
    if not spec.startswith(":"):
        raise PermError(f"bad argument {spec!r}")
    return _check_domain_spec(spec[1:], _DOMAIN_LETTERS)


def _cidrs(cidr4: str | None, cidr6: str | None) -> tuple[int, int]:
    length4 = 32 if cidr4 is None else int(cidr4)
    length6 = 128 if cidr6 is None else int(cidr6)
    if length4 > 32 or length6 > 128:
        raise PermError("CIDR length out of range")
    return length4, length6


def _network(name: str, rest: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not rest.startswith(":"):
        raise PermError(f"{name} needs a network")
    text, slash, length = rest[1:].partition("/")
    kind = ipaddress.IPv4Address if name == "ip4" else ipaddress.IPv6Address
    limit = 32 if name == "ip4" else 128
    try:
        address = kind(text)
    except ValueError:
        raise PermError(f"bad {name} address {text!r}") from None
    if slash and not re.fullmatch(r"0|[1-9][0-9]{0,2}", length) or int(length or limit) > limit:
        raise PermError(f"bad {name} prefix length {length!r}")
    return ipaddress.ip_network(f"{address}/{length or limit}", strict=False)


def _check_macro_string(value: str, letters: str) -> None:
    for found in _MACRO.finditer(value):
        letter, digits, _, _, escape = found.groups()
        if escape is not None and escape not in "%_-":
            raise PermError(f"bad macro %{escape}")
        if letter is not None and (letter.lower() not in letters or digits.startswith("0")):
            raise PermError(f"bad macro {found.group(0)}")
    stripped = _MACRO.sub("", value)
    if "%" in stripped or any(not 0x21 <= ord(c) <= 0x7E for c in stripped):
        raise PermError(f"bad macro string {value!r}")


def _check_domain_spec(spec: str, letters: str) -> str:
    """``spec`` if it is a domain-spec: a macro string ending in a macro
    or in a top label (section 7.1)."""
    _check_macro_string(spec, letters)
    if spec.endswith("}") and _MACRO.search(spec):
        return spec
    last = spec.rstrip(".").rpartition(".")[2]
    if "." not in spec.rstrip(".") or not _TOPLABEL.fullmatch(last):
        raise PermError(f"bad domain {spec!r}")
    return spec


@dataclass
class _Evaluation:
    """One ``check_host()`` and everything it includes: the lookup counts
    are shared."""

    ip: Address
    sender: str
    helo: str
    resolver: Any
    lookups: int = 0
    voids: int = 0

    async def run(self, domain: str) -> tuple[str, str]:
        try:
            return await self.check(domain)
        except SPFError as problem:
            return problem.result, str(problem)

    async def check(self, domain: str, explain: bool = True) -> tuple[str, str]:
        """``check_host()`` of ``domain``; ``explain``: a ``fail`` may use
        the domain's ``exp`` (not inside an ``include``, section 6.2)."""
        domain = domain.rstrip(".").lower()
        if not valid_domain(domain):
            return NONE, f"{domain!r} is not a domain name"
        text = await self.record_text(domain)
        if text is None:
            return NONE, f"no SPF record for {domain}"
        record = parse_record(text)
        for term in record.terms:
            if await self.matches(term, domain):
                explanation = f"{term.name} of {domain} matched"
                if term.result == FAIL and explain and record.explanation:
                    explanation = await self.explanation(record.explanation, domain, explanation)
                return term.result, explanation
        if record.redirect is None:
            return NEUTRAL, f"no mechanism of {domain} matched"
        return await self.redirect(record.redirect, domain, explain)

    async def explanation(self, spec: str, domain: str, default: str) -> str:
        """The text of the ``exp`` domain's one TXT record, its macros
        expanded; ``default`` when there is no such single, printable text
        or DNS fails (section 6.2)."""
        try:
            target = self.expand_domain(spec, domain)
            texts = await self.query(self.resolver.lookupText, target, dns.TXT, void_counts=False)
        except SPFError:
            return default
        if len(texts) != 1:
            return default
        text = _txt(texts[0])
        try:
            for word in text.split(" "):  # explain-string: macro strings and spaces
                _check_macro_string(word, _EXP_LETTERS)
        except PermError:
            return default
        expanded = expand(text, self.macro_values(domain, explaining=True))
        if not expanded or not _PRINTABLE.fullmatch(expanded):
            return default
        return expanded[:MAX_EXPLANATION]

    async def redirect(self, spec: str, domain: str, explain: bool = True) -> tuple[str, str]:
        self.count_lookup()
        target = self.expand_domain(spec, domain)
        result, explanation = await self.check(target, explain)
        if result == NONE:
            raise PermError(f"redirect to {target}: {explanation}")
        return result, explanation

    async def record_text(self, domain: str) -> str | None:
        texts = await self.query(self.resolver.lookupText, domain, dns.TXT, void_counts=False)
        records = [t for t in map(_txt, texts) if re.match(r"v=spf1(?: |$)", t, re.I)]
        if len(records) > 1:
            raise PermError(f"{domain} has {len(records)} SPF records")
        return records[0] if records else None

    def count_lookup(self) -> None:
        self.lookups += 1
        if self.lookups > MAX_LOOKUPS:
            raise PermError(f"more than {MAX_LOOKUPS} DNS lookups")

    async def matches(self, term: Term, domain: str) -> bool:
        if term.name == "all":
            return True
        if term.name in ("ip4", "ip6"):
            return self.ip.version == term.network.version and self.ip in term.network
        self.count_lookup()
        target = domain if term.domain is None else self.expand_domain(term.domain, domain)
        method = getattr(self, f"match_{term.name}")
        return await method(term, target)

    async def match_include(self, term: Term, target: str) -> bool:
        result, explanation = await self.check(target, explain=False)
        if result in (NONE, PERMERROR):
            raise PermError(f"include:{target}: {explanation}")
        if result == TEMPERROR:
            raise TempError(explanation)
        return result == PASS

    async def match_a(self, term: Term, target: str) -> bool:
        addresses = await self.addresses(target, void_counts=True)
        return self.in_any(addresses, term)

    async def match_mx(self, term: Term, target: str) -> bool:
        records = await self.query(self.resolver.lookupMailExchange, target, dns.MX)
        if len(records) > MAX_MX_OR_PTR_NAMES:
            raise PermError(f"{target} has more than {MAX_MX_OR_PTR_NAMES} MX records")
        for record in records:
            addresses = await self.addresses(str(record.name), void_counts=False)
            if self.in_any(addresses, term):
                return True
        return False

    async def match_ptr(self, term: Term, target: str) -> bool:
        validated = await self.validated_names()
        return any(name == target or name.endswith("." + target) for name in validated)

    async def match_exists(self, term: Term, target: str) -> bool:
        return bool(await self.query(self.resolver.lookupAddress, target, dns.A))

    async def validated_names(self) -> list[str]:
        """The names of the client's PTR records that resolve back to it
        (section 5.5); a DNS error means none."""
        try:
            name = self.ip.reverse_pointer
            pointers = await self.query(self.resolver.lookupPointer, name, dns.PTR)
        except TempError:
            return []
        validated = []
        for record in pointers[:MAX_MX_OR_PTR_NAMES]:
            name = str(record.name).rstrip(".").lower()
            try:
                if self.ip in await self.addresses(name, void_counts=False):
                    validated.append(name)
            except TempError:
                continue
        return validated

    async def addresses(self, name: str, void_counts: bool) -> list[Address]:
        if self.ip.version == 4:
            method, kind = self.resolver.lookupAddress, dns.A
        else:
            method, kind = self.resolver.lookupIPV6Address, dns.AAAA
        records = await self.query(method, name, kind, void_counts)
        return [ipaddress.ip_address(record.address) for record in records]

    def in_any(self, addresses: list[Address], term: Term) -> bool:
        length = term.cidr4 if self.ip.version == 4 else term.cidr6
        return any(
            self.ip in ipaddress.ip_network(f"{address}/{length}", strict=False)
            for address in addresses
        )

    async def query(
        self, method: Callable[..., Any], name: str, kind: int, void_counts: bool = True
    ) -> list[Any]:
        """The payloads of type ``kind`` for ``name``; TempError on a DNS
        failure; a void answer counts toward the void limit."""
        try:
            answers, _, _ = await method(name, timeout=QUERY_TIMEOUTS)
        except error.DNSNameError:
            answers = []
        except _DNS_FAILURES as problem:
            kind_name = dns.QUERY_TYPES.get(kind)
            raise TempError(f"DNS {kind_name} {name}: {type(problem).__name__}") from None
        payloads = [answer.payload for answer in answers if answer.type == kind]
        if not payloads and void_counts:
            self.voids += 1
            if self.voids > MAX_VOID_LOOKUPS:
                raise PermError(f"more than {MAX_VOID_LOOKUPS} void DNS lookups")
        return payloads

    def expand_domain(self, spec: str, domain: str) -> str:
        """A domain-spec with its macros expanded, cut to 253 characters
        from the left (section 7.3)."""
        expanded = expand(spec, self.macro_values(domain)).rstrip(".")
        while len(expanded) > 253 and "." in expanded:
            expanded = expanded.partition(".")[2]
        return expanded.lower()

    def macro_values(self, domain: str, explaining: bool = False) -> dict[str, str]:
        local, _, sender_domain = self.sender.rpartition("@")
        values = {
            "s": self.sender,
            "l": local,
            "o": sender_domain,
            "d": domain,
            "i": _dotted(self.ip),
            "p": "unknown",
            "v": "in-addr" if self.ip.version == 4 else "ip6",
            "h": self.helo,
        }
        if explaining:
            values.update(c=str(self.ip), r="unknown", t=str(int(time.time())))
        return values


def expand(spec: str, values: dict[str, str]) -> str:
    """Macro expansion (section 7.3) of a checked macro string."""
    return _MACRO.sub(lambda found: _expand_one(found, values), spec)


def _expand_one(found: re.Match, values: dict[str, str]) -> str:
    letter, digits, reverse, delimiters, escape = found.groups()
    if escape is not None:
        return {"%": "%", "_": " ", "-": "%20"}[escape]
    parts = re.split("[" + re.escape(delimiters or ".") + "]", values[letter.lower()])
    if reverse:
        parts.reverse()
    if digits:
        parts = parts[-int(digits):]
    text = ".".join(parts)
    return urllib.parse.quote(text, safe="") if letter.isupper() else text


def _dotted(ip: Address) -> str:
    if ip.version == 4:
        return str(ip)
    return ".".join(ip.exploded.replace(":", ""))


def _txt(record: Any) -> str:
    return b"".join(record.data).decode("ascii", "replace")
