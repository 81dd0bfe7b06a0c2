"""pymta.config.load: every key valid and invalid, one-line errors naming file and key, masking, `config
check`."""

import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from pymta.cli.config import config_group, render
from pymta.config import paths as quickconfig
from pymta.config.limits import SIZE_UNITS, format_size, parse_size
from pymta.config.load import KEYS, load, loads
from pymta.config.model import (
    DURATION_UNITS,
    Config,
    PasswordSource,
    Retry,
    Smarthost,
    default_hostname,
    format_duration,
    parse_duration,
)
from pymta.errors import EX_CONFIG, ConfigError
from pymta.records import FrozenInstanceError

ROOT = Path(__file__).resolve().parent.parent
FILE = "/etc/pymta/pymta.yaml"  # the name errors from loads() carry in these tests
no_system_config = pytest.mark.skipif(
    os.path.exists(quickconfig.SYSTEM_CONFIG), reason=f"{quickconfig.SYSTEM_CONFIG} exists on this machine"
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No PYMTA_* or XDG_* variable from the developer's session, and HOME is a fresh directory."""
    for name in list(os.environ):
        if name.startswith(("PYMTA_", "XDG_")):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)  # tests/conftest.py may have made it already
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture(autouse=True)
def fresh_hostname() -> Iterator[None]:
    """The default hostname is computed afresh in every test (it is cached per process)."""
    cached = default_hostname
    cached.cache_clear()
    yield
    cached.cache_clear()


def write(tmp_path: Path, text: str, name: str = "pymta.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        loads(text, FILE)
    assert caught.value.exit_code == EX_CONFIG
    return str(caught.value)


FULL = """\
spool: /var/spool/pymta
hostname: host.example.org
domain: example.org
admin: admin@example.org
deliver: queue
smarthosts:
  - host: smtp.web.de
    port: 587
    security: starttls
    username: me@web.de
    password: {keyring: pymta}
    ca_file: /etc/pymta/ca.pem
    fingerprint: "sha256:00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF"
    auth_plaintext: false
    timeout: 1m
  - host: mail.gmx.net
    security: tls
    username: me@gmx.de
    password: {command: "pass show gmx"}
  - host: 192.0.2.25
    security: none
retry:
  schedule: [1m, 5m, 15m, 1h, 4h]
  lifetime: 5d
max_message_size: 20M
"""


# --- The whole file ---


def test_full_config() -> None:
    loaded = loads(FULL, FILE)
    assert loaded == Config(
        spool="/var/spool/pymta",
        source=FILE,
        configured_hostname="host.example.org",
        configured_domain="example.org",
        admin="admin@example.org",
        deliver="queue",
        smarthosts=(
            Smarthost(
                host="smtp.web.de",
                port=587,
                security="starttls",
                username="me@web.de",
                password=PasswordSource("keyring", "pymta"),
                ca_file="/etc/pymta/ca.pem",
                fingerprint="sha256:" + ":".join([f"{n:X}{n:X}" for n in range(16)] * 2),
                auth_plaintext=False,
                timeout=60,
            ),
            Smarthost("mail.gmx.net", 465, "tls", "me@gmx.de", PasswordSource("command", "pass show gmx")),
            Smarthost("192.0.2.25", 25, "none"),
        ),
        retry=Retry((60, 300, 900, 3600, 14400), 432000),
        max_message_size=20_000_000,
    )
    assert loaded.hostname == "host.example.org"
    assert loaded.domain == "example.org"


def test_config_is_immutable() -> None:
    loaded = loads(FULL, FILE)
    with pytest.raises(FrozenInstanceError):
        loaded.spool = "/tmp"  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        loaded.smarthosts[0].port = 25  # type: ignore[misc]
    assert not hasattr(loaded, "__dict__")  # slots
    assert isinstance(loaded.smarthosts, tuple) and isinstance(loaded.retry.schedule, tuple)


def test_defaults() -> None:
    defaults = Config()
    assert defaults.source is None
    assert defaults.spool == quickconfig.default_spool()
    assert defaults.admin is None
    assert defaults.deliver == "immediate"
    assert defaults.smarthosts == ()
    assert defaults.retry == Retry((60, 300, 900, 3600, 14400), 5 * 86400)
    assert defaults.max_message_size == 35_000_000
    assert defaults.hostname == default_hostname()
    assert defaults.domain == defaults.hostname


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n", "~\n"])
def test_empty_file_gives_defaults(text: str) -> None:
    assert loads(text, FILE) == Config(source=FILE)


def test_null_values_mean_the_default() -> None:
    loaded = loads("spool:\nretry:\n  lifetime: ~\nsmarthosts:\n  - host: a.example\n    port:\n", FILE)
    assert loaded == Config(source=FILE, smarthosts=(Smarthost("a.example", 587),))


# --- load(): the search order, missing and unreadable files ---


@no_system_config
def test_no_config_anywhere_is_valid() -> None:
    assert load() == Config()
    assert load(None).source is None


@no_system_config
def test_user_config_is_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    (tmp_path / "xdg" / "pymta").mkdir(parents=True)
    path = write(tmp_path / "xdg" / "pymta", "deliver: queue\n")
    loaded = load()
    assert loaded.source == path
    assert loaded.deliver == "queue"


def test_explicit_file_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    explicit = write(tmp_path, "deliver: queue\n", "explicit.yaml")
    from_env = write(tmp_path, "deliver: immediate\n", "env.yaml")
    monkeypatch.setenv("PYMTA_CONFIG", from_env)
    assert load().source == from_env
    assert load(explicit).source == explicit
    assert load(explicit).deliver == "queue"


@pytest.mark.parametrize("through", ["argument", "environment"])
def test_named_file_that_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, through: str) -> None:
    missing = str(tmp_path / "missing.yaml")
    if through == "environment":
        monkeypatch.setenv("PYMTA_CONFIG", missing)
    with pytest.raises(ConfigError) as caught:
        load(missing if through == "argument" else None)
    assert str(caught.value) == f"{missing}: no such file; check the name given with -C or in $PYMTA_CONFIG"
    assert caught.value.exit_code == EX_CONFIG


