"""MTA-STS (pymta.delivery.mtasts): the TXT record from a real DNS server on loopback (tests/dnsserver.py),
the policy from a real HTTPS server on loopback with a trustme certificate, the cache in a directory."""

from __future__ import annotations

import http.server
import json
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from dnsserver import DnsServer, dns_server
from hypothesis import given
from hypothesis import strategies as st

from pymta.delivery.mtasts import (
    MAX_AGE_LIMIT,
    PolicyCache,
    StsPolicy,
    parse_policy,
    policy_for,
)
from pymta.delivery.mx import MxResolver

__all__ = ["dns_server"]  # the fixture, imported for pytest

DOMAIN = "example.net"
HOST = f"mta-sts.{DOMAIN}"
POLICY = (
    "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.net\r\nmx: *.backup.example.net\r\nmax_age: 86400\r\n"
)
NOW = 1_800_000_000.0


@dataclass
class PolicyServer:
    """What the HTTPS server answers, and the requests it got (path, Host)."""

    port: int = 0
    status: int = 200
    content_type: str = "text/plain"
    body: bytes = POLICY.encode()
    headers: dict[str, str] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def serve(ca: trustme.CA, name: str = HOST) -> Iterator[PolicyServer]:
    state = PolicyServer()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            state.requests.append((self.path, self.headers.get("Host", "")))
            self.send_response(state.status)
            self.send_header("Content-Type", state.content_type)
            self.send_header("Content-Length", str(len(state.body)))
            for key, value in state.headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(state.body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def https(ca: trustme.CA) -> Iterator[PolicyServer]:
    yield from serve(ca)


def zone(policy_id: str = "20250101T120000") -> dict[str, dict[str, list[str]]]:
    return {
        f"_mta-sts.{DOMAIN}": {"TXT": [f'"v=STSv1; id={policy_id};"', '"some-other=record"']},
        HOST: {"A": ["127.0.0.1"]},
    }


def client(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def lookup(
    dns: DnsServer, https: PolicyServer, ca: trustme.CA, cache: PolicyCache | None, now: float = NOW
) -> tuple[StsPolicy | None, str]:
    found = policy_for(
        DOMAIN,
        MxResolver(dns.settings(timeout=1)),
        cache,
        port=https.port,
        context=client(ca),
        timeout=5,
        now=now,
    )
    return found.policy, found.note


def test_a_policy_is_fetched_over_verified_https_and_cached(
    dns_server: DnsServer, https: PolicyServer, ca: trustme.CA, tmp_path: Path
) -> None:
    dns_server.zone = zone()
    cache = PolicyCache(str(tmp_path / "mta-sts"))
    policy, note = lookup(dns_server, https, ca, cache)
    assert policy == StsPolicy(
        DOMAIN, "20250101T120000", "enforce", ("mx1.example.net", "*.backup.example.net"), 86400, NOW
    )
    assert note == "the policy of example.net (id 20250101T120000) fetched: mode enforce, max_age 86400"
    assert https.requests == [("/.well-known/mta-sts.txt", f"{HOST}:{https.port}")]
    assert stat.S_IMODE((tmp_path / "mta-sts").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "mta-sts" / DOMAIN).stat().st_mode) == 0o600
    assert cache.get(DOMAIN) == policy
    assert os.listdir(tmp_path / "mta-sts") == [DOMAIN]  # no temporary file left


def test_the_cached_policy_is_used_while_the_record_id_is_the_same(
    dns_server: DnsServer, https: PolicyServer, ca: trustme.CA, tmp_path: Path
) -> None:
    dns_server.zone = zone()
    cache = PolicyCache(str(tmp_path))
    first, _ = lookup(dns_server, https, ca, cache)
    again, note = lookup(dns_server, https, ca, cache, now=NOW + 3600)
    assert again == first and note == "the cached policy (id 20250101T120000) is current"
    assert len(https.requests) == 1
    dns_server.zone = zone("2")
    https.body = POLICY.replace("enforce", "testing").encode()
    changed, _ = lookup(dns_server, https, ca, cache, now=NOW + 7200)
    assert changed is not None and changed.mode == "testing" and changed.policy_id == "2"
    assert len(https.requests) == 2


def test_a_failed_fetch_keeps_the_cached_policy_until_it_expires(
    dns_server: DnsServer, https: PolicyServer, ca: trustme.CA, tmp_path: Path
) -> None:
    dns_server.zone = zone()
    cache = PolicyCache(str(tmp_path))
    first, _ = lookup(dns_server, https, ca, cache)
    dns_server.zone = zone("2")
    https.status = 404
    kept, note = lookup(dns_server, https, ca, cache, now=NOW + 60)
    assert kept == first
    assert note == (
        "the policy of example.net (id 2) could not be fetched: mta-sts.example.net answered HTTP 404, "
        "not 200 (redirects are not followed); the cached policy (id 20250101T120000) applies"
    )
    expired, note = lookup(dns_server, https, ca, cache, now=NOW + 86400)
    assert expired is None and note.endswith("; no policy applies")


def test_a_dns_failure_or_a_missing_record_keeps_a_cached_policy(
    dns_server: DnsServer, https: PolicyServer, ca: trustme.CA, tmp_path: Path
) -> None:
    dns_server.zone = zone()
    cache = PolicyCache(str(tmp_path))
    first, _ = lookup(dns_server, https, ca, cache)
    dns_server.servfail.add(f"_mta-sts.{DOMAIN}")
    kept, note = lookup(dns_server, https, ca, cache)
    assert kept == first and "SERVFAIL" in note
    dns_server.servfail.clear()
    del dns_server.zone[f"_mta-sts.{DOMAIN}"]
    kept, note = lookup(dns_server, https, ca, cache)
    assert kept == first  # an attacker who hides the record does not switch the policy off (RFC 8461 5.1)
    assert note == "no MTA-STS record at _mta-sts.example.net; the cached policy (id 20250101T120000) applies"
    assert len(https.requests) == 1


@pytest.mark.parametrize(
    "records",
    [
        ['"v=spf1 -all"'],
        ['"v=STSv1; id=1;"', '"v=STSv1; id=2;"'],
        ['"v=STSv1; id=not-alnum;"'],
        ['"v=STSv10; id=1"'],
    ],
)
def test_no_valid_record_means_no_policy_and_no_fetch(
    dns_server: DnsServer, https: PolicyServer, ca: trustme.CA, records: list[str]
) -> None:
    dns_server.zone = {f"_mta-sts.{DOMAIN}": {"TXT": records}, HOST: {"A": ["127.0.0.1"]}}
    policy, note = lookup(dns_server, https, ca, None)
    assert policy is None and note.startswith("no MTA-STS record")
    assert https.requests == []


def test_a_certificate_for_another_name_is_refused(
    dns_server: DnsServer, ca: trustme.CA, tmp_path: Path
) -> None:
    dns_server.zone = zone()
    for other in serve(ca, "www.example.net"):
        policy, note = lookup(dns_server, other, ca, PolicyCache(str(tmp_path / "cache")))
        assert policy is None
        assert "certificate not valid for mta-sts.example.net" in note
        assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("status", "content_type", "body", "reason"),
    [
        (301, "text/plain", b"", "answered HTTP 301, not 200 (redirects are not followed)"),
        (200, "text/html", POLICY.encode(), "sent text/html, not text/plain"),
        (200, "text/plain", b"x" * (64 * 1024 + 1), "sent a policy over 65536 bytes"),
        (
            200,
            "text/plain; charset=utf-8",
            b"version: STSv1\nmode: enforce\nmax_age: 60\n",
            "mode enforce without mx:",
        ),
        (200, "text/plain", b"\xff\xfe", "not UTF-8"),
    ],
)
def test_an_answer_that_is_no_policy_is_refused(
    dns_server: DnsServer,
    https: PolicyServer,
    ca: trustme.CA,
    status: int,
    content_type: str,
    body: bytes,
    reason: str,
) -> None:
    dns_server.zone = zone()
    https.status, https.content_type, https.body = status, content_type, body
    https.headers = {"Location": "https://evil.example/policy"} if status == 301 else {}
    policy, note = lookup(dns_server, https, ca, None)
    assert policy is None and reason in note, note
    assert len(https.requests) == 1


