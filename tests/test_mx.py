"""MX resolution (pymta.delivery.mx) against a real DNS server on loopback (tests/dnsserver.py)."""

from __future__ import annotations

import random
import socket
import subprocess
import sys

import pytest
from dnsserver import DnsServer, dns_server

from pymta.config.model import DnsSettings
from pymta.delivery.mx import (
    Destination,
    DnsTemporaryError,
    MxHost,
    MxResolver,
    NoRouteError,
    NoSuchDomainError,
    NullMxError,
    ascii_domain,
)

__all__ = ["dns_server"]  # the fixture, imported for pytest


def resolver(server: DnsServer, timeout: float = 2.0, **limits: int) -> MxResolver:
    return MxResolver(server.settings(timeout=timeout), rng=random.Random(1), **limits)


def test_mx_hosts_in_preference_order_with_their_addresses(dns_server: DnsServer) -> None:
    dns_server.zone = {
        "example.test": {"MX": ["20 mx2.example.test.", "10 mx1.example.test.", "30 mx3.example.test."]},
        "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["2001:db8::1"]},
        "mx2.example.test": {"A": ["127.0.0.3"]},
        "mx3.example.test": {"AAAA": ["2001:db8::3"]},
    }
    destination = resolver(dns_server).lookup("example.test")
    assert destination == Destination(
        "example.test",
        (
            MxHost("mx1.example.test", 10, ("127.0.0.2", "2001:db8::1")),
            MxHost("mx2.example.test", 20, ("127.0.0.3",)),
            MxHost("mx3.example.test", 30, ("2001:db8::3",)),
        ),
    )
    assert destination.relays()[0] == (destination.hosts[0], "127.0.0.2")
    assert len(destination.relays()) == 4


def test_equal_preferences_are_shuffled_and_stay_behind_better_ones(dns_server: DnsServer) -> None:
    names = [f"mx{i}.example.test" for i in range(5)]
    dns_server.zone = {"example.test": {"MX": ["5 best.example.test."] + [f"10 {name}." for name in names]}}
    dns_server.zone["best.example.test"] = {"A": ["127.0.0.9"]}
    for i, name in enumerate(names):
        dns_server.zone[name] = {"A": [f"127.0.1.{i}"]}
    orders = set()
    for seed in range(20):
        mx = MxResolver(dns_server.settings(), rng=random.Random(seed))
        destination = mx.lookup("example.test")
        assert destination.hosts[0].name == "best.example.test"
        assert sorted(host.name for host in destination.hosts[1:]) == names
        orders.add(tuple(host.name for host in destination.hosts[1:]))
    assert len(orders) > 1  # the same seed gives the same order, different seeds differ
    again = MxResolver(dns_server.settings(), rng=random.Random(3)).lookup("example.test")
    assert again == MxResolver(dns_server.settings(), rng=random.Random(3)).lookup("example.test")


def test_no_mx_records_means_the_domain_is_its_own_host(dns_server: DnsServer) -> None:
    dns_server.zone = {"plain.test": {"A": ["127.0.0.5"], "AAAA": ["::1"]}}
    destination = resolver(dns_server).lookup("Plain.Test.")
    assert destination == Destination(
        "plain.test", (MxHost("plain.test", 0, ("127.0.0.5", "::1")),), implicit=True
    )


def test_no_mx_and_no_address_is_a_permanent_failure(dns_server: DnsServer) -> None:
    dns_server.zone = {"empty.test": {"TXT": ['"v=spf1 -all"']}}
    with pytest.raises(NoRouteError) as caught:
        resolver(dns_server).lookup("empty.test")
    assert caught.value.permanent and caught.value.enhanced == "5.4.4"
    assert caught.value.reply.startswith("550 5.4.4 empty.test: no MX records")


def test_null_mx_fails_at_once_with_5_1_10(dns_server: DnsServer) -> None:
    dns_server.zone = {"nomail.test": {"MX": ["0 ."], "A": ["127.0.0.6"]}}
    with pytest.raises(NullMxError) as caught:
        resolver(dns_server).lookup("nomail.test")
    assert caught.value.permanent
    assert caught.value.reply == "550 5.1.10 nomail.test: the domain accepts no mail (null MX, RFC 7505)"
    assert [query[2] for query in dns_server.queries] == ["MX"]  # no fallback to the A record