def test_unreadable_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write(tmp_path, "deliver: queue\n")

    def denied(file: str, mode: str = "r") -> None:
        raise PermissionError(13, "Permission denied", file)

    monkeypatch.setattr("pymta.config.load.open", denied, raising=False)
    with pytest.raises(ConfigError) as caught:
        load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: cannot be read (permission denied); ")
    assert f"chmod 644 {path}" in message and "\n" not in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_for_real(tmp_path: Path) -> None:
    path = write(tmp_path, "deliver: queue\n")
    os.chmod(path, 0o000)
    with pytest.raises(ConfigError, match="permission denied"):
        load(path)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r": is a directory; name the config file inside it"):
        load(str(tmp_path))


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "pymta.yaml"
    path.write_bytes(b"spool: /var/spool/\xff\n")
    with pytest.raises(ConfigError) as caught:
        load(str(path))
    assert str(caught.value).startswith(f"{path}: is not valid YAML: ")
    assert "\n" not in str(caught.value)


# --- Every key, valid ---

VALID: list[tuple[str, Callable[[Config], object], object]] = [
    ("spool: /srv/queue", lambda c: c.spool, "/srv/queue"),
    ("hostname: mx1.example.org", lambda c: (c.hostname, c.domain), ("mx1.example.org", "mx1.example.org")),
    ("hostname: localhost", lambda c: c.hostname, "localhost"),
    ("domain: example.org", lambda c: c.domain, "example.org"),
    ("admin: root@example.org", lambda c: c.admin, "root@example.org"),
    ("admin: alice", lambda c: c.admin, "alice"),
    ("admin:", lambda c: c.admin, None),
    ("deliver: immediate", lambda c: c.deliver, "immediate"),
    ("deliver: queue", lambda c: c.deliver, "queue"),
    ("smarthosts: []", lambda c: c.smarthosts, ()),
    ("smarthosts:", lambda c: c.smarthosts, ()),
    ("retry:", lambda c: c.retry, Retry()),
    ("retry: {schedule: [30s]}", lambda c: c.retry, Retry((30,), 432000)),
    ("retry: {schedule: [90, 1.5h]}", lambda c: c.retry.schedule, (90, 5400)),
    ("retry: {lifetime: 1w}", lambda c: c.retry.lifetime, 604800),
    ("retry: {lifetime: 3600}", lambda c: c.retry.lifetime, 3600),
    ("retry: {lifetime: '2d12h'}", lambda c: c.retry.lifetime, 216000),
    ("retry: {lifetime: 0.5}", lambda c: c.retry.lifetime, 0.5),
    ("max_message_size: 35M", lambda c: c.max_message_size, 35_000_000),
    ("max_message_size: 35MB", lambda c: c.max_message_size, 35_000_000),
    ("max_message_size: 10k", lambda c: c.max_message_size, 10_000),
    ("max_message_size: 10 KiB", lambda c: c.max_message_size, 10_240),
    ("max_message_size: 1.5G", lambda c: c.max_message_size, 1_500_000_000),
    ("max_message_size: 4096", lambda c: c.max_message_size, 4096),
    ("max_message_size: '4096'", lambda c: c.max_message_size, 4096),
]


@pytest.mark.parametrize(("text", "get", "value"), VALID, ids=[text for text, _, _ in VALID])
def test_valid_top_level(text: str, get: Callable[[Config], object], value: object) -> None:
    assert get(loads(text + "\n", FILE)) == value


def smarthost(lines: str) -> Smarthost:
    body = "".join(f"    {line}\n" for line in lines.split("; ") if line)
    return loads(f"smarthosts:\n  - host: smtp.example.org\n{body}", FILE).smarthosts[0]


FINGERPRINT = "sha256:" + ":".join(f"{byte:02X}" for byte in range(0xA0, 0xC0))

