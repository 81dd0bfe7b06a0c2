"""Direct delivery to the recipients' MX hosts (issue 15), with real parts: an authoritative DNS server on
loopback (tests/dnsserver.py) answers for the test zones, and the MX hosts are aiosmtpd servers on
127.0.0.2... sharing one port (`mx.port`), with certificates from a trustme CA that the flush trusts
through SSL_CERT_FILE (as OpenSSL reads it). Messages are queued with the real `sendmail`; the flush runs
in-process (log lines captured) or as the real `pymta flush`.
"""

from __future__ import annotations

import logging
import random
import socket
from collections.abc import Iterator

import pytest
from click.testing import CliRunner
from conftest import MtaEnv
from dnsserver import DnsServer, dns_server
from mailservers import Certificates, Handler, SmtpServer, certificates
from test_flush import LogLines
from test_flush import enqueue as sendmail_queues

from pymta.cli import smarthost as smarthost_cli
from pymta.config.load import load
from pymta.delivery.direct import DirectRoutes
from pymta.delivery.flush import NO_SMARTHOST, Flusher
from pymta.delivery.mx import MxResolver

__all__ = ["certificates", "dns_server"]  # fixtures imported for use

ADDRESSES = [f"127.0.0.{n}" for n in range(2, 9)]
SIMPLE = b"Subject: direct\n\nhello over the MX\n"
SENDER = "alice@home.test"  # its domain's MX takes the bounces


def shared_port(addresses: list[str]) -> dict[str, socket.socket]:
    """Listening sockets on every address, all on one free port (the MX port is one setting)."""
    for _ in range(30):
        first = socket.create_server((addresses[0], 0))
        port = first.getsockname()[1]
        socks = {addresses[0]: first}
        try:
            for address in addresses[1:]:
                socks[address] = socket.create_server((address, port))
        except OSError:
            for sock in socks.values():
                sock.close()
            continue
        return socks
    raise RuntimeError("no port free on every test address")


class World:
    """The DNS zone, the MX servers on 127.0.0.x and the config pointing at them."""

    def __init__(self, dns: DnsServer, tls: Certificates, mta: MtaEnv) -> None:
        self.dns = dns
        self.tls = tls
        self.mta = mta
        self.socks = shared_port(ADDRESSES)
        self.port = next(iter(self.socks.values())).getsockname()[1]
        self.servers: dict[str, SmtpServer] = {}
        self.free = list(ADDRESSES)
        # home.test takes the bounces (and is the sender's domain)
        self.mx("home.test", (10, self.server("mx.home.test", mode="plain")))

    def server(
        self,
        name: str,
        *,
        mode: str = "starttls",
        certificate_for: str | None = None,
        handler: Handler | None = None,
    ) -> tuple[str, str]:
        """Start an MX server called `name` on the next free address; its (name, address). Its
        certificate is for `name` unless `certificate_for` says another name."""
        address = self.free.pop(0)
        context = None
        if mode != "plain":
            context = self.tls.server_context(self.tls.issue(certificate_for or name))
        server = SmtpServer(
            mode,  # type: ignore[arg-type]
            self.tls,
            handler=handler,
            server_context=context,
            sock=self.socks.pop(address),
            server_hostname=name,
        )
        self.servers[name] = server.start()
        return name, address

    def down(self, name: str) -> tuple[str, str]:
        """An MX host whose address refuses connections."""
        address = self.free.pop(0)
        self.socks.pop(address).close()
        return name, address

    def mx(self, domain: str, *hosts: tuple[int, tuple[str, str]]) -> None:
        self.dns.zone[domain] = {"MX": [f"{preference} {name}." for preference, (name, _) in hosts]}
        for _, (name, address) in hosts:
            self.dns.zone[name] = {"A": [address]}

    def configure(self, extra: str = "", direct: bool = True, mx: str = "") -> None:
        """The config: direct delivery through this world's DNS and MX port; `mx` adds keys under mx:."""
        self.mta.write_config(
            "domain: home.test\nhostname: client.test\ndeliver: queue\n"
            f"direct: {'true' if direct else 'false'}\n"
            f"mx: {{port: {self.port}, timeout: 3s{', ' + mx if mx else ''}}}\n"
            f"dns: {{nameservers: [{self.dns.host}], port: {self.dns.port}, timeout: 1s}}\n" + extra
        )

    def received(self, name: str) -> list[tuple[str, list[str]]]:
        return [(m.mail_from, m.rcpt_tos) for m in self.servers[name].handler.messages]

    def close(self) -> None:
        for server in self.servers.values():
            server.stop()
        for sock in self.socks.values():
            sock.close()


