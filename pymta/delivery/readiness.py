"""Is this machine ready to deliver to recipients' MX hosts itself (`direct: true`)? What a receiving MX
checks before it accepts our mail, asked of DNS beforehand, so that the admin learns why Gmail would refuse
them before the first message bounces.

`check_readiness(hostname, sender_domains, resolver)` returns a `Readiness`: one `Finding` per thing
checked, each with its severity, what was found and how to fix it:
  (a) the hostname (the HELO name) is fully qualified and resolves (A/AAAA);
  (b) each of its public addresses has a PTR record naming a host that resolves back to the address
      (forward-confirmed reverse DNS), and that host is the HELO name;
  (c) each sender domain publishes one SPF record, and it does not obviously refuse our addresses; so
      does the HELO name, which receivers check for bounces (a warning or a note there);
  (d) none of the addresses is private or loopback (then a receiver sees a NAT's address, not this one);
  (e) each sender domain has a DMARC record (a note: Gmail asks bulk senders for one).

It reads SPF, it does not evaluate it (RFC 7208 is not implemented here): terms are taken in order, `ip4`,
`ip6`, `a`, `mx` and `all` are judged, and at the first `include`, `exists`, `ptr`, macro or a `redirect`
the verdict is "cannot tell", never a guess.

Invariant: a lookup that fails (SERVFAIL, no answer) is an "unknown" finding, never a problem: only what
DNS said counts against the admin. After one lookup times out the rest are not asked (each would wait as
long), and say so.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import dns.reversename

from pymta.config.model import DIRECT, Config
from pymta.delivery.lookups import DnsLookups, NoSuchName
from pymta.delivery.mx import DnsTemporaryError, MxResolver, NoSuchDomainError, ascii_domain

Severity = Literal["problem", "warn", "unknown", "note", "ok"]
# In the order a report lists them: what will get mail refused first, what passed last.
SEVERITIES: tuple[Severity, ...] = ("problem", "warn", "unknown", "note", "ok")

# Addresses of the hostname checked; a host with more is unusual, and each costs a PTR and a forward lookup.
MAX_ADDRESSES = 8
# PTR names followed per address, and MX hosts per SPF `mx` term (RFC 7208 4.6.4 allows 10).
MAX_PTR_NAMES = 5
MAX_SPF_MX = 10
# Domains no receiving MX can look up: a HELO in them is refused as not fully qualified (RFC 6761, 6762,
# 8375; .lan, .home and .internal are private use by custom).
PRIVATE_SUFFIXES = ("localhost", "local", "localdomain", "lan", "home", "internal", "invalid", "home.arpa")
# Address ranges a receiving MX never sees as a sender: private (RFC 1918, 6598 shared, IPv6 ULA),
# loopback, link-local, unspecified. The documentation ranges are not here: they stand for public ones.
NAT_RANGES = tuple(
    ipaddress.ip_network(text)
    for text in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "0.0.0.0/8",
        "::1/128",
        "::/128",
        "fc00::/7",
        "fe80::/10",
    )
)
# Characters of an SPF term quoted in a finding: a record may hold one of hundreds.
MAX_TERM_SHOWN = 80
FIX_DOMAIN = "set `domain:` to a domain you own"
SPF_RESULTS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing checked. `problem` says what was found (for `ok`, what passed), `fix` what to do."""

    severity: Severity
    problem: str
    fix: str = ""

    def line(self) -> str:
        """`[severity] problem; fix: fix`, the shape `pymta setup --check` prints."""
        return f"[{self.severity}] {self.problem}" + (f"; fix: {self.fix}" if self.fix else "")