VALID_SMARTHOST: list[tuple[str, Callable[[Smarthost], object], object]] = [
    ("", lambda h: (h.host, h.port, h.security), ("smtp.example.org", 587, "starttls")),
    ("", lambda h: (h.username, h.password, h.ca_file, h.fingerprint), (None, None, None, None)),
    ("", lambda h: (h.auth_plaintext, h.timeout), (False, 30)),
    ("security: tls", lambda h: h.port, 465),
    ("security: none", lambda h: h.port, 25),
    ("security: starttls; port: 2525", lambda h: (h.security, h.port), ("starttls", 2525)),
    ("port: 1", lambda h: h.port, 1),
    ("port: 65535", lambda h: h.port, 65535),
    ("username: me@web.de", lambda h: h.username, "me@web.de"),
    ("username: me; password: {keyring: pymta}", lambda h: h.password, PasswordSource("keyring", "pymta")),
    (
        "username: me; password: {command: pass show x}",
        lambda h: h.password,
        PasswordSource("command", "pass show x"),
    ),
    (
        "username: me; password: {env: SMTP_PASSWORD}",
        lambda h: h.password,
        PasswordSource("env", "SMTP_PASSWORD"),
    ),
    (
        "username: me; password: {file: /etc/pymta/x.secret}",
        lambda h: h.password,
        PasswordSource("file", "/etc/pymta/x.secret"),
    ),
    ("ca_file: /etc/ssl/my-ca.pem", lambda h: h.ca_file, "/etc/ssl/my-ca.pem"),
    (f"fingerprint: '{FINGERPRINT}'", lambda h: h.fingerprint, FINGERPRINT),
    (f"fingerprint: '{FINGERPRINT.lower()}'", lambda h: h.fingerprint, FINGERPRINT),
    (f"fingerprint: '{FINGERPRINT[7:]}'", lambda h: h.fingerprint, FINGERPRINT),
    (f"fingerprint: {FINGERPRINT[7:].replace(':', '')}", lambda h: h.fingerprint, FINGERPRINT),
    (
        f"fingerprint: 'SHA256:{FINGERPRINT[7:].replace(':', '').lower()}'",
        lambda h: h.fingerprint,
        FINGERPRINT,
    ),
    (f"fingerprint: '{FINGERPRINT}'", lambda h: h.fingerprint_digest, bytes(range(0xA0, 0xC0))),
    ("", lambda h: h.fingerprint_digest, None),
    (
        "security: none; username: me; password: {env: P}; auth_plaintext: true",
        lambda h: h.auth_plaintext,
        True,
    ),
    ("auth_plaintext: false", lambda h: h.auth_plaintext, False),
    ("timeout: 90s", lambda h: h.timeout, 90),
    ("timeout: 2.5", lambda h: h.timeout, 2.5),
    ("", lambda h: h.data_timeout, 600),  # RFC 5321 4.5.3.2.6: 10 minutes for the end of the text
    ("data_timeout: 20m", lambda h: (h.data_timeout, h.timeout), (1200, 30)),
    ("data_timeout: 0.5", lambda h: h.data_timeout, 0.5),
]


@pytest.mark.parametrize(
    ("lines", "get", "value"), VALID_SMARTHOST, ids=[t or "-" for t, _, _ in VALID_SMARTHOST]
)
def test_valid_smarthost(lines: str, get: Callable[[Smarthost], object], value: object) -> None:
    assert get(smarthost(lines)) == value


@pytest.mark.parametrize(
    ("host", "stored"),
    [
        ("smtp.web.de", "smtp.web.de"),
        ("192.0.2.1", "192.0.2.1"),
        ("'::1'", "::1"),
        ("'[2001:db8::1]'", "2001:db8::1"),
    ],
)
def test_smarthost_host_forms(host: str, stored: str) -> None:
    assert loads(f"smarthosts:\n  - host: {host}\n", FILE).smarthosts[0].host == stored


# --- Every key, invalid: one line naming the file and the key path, with the fix ---