def test_a_null_mx_beside_real_ones_is_skipped(dns_server: DnsServer) -> None:
    dns_server.zone = {"odd.test": {"MX": ["0 .", "10 mx.odd.test."]}, "mx.odd.test": {"A": ["127.0.0.7"]}}
    destination = resolver(dns_server).lookup("odd.test")
    assert [host.name for host in destination.hosts] == ["mx.odd.test"]
    assert any("null MX" in note for note in destination.notes)


def test_nxdomain_is_a_permanent_failure_5_1_2(dns_server: DnsServer) -> None:
    with pytest.raises(NoSuchDomainError) as caught:
        resolver(dns_server).lookup("nowhere.test")
    assert caught.value.permanent and caught.value.enhanced == "5.1.2"
    assert "NXDOMAIN" in str(caught.value)


def test_servfail_is_temporary(dns_server: DnsServer) -> None:
    dns_server.servfail.add("broken.test")
    with pytest.raises(DnsTemporaryError) as caught:
        resolver(dns_server).lookup("broken.test")
    assert not caught.value.permanent and caught.value.enhanced == "4.4.3"
    assert caught.value.reply.startswith("451 4.4.3 broken.test: ")
    assert "SERVFAIL" in str(caught.value)


def test_no_answer_times_out_as_temporary(dns_server: DnsServer) -> None:
    dns_server.silent.add("slow.test")
    with pytest.raises(DnsTemporaryError) as caught:
        resolver(dns_server, timeout=0.3).lookup("slow.test")
    assert "no answer to the MX lookup within 0.3s" in str(caught.value)
    assert ("udp", "slow.test", "MX") in dns_server.queries


def test_an_mx_host_that_fails_temporarily_is_skipped_while_others_work(dns_server: DnsServer) -> None:
    dns_server.zone = {
        "example.test": {"MX": ["10 down.example.test.", "20 up.example.test."]},
        "up.example.test": {"A": ["127.0.0.8"]},
    }
    dns_server.servfail.add("down.example.test")
    destination = resolver(dns_server).lookup("example.test")
    assert [host.name for host in destination.hosts] == ["up.example.test"]
    assert any(note.startswith("MX 10 down.example.test: ") for note in destination.notes)


def test_only_failing_mx_hosts_defer_and_only_missing_ones_bounce(dns_server: DnsServer) -> None:
    dns_server.zone = {"example.test": {"MX": ["10 down.example.test.", "20 gone.example.test."]}}
    dns_server.servfail.add("down.example.test")
    with pytest.raises(DnsTemporaryError):
        resolver(dns_server).lookup("example.test")
    dns_server.servfail.clear()
    dns_server.zone["down.example.test"] = {"TXT": ['"no address"']}
    with pytest.raises(NoRouteError) as caught:
        resolver(dns_server).lookup("example.test")
    assert "gone.example.test: no such host (NXDOMAIN)" in str(caught.value)


def test_cnames_are_followed_for_the_domain_and_for_an_mx_host(dns_server: DnsServer) -> None:
    dns_server.zone = {
        "alias.test": {"CNAME": ["real.test."]},
        "real.test": {"MX": ["10 mxalias.real.test."]},
        "mxalias.real.test": {"CNAME": ["mx.real.test."]},
        "mx.real.test": {"A": ["127.0.0.10"]},
        "bare.test": {"CNAME": ["host.real.test."]},
        "host.real.test": {"A": ["127.0.0.11"]},
    }
    destination = resolver(dns_server).lookup("alias.test")
    assert destination.hosts == (MxHost("mxalias.real.test", 10, ("127.0.0.10",)),)
    implicit = resolver(dns_server).lookup("bare.test")
    assert implicit.implicit and implicit.hosts == (MxHost("host.real.test", 0, ("127.0.0.11",)),)


def test_an_ip_address_or_a_bad_name_in_an_mx_record_is_not_used(dns_server: DnsServer) -> None:
    dns_server.zone = {
        "ip.test": {"MX": ["10 127.0.0.12.", "20 bad\\010name.ip.test.", "30 mx.ip.test."]},
        "mx.ip.test": {"A": ["127.0.0.13", "0.0.0.0"]},
    }
    destination = resolver(dns_server).lookup("ip.test")
    assert destination.hosts == (MxHost("mx.ip.test", 30, ("127.0.0.13",)),)
    assert any("an IP address, not a host name" in note for note in destination.notes)
    assert any("not a valid host name" in note for note in destination.notes)
    assert all("\n" not in note and "\x08" not in note for note in destination.notes)
    dns_server.zone = {"onlyip.test": {"MX": ["10 127.0.0.12."]}}
    with pytest.raises(NoRouteError):
        resolver(dns_server).lookup("onlyip.test")