@pytest.fixture
def world(
    dns_server: DnsServer, certificates: Certificates, mta: MtaEnv, monkeypatch: pytest.MonkeyPatch
) -> Iterator[World]:
    monkeypatch.setenv("SSL_CERT_FILE", str(certificates.ca_file))
    made = World(dns_server, certificates, mta)
    made.configure()
    yield made
    made.close()


def enqueue(mta: MtaEnv, *recipients: str) -> str:
    """Queue one message from SENDER with the real sendmail; its queue id."""
    return sendmail_queues(mta, "-f", SENDER, *recipients, message=SIMPLE)


def run_flush(world: World, seed: int | None = None) -> list[str]:
    """One in-process flush of everything due; its log lines. `seed` fixes the shuffle of equal MX."""
    for sock in world.socks.values():  # addresses no server took refuse connections
        sock.close()
    world.socks.clear()
    logger = logging.Logger("pymta-test", logging.DEBUG)
    capture = LogLines()
    logger.addHandler(capture)
    config = load(str(world.mta.config))
    flusher = Flusher(config, logger)
    if seed is not None:
        flusher.direct = DirectRoutes(config, MxResolver(config.dns, rng=random.Random(seed)))
    flusher.run()
    return capture.lines


def outcome(world: World, queue_id: str, address: str) -> tuple[str, str | None]:
    entry = next(e for e in world.mta.entries() if e.id == queue_id)
    recipient = next(r for r in entry.recipients if r.address == address)
    return recipient.status, recipient.last_error


def line_for(lines: list[str], address: str) -> str:
    found = [line for line in lines if f"to=<{address}>" in line]
    assert len(found) == 1, lines
    return found[0]


# --- MX order, fallback, implicit MX ---


def test_the_best_mx_gets_the_mail_and_the_log_line_names_it_with_its_tls(world: World) -> None:
    mx1, mx2 = world.server("mx1.a.test"), world.server("mx2.a.test")
    world.mx("a.test", (20, mx2), (10, mx1))
    enqueue(world.mta, "bob@a.test")
    lines = run_flush(world)
    assert world.received("mx1.a.test") == [(SENDER, ["bob@a.test"])]
    assert world.received("mx2.a.test") == []
    assert world.mta.entries() == []
    line = line_for(lines, "bob@a.test")
    assert f"relay=mx1.a.test[{mx1[1]}]:{world.port} tls=verified " in line and "status=sent" in line
    assert world.servers["mx1.a.test"].handler.ehlo_names[-1] == "client.test"


def test_an_mx_that_is_down_is_passed_over_for_the_next(world: World) -> None:
    dead = world.down("mx1.b.test")
    world.mx("b.test", (10, dead), (20, world.server("mx2.b.test")))
    enqueue(world.mta, "bob@b.test")
    lines = run_flush(world)
    assert world.received("mx2.b.test") == [(SENDER, ["bob@b.test"])]
    assert any("MX host mx1.b.test" in line and "refused" in line for line in lines), lines


def test_every_address_of_an_mx_host_is_tried(world: World) -> None:
    (_, dead), (name, alive) = world.down("mx.multi.test"), world.server("mx.multi.test")
    world.dns.zone["multi.test"] = {"MX": ["10 mx.multi.test."]}
    world.dns.zone["mx.multi.test"] = {"A": [dead, alive]}
    enqueue(world.mta, "bob@multi.test")
    lines = run_flush(world)
    assert world.received(name) == [(SENDER, ["bob@multi.test"])]
    assert f"relay=mx.multi.test[{alive}]:{world.port} tls=verified " in line_for(lines, "bob@multi.test")
    assert any(f"MX host mx.multi.test[{dead}]" in line for line in lines), lines  # tried first


def test_equal_preferences_are_shuffled_and_both_used(world: World) -> None:
    one, two = world.server("one.c.test", mode="plain"), world.server("two.c.test", mode="plain")
    domains = [f"d{n}.c.test" for n in range(6)]
    for domain in domains:
        world.mx(domain, (10, one), (10, two))
    enqueue(world.mta, *(f"x@{domain}" for domain in domains))
    run_flush(world, seed=3)
    got_one = {r for _, rcpts in world.received("one.c.test") for r in rcpts}
    got_two = {r for _, rcpts in world.received("two.c.test") for r in rcpts}
    assert got_one and got_two and got_one | got_two == {f"x@{domain}" for domain in domains}
    assert len(world.servers["one.c.test"].handler.sessions) == 1  # reused across domains
    assert len(world.servers["two.c.test"].handler.sessions) == 1