INVALID: list[tuple[str, str, str]] = [
    # (file text, key path, a fragment of the message)
    ("spool: var/spool/pymta", "spool", '"var/spool/pymta" is not an absolute path; write the full path'),
    ("spool: ~/spool", "spool", "(~ is not expanded)"),
    ("spool: 42", "spool", "must be an absolute path such as /var/spool/pymta, not 42"),
    ("spool: [a]", "spool", "not a list"),
    ('spool: "/a\\nb"', "spool", "on one line, without control characters"),
    ("hostname: bad_name", "hostname", '"bad_name" is not a domain name; write e.g. host.example.org'),
    ("hostname: -x.example", "hostname", "is not a domain name"),
    ("domain: 'a b'", "domain", "is not a domain name"),
    ("domain: true", "domain", "must be a domain name such as host.example.org, not true"),
    ("admin: Root <root@example.org>", "admin", "is not a plain address; write e.g. admin@example.org"),
    ("admin: a@b@example.org", "admin", "is not a plain address"),
    ("admin: '@example.org'", "admin", "is not a plain address"),
    ("admin: root@", "admin", "is not a plain address"),
    ("deliver: later", "deliver", 'must be one of immediate, queue, not "later"'),
    ("deliver: yes", "deliver", "must be one of immediate, queue, not true"),
    ("smarthosts: smtp.web.de", "smarthosts", 'must be a list of smarthosts, each starting with "- host:"'),
    ("smarthosts:\n  host: a.example", "smarthosts", "not a mapping"),
    ("smarthosts: [smtp.web.de]", "smarthosts[0]", "must be a mapping with host:"),
    (
        "smarthosts:\n  - port: 25",
        "smarthosts[0].host",
        "is missing; write the server's name, e.g. host: smtp.web.de",
    ),
    (
        "smarthosts:\n  - host: smtp.web.de:587",
        "smarthosts[0].host",
        "includes a port; write the name alone and the port under port:",
    ),
    ("smarthosts:\n  - host: 'smtp web.de'", "smarthosts[0].host", "is not a domain name"),
    (
        "smarthosts:\n  - host: a.example\n  - host: b.example\n    securty: tls",
        "smarthosts[1].securty",
        'unknown key; did you mean "security"?',
    ),
    (
        "smarthosts:\n  - host: a.example\n    port: abc",
        "smarthosts[0].port",
        'must be a whole number from 1 to 65535, not "abc"',
    ),
    (
        "smarthosts:\n  - host: a.example\n    port: '587'",
        "smarthosts[0].port",
        'not "587" (remove the quotes)',
    ),
    ("smarthosts:\n  - host: a.example\n    port: 0", "smarthosts[0].port", "from 1 to 65535, not 0"),
    ("smarthosts:\n  - host: a.example\n    port: 65536", "smarthosts[0].port", "not 65536"),
    ("smarthosts:\n  - host: a.example\n    port: 587.0", "smarthosts[0].port", "not 587.0"),
    ("smarthosts:\n  - host: a.example\n    port: true", "smarthosts[0].port", "not true"),
    (
        "smarthosts:\n  - host: a.example\n    security: ssl",
        "smarthosts[0].security",
        'must be one of starttls, tls, none, not "ssl"',
    ),
    ("smarthosts:\n  - host: a.example\n    security: off", "smarthosts[0].security", "not false"),
    ("smarthosts:\n  - host: a.example\n    username: ''", "smarthosts[0].username", "must be a user name"),
    (
        "smarthosts:\n  - host: a.example\n    password: {env: X}",
        "smarthosts[0].password",
        "is set but username is not; add username:",
    ),
    (
        "smarthosts:\n  - host: a.example\n    username: me\n    password: [a]",
        "smarthosts[0].password",
        "must name exactly one password source; write one of {keyring: pymta}",
    ),
    (
        "smarthosts:\n  - host: a.example\n    username: me\n    password: {}",
        "smarthosts[0].password",
        "exactly one password source",
    ),
    (
        "smarthosts:\n  - host: a.example\n    username: me\n    password: {env: A, file: /b}",
        "smarthosts[0].password",
        "exactly one password source",
    ),
    (
        "smarthosts:\n  - host: a.example\n    username: me\n    password: {keyrng: pymta}",
        "smarthosts[0].password.keyrng",
        'unknown password source; did you mean "keyring"?',
    ),
    (
        "smarthosts:\n  - host: a.example\n    username: me\n    password: {vault: x}",
        "smarthosts[0].password.vault",
        "unknown password source; write one of",
    ),
    (
        "smarthosts:\n  - host: a.example\n    username: me\n    password: {keyring: ''}",
        "smarthosts[0].password.keyring",
        "must be a keyring service name",
    ),
    (
        "smarthosts:\n  - host: a.example\n    username: me\n    password: {command: 5}",
        "smarthosts[0].password.command",
        "must be a shell command",
    ),
    (
        "smarthosts:\n  - host: a.example\n    username: me\n    password: {env: 'A-B'}",
        "smarthosts[0].password.env",
        '"A-B" is not an environment variable name',
    ),
    (
        "smarthosts:\n  - host: a.example\n    username: me\n    password: {file: x.secret}",
        "smarthosts[0].password.file",
        "is not an absolute path",
    ),
    (
        "smarthosts:\n  - host: a.example\n    ca_file: ca.pem",
        "smarthosts[0].ca_file",
        '"ca.pem" is not an absolute path',
    ),
    (
        "smarthosts:\n  - host: a.example\n    fingerprint: 'sha1:AB:CD'",
        "smarthosts[0].fingerprint",
        "is not a SHA-256 fingerprint; write sha256: and 32 hex pairs",
    ),
    (
        "smarthosts:\n  - host: a.example\n    fingerprint: 'sha256:AB:CD'",
        "smarthosts[0].fingerprint",
        "is not a SHA-256 fingerprint",
    ),
    (
        "smarthosts:\n  - host: a.example\n    fingerprint: 12",
        "smarthosts[0].fingerprint",
        "12 is not a SHA-256 fingerprint",
    ),
    (
        "smarthosts:\n  - host: a.example\n    auth_plaintext: maybe",
        "smarthosts[0].auth_plaintext",
        'must be true or false, not "maybe"',
    ),
    (
        "smarthosts:\n  - host: a.example\n    auth_plaintext: 1",
        "smarthosts[0].auth_plaintext",
        "must be true or false, not 1",
    ),
    (
        "smarthosts:\n  - host: a.example\n    timeout: soon",
        "smarthosts[0].timeout",
        '"soon" is not a duration; write e.g. 90s, 5m, 4h, 5d',
    ),
    (
        "smarthosts:\n  - host: a.example\n    timeout: 0",
        "smarthosts[0].timeout",
        "must be longer than 0 seconds, not 0",
    ),
    (
        "smarthosts:\n  - host: a.example\n    data_timeout: 0s",
        "smarthosts[0].data_timeout",
        'must be longer than 0 seconds, not "0s"',
    ),
    (
        "smarthosts:\n  - host: a.example\n    data_timeout: forever",
        "smarthosts[0].data_timeout",
        '"forever" is not a duration; write e.g. 90s, 5m, 4h, 5d',
    ),
    (
        "smarthosts:\n  - host: a.example\n    security: none\n    username: me",
        "smarthosts[0].security",
        "would send the password unencrypted; use starttls or tls, or add auth_plaintext: true",
    ),
    (
        "smarthosts:\n  - host: a.example\n    security: none\n    ca_file: /ca.pem",
        "smarthosts[0].security",
        "makes ca_file and fingerprint useless",
    ),
    ("retry: 5d", "retry", 'must be a mapping with schedule: and lifetime:, not "5d"'),
    (
        "retry:\n  lifetime: 5 days",
        "retry.lifetime",
        '"5 days" is not a duration; write e.g. 90s, 5m, 4h, 5d',
    ),
    ("retry:\n  lifetime: -1", "retry.lifetime", "must be longer than 0 seconds, not -1"),
    ("retry:\n  lifetime: .inf", "retry.lifetime", "inf is not a duration"),
    ("retry:\n  lifetime: 5M", "retry.lifetime", '"5M" is not a duration'),
    ("retry:\n  lifetime: [5d]", "retry.lifetime", "a list is not a duration"),
    ("retry:\n  lifetim: 5d", "retry.lifetim", 'unknown key; did you mean "lifetime"?'),
    (
        "retry:\n  schedule: []",
        "retry.schedule",
        "must be a list of durations such as [1m, 5m, 15m, 1h, 4h], not a list",
    ),
    (
        "retry:\n  schedule: 5m",
        "retry.schedule",
        'must be a list of durations such as [1m, 5m, 15m, 1h, 4h], not "5m"',
    ),
    ("retry:\n  schedule: [1m, 5x]", "retry.schedule[1]", '"5x" is not a duration'),
    (
        "max_message_size: 35 MiBs",
        "max_message_size",
        '"35 MiBs" is not a size; write e.g. 35M, 10k, or a number of bytes',
    ),
    ("max_message_size: 0", "max_message_size", "must be more than 0 bytes, not 0"),
    ("max_message_size: -5", "max_message_size", "must be more than 0 bytes, not -5"),
    ("max_message_size: 1.5", "max_message_size", "1.5 is not a size"),
    ("max_message_size: big", "max_message_size", '"big" is not a size'),
    ("smarthost:\n  - host: a.example", "smarthost", 'unknown key; did you mean "smarthosts"?'),
    ("spoool: /x", "spoool", 'unknown key; did you mean "spool"?'),
    ("lifetime: 5d", "lifetime", "unknown key here; it belongs under retry:"),
    ("port: 25", "port", "unknown key here; it belongs under smarthosts:"),
    (
        "colour: blue",
        "colour",
        "unknown key; the keys here are spool, hostname, domain, admin, deliver, smarthosts",
    ),
    ("1: x", "1", "unknown key"),
    ("2001-12-14: x", "2001-12-14", "unknown key"),
    ("retry:\n  ~: x", "retry.~", "unknown key"),
    ('"a\\nb": x', '"a\\nb"', "unknown key"),
]


