"""MTA-STS (RFC 8461) applied by direct delivery, with real parts: the loopback DNS server answers the
`_mta-sts` TXT records and the MX records, a real HTTPS server on 127.0.0.20 serves the policies with
certificates for mta-sts.DOMAIN from a trustme CA that only `mta_sts.ca_file` trusts, and the MX hosts
are aiosmtpd servers (tests/test_direct.py's World), with or without STARTTLS and a valid certificate.
An attacker's HTTPS server on 127.0.0.21 shares the port; the tests are written as the attacker plays.
"""

from __future__ import annotations

import http.server
import logging
import os
import re
import ssl
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from click.testing import CliRunner
from dnsserver import DnsServer, dns_server
from mailservers import SmtpServer, certificates
from system_install import SystemInstall
from test_direct import SENDER, World, enqueue, line_for, outcome, run_flush, shared_port, world
from test_flush import LogLines

from pymta.cli import smarthost as smarthost_cli
from pymta.config.load import load, loads
from pymta.config.model import MtaSts
from pymta.delivery.flush import Flusher
from pymta.errors import ConfigError

__all__ = ["certificates", "dns_server", "world"]  # fixtures imported for use

POLICY_ADDRESS = "127.0.0.20"
ATTACKER_ADDRESS = "127.0.0.21"


def policy(mode: str = "enforce", *patterns: str, max_age: int = 86400) -> bytes:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {p}" for p in patterns), f"max_age: {max_age}"]
    return ("\r\n".join(lines) + "\r\n").encode()


@dataclass
class Answer:
    """What the policy host of one domain answers."""

    body: bytes
    status: int = 200
    content_type: str = "text/plain"
    headers: dict[str, str] = field(default_factory=dict)