@pytest.mark.parametrize(
    "domain", ["bad..example", "x" * 250 + ".example", "exa mple.net", "bü..example", "\u200d.example"]
)
def test_a_recipient_domain_that_is_no_domain_name_has_no_policy(dns_server: DnsServer, domain: str) -> None:
    found = policy_for(domain, MxResolver(dns_server.settings(timeout=1)), PolicyCache("/nonexistent/x"))
    assert found.policy is None and found.note.isprintable()


def test_nothing_listening_is_a_failed_fetch(dns_server: DnsServer, ca: trustme.CA) -> None:
    dns_server.zone = zone()
    closed = PolicyServer(port=9)
    policy, note = lookup(dns_server, closed, ca, None)
    assert policy is None and "mta-sts.example.net[127.0.0.1]:" in note


# --- the policy text ---


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("mode: enforce\nmx: a.example\nmax_age: 1\n", "no version: STSv1"),
        ("version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n", "is not enforce, testing or none"),
        ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557601\n", "up to 31557600"),
        ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n", "is not a number"),
        (
            "version: STSv1\nmode: enforce\nmx: *.*.example\nmax_age: 1\n",
            "not a host name or *.domain pattern",
        ),
        ("version: STSv1\nmode enforce\n", "a line without a colon"),
    ],
)
def test_an_invalid_policy_says_what_is_wrong(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error.replace("*", r"\*").replace(".", r"\.")):
        parse_policy(text)