def test_a_domain_without_mx_records_is_its_own_host(world: World) -> None:
    name, address = world.server("implicit.test")
    world.dns.zone["implicit.test"] = {"A": [address]}
    enqueue(world.mta, "bob@implicit.test")
    lines = run_flush(world)
    assert world.received("implicit.test") == [(SENDER, ["bob@implicit.test"])]
    assert f"relay=implicit.test[{address}]:{world.port}" in line_for(lines, "bob@implicit.test")


# --- DNS answers that decide ---


@pytest.mark.parametrize(
    ("zone", "code"),
    [({"null.test": {"MX": ["0 ."]}}, "5.1.10"), ({}, "5.1.2")],
    ids=["null MX", "NXDOMAIN"],
)
def test_a_domain_that_takes_no_mail_bounces_at_once(world: World, zone: dict, code: str) -> None:
    world.dns.zone.update(zone)
    queue_id = enqueue(world.mta, "bob@null.test")
    lines = run_flush(world)
    status, error = outcome(world, queue_id, "bob@null.test")
    assert status == "failed" and error is not None and f" {code} " in error
    assert "status=bounced" in line_for(lines, "bob@null.test")
    bounces = world.received("mx.home.test")
    assert [rcpts for _, rcpts in bounces] == [[SENDER]]
    assert code.encode() in world.servers["mx.home.test"].handler.messages[0].data


def test_a_dns_server_that_fails_defers(world: World) -> None:
    world.dns.servfail.add("broken.test")
    queue_id = enqueue(world.mta, "bob@broken.test")
    lines = run_flush(world)
    status, error = outcome(world, queue_id, "bob@broken.test")
    assert status == "deferred" and error is not None and error.startswith("451 4.4.3 ")
    assert "status=deferred" in line_for(lines, "bob@broken.test")
    assert world.received("mx.home.test") == []  # no bounce


def test_an_mx_that_is_this_host_is_a_routing_loop(world: World) -> None:
    world.dns.zone["loop.test"] = {"MX": ["10 client.test."]}
    world.dns.zone["client.test"] = {"A": ["127.0.0.1"]}
    queue_id = enqueue(world.mta, "bob@loop.test")
    run_flush(world)
    status, error = outcome(world, queue_id, "bob@loop.test")
    assert status == "failed" and error is not None and " 5.4.6 " in error and "loops back" in error


def test_mx_records_at_or_above_our_own_preference_are_dropped(world: World) -> None:
    better = world.server("better.loop.test")
    world.mx("backup.test", (10, better))
    world.dns.zone["backup.test"]["MX"].append("20 client.test.")
    world.dns.zone["client.test"] = {"A": ["127.0.0.1"]}
    enqueue(world.mta, "bob@backup.test")
    run_flush(world)
    assert world.received("better.loop.test") == [(SENDER, ["bob@backup.test"])]


# --- TLS ---


@pytest.mark.parametrize("policy", ["opportunistic", "verify"])
def test_starttls_with_a_valid_certificate_is_verified(world: World, policy: str) -> None:
    world.mx("tls.test", (10, world.server("mx.tls.test")))
    world.configure(mx=f"tls: {policy}")
    enqueue(world.mta, "bob@tls.test")
    lines = run_flush(world)
    assert world.received("mx.tls.test") == [(SENDER, ["bob@tls.test"])]
    assert " tls=verified " in line_for(lines, "bob@tls.test")


@pytest.mark.parametrize(
    ("server", "tls"),
    [({"mode": "plain"}, "none"), ({"certificate_for": "someone-else.test"}, "encrypted")],
    ids=["no STARTTLS", "invalid certificate"],
)
def test_opportunistic_tls_delivers_with_what_it_gets(world: World, server: dict, tls: str) -> None:
    world.mx("weak.test", (10, world.server("mx.weak.test", **server)))
    enqueue(world.mta, "bob@weak.test")
    lines = run_flush(world)
    assert world.received("mx.weak.test") == [(SENDER, ["bob@weak.test"])]
    assert f" tls={tls} " in line_for(lines, "bob@weak.test")