@dataclass(frozen=True, slots=True)
class Readiness:
    """What was checked for `hostname`: the addresses it resolved to, and the findings in order."""

    hostname: str
    addresses: tuple[str, ...]
    findings: tuple[Finding, ...]

    @property
    def problems(self) -> tuple[Finding, ...]:
        return tuple(finding for finding in self.findings if finding.severity == "problem")

    def heading(self) -> str:
        """What was checked, for the line before the findings."""
        where = f" ({', '.join(self.addresses)})" if self.addresses else ""
        return f"direct delivery: what a receiving MX will find for {self.hostname}{where}:"

    def summary(self) -> str:
        """The verdict in one line: how many problems and warnings, and where to read on."""
        counts = {severity: 0 for severity in SEVERITIES}
        for finding in self.findings:
            counts[finding.severity] += 1
        if not counts["problem"] and not counts["warn"]:
            unknown = f"; {counts['unknown']} not checked (DNS)" if counts["unknown"] else ""
            return f"direct delivery: no problem found{unknown}"
        return (
            f"direct delivery: {counts['problem']} problem(s), {counts['warn']} warning(s): receivers may "
            "refuse or junk mail from here until they are fixed (README: Sending without a smarthost)"
        )

    def lines(self) -> list[str]:
        """The findings, worst first (stable within a severity), one line each."""
        ordered = sorted(self.findings, key=lambda finding: SEVERITIES.index(finding.severity))
        return [finding.line() for finding in ordered]


def direct_sender_domains(config: Config) -> list[str]:
    """The domains in the envelope senders of mail sent directly, as far as the config says them: the
    `domain` that qualifies local senders, and a `sender: "*@DOMAIN"` route's domain. Rewrites are not
    among them: direct delivery sends the sender as it is (a rewrite is for a smarthost's account). A user
    who gives another sender (`sendmail -f`) is not foreseen here."""
    domains = [config.domain]
    for route in config.routes:
        pattern = route.sender or ""
        if (
            route.smarthost == DIRECT
            and pattern.startswith("*@")
            and not any(c in pattern[2:] for c in "*?[]")
        ):
            domains.append(pattern[2:])
    return domains


def check_config(config: Config, resolver: MxResolver | None = None) -> Readiness | None:
    """The readiness of this host for the direct delivery `config` asks for (its hostname, its senders'
    domains, asked of its `dns:`), or None when it sends nothing directly."""
    if not config.sends_direct:
        return None
    return check_readiness(config.hostname, direct_sender_domains(config), resolver or MxResolver(config.dns))


def check_readiness(hostname: str, sender_domains: Iterable[str], resolver: MxResolver) -> Readiness:
    """What a receiving MX will find when this host (HELO `hostname`) sends mail from `sender_domains`."""
    lookups = DnsLookups(resolver)
    findings: list[Finding] = []
    addresses = _check_hostname(hostname, lookups, findings)
    public = [address for address in addresses if not _behind_nat(address)]
    name = _ascii(hostname)
    for address in public:
        findings.append(_check_reverse(address, name, lookups))
    seen: set[str] = set()
    for domain in sender_domains:
        key = _ascii(domain)
        if key in seen:
            continue
        seen.add(key)
        try:
            findings += _check_spf(key, public, hostname, lookups)
            findings.append(_check_dmarc(key, lookups))
        except ValueError:
            findings.append(
                Finding("problem", f"the sender domain {key!r} is not a valid domain name", FIX_DOMAIN)
            )
    if public and name not in seen:
        findings += _check_helo_spf(name, public, lookups)
    return Readiness(hostname, tuple(addresses), tuple(findings))


def _ascii(domain: str) -> str:
    try:
        return ascii_domain(domain)
    except NoSuchDomainError:
        return domain.strip().rstrip(".").lower()


def _unknown(what: str, error: DnsTemporaryError) -> Finding:
    return Finding(
        "unknown",
        f"could not check {what}: {error.reason}",
        "check again later; if it lasts, check the DNS servers in `dns:` or /etc/resolv.conf",
    )


# --- (a) the hostname, (d) its addresses ---