@pytest.mark.parametrize(
    ("text", "key", "fragment"), INVALID, ids=[f"{key}:{text}" for text, key, _ in INVALID]
)
def test_invalid(text: str, key: str, fragment: str) -> None:
    message = error_of(text + "\n")
    assert "\n" not in message and "\r" not in message
    assert message.startswith(f"{FILE}: {key}: "), message
    assert fragment in message


# --- Passwords never in the config, never in a message, never in the output ---

SECRETS = ["hunter2", "correct horse battery staple", "p@ss: word", "123456", "s3cr3t!#"]


@pytest.mark.parametrize("secret", SECRETS)
@pytest.mark.parametrize("where", ["password: {}", "password: [{}]", "password: {{keyring: x, extra: {}}}"])
def test_literal_password_is_refused_and_never_shown(secret: str, where: str) -> None:
    value = where.format(yaml.safe_dump(secret, default_style='"').strip())
    message = error_of(f"smarthosts:\n  - host: a.example\n    username: me\n    {value}\n")
    assert secret not in message
    assert message.startswith(f"{FILE}: smarthosts[0].password")


def test_literal_password_message_gives_the_fix() -> None:
    message = error_of("smarthosts:\n  - host: a.example\n    username: me\n    password: hunter2\n")
    assert message == (
        f"{FILE}: smarthosts[0].password: a password cannot be written in the config file, which every user "
        "can read; store it with `pymta password set HOST` and write {keyring: pymta}, or put it in a file "
        "only pymta can read and write {file: PATH}"
    )


@given(st.text(st.characters(exclude_categories=("Cs",))))
def test_messages_do_not_depend_on_a_literal_password(secret: str) -> None:
    # Whatever the password, the message is the same: so it cannot contain it.
    def message(value: object) -> str:
        document = {"smarthosts": [{"host": "a.example", "username": "me", "password": value}]}
        return error_of(yaml.safe_dump(document))

    for shape in (lambda v: v, lambda v: [v], lambda v: {"keyring": "k", "extra": v}, lambda v: {"pw": v}):
        assert message(shape(secret)) == message(shape("marker"))


