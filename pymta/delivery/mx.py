"""Where a domain's mail goes: its MX hosts in order, each with its addresses (RFC 5321 section 5).

`MxResolver.lookup(domain)` asks DNS through dnspython (never a resolver of our own) and returns a
`Destination`: the MX hosts in preference order, equal preferences shuffled, each with its A then AAAA
addresses; a domain without MX records is its own host (the implicit MX). What cannot be routed is an
exception carrying its RFC 3463 code and a `reply` in the form of a recipient's outcome: a null MX
(RFC 7505) `NullMxError` 5.1.10, a domain that does not exist `NoSuchDomainError` 5.1.2, a domain with no
usable host `NoRouteError` 5.4.4 (all permanent), a DNS server that fails or does not answer
`DnsTemporaryError` 4.4.3 (the message waits for the next run). `RoutingLoopError` 5.4.6 is raised by
the caller that knows our own names (`delivery.direct`).

Invariant: every name and address in a `Destination` came from DNS and was checked (a host name, an IP
address that can be connected to); a hostile answer costs the domain, never a line of the log.
"""

from __future__ import annotations

import ipaddress
import random
import re
from dataclasses import dataclass

# dnspython imports a record type's class when it first parses one, and falls back to a generic record
# without fields when that fails. The rdtypes imported here are loaded before the privilege switch with the
# rest of delivery/ (`privsep.preload`): the types this module reads, and those a server puts beside them.
import dns.exception
import dns.name
import dns.rdatatype
import dns.rdtypes.ANY.CNAME  # noqa: F401
import dns.rdtypes.ANY.MX  # noqa: F401
import dns.rdtypes.ANY.NS  # noqa: F401
import dns.rdtypes.ANY.SOA  # noqa: F401
import dns.rdtypes.IN.A  # noqa: F401
import dns.rdtypes.IN.AAAA  # noqa: F401
import dns.resolver

from pymta.config.model import DnsSettings
from pymta.errors import EX_TEMPFAIL, EX_UNAVAILABLE, PymtaError

# MX hosts looked up per domain: the best ones after the shuffle, the rest dropped. Each costs two lookups,
# and a domain with dozens of MX records (a misconfiguration or a trap) must not hold the run.
MAX_MX_HOSTS = 10
# Addresses kept per domain, over all its hosts: each unreachable one costs a connect timeout per attempt.
MAX_ADDRESSES = 12

# A host name as it may appear in an MX record: letters, digits, hyphens (and underscores, seen in the
# wild), dot-separated labels of 1 to 63 characters.
_HOST_NAME = re.compile(
    r"(?i)^(?=.{1,253}$)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*$"
)


@dataclass(frozen=True, slots=True)
class MxHost:
    """One host to try: its name (ASCII, no final dot; the name a certificate is checked against), its
    preference, and its addresses in the order to try them."""

    name: str
    preference: int
    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a domain's mail goes: the hosts in the order to try them, never empty. `implicit` is True when
    the domain has no MX records and is its own host. `notes` say what was left out and why (hosts that
    did not resolve, invalid records, the limits), for the log and `pymta test`."""

    domain: str
    hosts: tuple[MxHost, ...]
    implicit: bool = False
    notes: tuple[str, ...] = ()

    def relays(self) -> list[tuple[MxHost, str]]:
        """Every (host, address) in the order to connect."""
        return [(host, address) for host in self.hosts for address in host.addresses]


class MxLookupError(PymtaError):
    """The domain's mail cannot be routed now. `enhanced` is the RFC 3463 code, `permanent` says whether
    to bounce (5.x.x) or wait for the next run (4.x.x); `reply` is the line a recipient's outcome keeps."""

    exit_code = EX_TEMPFAIL
    enhanced = "4.4.3"
    permanent = False

    def __init__(self, domain: str, reason: str) -> None:
        super().__init__(f"{domain}: {reason}")
        self.domain = domain
        self.reason = reason

    @property
    def reply(self) -> str:
        code = "550" if self.permanent else "451"
        return f"{code} {self.enhanced} {self}"


class DnsTemporaryError(MxLookupError):
    """The DNS server failed (SERVFAIL), refused, or did not answer in time: try again on the next run."""


class NullMxError(MxLookupError):
    """The domain says it accepts no mail: a null MX, one MX record "." (RFC 7505)."""

    exit_code = EX_UNAVAILABLE
    enhanced = "5.1.10"
    permanent = True


class NoSuchDomainError(MxLookupError):
    """The domain does not exist (NXDOMAIN) or is not a valid domain name."""

    exit_code = EX_UNAVAILABLE
    enhanced = "5.1.2"
    permanent = True


class NoRouteError(MxLookupError):
    """The domain exists but has no host to deliver to: no MX and no address, or no usable MX host."""

    exit_code = EX_UNAVAILABLE
    enhanced = "5.4.4"
    permanent = True