def _check_hostname(hostname: str, lookups: DnsLookups, findings: list[Finding]) -> list[str]:
    """The hostname's addresses, with findings on its form, its lookup and private addresses."""
    fix_name = "set `hostname:` to a name in a domain you control (e.g. mail.example.net) with an A record"
    try:
        name = ascii_domain(hostname)
    except NoSuchDomainError as error:
        findings.append(Finding("problem", f"the hostname {hostname!r} is {error.reason}", fix_name))
        return []
    if _is_address(name):
        findings.append(
            Finding("problem", f"the hostname {name} is an address; HELO needs a host name", fix_name)
        )
        return []
    if "." not in name:
        findings.append(
            Finding(
                "problem",
                f"the hostname {name} is not fully qualified (receivers refuse such a HELO)",
                fix_name,
            )
        )
        return []
    suffix = next((s for s in PRIVATE_SUFFIXES if name == s or name.endswith("." + s)), "")
    if suffix:
        findings.append(
            Finding(
                "problem", f"the hostname {name} is in .{suffix}, which no receiving MX can look up", fix_name
            )
        )
        return []
    try:
        addresses = lookups.records(name, "A") + lookups.records(name, "AAAA")
    except NoSuchName:
        findings.append(Finding("problem", f"the hostname {name} does not exist in DNS (NXDOMAIN)", fix_name))
        return []
    except DnsTemporaryError as error:
        findings.append(_unknown(f"that the hostname {name} resolves", error))
        return []
    if not addresses:
        findings.append(Finding("problem", f"the hostname {name} has no A or AAAA record", fix_name))
        return []
    addresses = addresses[:MAX_ADDRESSES]
    findings.append(Finding("ok", f"the hostname {name} resolves to {', '.join(addresses)}"))
    for address in addresses:
        if _behind_nat(address):
            findings.append(
                Finding(
                    "warn",
                    f"{name} resolves to {address}, a private or loopback address: receiving MX hosts see "
                    "the public address your mail leaves from, and its PTR and SPF are what count "
                    "(not checked here)",
                    "give the hostname the public address mail leaves from, or keep using a smarthost",
                )
            )
    return addresses


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


def _behind_nat(address: str) -> bool:
    parsed = ipaddress.ip_address(address)
    return any(parsed in network for network in NAT_RANGES if network.version == parsed.version)


# --- (b) forward-confirmed reverse DNS ---


def _check_reverse(address: str, hostname: str, lookups: DnsLookups) -> Finding:
    ask_provider = f"ask whoever assigned {address} (your hosting provider, not your DNS host) for a PTR"
    ask_provider += f" naming {hostname}"
    reverse = dns.reversename.from_address(address).to_text(omit_final_dot=True)
    try:
        names = lookups.records(reverse, "PTR")[:MAX_PTR_NAMES]
    except NoSuchName:
        names = []
    except DnsTemporaryError as error:
        return _unknown(f"the PTR record of {address}", error)
    if not names:
        return Finding(
            "problem",
            f"{address} has no PTR record (reverse DNS); Gmail and most providers refuse its mail",
            ask_provider,
        )
    version = ipaddress.ip_address(address).version
    confirmed: list[str] = []
    for name in names:
        try:
            forward = lookups.existing(name, "A" if version == 4 else "AAAA")
        except DnsTemporaryError as error:
            return _unknown(f"that {name} (the PTR of {address}) resolves back to it", error)
        if any(ipaddress.ip_address(found) == ipaddress.ip_address(address) for found in forward):
            confirmed.append(name)
    if not confirmed:
        return Finding(
            "problem",
            f"the PTR of {address} names {', '.join(names)}, which does not resolve back to {address} "
            "(forward-confirmed reverse DNS fails)",
            f"give {names[0]} the address {address}, or {ask_provider}",
        )
    if hostname in confirmed:
        return Finding("ok", f"the PTR of {address} is {hostname}, which resolves back to it (FCrDNS)")
    return Finding(
        "warn",
        f"the PTR of {address} is {confirmed[0]}, not the HELO name {hostname}; some receivers count the "
        "mismatch against the mail",
        f"set `hostname: {confirmed[0]}`, or {ask_provider}",
    )


# --- (c) SPF, read not evaluated ---