@pytest.mark.parametrize(
    ("server", "why"),
    [
        ({"mode": "plain"}, "does not offer STARTTLS"),
        ({"certificate_for": "someone-else.test"}, "certificate"),
    ],
    ids=["no STARTTLS", "invalid certificate"],
)
def test_the_verify_policy_defers_without_a_valid_certificate(world: World, server: dict, why: str) -> None:
    world.mx("bank.test", (10, world.server("mx.bank.test", **server)))
    world.mx("shop.test", (10, world.server("mx.shop.test", **server)))
    world.configure(mx="tls_policy: {bank.test: verify}")
    queue_id = enqueue(world.mta, "bob@bank.test", "eve@shop.test")
    run_flush(world)
    status, error = outcome(world, queue_id, "bob@bank.test")
    assert status == "deferred" and error is not None and "4.7.5" in error and why in error
    assert world.received("mx.bank.test") == []
    assert world.received("mx.shop.test") == [(SENDER, ["eve@shop.test"])]  # its policy is opportunistic
    assert world.servers["mx.bank.test"].auth.attempts == []


# --- replies ---


def test_a_4xx_from_the_first_mx_is_tried_on_the_second(world: World) -> None:
    greylisting = Handler(rejections={"bob@grey.test": "451 4.7.1 greylisted, try again later"})
    world.mx(
        "grey.test",
        (10, world.server("mx1.grey.test", handler=greylisting)),
        (20, world.server("mx2.grey.test")),
    )
    enqueue(world.mta, "bob@grey.test")
    lines = run_flush(world)
    assert greylisting.rcpts_seen == ["bob@grey.test"]
    assert world.received("mx2.grey.test") == [(SENDER, ["bob@grey.test"])]
    assert "relay=mx2.grey.test[" in line_for(lines, "bob@grey.test")
    assert world.mta.entries() == []


def test_a_4xx_from_every_mx_defers_with_the_last_reply(world: World) -> None:
    world.mx(
        "full.test",
        (
            10,
            world.server(
                "mx1.full.test", handler=Handler(rejections={"bob@full.test": "452 4.2.2 full one"})
            ),
        ),
        (
            20,
            world.server(
                "mx2.full.test", handler=Handler(rejections={"bob@full.test": "452 4.2.2 full two"})
            ),
        ),
    )
    queue_id = enqueue(world.mta, "bob@full.test")
    run_flush(world)
    assert outcome(world, queue_id, "bob@full.test") == ("deferred", "452 4.2.2 full two")


def test_a_5xx_at_rcpt_fails_that_recipient_only(world: World) -> None:
    handler = Handler(rejections={"nobody@e.test": "550 5.1.1 no such user"})
    world.mx("e.test", (10, world.server("mx1.e.test", handler=handler)), (20, world.server("mx2.e.test")))
    queue_id = enqueue(world.mta, "nobody@e.test", "bob@e.test")
    run_flush(world)
    assert world.received("mx1.e.test") == [(SENDER, ["bob@e.test"])]
    assert world.servers["mx2.e.test"].handler.rcpts_seen == []  # a 5xx is final: no next MX
    assert outcome(world, queue_id, "nobody@e.test") == ("failed", "550 5.1.1 no such user")


# --- many domains, sessions ---