def test_mode_none_needs_no_mx_and_unknown_keys_are_ignored() -> None:
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 0\nextension: yes\n") == ("none", (), 0)


@given(
    mode=st.sampled_from(["enforce", "testing"]),
    hosts=st.lists(
        st.tuples(st.booleans(), st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){1,3}", fullmatch=True)),
        min_size=1,
        max_size=5,
    ),
    max_age=st.integers(0, MAX_AGE_LIMIT),
    newline=st.sampled_from(["\n", "\r\n"]),
)
def test_a_written_policy_reads_back(
    mode: str, hosts: list[tuple[bool, str]], max_age: int, newline: str
) -> None:
    patterns = [("*." if wild else "") + host for wild, host in hosts]
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {p}" for p in patterns), f"max_age: {max_age}"]
    assert parse_policy(newline.join(lines) + newline) == (mode, tuple(patterns), max_age)


def test_a_pattern_stands_for_exactly_one_label() -> None:
    policy = StsPolicy(DOMAIN, "1", "enforce", ("mx1.example.net", "*.backup.example.net"), 60, NOW)
    assert policy.matches("MX1.example.net.") and policy.matches("b1.backup.example.net")
    assert not policy.matches("backup.example.net")
    assert not policy.matches("a.b1.backup.example.net")
    assert not policy.matches("mx2.example.net")


# --- the cache against what may be planted in it ---


def test_what_is_planted_in_the_cache_is_never_taken_for_a_policy(tmp_path: Path) -> None:
    cache = PolicyCache(str(tmp_path))
    good = StsPolicy(DOMAIN, "1", "enforce", ("mx1.example.net",), 60, NOW)
    cache.put(good)
    assert cache.get(DOMAIN) == good
    record = json.loads((tmp_path / DOMAIN).read_text())
    for bad in (
        {**record, "domain": "other.example"},
        {**record, "mode": "off"},
        {**record, "mx": ["mx1.example.net", 7]},
        {**record, "max_age": MAX_AGE_LIMIT + 1},
        {**record, "policy_id": "../x"},
        [record],
    ):
        (tmp_path / DOMAIN).write_text(json.dumps(bad))
        assert cache.get(DOMAIN) is None, bad
    (tmp_path / DOMAIN).write_text("{not json")
    assert cache.get(DOMAIN) is None
    (tmp_path / DOMAIN).write_bytes(b" " * 100_000)
    assert cache.get(DOMAIN) is None
    (tmp_path / DOMAIN).unlink()
    (tmp_path / "elsewhere").write_text(json.dumps(record))
    (tmp_path / DOMAIN).symlink_to(tmp_path / "elsewhere")
    assert cache.get(DOMAIN) is None  # not through a link
    os.mkfifo(tmp_path / "fifo.example")
    assert cache.get("fifo.example") is None  # no hang on a FIFO
    assert cache.get("../etc") is None and cache.get("..") is None


def test_a_policy_host_that_drips_its_answer_is_given_up_at_the_deadline(
    dns_server: DnsServer, ca: trustme.CA
) -> None:
    """Each byte comes within the read timeout, the whole never: the fetch must end at its own deadline,
    not hold the queue run for as long as the server likes."""
    dns_server.zone = zone()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST).configure_cert(context)
    listener = socket.create_server(("127.0.0.1", 0))
    hung_up = threading.Event()

    def drip() -> None:
        connection, _ = listener.accept()
        with context.wrap_socket(connection, server_side=True) as tls:
            tls.recv(4096)
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Slow: ")
            for _ in range(150):  # 15 s of headers, a byte at a time
                try:
                    tls.sendall(b"a")
                except OSError:
                    hung_up.set()
                    return
                time.sleep(0.1)
            tls.sendall(b"\r\nContent-Length: %d\r\n\r\n%s" % (len(POLICY), POLICY.encode()))

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    try:
        found = policy_for(
            DOMAIN,
            MxResolver(dns_server.settings(timeout=1)),
            None,
            port=listener.getsockname()[1],
            context=client(ca),
            timeout=1,
            now=NOW,
        )
        assert found.policy is None and found.failed
        assert "no complete answer within 1s" in found.note, found.note
        thread.join(timeout=30)
        assert hung_up.is_set()  # the client went away while the server was still dripping
    finally:
        listener.close()