class PolicyHosts:
    """The HTTPS servers: the domains' policy host (a certificate for each mta-sts.DOMAIN asked for, by
    SNI) and an attacker's (a valid certificate, for its own name evil.test), on one port."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.ca_file = directory / "sts-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.answers: dict[str, Answer] = {}  # by Host name (mta-sts.DOMAIN)
        self.requests: list[tuple[str, str, str]] = []  # (server, Host, path)
        socks = shared_port([POLICY_ADDRESS, ATTACKER_ADDRESS])
        self.port = socks[POLICY_ADDRESS].getsockname()[1]
        self._servers = [
            self._serve("policy", socks[POLICY_ADDRESS], self._by_name()),
            self._serve("attacker", socks[ATTACKER_ADDRESS], self._context("evil.test")),
        ]
        self.attacker_answer = Answer(policy("none"))

    def _context(self, name: str) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(name).configure_cert(context)
        return context

    def _by_name(self) -> ssl.SSLContext:
        contexts: dict[str, ssl.SSLContext] = {}
        default = self._context("policy.invalid")

        def choose(sock: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
            if name:
                sock.context = contexts.setdefault(name, self._context(name))

        default.sni_callback = choose  # type: ignore[assignment]
        return default

    def _serve(self, which: str, sock: object, context: ssl.SSLContext) -> http.server.HTTPServer:
        hosts = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                host = self.headers.get("Host", "").rpartition(":")[0]
                hosts.requests.append((which, host, self.path))
                answer = hosts.attacker_answer if which == "attacker" else hosts.answers.get(host)
                if answer is None:
                    answer = Answer(b"no such policy\n", status=404)
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.content_type)
                self.send_header("Content-Length", str(len(answer.body)))
                for key, value in answer.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(answer.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(sock.getsockname(), Handler, bind_and_activate=False)  # type: ignore[attr-defined]
        server.socket.close()
        server.socket = context.wrap_socket(sock, server_side=True)  # type: ignore[arg-type]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()


@pytest.fixture
def sts(world: World, tmp_path: Path) -> Iterator[PolicyHosts]:
    hosts = PolicyHosts(tmp_path)
    configure(world, hosts)
    yield hosts
    hosts.close()


def configure(world: World, hosts: PolicyHosts, mx: str = "", enabled: bool = True) -> None:
    world.configure(
        f"mta_sts: {{enabled: {str(enabled).lower()}, port: {hosts.port}, ca_file: {hosts.ca_file}}}\n", mx=mx
    )


def publish(
    world: World, hosts: PolicyHosts, domain: str, body: bytes, policy_id: str = "1", at: str = POLICY_ADDRESS
) -> None:
    """`domain` publishes an MTA-STS record with `policy_id` and the policy `body` at mta-sts.DOMAIN."""
    publish_in(world.dns.zone, hosts, domain, body, policy_id, at)


def publish_in(
    zone: dict[str, dict[str, list[str]]],
    hosts: PolicyHosts,
    domain: str,
    body: bytes,
    policy_id: str = "1",
    at: str = POLICY_ADDRESS,
) -> None:
    zone[f"_mta-sts.{domain}"] = {"TXT": [f'"v=STSv1; id={policy_id}"']}
    zone[f"mta-sts.{domain}"] = {"A": [at]}
    hosts.answers[f"mta-sts.{domain}"] = Answer(body)


def run_flush_warnings(world: World) -> tuple[list[str], list[str]]:
    """As `run_flush`, and the lines logged as warnings (or worse) apart."""
    for sock in world.socks.values():
        sock.close()
    world.socks.clear()
    logger = logging.Logger("pymta-test", logging.DEBUG)
    everything, warned = LogLines(), LogLines()
    warned.setLevel(logging.WARNING)
    logger.addHandler(everything)
    logger.addHandler(warned)
    Flusher(load(str(world.mta.config)), logger).run()
    return everything.lines, warned.lines


def fetches(hosts: PolicyHosts, which: str = "policy") -> list[str]:
    return [host for server, host, _ in hosts.requests if server == which]


# --- the config ---


def test_mta_sts_is_on_by_default_and_its_keys_are_checked() -> None:
    assert loads("direct: true\n", "/f").mta_sts == MtaSts(enabled=True, port=443, ca_file=None)
    assert loads("mta_sts: {enabled: false}\n", "/f").mta_sts.enabled is False
    for text, error in [
        ("mta_sts: false\n", "mta_sts: must be a mapping such as {enabled: false}, not false"),
        ("mta_sts: {enable: false}\n", 'mta_sts.enable: unknown key; did you mean "enabled"?'),
        ("mta_sts: {ca_file: ca.pem}\n", 'mta_sts.ca_file: "ca.pem" is not an absolute path'),
        ("mta_sts: {port: 0}\n", "mta_sts.port: must be a whole number from 1 to 65535"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(error)):
            loads(text, "/f")


# --- enforce ---


def test_enforce_delivers_over_verified_tls_to_a_named_mx_and_says_so(world: World, sts: PolicyHosts) -> None:
    mx = world.server("mx1.sts.test")
    world.mx("sts.test", (10, mx))
    publish(world, sts, "sts.test", policy("enforce", "*.sts.test"))
    enqueue(world.mta, "bob@sts.test")
    lines = run_flush(world)
    assert world.received("mx1.sts.test") == [(SENDER, ["bob@sts.test"])]
    line = line_for(lines, "bob@sts.test")
    assert f"relay=mx1.sts.test[{mx[1]}]:{world.port} tls=verified sts=enforce " in line, line
    assert fetches(sts) == ["mta-sts.sts.test"]
    cache = world.mta.spool / "mta-sts"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert cache.stat().st_uid == world.mta.spool.stat().st_uid
    assert os.listdir(cache) == ["sts.test"]


def test_enforce_never_sends_to_an_mx_the_policy_does_not_name(world: World, sts: PolicyHosts) -> None:
    # The attacker answers the MX query with its own host, which takes mail in clear.
    world.mx("sts.test", (10, world.server("mx.evil.test", mode="plain")))
    publish(world, sts, "sts.test", policy("enforce", "mx1.sts.test"))
    queue_id = enqueue(world.mta, "bob@sts.test")
    lines = run_flush(world)
    status, error = outcome(world, queue_id, "bob@sts.test")
    assert status == "deferred" and error is not None
    assert error.startswith(
        "451 4.7.5 sts.test: its MTA-STS policy (mode enforce, id 1) names none of its MX"
    )
    assert "mx.evil.test" in error and "mx: mx1.sts.test" in error
    assert world.servers["mx.evil.test"].handler.ehlo_names == []  # not even connected to
    assert "status=deferred" in line_for(lines, "bob@sts.test")


def test_enforce_keeps_only_the_named_mx_hosts(world: World, sts: PolicyHosts) -> None:
    world.mx("sts.test", (5, world.server("mx.evil.test", mode="plain")), (10, world.server("mx1.sts.test")))
    publish(world, sts, "sts.test", policy("enforce", "mx1.sts.test"))
    enqueue(world.mta, "bob@sts.test")
    run_flush(world)
    assert world.received("mx1.sts.test") == [(SENDER, ["bob@sts.test"])]
    assert world.servers["mx.evil.test"].handler.ehlo_names == []


@pytest.mark.parametrize(
    ("server", "why"),
    [
        ({"mode": "plain"}, "the MX host does not offer STARTTLS"),
        ({"certificate_for": "someone-else.test"}, "certificate"),
    ],
    ids=["no STARTTLS", "invalid certificate"],
)
def test_enforce_defers_without_verified_tls(world: World, sts: PolicyHosts, server: dict, why: str) -> None:
    world.mx("sts.test", (10, world.server("mx1.sts.test", **server)))
    publish(world, sts, "sts.test", policy("enforce", "mx1.sts.test"))
    queue_id = enqueue(world.mta, "bob@sts.test")
    run_flush(world)  # mx.tls is opportunistic: the policy makes it verify
    status, error = outcome(world, queue_id, "bob@sts.test")
    assert status == "deferred" and error is not None
    assert "4.7.5 no TLS with a certificate valid for mx1.sts.test" in error
    assert "the domain's MTA-STS policy is enforce (RFC 8461)" in error and why in error
    handler = world.servers["mx1.sts.test"].handler
    assert handler.mail_froms == [] and handler.messages == []  # never in clear


# --- testing, none, no policy, switched off ---


def test_testing_delivers_as_opportunistic_tls_and_logs_what_enforce_would_refuse(
    world: World, sts: PolicyHosts
) -> None:
    mx = world.server("mx.other.test", mode="plain")
    world.mx("sts.test", (10, mx))
    publish(world, sts, "sts.test", policy("testing", "mx1.sts.test"))
    enqueue(world.mta, "bob@sts.test")
    lines = run_flush(world)
    assert world.received("mx.other.test") == [(SENDER, ["bob@sts.test"])]
    assert " tls=none sts=testing " in line_for(lines, "bob@sts.test")
    assert any(
        "MTA-STS (mode testing) for sts.test" in line and "mx.other.test" in line and "mode enforce" in line
        for line in lines
    ), lines
    assert any(
        f"MX host mx.other.test[{mx[1]}]:{world.port}: tls=none" in line and "mode testing" in line
        for line in lines
    ), lines


def test_a_stricter_tls_policy_still_applies_under_testing(world: World, sts: PolicyHosts) -> None:
    world.mx("sts.test", (10, world.server("mx1.sts.test", certificate_for="someone-else.test")))
    publish(world, sts, "sts.test", policy("testing", "mx1.sts.test"))
    configure(world, sts, mx="tls_policy: {sts.test: verify}")
    queue_id = enqueue(world.mta, "bob@sts.test")
    run_flush(world)
    status, error = outcome(world, queue_id, "bob@sts.test")
    assert status == "deferred" and error is not None and "(mx.tls_policy)" in error


@pytest.mark.parametrize("body", [policy("none"), None], ids=["mode none", "no record"])
def test_no_policy_delivers_as_before(world: World, sts: PolicyHosts, body: bytes | None) -> None:
    world.mx("sts.test", (10, world.server("mx.other.test", mode="plain")))
    if body is not None:
        publish(world, sts, "sts.test", body)
    enqueue(world.mta, "bob@sts.test")
    lines = run_flush(world)
    assert world.received("mx.other.test") == [(SENDER, ["bob@sts.test"])]
    line = line_for(lines, "bob@sts.test")
    assert " tls=none " in line and "sts=" not in line
    assert ("udp", "_mta-sts.sts.test", "TXT") in world.dns.queries


def test_mta_sts_can_be_switched_off(world: World, sts: PolicyHosts) -> None:
    world.mx("sts.test", (10, world.server("mx.other.test", mode="plain")))
    publish(world, sts, "sts.test", policy("enforce", "mx1.sts.test"))
    configure(world, sts, enabled=False)
    enqueue(world.mta, "bob@sts.test")
    run_flush(world)
    assert world.received("mx.other.test") == [(SENDER, ["bob@sts.test"])]
    assert not any(name.startswith("_mta-sts.") for _, name, _ in world.dns.queries)
    assert sts.requests == []


# --- the cache, and what an attacker tries ---


def test_the_cached_policy_applies_when_the_fetch_fails(world: World, sts: PolicyHosts) -> None:
    evil = world.server("mx.evil.test", mode="plain")
    world.mx("sts.test", (10, world.server("mx1.sts.test")))
    publish(world, sts, "sts.test", policy("enforce", "mx1.sts.test"))
    enqueue(world.mta, "bob@sts.test")
    run_flush(world)
    assert world.received("mx1.sts.test") == [(SENDER, ["bob@sts.test"])]
    # Now an attacker on the path: a new record id, the policy host's name pointed at its own server (which
    # offers mode none), and the MX at a host that takes mail in clear.
    world.dns.zone["_mta-sts.sts.test"] = {"TXT": ['"v=STSv1; id=2"']}
    world.dns.zone["mta-sts.sts.test"] = {"A": [ATTACKER_ADDRESS]}
    world.mx("sts.test", (10, evil))
    queue_id = enqueue(world.mta, "carol@sts.test")
    lines = run_flush(world)
    status, error = outcome(world, queue_id, "carol@sts.test")
    assert status == "deferred" and error is not None and "MTA-STS policy (mode enforce, id 1)" in error
    assert world.servers["mx.evil.test"].handler.ehlo_names == []
    assert fetches(sts, "attacker") == []  # its certificate is for evil.test: refused before any request
    assert any(
        "could not be fetched" in line
        and "certificate not valid for mta-sts.sts.test" in line
        and "the cached policy (id 1) applies" in line
        for line in lines
    ), lines


def test_a_policy_host_pointed_at_an_attacker_gives_no_policy_to_downgrade_to(
    world: World, sts: PolicyHosts
) -> None:
    world.mx("sts.test", (10, world.server("mx1.sts.test")))
    publish(world, sts, "sts.test", policy("enforce", "mx1.sts.test"), at=ATTACKER_ADDRESS)
    enqueue(world.mta, "bob@sts.test")
    lines = run_flush(world)
    # no policy could be had, so none applies: delivered as opportunistic TLS does (here verified)
    assert world.received("mx1.sts.test") == [(SENDER, ["bob@sts.test"])]
    assert "sts=" not in line_for(lines, "bob@sts.test")
    assert not (world.mta.spool / "mta-sts" / "sts.test").exists()


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (Answer(b"version: STSv1\r\nmode: none\r\n" + b"#" * 65536), "over 65536 bytes"),
        (
            Answer(
                b"", status=302, headers={"Location": f"https://{ATTACKER_ADDRESS}/.well-known/mta-sts.txt"}
            ),
            "HTTP 302, not 200 (redirects are not followed)",
        ),
        (Answer(policy("enforce", "mx.evil.test"), content_type="text/html"), "not text/plain"),
    ],
    ids=["over 64 KiB", "redirect", "not text/plain"],
)
def test_an_answer_that_is_no_policy_leaves_the_cached_one(
    world: World, sts: PolicyHosts, answer: Answer, reason: str
) -> None:
    evil = world.server("mx.evil.test", mode="plain")
    world.mx("sts.test", (10, world.server("mx1.sts.test")))
    publish(world, sts, "sts.test", policy("enforce", "mx1.sts.test"))
    enqueue(world.mta, "bob@sts.test")
    run_flush(world)
    world.dns.zone["_mta-sts.sts.test"] = {"TXT": ['"v=STSv1; id=2"']}
    sts.answers["mta-sts.sts.test"] = answer
    world.mx("sts.test", (10, evil))
    queue_id = enqueue(world.mta, "carol@sts.test")
    lines = run_flush(world)
    assert outcome(world, queue_id, "carol@sts.test")[0] == "deferred"
    assert world.servers["mx.evil.test"].handler.ehlo_names == []
    assert any(reason in line and "the cached policy (id 1) applies" in line for line in lines), lines
    assert fetches(sts, "attacker") == []


def test_a_link_planted_as_the_cache_is_not_followed_and_the_log_says_so(
    world: World, sts: PolicyHosts, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    world.mx("sts.test", (10, world.server("mx1.sts.test")))
    publish(world, sts, "sts.test", policy("enforce", "mx1.sts.test"))
    enqueue(world.mta, "bob@sts.test")
    (world.mta.spool / "mta-sts").symlink_to(elsewhere)
    lines, warned = run_flush_warnings(world)
    assert world.received("mx1.sts.test") == [(SENDER, ["bob@sts.test"])]  # the policy applies all the same
    assert " sts=enforce " in line_for(lines, "bob@sts.test")
    assert os.listdir(elsewhere) == []
    assert any("MTA-STS:" in line and "not cached" in line for line in warned), lines


# --- pymta test --to ---


def test_pymta_test_shows_the_policy_that_applies(world: World, sts: PolicyHosts) -> None:
    world.mx("sts.test", (10, world.server("mx1.sts.test")))
    publish(world, sts, "sts.test", policy("enforce", "mx1.sts.test"))
    run_flush(world)  # closes the unused addresses
    result = CliRunner().invoke(
        smarthost_cli.test_command, ["--to", "bob@sts.test", "-C", str(world.mta.config)]
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "MTA-STS:" in out and "mode enforce" in out and "mx1.sts.test" in out, out
    assert "(tls=verified)" in out
    assert world.servers["mx1.sts.test"].handler.messages == []


def test_pymta_test_shows_an_mx_the_policy_refuses(world: World, sts: PolicyHosts) -> None:
    world.mx("sts.test", (10, world.server("mx.evil.test", mode="plain")))
    publish(world, sts, "sts.test", policy("enforce", "mx1.sts.test"))
    run_flush(world)
    result = CliRunner().invoke(
        smarthost_cli.test_command, ["--to", "bob@sts.test", "-C", str(world.mta.config)]
    )
    assert result.exit_code != 0
    assert "mx.evil.test" in result.stdout and "names none of its MX hosts" in result.stdout, result.stdout
    assert world.servers["mx.evil.test"].handler.ehlo_names == []


# --- system mode: the cache is the spool owner's ---


def test_in_system_mode_the_delivery_process_keeps_the_cache_as_the_spool_owner(
    system: SystemInstall, dns_server: DnsServer
) -> None:
    directory = system.base / "sts"
    directory.mkdir(exist_ok=True)
    directory.chmod(0o755)
    hosts = PolicyHosts(directory)  # its CA file where the spool's owner can read it
    hosts.ca_file.chmod(0o644)
    mx = SmtpServer("plain", server_hostname="mx1.sys.test").start()
    try:
        dns_server.zone = {"sys.test": {"MX": ["10 mx1.sys.test."]}, "mx1.sys.test": {"A": [mx.host]}}
        publish_in(dns_server.zone, hosts, "sys.test", policy("testing", "mx1.sys.test"))
        system.write_config(
            "direct: true\n"
            f"mx: {{port: {mx.port}, timeout: 5s}}\n"
            f"dns: {{nameservers: [{dns_server.host}], port: {dns_server.port}, timeout: 2s}}\n"
            f"mta_sts: {{port: {hosts.port}, ca_file: {hosts.ca_file}}}\n"
        )
        queued = system.sendmail(system.alice, "bob@sys.test", input=b"Subject: sts\n\nhello\n")
        assert queued.returncode == 0, queued.stderr
        flushed = system.flush()
        assert flushed.returncode == 0, flushed.stderr
        assert [m.rcpt_tos for m in mx.handler.messages] == [["bob@sys.test"]]
        assert b" tls=none sts=testing " in flushed.stderr, flushed.stderr
        owner = system.spool_user.uid
        cache = system.spool / "mta-sts"
        info, kept = cache.lstat(), (cache / "sys.test").lstat()
        assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == owner
        assert stat.S_IMODE(kept.st_mode) == 0o600 and kept.st_uid == owner
        assert fetches(hosts) == ["mta-sts.sys.test"]
    finally:
        mx.stop()
        hosts.close()