def _check_spf(domain: str, addresses: list[str], hostname: str, lookups: DnsLookups) -> list[Finding]:
    terms = " ".join(f"ip{ipaddress.ip_address(a).version}:{a}" for a in addresses) or f"a:{_ascii(hostname)}"
    publish = f'publish one TXT record at {domain}: "v=spf1 {terms} -all"'
    try:
        texts = lookups.records(domain, "TXT")
    except NoSuchName:
        return [
            Finding(
                "problem",
                f"the sender domain {domain} does not exist in DNS; receivers refuse mail from it",
                FIX_DOMAIN,
            )
        ]
    except DnsTemporaryError as error:
        return [_unknown(f"the SPF record of {domain}", error)]
    records = [text for text in texts if _is_spf(text)]
    if not records:
        return [
            Finding(
                "problem",
                f"{domain} publishes no SPF record; Gmail refuses mail that passes neither SPF nor DKIM, and "
                "pymta does not sign with DKIM",
                publish,
            )
        ]
    if len(records) > 1:
        return [
            Finding(
                "problem",
                f"{domain} publishes {len(records)} SPF records, an error to receivers (RFC 7208 4.5)",
                "merge them into one",
            )
        ]
    if not addresses:
        return [
            Finding("note", f"{domain} publishes an SPF record; not checked against an address (none known)")
        ]
    return [_spf_finding(domain, records[0], address, lookups) for address in addresses]


def _check_helo_spf(name: str, addresses: list[str], lookups: DnsLookups) -> list[Finding]:
    """The SPF record of the HELO name, when it is no sender domain: receivers check it for mail with an
    empty sender (bounces, RFC 7208 2.3), so a refusal there is a warning, and no record a note."""
    try:
        records = [text for text in lookups.existing(name, "TXT") if _is_spf(text)]
    except DnsTemporaryError as error:
        return [_unknown(f"the SPF record of the HELO name {name}", error)]
    if len(records) != 1:
        published = f"{len(records)} SPF records" if records else "no SPF record"
        return [
            Finding(
                "note",
                f"the HELO name {name} publishes {published}; receivers check it for bounces, which are sent "
                "with an empty sender",
                f'publish one TXT record at {name}: "v=spf1 a -all"',
            )
        ]
    findings = [_spf_finding(name, records[0], address, lookups) for address in addresses]
    return [Finding("warn", f.problem, f.fix) if f.severity == "problem" else f for f in findings]


def _is_spf(text: str) -> bool:
    return text[:6].lower() == "v=spf1" and (len(text) == 6 or text[6] == " ")


def _spf_finding(domain: str, record: str, address: str, lookups: DnsLookups) -> Finding:
    add = f"add ip{ipaddress.ip_address(address).version}:{address} to {domain}'s SPF record, before its all"
    try:
        result, term = spf_verdict(record, domain, address, lookups.existing)
    except DnsTemporaryError as error:
        return _unknown(f"whether {domain}'s SPF record permits {address}", error)
    if len(term) > MAX_TERM_SHOWN:
        term = term[: MAX_TERM_SHOWN - 3] + "..."
    if result == "pass":
        return Finding("ok", f"{domain}'s SPF record permits {address} ({term})")
    if result == "fail":
        return Finding(
            "problem",
            f"{domain}'s SPF record refuses {address} ({term}): receivers reject or junk its mail from here",
            add,
        )
    if result in ("softfail", "neutral"):
        return Finding("warn", f"{domain}'s SPF record does not permit {address} ({term}: {result})", add)
    if result == "invalid":
        return Finding(
            "problem",
            f"{domain}'s SPF record has an invalid term ({term}); receivers treat it as an error",
            "correct the record (RFC 7208 section 5)",
        )
    return Finding(
        "note",
        f"{domain}'s SPF record may permit {address} through {term}, which this check does not follow "
        "(it reads SPF, it does not evaluate it)",
        "send a test message to a Gmail address and read its Authentication-Results field for spf=pass",
    )


# --- (e) DMARC, a note ---


def _check_dmarc(domain: str, lookups: DnsLookups) -> Finding:
    """The DMARC record for `domain`: at _dmarc.DOMAIN, else at its parents' (the tree walk of DMARCbis,
    which needs no public suffix list); the top-level domain is not asked."""
    labels = domain.split(".")
    for start in range(max(len(labels) - 1, 1)):
        name = "_dmarc." + ".".join(labels[start:])
        try:
            texts = lookups.existing(name, "TXT")
        except DnsTemporaryError as error:
            return _unknown(f"the DMARC record of {domain}", error)
        policies = [text for text in texts if text[:8].lower() == "v=dmarc1"]
        if policies:
            return _dmarc_finding(domain, name, policies[0])
    return Finding(
        "note",
        f"{domain} publishes no DMARC record; Gmail and Yahoo ask senders of bulk mail for one",
        f'publish a TXT record at _dmarc.{domain}: "v=DMARC1; p=none"',
    )