class RoutingLoopError(MxLookupError):
    """The domain's best MX host is this host (RFC 5321 5.1): sending there would loop back to us."""

    exit_code = EX_UNAVAILABLE
    enhanced = "5.4.6"
    permanent = True


def ascii_domain(domain: str) -> str:
    """The domain in ASCII (A-labels), lower case, without a final dot. A U-label domain is converted with
    the `idna` package (IDNA 2008, UTS 46 mapping) when it is installed, else left to dnspython."""
    domain = domain.strip().rstrip(".")
    if domain.isascii():
        return domain.lower()
    try:
        import idna  # not a declared dependency yet: without it dnspython's IDNA 2003 applies
    except ImportError:
        try:
            return dns.name.from_text(domain).to_text(omit_final_dot=True).lower()
        except dns.exception.DNSException as error:
            raise NoSuchDomainError(domain, f"not a valid domain name ({error})") from None
    try:
        return idna.encode(domain, uts46=True).decode("ascii").lower()
    except idna.IDNAError as error:
        raise NoSuchDomainError(domain, f"not a valid internationalised domain name ({error})") from None


def make_resolver(settings: DnsSettings) -> dns.resolver.Resolver:
    """A dnspython resolver asking the configured servers (else the system's) with the timeout."""
    if settings.nameservers:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = list(settings.nameservers)
    else:
        resolver = dns.resolver.Resolver()
    resolver.port = settings.port
    resolver.timeout = settings.timeout
    resolver.lifetime = settings.timeout
    resolver.cache = dns.resolver.Cache()  # MX hosts are shared by many domains (the big providers)
    return resolver


