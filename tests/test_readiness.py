"""The readiness check for direct delivery (pymta.delivery.readiness) against a real DNS server on loopback
(tests/dnsserver.py): each zone is one way a receiving MX would find this host wanting, or not."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from conftest import MtaEnv
from dnsserver import DnsServer, dns_server
from hypothesis import given
from hypothesis import strategies as st

from pymta.config.load import loads
from pymta.delivery.mx import MxResolver
from pymta.delivery.readiness import (
    Finding,
    Readiness,
    check_config,
    check_readiness,
    direct_sender_domains,
    spf_verdict,
)

__all__ = ["dns_server"]  # the fixture, imported for pytest

HOST = "mail.example.net"
ADDRESS = "198.51.100.7"
PTR_NAME = "7.100.51.198.in-addr.arpa"
V6 = "2001:db8::7"
V6_PTR = "7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"


def good_zone() -> dict[str, dict[str, list[str]]]:
    """A host that any receiver accepts mail from: A, PTR back to it, SPF naming it, DMARC."""
    return {
        HOST: {"A": [ADDRESS], "TXT": ['"v=spf1 a -all"']},
        PTR_NAME: {"PTR": [f"{HOST}."]},
        "example.net": {"TXT": ['"v=spf1 mx ip4:198.51.100.0/24 -all"', '"google-site-verification=x"']},
        "_dmarc.example.net": {"TXT": ['"v=DMARC1; p=none; rua=mailto:dmarc@example.net"']},
    }


def check(server: DnsServer, hostname: str = HOST, domains: tuple[str, ...] = ("example.net",)) -> Readiness:
    return check_readiness(hostname, domains, MxResolver(server.settings(timeout=2)))


def severities(readiness: Readiness) -> list[str]:
    return [finding.severity for finding in readiness.findings]


def only(readiness: Readiness, severity: str) -> Finding:
    (finding,) = [finding for finding in readiness.findings if finding.severity == severity]
    return finding


def test_a_host_ready_for_direct_delivery_has_only_ok_findings(dns_server: DnsServer) -> None:
    dns_server.zone = good_zone()
    readiness = check(dns_server)
    assert readiness.addresses == (ADDRESS,)
    assert severities(readiness) == ["ok"] * 5
    assert not readiness.problems
    assert readiness.lines() == [
        f"[ok] the hostname {HOST} resolves to {ADDRESS}",
        f"[ok] the PTR of {ADDRESS} is {HOST}, which resolves back to it (FCrDNS)",
        f"[ok] example.net's SPF record permits {ADDRESS} (ip4:198.51.100.0/24)",
        "[ok] example.net publishes a DMARC record at _dmarc.example.net (p=none)",
        f"[ok] {HOST}'s SPF record permits {ADDRESS} (a)",
    ]


def test_the_helo_name_s_spf_is_checked_for_bounces_as_a_warning_at_most(dns_server: DnsServer) -> None:
    dns_server.zone = good_zone()
    dns_server.zone[HOST]["TXT"] = ['"v=spf1 ip4:203.0.113.1 -all"']
    warning = only(check(dns_server), "warn")
    assert warning.problem.startswith(f"{HOST}'s SPF record refuses {ADDRESS} (-all)")
    del dns_server.zone[HOST]["TXT"]
    note = only(check(dns_server), "note")
    assert note.problem == (
        f"the HELO name {HOST} publishes no SPF record; receivers check it for bounces, which are sent "
        "with an empty sender"
    )
    assert note.fix == f'publish one TXT record at {HOST}: "v=spf1 a -all"'
    # the HELO name that is the sender domain too is checked once, as a sender domain
    assert [line for line in check(dns_server, domains=(HOST,)).lines() if "SPF" in line] == [
        f"[problem] {HOST} publishes no SPF record; Gmail refuses mail that passes neither SPF nor DKIM, and "
        f'pymta does not sign with DKIM; fix: publish one TXT record at {HOST}: "v=spf1 ip4:{ADDRESS} -all"'
    ]


def test_both_address_families_are_checked(dns_server: DnsServer) -> None:
    dns_server.zone = good_zone()
    dns_server.zone[HOST]["AAAA"] = [V6]
    dns_server.zone[V6_PTR] = {"PTR": [f"{HOST}."]}
    readiness = check(dns_server)
    assert readiness.addresses == (ADDRESS, V6)
    lines = readiness.lines()
    assert f"[ok] the PTR of {V6} is {HOST}, which resolves back to it (FCrDNS)" in lines
    # the SPF record names no IPv6 range and ends in -all: mail sent over IPv6 is refused
    problem = only(readiness, "problem")
    assert problem.problem.startswith(f"example.net's SPF record refuses {V6} (-all)")
    assert problem.fix == f"add ip6:{V6} to example.net's SPF record, before its all"


def test_no_ptr_record_is_a_problem_naming_who_sets_it(dns_server: DnsServer) -> None:
    zone = good_zone()
    del zone[PTR_NAME]
    dns_server.zone = zone
    problem = only(check(dns_server), "problem")
    assert (
        problem.problem
        == f"{ADDRESS} has no PTR record (reverse DNS); Gmail and most providers refuse its mail"
    )
    assert "your hosting provider, not your DNS host" in problem.fix and HOST in problem.fix


def test_a_ptr_naming_a_host_that_does_not_resolve_back_fails_fcrdns(dns_server: DnsServer) -> None:
    zone = good_zone()
    zone[PTR_NAME] = {"PTR": ["static-7.provider.example."]}
    zone["static-7.provider.example"] = {"A": ["198.51.100.8"]}
    dns_server.zone = zone
    problem = only(check(dns_server), "problem")
    assert problem.problem == (
        f"the PTR of {ADDRESS} names static-7.provider.example, which does not resolve back to {ADDRESS} "
        "(forward-confirmed reverse DNS fails)"
    )
    assert problem.fix.startswith(f"give static-7.provider.example the address {ADDRESS}, or ask")


def test_a_confirmed_ptr_that_is_not_the_helo_name_is_a_warning(dns_server: DnsServer) -> None:
    zone = good_zone()
    zone[PTR_NAME] = {"PTR": ["static-7.provider.example."]}
    zone["static-7.provider.example"] = {"A": [ADDRESS]}
    dns_server.zone = zone
    readiness = check(dns_server)
    assert not readiness.problems
    warning = only(readiness, "warn")
    assert warning.problem.startswith(
        f"the PTR of {ADDRESS} is static-7.provider.example, not the HELO name {HOST}"
    )
    assert warning.fix.startswith("set `hostname: static-7.provider.example`, or ask")


def test_no_spf_record_is_a_problem_with_the_record_to_publish(dns_server: DnsServer) -> None:
    zone = good_zone()
    zone["example.net"] = {"TXT": ['"google-site-verification=x"']}
    dns_server.zone = zone
    problem = only(check(dns_server), "problem")
    assert problem.problem.startswith("example.net publishes no SPF record;")
    assert problem.fix == f'publish one TXT record at example.net: "v=spf1 ip4:{ADDRESS} -all"'


def test_an_spf_record_ending_in_minus_all_without_our_address_refuses_us(dns_server: DnsServer) -> None:
    zone = good_zone()
    zone["example.net"] = {"TXT": ['"v=spf1 ip4:203.0.113.0/24 a:other.example.net -all"']}
    zone["other.example.net"] = {"A": ["203.0.113.9"]}
    dns_server.zone = zone
    problem = only(check(dns_server), "problem")
    assert problem.problem == (
        f"example.net's SPF record refuses {ADDRESS} (-all): receivers reject or junk its mail from here"
    )
    assert problem.fix == f"add ip4:{ADDRESS} to example.net's SPF record, before its all"


def test_spf_a_and_mx_terms_are_looked_up(dns_server: DnsServer) -> None:
    zone = good_zone()
    zone["example.net"] = {"TXT": ['"v=spf1 a:mail.example.net -all"'], "MX": ["10 mail.example.net."]}
    dns_server.zone = zone
    assert (
        "[ok] example.net's SPF record permits 198.51.100.7 (a:mail.example.net)" in check(dns_server).lines()
    )
    zone["example.net"]["TXT"] = ['"v=spf1 ~mx -all"']
    warning = only(check(dns_server), "warn")
    assert warning.problem == f"example.net's SPF record does not permit {ADDRESS} (~mx: softfail)"


def test_an_include_before_any_match_is_a_note_not_a_verdict(dns_server: DnsServer) -> None:
    zone = good_zone()
    zone["example.net"] = {"TXT": ['"v=spf1 include:_spf.provider.example -all"']}
    dns_server.zone = zone
    readiness = check(dns_server)
    assert not readiness.problems
    note = only(readiness, "note")
    assert note.problem.startswith(
        f"example.net's SPF record may permit {ADDRESS} through include:_spf.provider.example"
    )
    assert ("tcp", "_spf.provider.example", "TXT") not in dns_server.queries
    assert ("udp", "_spf.provider.example", "TXT") not in dns_server.queries


def test_two_spf_records_are_a_problem(dns_server: DnsServer) -> None:
    zone = good_zone()
    zone["example.net"] = {"TXT": ['"v=spf1 -all"', '"v=spf1 ip4:198.51.100.7 -all"']}
    dns_server.zone = zone
    assert only(check(dns_server), "problem").problem.startswith("example.net publishes 2 SPF records")


def test_a_hostname_that_does_not_exist_is_a_problem_and_stops_the_address_checks(
    dns_server: DnsServer,
) -> None:
    zone = good_zone()
    del zone[HOST]
    dns_server.zone = zone
    readiness = check(dns_server)
    assert readiness.addresses == ()
    assert readiness.lines()[0] == (
        f"[problem] the hostname {HOST} does not exist in DNS (NXDOMAIN); fix: set `hostname:` to a name "
        "in a domain you control (e.g. mail.example.net) with an A record"
    )
    assert not any(name == PTR_NAME for _, name, _ in dns_server.queries)
    # the SPF record exists: without an address, it is not judged
    assert "[note] example.net publishes an SPF record; not checked against an address (none known)" in (
        readiness.lines()
    )


@pytest.mark.parametrize(
    ("hostname", "why"),
    [
        ("myhost", "is not fully qualified"),
        ("myhost.local", "is in .local"),
        ("box.fritz.home.arpa", "in .home.arpa"),
        ("198.51.100.7", "is an address; HELO needs a host name"),
        ("", "is not fully qualified"),
    ],
)
def test_a_hostname_no_receiver_can_look_up_is_refused_without_asking(
    dns_server: DnsServer, hostname: str, why: str
) -> None:
    readiness = check(dns_server, hostname, ())
    assert readiness.findings[0].severity == "problem" and why in readiness.findings[0].problem
    assert dns_server.queries == []


def test_a_servfail_is_could_not_check_never_a_problem(dns_server: DnsServer) -> None:
    dns_server.zone = good_zone()
    dns_server.servfail.add(PTR_NAME)
    dns_server.servfail.add("example.net")
    readiness = check(dns_server)
    assert not readiness.problems
    assert severities(readiness) == ["ok", "unknown", "unknown", "ok", "ok"]
    unknown = readiness.findings[1]
    assert unknown.problem == (
        f"could not check the PTR record of {ADDRESS}: the DNS server failed the PTR lookup (SERVFAIL)"
    )
    assert "`dns:`" in unknown.fix


def test_after_a_timeout_nothing_more_is_asked(dns_server: DnsServer) -> None:
    dns_server.zone = good_zone()
    dns_server.silent.add(HOST)
    readiness = check_readiness(HOST, ("example.net",), MxResolver(dns_server.settings(timeout=0.5)))
    assert severities(readiness) == ["unknown", "unknown", "unknown"]
    assert readiness.findings[1].problem.startswith(
        "could not check the SPF record of example.net: not asked: the DNS server did not answer within 0.5s"
    )
    assert {name for _, name, _ in dns_server.queries} == {HOST}


def test_a_private_address_is_a_warning_and_its_ptr_is_not_asked(dns_server: DnsServer) -> None:
    zone = good_zone()
    zone[HOST] = {"A": ["192.168.1.20"]}
    dns_server.zone = zone
    readiness = check(dns_server)
    warning = only(readiness, "warn")
    assert warning.problem.startswith(f"{HOST} resolves to 192.168.1.20, a private or loopback address")
    assert not any(name.endswith(".in-addr.arpa") for _, name, _ in dns_server.queries)


def test_dmarc_is_found_up_the_tree_and_its_absence_is_a_note(dns_server: DnsServer) -> None:
    dns_server.zone = good_zone()
    readiness = check(dns_server, domains=("mail.example.net",))
    assert (
        "[ok] mail.example.net publishes a DMARC record at _dmarc.example.net (p=none)" in readiness.lines()
    )
    del dns_server.zone["_dmarc.example.net"]
    note = only(check(dns_server), "note")
    assert note.problem.startswith("example.net publishes no DMARC record")
    assert ("udp", "_dmarc.net", "TXT") not in dns_server.queries  # a top-level domain is not asked


# --- SPF read without DNS: ip4/ip6 terms and all ---

NO_DNS = lambda name, rdtype: pytest.fail(f"looked up {name} {rdtype}")  # noqa: E731


@pytest.mark.parametrize(
    ("record", "verdict"),
    [
        ("v=spf1 ip4:198.51.100.7 -all", ("pass", "ip4:198.51.100.7")),
        ("v=spf1 -ip4:198.51.100.0/24 +all", ("fail", "-ip4:198.51.100.0/24")),
        ("v=spf1 ip6:2001:db8::/32 ~all", ("softfail", "~all")),
        ("v=spf1 ip4:203.0.113.1", ("neutral", "no term matches and there is no all")),
        ("v=spf1 redirect=_spf.example.org", ("unknown", "redirect=_spf.example.org")),
        ("v=spf1 exp=explain.example.org ?all", ("neutral", "?all")),
        ("v=spf1 ptr -all", ("unknown", "ptr")),
        ("v=spf1 a:%{d}.example.org -all", ("unknown", "a:%{d}.example.org")),
        ("v=spf1 ip4:198.51.100.999 -all", ("invalid", "ip4:198.51.100.999")),
        ("v=spf1 ip6:198.51.100.7 -all", ("invalid", "ip6:198.51.100.7")),
        ("v=spf1 frobnicate -all", ("invalid", "frobnicate")),
    ],
)
def test_spf_terms_are_read_in_order(record: str, verdict: tuple[str, str]) -> None:
    assert spf_verdict(record, "example.net", ADDRESS, NO_DNS) == verdict


@given(
    networks=st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(8, 32)), max_size=6),
    address=st.integers(0, 2**32 - 1),
)
def test_an_ip4_only_record_passes_exactly_the_addresses_it_covers(
    networks: list[tuple[int, int]], address: int
) -> None:
    ip = ipaddress.IPv4Address(address)
    terms = [f"ip4:{ipaddress.IPv4Network((base, bits), strict=False)}" for base, bits in networks]
    covered = any(ip in ipaddress.IPv4Network((base, bits), strict=False) for base, bits in networks)
    result, _ = spf_verdict("v=spf1 " + " ".join(terms) + " -all", "example.net", str(ip), NO_DNS)
    assert result == ("pass" if covered else "fail")


def test_what_dns_says_reaches_the_terminal_without_controls_and_cut_short(dns_server: DnsServer) -> None:
    zone = good_zone()
    zone["example.net"] = {"TXT": ['"v=spf1 \\027[31mred\\007 -all"', '"x"']}
    dns_server.zone = zone
    problem = only(check(dns_server), "problem")
    assert "\x1b" not in problem.line() and "\x07" not in problem.line()
    zone["example.net"] = {"TXT": ['"v=spf1 a:' + "x" * 200 + '.example.net -all"']}
    (line,) = [line for line in check(dns_server).lines() if line.startswith("[problem]")]
    assert "a:xxx" in line and "x" * 100 not in line


def test_a_sender_domain_that_is_no_domain_name_is_a_problem(dns_server: DnsServer) -> None:
    dns_server.zone = good_zone()
    readiness = check(dns_server, domains=("x" * 70 + ".example.net",))
    problem = only(readiness, "problem")
    assert problem.problem.endswith("is not a valid domain name")
    assert problem.fix == "set `domain:` to a domain you own"


# --- Which domains a config sends from directly ---


def test_a_config_without_direct_delivery_is_not_checked() -> None:
    config = loads("hostname: mail.example.net\nsmarthosts:\n  - host: relay.example.net\n", "t.yaml")
    assert check_config(config) is None


def test_the_sender_domains_of_direct_mail_are_the_domain_and_those_routes_name() -> None:
    config = loads(
        "hostname: mail.example.net\ndirect: true\nrewrite: {from: me@example.org}\n"
        "routes:\n"
        '  - sender: "*@lists.example.com"\n    smarthost: direct\n'
        '  - sender: "*@*.example.com"\n    smarthost: direct\n'
        '  - recipient: "*@corp.example"\n    smarthost: direct\n',
        "t.yaml",
    )
    # the rewrite is for a smarthost's account: direct delivery sends the sender as it is
    assert direct_sender_domains(config) == ["mail.example.net", "lists.example.com"]


# --- pymta config check ---


def direct_config(mta: MtaEnv, server: DnsServer, text: str = "direct: true\n") -> None:
    mta.write_config(
        f"hostname: {HOST}\ndomain: example.net\n{text}"
        f"dns:\n  nameservers: [{server.host}]\n  port: {server.port}\n  timeout: 2s\n"
    )


def test_config_check_prints_the_findings_of_a_direct_config_and_exits_0(
    mta: MtaEnv, dns_server: DnsServer
) -> None:
    zone = good_zone()
    del zone[PTR_NAME]
    dns_server.zone = zone
    direct_config(mta, dns_server)
    result = mta.run("pymta", ["config", "check"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"# {mta.config}: valid".encode())
    assert result.stderr.decode().splitlines() == [
        f"pymta: direct delivery: what a receiving MX will find for {HOST} ({ADDRESS}):",
        f"[problem] {ADDRESS} has no PTR record (reverse DNS); Gmail and most providers refuse its mail; "
        f"fix: ask whoever assigned {ADDRESS} (your hosting provider, not your DNS host) "
        f"for a PTR naming {HOST}",
        f"[ok] the hostname {HOST} resolves to {ADDRESS}",
        f"[ok] example.net's SPF record permits {ADDRESS} (ip4:198.51.100.0/24)",
        "[ok] example.net publishes a DMARC record at _dmarc.example.net (p=none)",
        f"[ok] {HOST}'s SPF record permits {ADDRESS} (a)",
        "pymta: direct delivery: 1 problem(s), 0 warning(s): receivers may refuse or junk mail from here "
        "until they are fixed (README: Sending without a smarthost)",
    ]


def test_config_check_of_a_route_to_direct_reports_a_dns_failure_as_unknown(
    mta: MtaEnv, dns_server: DnsServer
) -> None:
    dns_server.zone = good_zone()
    dns_server.servfail.add(HOST)
    direct_config(
        mta,
        dns_server,
        "smarthosts:\n  - host: relay.example.net\n"
        'routes:\n  - recipient: "*@corp.example"\n    smarthost: direct\n',
    )
    result = mta.run("pymta", ["config", "check"])
    assert result.returncode == 0, result.stderr
    lines = result.stderr.decode().splitlines()
    assert lines[1] == (
        f"[unknown] could not check that the hostname {HOST} resolves: the DNS server failed the A lookup "
        "(SERVFAIL); fix: check again later; if it lasts, check the DNS servers in `dns:` or /etc/resolv.conf"
    )
    assert lines[-1] == "pymta: direct delivery: no problem found; 1 not checked (DNS)"


def test_config_check_without_direct_delivery_asks_no_dns(mta: MtaEnv, dns_server: DnsServer) -> None:
    direct_config(mta, dns_server, "smarthosts:\n  - host: relay.example.net\n")
    result = mta.run("pymta", ["config", "check"])
    assert result.returncode == 0 and result.stderr == b""
    assert dns_server.queries == []


def test_the_direct_example_passes_config_check_on_a_host_that_is_ready(
    mta: MtaEnv, dns_server: DnsServer
) -> None:
    dns_server.zone = good_zone()
    example = (Path(__file__).parent.parent / "examples" / "direct.yaml").read_text()
    mta.write_config(f"{example}dns:\n  nameservers: [{dns_server.host}]\n  port: {dns_server.port}\n")
    result = mta.run("pymta", ["config", "check"])
    assert result.returncode == 0, result.stderr
    lines = result.stderr.decode().splitlines()
    assert lines[0] == f"pymta: direct delivery: what a receiving MX will find for {HOST} ({ADDRESS}):"
    assert lines[-1] == "pymta: direct delivery: no problem found"
    assert b"direct: true" in result.stdout and b"bank.example: verify" in result.stdout