def _dmarc_finding(domain: str, name: str, record: str) -> Finding:
    tags = dict(
        (key.strip().lower(), value.strip().lower())
        for key, _, value in (part.partition("=") for part in record.split(";"))
    )
    policy = tags.get("p", "none")
    if policy in ("reject", "quarantine"):
        return Finding(
            "note",
            f"{domain}'s DMARC policy (at {name}) is p={policy}: pymta does not sign with DKIM, so its mail "
            "passes DMARC through SPF alone, and fails it when a recipient forwards it",
            "sign with DKIM on a later hop, or keep p=none until you do",
        )
    return Finding("ok", f"{domain} publishes a DMARC record at {name} (p={policy})")


RecordLookup = Callable[[str, str], list[str]]
# An SPF mechanism: its name, its argument after ":", the IPv4 (or ip4/ip6) prefix, the IPv6 prefix.
_MECHANISM = re.compile(r"(?i)([a-z0-9]+)(?::([^/]*))?(?:/([0-9]{1,3}))?(?://([0-9]{1,3}))?")


def spf_verdict(record: str, domain: str, address: str, records: RecordLookup) -> tuple[str, str]:
    """What `record` (domain's SPF) says of `address`, as far as it can be read without following other
    records: ("pass" | "fail" | "softfail" | "neutral", the deciding term), ("unknown", the term it stopped
    at) or ("invalid", the term). `records(name, rdtype)` looks up the A, AAAA or MX records that `a` and
    `mx` terms name ([] when the name does not exist).
    """
    ip = ipaddress.ip_address(address)
    redirect = ""
    for term in record.split()[1:]:
        name, equals, _ = term.partition("=")
        if equals and re.fullmatch(r"(?i)[a-z][a-z0-9_.-]*", name):  # a modifier: name=value
            if name.lower() == "redirect":
                redirect = term
            continue
        qualifier = term[0] if term[0] in SPF_RESULTS else "+"
        parsed = _MECHANISM.fullmatch(term.lstrip("+-~?"))
        if parsed is None:
            return "invalid", term
        kind, argument, prefix, prefix6 = parsed.groups()
        try:
            matched = _spf_matches(kind.lower(), argument, prefix, prefix6, domain, ip, records)
        except ValueError:
            return "invalid", term
        if matched is None:
            return "unknown", term
        if matched:
            return SPF_RESULTS[qualifier], term
    if redirect:
        return "unknown", redirect
    return "neutral", "no term matches and there is no all"


def _spf_matches(
    kind: str,
    argument: str | None,
    prefix: str | None,
    prefix6: str | None,
    domain: str,
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    records: RecordLookup,
) -> bool | None:
    """Whether the mechanism covers `ip`; None when that cannot be told without following it. ValueError
    for a term that is not valid SPF."""
    if kind == "all" and argument is None and prefix is None and prefix6 is None:
        return True
    if kind in ("include", "exists", "ptr") or "%" in (argument or ""):
        return None
    if kind in ("ip4", "ip6") and argument and prefix6 is None:
        network = ipaddress.ip_network(argument + (f"/{prefix}" if prefix else ""), strict=False)
        if network.version != int(kind[2]):
            raise ValueError(kind)
        return ip.version == network.version and ip in network
    if kind not in ("a", "mx") or argument == "":
        raise ValueError(kind)
    bits = int((prefix if ip.version == 4 else prefix6) or ip.max_prefixlen)
    if bits > ip.max_prefixlen:
        raise ValueError(bits)
    target = argument or domain
    hosts = [target] if kind == "a" else records(target, "MX")[:MAX_SPF_MX]
    family = "A" if ip.version == 4 else "AAAA"
    for host in hosts:
        for found in records(host, family):
            if ip in ipaddress.ip_network(f"{found}/{bits}", strict=False):
                return True
    return False