class MxResolver:
    """Looks up where domains' mail goes, with one resolver (and its cache) for a run. `rng` shuffles
    equal preferences (tests pass a seeded one)."""

    def __init__(
        self,
        settings: DnsSettings | None = None,
        *,
        rng: random.Random | None = None,
        max_hosts: int = MAX_MX_HOSTS,
        max_addresses: int = MAX_ADDRESSES,
        resolver: dns.resolver.Resolver | None = None,
    ) -> None:
        self.settings = settings or DnsSettings()
        self._resolver = resolver
        self.rng = rng or random.Random()
        self.max_hosts = max_hosts
        self.max_addresses = max_addresses

    @property
    def resolver(self) -> dns.resolver.Resolver:
        if self._resolver is None:  # built on first use: reading resolv.conf may fail, and then it defers
            try:
                self._resolver = make_resolver(self.settings)
            except dns.exception.DNSException as error:
                raise DnsTemporaryError(
                    "DNS", f"no DNS server to ask ({error}); check /etc/resolv.conf"
                ) from None
        return self._resolver

    def lookup(self, domain: str) -> Destination:
        """Where mail for `domain` goes (a U-label domain is converted; "[192.0.2.1]" and
        "[IPv6:2001:db8::1]" are address literals, used as they are)."""
        literal = _address_literal(domain)
        if literal is not None:
            return Destination(domain, (MxHost(domain, 0, (literal,)),), implicit=True)
        name = ascii_domain(domain)
        if not name or not _HOST_NAME.match(name):
            raise NoSuchDomainError(domain, "not a valid domain name")
        answer = self._query(name, "MX", domain)
        records = list(answer.rrset) if answer.rrset is not None else []
        if not records:
            canonical = answer.canonical_name.to_text(omit_final_dot=True).lower()
            return self._implicit(name, canonical)
        exchanges = [(record.preference, record.exchange) for record in records]
        if len(exchanges) == 1 and exchanges[0][1] == dns.name.root:
            raise NullMxError(name, "the domain accepts no mail (null MX, RFC 7505)")
        return self._explicit(name, exchanges)

    def _implicit(self, name: str, canonical: str) -> Destination:
        """No MX records: the domain (after its CNAME, RFC 5321 5.1) is its own, only host."""
        addresses, reason, temporary = self._addresses(canonical)
        if not addresses:
            error = DnsTemporaryError if temporary else NoRouteError
            raise error(name, f"no MX records and {reason}")
        host = MxHost(canonical, 0, tuple(addresses[: self.max_addresses]))
        return Destination(name, (host,), implicit=True)

    def _explicit(self, name: str, exchanges: list[tuple[int, dns.name.Name]]) -> Destination:
        notes: list[str] = []
        ordered = self._ordered(exchanges)
        if len(ordered) > self.max_hosts:
            notes.append(f"{len(ordered)} MX hosts, the first {self.max_hosts} kept")
            ordered = ordered[: self.max_hosts]
        hosts: list[MxHost] = []
        seen: set[str] = set()
        temporary = False
        for preference, exchange in ordered:
            host = exchange.to_text(omit_final_dot=True).lower()
            unusable = _unusable_exchange(exchange, host)
            if unusable:
                notes.append(f"MX {preference} {host}: {unusable}, skipped")
                continue
            if len(seen) >= self.max_addresses:
                notes.append(
                    f"MX {preference} {host}: over the limit of {self.max_addresses} addresses, skipped"
                )
                continue
            addresses, reason, failed_now = self._addresses(host)
            temporary = temporary or failed_now
            fresh = [address for address in addresses if address not in seen]
            fresh = fresh[: self.max_addresses - len(seen)]
            if not fresh:
                notes.append(f"MX {preference} {host}: {reason or 'no address not already listed'}, skipped")
                continue
            seen.update(fresh)
            hosts.append(MxHost(host, preference, tuple(fresh)))
        if not hosts:
            error = DnsTemporaryError if temporary else NoRouteError
            raise error(name, "no usable MX host (" + "; ".join(notes) + ")")
        return Destination(name, tuple(hosts), notes=tuple(notes))

    def _ordered(self, exchanges: list[tuple[int, dns.name.Name]]) -> list[tuple[int, dns.name.Name]]:
        """By preference, lowest first; equal preferences in random order (RFC 5321 5.1), duplicates once."""
        unique = sorted(set(exchanges))  # the order DNS gave is no order: the rng alone decides (tests)
        self.rng.shuffle(unique)
        # sorted() is stable: the shuffle stays within a preference
        return sorted(unique, key=lambda pair: pair[0])

    def _addresses(self, host: str) -> tuple[list[str], str, bool]:
        """The host's IPv4 then IPv6 addresses that can be connected to; with none, the reason and whether
        it is temporary (a failed lookup) rather than permanent (no such name, no address records)."""
        addresses: list[str] = []
        reasons: list[str] = []
        temporary = False
        for rdtype in ("A", "AAAA"):
            try:
                answer = self._query(host, rdtype, host)
            except NoSuchDomainError:
                return [], "no such host (NXDOMAIN)", False
            except DnsTemporaryError as error:
                reasons.append(error.reason)
                temporary = True
                continue
            for record in answer.rrset or ():
                address = record.address
                if _connectable(address) and address not in addresses:
                    addresses.append(address)
        if addresses:
            return addresses, "", False
        return [], ("; ".join(reasons) if reasons else "no address records"), temporary

    def _query(self, name: str, rdtype: str, shown: str) -> dns.resolver.Answer:
        """One lookup; an empty answer (the name exists, no such records) is an answer with no rrset."""
        try:
            return self.resolver.resolve(
                dns.name.from_text(name),
                dns.rdatatype.from_text(rdtype),
                search=False,
                raise_on_no_answer=False,
            )
        except dns.resolver.NXDOMAIN:
            raise NoSuchDomainError(shown, "the domain does not exist (NXDOMAIN)") from None
        except dns.resolver.LifetimeTimeout:
            raise DnsTemporaryError(
                shown, f"no answer to the {rdtype} lookup within {self.settings.timeout:g}s"
            ) from None
        except dns.resolver.NoNameservers:
            raise DnsTemporaryError(
                shown, f"the DNS server failed the {rdtype} lookup (SERVFAIL or refused)"
            ) from None
        except dns.exception.DNSException as error:
            raise DnsTemporaryError(shown, f"the {rdtype} lookup failed: {error}") from None


def _unusable_exchange(exchange: dns.name.Name, host: str) -> str:
    """Why an MX record's host cannot be used, or "". An IP address in an MX record is invalid (RFC 5321
    5.1: MX records name hosts) and is skipped as Postfix does; "." beside other MX records is no host."""
    if exchange == dns.name.root:
        return "a null MX beside other MX records"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return "an IP address, not a host name (RFC 5321 5.1)"
    if not _HOST_NAME.match(host):
        return "not a valid host name"
    return ""


def _connectable(address: str) -> bool:
    """An address a connection can be made to: 0.0.0.0, :: and multicast would reach this host or nothing."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    return not (parsed.is_unspecified or parsed.is_multicast)


def _address_literal(domain: str) -> str | None:
    """The address in "[192.0.2.1]" or "[IPv6:2001:db8::1]" (RFC 5321 4.1.3), else None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    text = domain[1:-1]
    if text[:5].lower() == "ipv6:":
        text = text[5:]
        version = 6
    else:
        version = 4
    try:
        parsed = ipaddress.ip_address(text)
    except ValueError:
        raise NoSuchDomainError(domain, "not a valid address literal") from None
    if parsed.version != version:
        raise NoSuchDomainError(domain, "not a valid address literal (IPv6 needs the IPv6: prefix)")
    if not _connectable(text):
        raise NoRouteError(domain, "the address literal cannot be connected to")
    return str(parsed)