@pytest.mark.parametrize("typo", ["pasword", "passwd", "pass"])
def test_misspelt_password_key_does_not_show_the_value(typo: str) -> None:
    message = error_of(f"smarthosts:\n  - host: a.example\n    {typo}: hunter2\n")
    assert "hunter2" not in message and f"smarthosts[0].{typo}: unknown key" in message


def test_masked_output_shows_sources_never_secrets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret_file = tmp_path / "webde.secret"
    secret_file.write_text("file-secret-1\n")
    monkeypatch.setenv("SMTP_PASSWORD", "env-secret-2")
    text = (
        "smarthosts:\n"
        "  - {host: a.example, username: me, password: {keyring: pymta}}\n"
        "  - {host: b.example, username: me, password: {command: 'printf command-secret-3'}}\n"
        "  - {host: c.example, username: me, password: {env: SMTP_PASSWORD}}\n"
        f"  - {{host: d.example, username: me, password: {{file: {secret_file}}}}}\n"
    )
    loaded = loads(text, FILE)
    masked = loaded.masked()
    hosts = masked["smarthosts"]
    assert isinstance(hosts, list)
    assert [host["password"] for host in hosts] == [
        {"keyring": "pymta"},
        {"command": "printf command-secret-3"},  # the command is shown (the file is world-readable anyway)
        {"env": "SMTP_PASSWORD"},
        {"file": str(secret_file)},
    ]
    shown = render(loaded) + repr(loaded) + str(masked)
    assert "file-secret-1" not in shown and "env-secret-2" not in shown


# --- YAML syntax and shape ---


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "spool: /x\n\tdeliver: queue\n",
            "line 2, column 1: YAML syntax error: found character '\\t' that cannot start any token; "
            "indent with spaces, not tabs",
        ),
        (
            "spool: /x\n  deliver: queue\n",
            "line 2, column 10: YAML syntax error: mapping values are not allowed",
        ),
        ("retry: [1m, 5m\n", "YAML syntax error: expected ',' or ']', but got '<stream end>'"),
        ("spool: /a\nspool: /b\n", 'line 2: duplicate key "spool"; remove one of them'),
        ("smarthosts:\n  - host: a\n    port: 25\n    port: 26\n", 'line 4: duplicate key "port"'),
        (
            "spool: /x\n---\nspool: /y\n",
            "found another document (expected a single document in the stream on line 1); "
            "remove the second document",
        ),
    ],
)
def test_yaml_syntax_errors(text: str, expected: str) -> None:
    message = error_of(text)
    assert message.startswith(f"{FILE}: line ") and expected in message and "\n" not in message


def test_merge_keys_are_not_duplicates() -> None:
    text = "base: &b {host: a.example, port: 25}\nsmarthosts:\n  - <<: *b\n    port: 26\n"
    with pytest.raises(ConfigError, match=r"^/etc/pymta/pymta.yaml: base: unknown key"):
        loads(text, FILE)
    loaded = loads("smarthosts:\n  - &b {host: a.example, port: 25}\n  - <<: *b\n    port: 26\n", FILE)
    assert [host.port for host in loaded.smarthosts] == [25, 26]


@pytest.mark.parametrize(
    ("text", "kind"), [("- a\n- b\n", "a list"), ("just text\n", '"just text"'), ("5\n", "5")]
)
def test_top_level_must_be_a_mapping(text: str, kind: str) -> None:
    assert error_of(text) == (
        f"{FILE}: must be a mapping of keys to values (spool:, smarthosts:, ...) at the top level, not {kind}"
    )


# --- Durations and sizes ---


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("5m", 300),
        ("4h", 14400),
        ("5d", 432000),
        ("1w", 604800),
        ("1h30m", 5400),
        ("1d12h", 129600),
        ("0s", 0),
        ("90", 90),
        ("2.5", 2.5),
        ("1.5h", 5400),
        ("0.5s", 0.5),
        (" 5m ", 300),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert type(parse_duration(text)) is type(seconds)


@pytest.mark.parametrize("text", ["", "5 days", "5 m", "m", "5M", "5H", "-5m", "1e3", "5m30", "1..5s", "inf"])
def test_not_a_duration(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (30, "30s"),
        (60, "1m"),
        (90, "1m30s"),
        (3600, "1h"),
        (432000, "5d"),
        (604800, "1w"),
        (694861, "1w1d1h1m1s"),
        (0.5, "0.5s"),
        (1e-05, "0.00001s"),
        (90.25, "90.25s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("35M", 35_000_000),
        ("35MB", 35_000_000),
        ("35mb", 35_000_000),
        ("35 MB", 35_000_000),
        ("10k", 10_000),
        ("10K", 10_000),
        ("10kB", 10_000),
        ("1KiB", 1024),
        ("2MiB", 2 * 2**20),
        ("1GiB", 2**30),
        ("1G", 10**9),
        ("1.5M", 1_500_000),
        ("100", 100),
        ("100b", 100),
        ("0", 0),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "35 M B", "35MiBs", "-1", "35T", "1e6", "35  M"])