def test_many_mx_hosts_are_limited_and_the_answer_comes_over_tcp(dns_server: DnsServer) -> None:
    names = [f"mx{i:02}.a-rather-long-domain-name.example.test" for i in range(40)]
    dns_server.zone = {"many.test": {"MX": [f"{i} {name}." for i, name in enumerate(names)]}}
    for i, name in enumerate(names):
        dns_server.zone[name] = {"A": [f"127.0.2.{i}", f"127.0.3.{i}"]}
    destination = resolver(dns_server, max_hosts=10, max_addresses=12).lookup("many.test")
    assert [host.name for host in destination.hosts] == names[:6]
    assert sum(len(host.addresses) for host in destination.hosts) == 12
    assert "40 MX hosts, the first 10 kept" in destination.notes
    assert ("tcp", "many.test", "MX") in dns_server.queries  # too big for 512 bytes of UDP
    looked_up = {name for _, name, _ in dns_server.queries}
    assert names[6] not in looked_up and names[10] not in looked_up  # no lookups past the limits


def test_the_same_address_is_listed_once(dns_server: DnsServer) -> None:
    dns_server.zone = {
        "dup.test": {"MX": ["10 a.dup.test.", "20 b.dup.test."]},
        "a.dup.test": {"A": ["127.0.0.14"]},
        "b.dup.test": {"A": ["127.0.0.14", "127.0.0.15"]},
    }
    destination = resolver(dns_server).lookup("dup.test")
    assert [host.addresses for host in destination.hosts] == [("127.0.0.14",), ("127.0.0.15",)]


def test_address_literals_need_no_dns() -> None:
    mx = MxResolver(DnsSettings(nameservers=("127.0.0.1",), port=9, timeout=0.2))
    assert mx.lookup("[127.0.0.1]").relays()[0][1] == "127.0.0.1"
    assert mx.lookup("[IPv6:::1]").relays()[0][1] == "::1"
    with pytest.raises(NoSuchDomainError):
        mx.lookup("[::1]")
    with pytest.raises(NoRouteError):
        mx.lookup("[0.0.0.0]")


def test_invalid_domain_names_fail_before_any_query(dns_server: DnsServer) -> None:
    for bad in ("", "exa mple.test", "a..b", "x" * 64 + ".test"):
        with pytest.raises(NoSuchDomainError):
            resolver(dns_server).lookup(bad)
    assert dns_server.queries == []


def test_a_unicode_domain_is_looked_up_by_its_a_labels(dns_server: DnsServer) -> None:
    assert ascii_domain("Bücher.Example.") == "xn--bcher-kva.example"
    dns_server.zone = {"xn--bcher-kva.test": {"A": ["127.0.0.16"]}}
    destination = resolver(dns_server).lookup("bücher.test")
    assert destination.domain == "xn--bcher-kva.test"
    assert destination.hosts[0].addresses == ("127.0.0.16",)


def test_without_the_idna_package_dnspython_converts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "idna", None)  # `import idna` now raises ImportError
    assert ascii_domain("Bücher.Example.") == "xn--bcher-kva.example"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
def test_a_dns_server_on_ipv6_loopback_and_an_aaaa_only_host() -> None:
    server = DnsServer("::1")
    try:
        server.zone = {"six.test": {"MX": ["10 mx.six.test."]}, "mx.six.test": {"AAAA": ["::1"]}}
        destination = resolver(server).lookup("six.test")
        assert destination.relays() == [(MxHost("mx.six.test", 10, ("::1",)), "::1")]
    finally:
        server.stop()


def test_the_record_types_read_are_imported_with_the_module() -> None:
    """dnspython imports a record type's class when it first parses one, and falls back to a generic
    record (no `.preference`, no `.address`) when that import fails: after the privilege switch, a Python
    the `pymta` user cannot read would break every lookup. Importing the module (the preload) loads them."""
    code = (
        "import sys, pymta.delivery.mx; "
        "print(' '.join(sorted(name for name in sys.modules if name.startswith('dns.rdtypes.'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(result.stdout.split())
    for name in ("ANY.MX", "ANY.CNAME", "ANY.NS", "ANY.SOA", "IN.A", "IN.AAAA"):
        assert f"dns.rdtypes.{name}" in loaded