def test_one_message_to_three_domains_through_the_real_commands(world: World) -> None:
    for domain in ("one.test", "two.test", "three.test"):
        world.mx(domain, (10, world.server(f"mx.{domain}")))
    for sock in world.socks.values():
        sock.close()
    world.socks.clear()
    enqueue(world.mta, "a@one.test", "b@two.test", "c@three.test", "d@two.test")
    env = {**world.mta.env, "SSL_CERT_FILE": str(world.tls.ca_file)}
    result = world.mta.run("pymta", ["flush", "-v"], env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert world.received("mx.one.test") == [(SENDER, ["a@one.test"])]
    assert world.received("mx.two.test") == [(SENDER, ["b@two.test", "d@two.test"])]
    assert world.received("mx.three.test") == [(SENDER, ["c@three.test"])]
    assert world.mta.entries() == []
    assert result.stderr.decode().count("status=sent") == 4


def test_one_session_per_mx_for_many_messages(world: World) -> None:
    shared = world.server("mx.shared.test", mode="plain")  # one Session per connection (no STARTTLS)
    world.mx("f.test", (10, shared))
    world.mx("g.test", (10, shared))
    for recipient in ("a@f.test", "b@g.test", "c@f.test", "d@g.test"):
        enqueue(world.mta, recipient)
    run_flush(world)
    handler = world.servers["mx.shared.test"].handler
    assert sorted(r for m in handler.messages for r in m.rcpt_tos) == [
        "a@f.test",
        "b@g.test",
        "c@f.test",
        "d@g.test",
    ]
    assert len(handler.sessions) == 1
    assert len([q for q in world.dns.queries if q[1] == "f.test" and q[2] == "MX"]) == 1  # looked up once


def test_a_started_message_is_finished_before_the_next_one_waits_for_dns(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With PIPELINING a started message's text goes out once the next one is started; when the next one
    must first ask DNS (a domain not looked up yet, perhaps a slow one), the server of the first would hold
    its 354 for as long: the first is finished before that lookup."""
    world.mx("a.test", (10, world.server("mx.a.test", mode="plain")))
    world.mx("b.test", (10, world.server("mx.b.test", mode="plain")))
    enqueue(world.mta, "bob@a.test")
    enqueue(world.mta, "carol@b.test")
    delivered_at_lookup: list[int] = []
    answer = world.dns.answer

    def watched(wire: bytes, transport: str, limit: int) -> bytes | None:
        reply = answer(wire, transport, limit)
        if world.dns.queries and world.dns.queries[-1][1:] == ("b.test", "MX"):
            delivered_at_lookup.append(len(world.servers["mx.a.test"].handler.messages))
        return reply

    monkeypatch.setattr(world.dns, "answer", watched)
    run_flush(world)
    assert delivered_at_lookup == [1], "b.test was looked up while the message for a.test waited for its text"
    assert world.received("mx.b.test") == [(SENDER, ["carol@b.test"])]
    assert world.mta.entries() == []


# --- routes ---


def test_a_recipient_route_sends_through_a_smarthost_while_the_rest_goes_direct(world: World) -> None:
    relay = SmtpServer("plain").start()
    try:
        world.mx("out.test", (10, world.server("mx.out.test")))
        world.configure(
            f"smarthosts:\n  - host: 127.0.0.1\n    port: {relay.port}\n    security: none\n    name: corp\n"
            'routes:\n  - recipient: "*@corp.test"\n    smarthost: corp\n'
        )
        enqueue(world.mta, "boss@corp.test", "bob@out.test")
        lines = run_flush(world)
        assert [m.rcpt_tos for m in relay.handler.messages] == [["boss@corp.test"]]
        assert world.received("mx.out.test") == [(SENDER, ["bob@out.test"])]
        assert " tls=" not in line_for(lines, "boss@corp.test")  # a smarthost's line is as it was
        assert world.mta.entries() == []
    finally:
        relay.stop()


def test_a_route_to_direct_without_direct_true(world: World) -> None:
    relay = SmtpServer("plain").start()
    try:
        world.mx("partner.test", (10, world.server("mx.partner.test")))
        world.configure(
            f"smarthosts:\n  - host: 127.0.0.1\n    port: {relay.port}\n    security: none\n"
            'routes:\n  - recipient: "*@partner.test"\n    smarthost: direct\n',
            direct=False,
        )
        enqueue(world.mta, "p@partner.test", "q@elsewhere.test")
        run_flush(world)
        assert world.received("mx.partner.test") == [(SENDER, ["p@partner.test"])]
        assert [m.rcpt_tos for m in relay.handler.messages] == [["q@elsewhere.test"]]
    finally:
        relay.stop()


def test_without_direct_nothing_changes(world: World) -> None:
    world.mx("a.test", (10, world.server("mx.a.test")))
    world.configure(direct=False)
    queue_id = enqueue(world.mta, "bob@a.test")
    run_flush(world)
    assert outcome(world, queue_id, "bob@a.test") == ("deferred", NO_SMARTHOST)
    assert world.received("mx.a.test") == []
    assert world.dns.queries == []


# --- pymta test --to ---


def test_pymta_test_shows_the_mx_its_tls_and_the_answers_without_sending(world: World) -> None:
    dead = world.down("mx0.probe.test")
    world.mx("probe.test", (5, dead), (10, world.server("mx1.probe.test")))
    for sock in world.socks.values():
        sock.close()
    world.socks.clear()
    result = CliRunner().invoke(
        smarthost_cli.test_command, ["--to", "bob@probe.test", "-C", str(world.mta.config)]
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "bob@probe.test goes to the MX hosts of probe.test" in out
    assert f"mx1.probe.test[{world.servers['mx1.probe.test'].host}]:{world.port}" in out
    assert "TLS:" in out and "verified" in out
    assert "RCPT TO:<bob@probe.test> 250" in out and "RSET, nothing sent" in out
    handler = world.servers["mx1.probe.test"].handler
    assert handler.rcpts_seen == ["bob@probe.test"] and handler.messages == [] and handler.resets == 1
    assert world.mta.entries() == []  # no test message queued