def test_not_a_size(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0"),
        (1, "1"),
        (999, "999"),
        (1000, "1k"),
        (1024, "1KiB"),
        (35_000_000, "35M"),
        (2**20, "1MiB"),
        (10**9, "1G"),
        (2**30, "1GiB"),
        (1_500_000, "1500k"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


@given(st.integers(min_value=0, max_value=10**9))
def test_duration_round_trip(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False))
def test_duration_round_trip_fractions(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.lists(st.tuples(st.integers(0, 1000), st.sampled_from(sorted(DURATION_UNITS))), min_size=1))
def test_duration_parts_add_up(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{count}{unit}" for count, unit in parts)
    assert parse_duration(text) == sum(count * DURATION_UNITS[unit] for count, unit in parts)


@given(st.integers(min_value=0, max_value=10**15))
def test_size_round_trip(size: int) -> None:
    assert parse_size(format_size(size)) == size


@given(st.integers(0, 10**6), st.sampled_from(sorted(SIZE_UNITS)), st.booleans())
def test_size_units(count: int, unit: str, upper: bool) -> None:
    text = f"{count}{unit.upper() if upper else unit}"
    assert parse_size(text) == count * SIZE_UNITS[unit]


# --- The hostname ---


def test_hostname_with_a_dot_needs_no_resolver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "uname", lambda: os.uname_result(("Linux", "box.example.org", "", "", "")))
    monkeypatch.setattr(socket, "getfqdn", lambda name="": pytest.fail("asked the resolver"))
    assert default_hostname() == "box.example.org"


def test_hostname_from_the_resolver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "uname", lambda: os.uname_result(("Linux", "box", "", "", "")))
    monkeypatch.setattr(socket, "getfqdn", lambda name="": f"{name}.example.net")
    assert default_hostname() == "box.example.net"
    assert Config(configured_domain="example.org").hostname == "box.example.net"


@pytest.mark.parametrize("answer", ["localhost", "localhost.localdomain", ""])
def test_hostname_falls_back_to_the_node_name(monkeypatch: pytest.MonkeyPatch, answer: str) -> None:
    monkeypatch.setattr(os, "uname", lambda: os.uname_result(("Linux", "box", "", "", "")))
    monkeypatch.setattr(socket, "getfqdn", lambda name="": answer)
    assert default_hostname() == "box"


def test_hostname_never_waits_for_a_dead_resolver(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    monkeypatch.setattr(os, "uname", lambda: os.uname_result(("Linux", "box", "", "", "")))
    monkeypatch.setattr(socket, "getfqdn", lambda name="": release.wait(10) and "late.example")
    monkeypatch.setattr("pymta.config.model.HOSTNAME_LOOKUP_TIMEOUT", 0.05)
    try:
        assert default_hostname() == "box"
    finally:
        release.set()


def test_loading_does_not_resolve_the_hostname(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pymta.config.model.default_hostname", lambda: pytest.fail("resolved the hostname"))
    loaded = loads(FULL, FILE)
    assert loaded.hostname == "host.example.org"
    loads("deliver: queue\n", FILE)


# --- Retry ---


def test_retry_delay_repeats_the_last_interval() -> None:
    retry = Retry((60, 300, 3600))
    assert [retry.delay_after(n) for n in (0, 1, 2, 3, 4, 10)] == [60, 60, 300, 3600, 3600, 3600]


# --- masked() is itself a valid config ---


def test_masked_reads_back_as_the_same_settings() -> None:
    loaded = loads(FULL, FILE)
    again = loads(yaml.safe_dump(loaded.masked()), FILE)
    assert again.masked() == loaded.masked()
    assert again.smarthosts == loaded.smarthosts and again.retry == loaded.retry


# --- pymta config check ---


def test_check_prints_effective_settings(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    result = CliRunner().invoke(config_group, ["check", "-C", path])
    assert result.exit_code == 0, result.output
    header, _, body = result.stdout.partition("\n")
    assert header == f"# {path}: valid; effective settings, defaults filled in, passwords masked"
    assert "password: {keyring: pymta}" in body and "schedule: [1m, 5m, 15m, 1h, 4h]" in body
    assert loads(body, "<output>").masked() == loads(FULL, FILE).masked()
    assert result.stderr == ""


def test_check_shows_each_smarthost_s_timeouts(tmp_path: Path) -> None:
    path = write(tmp_path, "smarthosts:\n  - host: a.example\n  - host: b.example\n    data_timeout: 15m\n")
    result = CliRunner().invoke(config_group, ["check", "-C", path])
    assert result.exit_code == 0, result.output
    hosts = yaml.safe_load(result.stdout)["smarthosts"]
    assert [(h["timeout"], h["data_timeout"]) for h in hosts] == [("30s", "10m"), ("30s", "15m")]


@no_system_config
def test_check_without_a_config() -> None:
    result = CliRunner().invoke(config_group, ["check"])
    assert result.exit_code == 0
    assert result.stdout.startswith("# no config file; using defaults\n# no smarthosts: ")
    assert yaml.safe_load(result.stdout)["deliver"] == "immediate"


def test_check_reads_pymta_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PYMTA_CONFIG", write(tmp_path, "deliver: queue\n"))
    result = CliRunner().invoke(config_group, ["check"])
    assert result.exit_code == 0 and "deliver: queue\n" in result.stdout


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "smarthosts:\n  - host: a.example\n    securty: tls\n",
            'smarthosts[0].securty: unknown key; did you mean "security"?',
        ),
        ("spool: [\n", "YAML syntax error"),
    ],
)
def test_check_invalid_config(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    result = CliRunner().invoke(config_group, ["check", "-C", path])
    assert result.exit_code == EX_CONFIG
    assert result.stdout == ""
    assert result.stderr.startswith(f"pymta: {path}: ") and message in result.stderr
    assert result.stderr.count("\n") == 1


def test_check_missing_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(config_group, ["check", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == EX_CONFIG
    missing = tmp_path / "nope.yaml"
    assert (
        result.stderr == f"pymta: {missing}: no such file; check the name given with -C or in $PYMTA_CONFIG\n"
    )


def test_check_help() -> None:
    result = CliRunner().invoke(config_group, ["check", "--help"])
    assert result.exit_code == 0
    assert "-C, --config FILE" in result.stdout and "78 (EX_CONFIG)" in result.stdout
    assert "Passwords are shown only as their source" in result.stdout


def installed_pymta() -> str | None:
    return shutil.which("pymta", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(installed_pymta() is None, reason="the pymta console script is not installed")
def test_check_through_the_console_script(tmp_path: Path) -> None:
    pymta = installed_pymta()
    assert pymta is not None
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    if subprocess.run([pymta, "config", "--help"], env=env, capture_output=True).returncode != 0:
        pytest.skip("`pymta config` is not registered in the pymta command yet")
    good = subprocess.run(
        [pymta, "config", "check", "-C", write(tmp_path, FULL)], env=env, capture_output=True, text=True
    )
    assert good.returncode == 0, good.stderr
    assert "host: smtp.web.de" in good.stdout
    bad = subprocess.run(
        [pymta, "config", "check", "-C", write(tmp_path, "deliver: later\n", "bad.yaml")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == EX_CONFIG
    assert (
        bad.stderr
        == f'pymta: {tmp_path / "bad.yaml"}: deliver: must be one of immediate, queue, not "later"\n'
    )


# --- The documentation covers every key ---


def test_man_page_documents_every_key() -> None:
    page = (ROOT / "man" / "pymta.yaml.5").read_text()
    for key in KEYS:
        name = key.rpartition(".")[2]
        assert f".B {name}" in page or f".BR {name}" in page or f"\\fB{name}\\fR" in page, key


def test_example_config_is_valid_and_shows_every_key() -> None:
    path = ROOT / "examples" / "pymta.yaml"
    loaded = load(str(path))
    assert loaded.smarthosts[0].host == "smtp.web.de"
    text = path.read_text()
    for key in KEYS:
        assert f"{key.rpartition('.')[2]}:" in text, key


# --- trusted_users and sender_policy (pymta.config.identity) ---


def test_sender_identity_defaults() -> None:
    assert Config().trusted_users == ("root",)
    assert Config().sender_policy == "warn"


def test_trusted_users_and_sender_policy_are_read() -> None:
    loaded = loads("trusted_users: [root, www-data, _cron-failure]\nsender_policy: strict\n", FILE)
    assert loaded.trusted_users == ("root", "www-data", "_cron-failure")
    assert loaded.sender_policy == "strict"
    assert loads("trusted_users: []\n", FILE).trusted_users == ()
    assert loads("trusted_users:\n", FILE).trusted_users == ("root",)  # empty: the default


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "trusted_users: root\n",
            'trusted_users: must be a list of login names such as [root, www-data], not "root"',
        ),
        ("trusted_users: [1000]\n", "trusted_users[0]: must be a login name, not 1000; quote a name"),
        ("trusted_users: [alice@example.org]\n", 'trusted_users[0]: "alice@example.org" is not a login name'),
        ("trusted_users: ['bob smith']\n", 'trusted_users[0]: "bob smith" is not a login name'),
        ("sender_policy: refuse\n", 'sender_policy: must be one of warn, strict, not "refuse"'),
        ("trusted_user: [root]\n", 'trusted_user: unknown key; did you mean "trusted_users"?'),
    ],
)
def test_sender_identity_keys_are_checked(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        loads(text, FILE)
    assert str(raised.value).startswith(f"{FILE}: {message}")


def test_sender_identity_keys_read_back_from_masked() -> None:
    loaded = loads("trusted_users: [root, www-data]\nsender_policy: strict\n", FILE)
    assert loaded.masked()["trusted_users"] == ["root", "www-data"]
    assert loads(yaml.safe_dump(loaded.masked()), FILE).masked() == loaded.masked()


def test_a_config_nested_thousands_deep_is_one_config_error() -> None:
    """Found by the torture suite's fuzzer: PyYAML's RecursionError escaped as a traceback."""
    with pytest.raises(ConfigError, match=r"^x\.yaml: is nested too deeply to read"):
        loads("spool: /tmp/spool\nbroken: " + "[" * 3000 + "\n", "x.yaml")
