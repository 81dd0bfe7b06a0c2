"""The configuration file: YAML in, a typed, validated, immutable `Config` out.

The file is parsed once into frozen dataclasses; nothing else in pymta reads YAML or looks at raw keys. Every
key is declared in a table (key, field, parser); an unknown key is an error with a did-you-mean, and every
error is one line that names the file, the key path (`smarthosts[0].port`), what is wrong and the fix.

The file must be readable by every user (`sendmail` reads the spool location from it), so it never holds a
password: passwords come from a source (keyring, command, environment variable or a private file) that
`pymta.delivery.credentials` resolves at delivery time. A `Config` holds only the reference to that source.

`sendmail` does not import this module (it reads a few keys with `pymta.config.paths`); the CLI and the
flusher do.
"""

import difflib
import functools
import ipaddress
import json
import math
import os
import re
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Any, Literal

import yaml

from pymta.config import paths as quickconfig
from pymta.errors import ConfigError

Deliver = Literal["immediate", "queue"]
Security = Literal["starttls", "tls", "none"]
AuthMechanism = Literal["auto", "plain", "login", "cram-md5", "xoauth2", "oauthbearer"]
PasswordKind = Literal["keyring", "command", "env", "file"]

DELIVER_CHOICES: tuple[Deliver, ...] = ("immediate", "queue")
SECURITY_CHOICES: tuple[Security, ...] = ("starttls", "tls", "none")
AUTH_CHOICES: tuple[AuthMechanism, ...] = ("auto", "plain", "login", "cram-md5", "xoauth2", "oauthbearer")
MailboxFormat = Literal["auto", "mbox", "maildir"]
MAILBOX_CHOICES: tuple[MailboxFormat, ...] = ("auto", "mbox", "maildir")
OriginalFrom = Literal["x-original-from", "reply-to", "none"]
ORIGINAL_FROM_CHOICES: tuple[OriginalFrom, ...] = ("x-original-from", "reply-to", "none")
PASSWORD_KINDS: tuple[PasswordKind, ...] = ("keyring", "command", "env", "file")
SenderPolicyChoice = Literal["warn", "strict"]
SENDER_POLICY_CHOICES: tuple[SenderPolicyChoice, ...] = ("warn", "strict")

# --- Defaults, each with the reason it is what it is. ---

# Mail should leave at once; the timer flush is the safety net, not the normal path.
DEFAULT_DELIVER: Deliver = "immediate"
# Port 587 with STARTTLS is the submission service every mail provider offers (RFC 6409).
DEFAULT_SECURITY: Security = "starttls"
# Each security mode's standard port: submission (RFC 6409), submissions (RFC 8314), relay (RFC 5321).
DEFAULT_PORTS: Mapping[Security, int] = {"starttls": 587, "tls": 465, "none": 25}
# Seconds per SMTP command: patient with a slow provider, short enough that a dead one does not stall a flush.
DEFAULT_SMTP_TIMEOUT = 30
# Seconds for the answer to the end of a message's text: RFC 5321 4.5.3.2.6 asks for 10 minutes, as a server
# may scan the message before it answers. Giving up sooner only makes the message go again: the server may
# have it by then, so each early give-up can be one more copy.
DEFAULT_DATA_TIMEOUT = 600
# Seconds between attempts: quick first retries get past greylisting, then back off; the last one repeats.
DEFAULT_RETRY_SCHEDULE: tuple[float, ...] = (60, 300, 900, 3600, 14400)
# Seconds before a message that still cannot be delivered bounces: RFC 5321 4.5.4.1 asks for 4-5 days.
DEFAULT_LIFETIME = 5 * 86400
# Seconds before the sender is told a message is still waiting: Postfix's delay_warning_time, turned on.
DEFAULT_WARN_AFTER = 4 * 3600
# Seconds a failed (bounced) message stays visible in `pymta queue --state failed` before the flush drops it.
DEFAULT_FAILED_RETENTION = 7 * 86400
# The aliases file most systems have; a missing one means no aliases.
DEFAULT_ALIASES = "/etc/aliases"
# Where mbox mailboxes live (mail, mutt and Python's mailbox agree on /var/mail/USER on Debian).
DEFAULT_MAIL_SPOOL = "/var/mail"
# A user's Maildir; ~ is the recipient's home directory.
DEFAULT_MAILDIR = "~/Maildir"
# Bytes: a 25 MB attachment (the most providers take) grows 37% in base64; the smarthost has the last word.
DEFAULT_MAX_MESSAGE_SIZE = 35_000_000
# Accounts that may set any envelope sender: root, as sendmail(8) trusts it. Others get a warning field.
DEFAULT_TRUSTED_USERS: tuple[str, ...] = ("root",)
# warn: mark a foreign sender with X-Authentication-Warning (sendmail's way), never lose the mail for it.
DEFAULT_SENDER_POLICY: SenderPolicyChoice = "warn"
# Messages one user may have in a system-mode queue: far more than cron and scripts ever leave waiting, far
# fewer than it takes a runaway loop to fill the disk the others share (a few GB at 35 MB each at most).
DEFAULT_MAX_QUEUED_PER_USER = 1000
# Seconds to wait for the resolver when naming this host: /etc/hosts answers at once, a dead DNS server never.
HOSTNAME_LOOKUP_TIMEOUT = 2.0

# --- Durations and sizes ---

DURATION_UNITS: Mapping[str, int] = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
SIZE_UNITS: Mapping[str, int] = {
    "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
}  # fmt: skip
# The units format_size writes, largest first; decimal before binary so 35000000 reads "35M".
_SIZE_DISPLAY: tuple[tuple[str, int], ...] = (
    ("G", 10**9), ("GiB", 2**30), ("M", 10**6), ("MiB", 2**20), ("k", 10**3), ("KiB", 2**10),
)  # fmt: skip

_NUMBER = r"[0-9]+(?:\.[0-9]+)?"
_DURATION_RE = re.compile(rf"(?:{_NUMBER}[{''.join(DURATION_UNITS)}])+")
_DURATION_PART_RE = re.compile(rf"({_NUMBER})([{''.join(DURATION_UNITS)}])")
_SIZE_RE = re.compile(rf"({_NUMBER}) ?([A-Za-z]*)")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEX_PAIR_RE = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){31}")
_HEX_RE = re.compile(r"[0-9A-Fa-f]{64}")


def _seconds(value: Fraction) -> float:
    """A whole number of seconds as int (how it reads back), anything else as float."""
    return int(value) if value.denominator == 1 else float(value)


def parse_duration(text: str) -> float:
    """Seconds in `text`: `90s`, `5m`, `4h`, `5d`, `1w`, combinations like `1h30m`, or a plain number.

    Raises ValueError when `text` is not a duration.
    """
    text = text.strip()
    if re.fullmatch(_NUMBER, text):
        return _seconds(Fraction(text))
    if not _DURATION_RE.fullmatch(text):
        raise ValueError(f"{text!r} is not a duration")
    total = sum(
        (Fraction(number) * DURATION_UNITS[unit] for number, unit in _DURATION_PART_RE.findall(text)),
        Fraction(0),
    )
    return _seconds(total)


def format_duration(seconds: float) -> str:
    """The shortest way to write `seconds` that `parse_duration` reads back exactly, e.g. `1h30m`."""
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds != int(seconds):
        # repr() is the shortest text that reads back as the same float; Decimal drops its exponent.
        return f"{format(Decimal(repr(float(seconds))), 'f')}s"
    whole = int(seconds)
    if whole == 0:
        return "0s"
    parts = []
    for unit, size in DURATION_UNITS.items():
        count, whole = divmod(whole, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def parse_size(text: str) -> int:
    """Bytes in `text`: `35M`, `35MB`, `10k`, `1.5G`, `64KiB` or a plain number (k, M, G are powers of 1000).

    Units are case-insensitive; a fraction of a byte is dropped. Raises ValueError when `text` is not a size.
    """
    match = _SIZE_RE.fullmatch(text.strip())
    if not match or match.group(2).lower() not in SIZE_UNITS.keys() | {""}:
        raise ValueError(f"{text!r} is not a size")
    number, unit = match.groups()
    return int(Fraction(number) * SIZE_UNITS.get(unit.lower(), 1))


def format_size(size: int) -> str:
    """`size` bytes in the largest unit that holds it exactly, e.g. `35M`; `parse_size` reads it back."""
    if size < 0:
        raise ValueError("a size cannot be negative")
    for unit, bytes_per_unit in _SIZE_DISPLAY:
        if size and size % bytes_per_unit == 0:
            return f"{size // bytes_per_unit}{unit}"
    return str(size)


# --- The hostname, found lazily and never waiting long ---


@functools.cache
def default_hostname() -> str:
    """This machine's fully qualified name (socket.getfqdn), else its node name.

    getfqdn may ask DNS, which can hang for many seconds when the network is down, so it runs in a
    thread that is abandoned after HOSTNAME_LOOKUP_TIMEOUT. Computed on first use and then remembered.
    """
    nodename = os.uname().nodename or "localhost"
    if "." in nodename:
        return nodename
    answer: list[str] = []
    lookup = threading.Thread(target=lambda: answer.append(socket.getfqdn(nodename)), daemon=True)
    lookup.start()
    lookup.join(HOSTNAME_LOOKUP_TIMEOUT)
    fqdn = answer[0] if answer else ""
    return fqdn if fqdn and not fqdn.startswith("localhost") else nodename


# --- The typed configuration ---


@dataclass(frozen=True, slots=True)
class PasswordSource:
    """Where a smarthost password comes from. The reference names the place; it is not the secret."""

    kind: PasswordKind
    reference: str  # the keyring service, the shell command, the variable name or the file path

    def masked(self) -> dict[str, str]:
        """The source as written in the config, e.g. `{"keyring": "pymta"}`; it holds no secret."""
        return {self.kind: self.reference}


@dataclass(frozen=True, slots=True)
class Rewrite:
    """Sender rewriting for mail from local senders (root, cron, daemons) sent through a smarthost, whose
    provider accepts only the account's own address (web.de, GMX, Gmail answer 554 otherwise)."""

    from_address: str  # the account's address, e.g. me@web.de
    envelope: bool = True  # rewrite the envelope sender (MAIL FROM)
    header: bool = True  # rewrite the From: header, keeping its display name
    original: OriginalFrom = "x-original-from"  # where the original From goes, if anywhere

    def masked(self) -> dict[str, object]:
        return {
            "from": self.from_address,
            "envelope": self.envelope,
            "header": self.header,
            "original": self.original,
        }


@dataclass(frozen=True, slots=True)
class Local:
    """Delivery to local mailboxes."""

    mailbox: MailboxFormat = "auto"  # auto: ~/Maildir when it exists, else mbox
    mail_spool: str = DEFAULT_MAIL_SPOOL  # mbox files are MAIL_SPOOL/USER
    maildir: str = DEFAULT_MAILDIR  # ~ is the recipient's home

    def masked(self) -> dict[str, object]:
        return {"mailbox": self.mailbox, "mail_spool": self.mail_spool, "maildir": self.maildir}


@dataclass(frozen=True, slots=True)
class Smarthost:
    """One server that takes our mail for relaying, and how to talk to it."""

    host: str
    port: int
    security: Security = DEFAULT_SECURITY
    username: str | None = None
    password: PasswordSource | None = None
    ca_file: str | None = None  # trust this CA file instead of the system store
    fingerprint: str | None = None  # normalised "sha256:AB:CD:..." pin of the server certificate
    auth_plaintext: bool = False  # allow AUTH without TLS (DESIGN invariant 8)
    timeout: float = DEFAULT_SMTP_TIMEOUT  # connect, greeting, each command's reply, each block of text sent
    data_timeout: float = DEFAULT_DATA_TIMEOUT  # the reply to the end of the message text
    # auto: the best mechanism both sides know; xoauth2/oauthbearer take an OAuth2 token from `password`
    auth: AuthMechanism = "auto"
    name: str | None = None  # what routes call it; default: its host
    rewrite: Rewrite | None = None  # sender rewriting for this smarthost; default: the top-level rewrite

    @property
    def label(self) -> str:
        """The name routes use for this smarthost: `name` when given, else the host."""
        return self.name or self.host

    @property
    def fingerprint_digest(self) -> bytes | None:
        """The pinned SHA-256 digest, to compare with `hashlib.sha256(der_certificate).digest()`."""
        if self.fingerprint is None:
            return None
        return bytes.fromhex(self.fingerprint.removeprefix("sha256:").replace(":", ""))

    def masked(self) -> dict[str, object]:
        return {
            "host": self.host,
            "port": self.port,
            "security": self.security,
            "username": self.username,
            "password": self.password.masked() if self.password else None,
            "ca_file": self.ca_file,
            "fingerprint": self.fingerprint,
            "auth_plaintext": self.auth_plaintext,
            "timeout": format_duration(self.timeout),
            "data_timeout": format_duration(self.data_timeout),
            "auth": self.auth,
            "name": self.name,
            "rewrite": self.rewrite.masked() if self.rewrite else None,
        }


@dataclass(frozen=True, slots=True)
class Retry:
    """When to try a deferred message again, and when to give up and bounce it."""

    schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE  # seconds to wait after the 1st, 2nd, ... attempt
    lifetime: float = DEFAULT_LIFETIME  # seconds from queueing until the message bounces
    warn_after: float | None = DEFAULT_WARN_AFTER  # seconds until a "still trying" notice; None: never

    def delay_after(self, attempts: int) -> float:
        """Seconds to wait after `attempts` failed attempts; past the schedule its last interval repeats."""
        return self.schedule[min(max(attempts, 1), len(self.schedule)) - 1]

    def masked(self) -> dict[str, object]:
        return {
            "schedule": [format_duration(s) for s in self.schedule],
            "lifetime": format_duration(self.lifetime),
            "warn_after": "never" if self.warn_after is None else format_duration(self.warn_after),
        }


@dataclass(frozen=True, slots=True)
class Route:
    """Mail from senders matching `sender` (a shell pattern, e.g. *@example.com) goes via one smarthost."""

    sender: str
    smarthost: str  # the smarthost's name (or host)
    # Sender rewriting for this route; default: the smarthost's, else the top-level one.
    rewrite: Rewrite | None = None

    def masked(self) -> dict[str, object]:
        return {
            "sender": self.sender,
            "smarthost": self.smarthost,
            "rewrite": self.rewrite.masked() if self.rewrite else None,
        }


@dataclass(frozen=True, slots=True)
class Config:
    """pymta's effective settings. `Config()` is the configuration used when there is no file."""

    spool: str = field(default_factory=quickconfig.default_spool)
    source: str | None = None  # the file this came from; None when defaults apply
    configured_hostname: str | None = None  # as written; read `hostname` for the effective name
    configured_domain: str | None = None  # as written; read `domain` for the effective domain
    admin: str | None = None
    deliver: Deliver = DEFAULT_DELIVER
    smarthosts: tuple[Smarthost, ...] = ()
    routes: tuple[Route, ...] = ()
    retry: Retry = field(default_factory=Retry)
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    failed_retention: float = DEFAULT_FAILED_RETENTION
    local_domains: tuple[str, ...] = ()  # domains whose mail is delivered here (besides localhost, hostname)
    aliases: str = DEFAULT_ALIASES
    local: Local = field(default_factory=Local)
    rewrite: Rewrite | None = None
    trusted_users: tuple[str, ...] = DEFAULT_TRUSTED_USERS  # login names that may set any envelope sender
    sender_policy: SenderPolicyChoice = DEFAULT_SENDER_POLICY  # what an untrusted foreign sender gets
    # messages a user other than root may have queued (system mode); None: no limit
    max_queued_per_user: int | None = DEFAULT_MAX_QUEUED_PER_USER

    @property
    def hostname(self) -> str:
        """How we name ourselves (HELO, Message-ID): as configured, else this machine's FQDN."""
        return self.configured_hostname or default_hostname()

    @property
    def domain(self) -> str:
        """The domain that qualifies bare local parts: as configured, else the hostname."""
        return self.configured_domain or self.hostname

    def masked(self) -> dict[str, object]:
        """The effective settings as plain data in the file's own format; a password shows only its source."""
        return {
            "spool": self.spool,
            "hostname": self.hostname,
            "domain": self.domain,
            "admin": self.admin,
            "deliver": self.deliver,
            "smarthosts": [host.masked() for host in self.smarthosts],
            "routes": [route.masked() for route in self.routes],
            "retry": self.retry.masked(),
            "max_message_size": format_size(self.max_message_size),
            "failed_retention": format_duration(self.failed_retention),
            "local_domains": list(self.local_domains),
            "aliases": self.aliases,
            "local": self.local.masked(),
            "rewrite": self.rewrite.masked() if self.rewrite else None,
            "trusted_users": list(self.trusted_users),
            "sender_policy": self.sender_policy,
            "max_queued_per_user": "none" if self.max_queued_per_user is None else self.max_queued_per_user,
        }


# --- Reading and validating ---


@dataclass(frozen=True, slots=True)
class _Where:
    """A place in the config file, for error messages: the file and the key path."""

    source: str
    path: str = ""

    def key(self, name: object) -> "_Where":
        if isinstance(name, str):
            text = name if name.isprintable() and " " not in name else json.dumps(name, ensure_ascii=False)
        else:
            text = "~" if name is None else str(name)  # a null, number or date as key
        return _Where(self.source, f"{self.path}.{text}" if self.path else text)

    def index(self, number: int) -> "_Where":
        return _Where(self.source, f"{self.path}[{number}]")

    def fail(self, problem: str) -> ConfigError:
        message = f"{self.source}: {self.path}: {problem}" if self.path else f"{self.source}: {problem}"
        return ConfigError(message.replace("\r", "\\r").replace("\n", "\\n"))


Parser = Callable[[object, _Where], Any]


@dataclass(frozen=True, slots=True)
class _Key:
    """One config key: the dataclass field it fills, how its value is read, and whether it must be given."""

    field: str
    parse: Parser
    required: str = ""  # when non-empty, the key must be given and this says how


def _show(value: object) -> str:
    """A value for an error message, on one line. Never used for a password."""
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return json.dumps(str(value), ensure_ascii=False) if not isinstance(value, int | float) else str(value)


def _text(value: object, where: _Where, what: str = "a line of text") -> str:
    if not isinstance(value, str) or not value.strip():
        raise where.fail(f"must be {what}, not {_show(value)}")
    if not value.isprintable():
        raise where.fail(f"must be {what} on one line, without control characters")
    return value


def _absolute_path(value: object, where: _Where) -> str:
    path = _text(value, where, "an absolute path such as /var/spool/pymta")
    if not os.path.isabs(path):
        raise where.fail(
            f"{_show(path)} is not an absolute path; write the full path starting with / (~ is not expanded)"
        )
    return path


def _domain_name(value: object, where: _Where) -> str:
    name = _text(value, where, "a domain name such as host.example.org")
    if not _HOSTNAME_RE.fullmatch(name):
        raise where.fail(
            f"{_show(name)} is not a domain name; write e.g. host.example.org (letters, digits, - and .)"
        )
    return name


def _server(value: object, where: _Where) -> str:
    name = value if isinstance(value, str) else ""
    try:
        return str(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        pass
    if ":" in name and name.rpartition(":")[2].isdigit():
        raise where.fail(f"{_show(name)} includes a port; write the name alone and the port under port:")
    return _domain_name(value, where)


def _address(value: object, where: _Where) -> str:
    address = _text(value, where, "an address such as admin@example.org")
    local, at, domain = address.rpartition("@") if "@" in address else (address, "", "")
    if (
        (at and not local)
        or any(c.isspace() or c in '<>(),;:"[]\\@' for c in local)
        or (at and not _HOSTNAME_RE.fullmatch(domain))
    ):
        raise where.fail(
            f"{_show(address)} is not a plain address; write e.g. admin@example.org (no name or <>)"
        )
    return address


def _choice(*choices: str) -> Parser:
    def parse(value: object, where: _Where) -> str:
        if value not in choices:
            raise where.fail(f"must be one of {', '.join(choices)}, not {_show(value)}")
        return str(value)

    return parse


def _boolean(value: object, where: _Where) -> bool:
    if not isinstance(value, bool):
        raise where.fail(f"must be true or false, not {_show(value)}")
    return value


def _port(value: object, where: _Where) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        hint = " (remove the quotes)" if isinstance(value, str) and value.strip().isdigit() else ""
        raise where.fail(f"must be a whole number from 1 to 65535, not {_show(value)}{hint}")
    return value


def _duration(value: object, where: _Where) -> float:
    problem = f"{_show(value)} is not a duration; write e.g. 90s, 5m, 4h, 5d"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise where.fail(problem)
    try:
        seconds = parse_duration(value) if isinstance(value, str) else value
    except ValueError:
        raise where.fail(problem) from None
    if not math.isfinite(seconds):
        raise where.fail(problem)
    if not seconds > 0:
        raise where.fail(f"must be longer than 0 seconds, not {_show(value)}")
    return seconds


def _size(value: object, where: _Where) -> int:
    problem = f"{_show(value)} is not a size; write e.g. 35M, 10k, or a number of bytes"
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise where.fail(problem)
    try:
        size = parse_size(value) if isinstance(value, str) else value
    except ValueError:
        raise where.fail(problem) from None
    if size <= 0:
        raise where.fail(f"must be more than 0 bytes, not {_show(value)}")
    return size


def _queue_limit(value: object, where: _Where) -> int | None:
    if value == "none":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        hint = " (remove the quotes)" if isinstance(value, str) and value.strip().isdigit() else ""
        raise where.fail(
            f"must be a whole number of messages, at least 1, or none for no limit, not {_show(value)}{hint}"
        )
    return value


def _fingerprint(value: object, where: _Where) -> str:
    text = value.strip() if isinstance(value, str) else ""
    if text[:7].lower() == "sha256:":
        text = text[7:]
    if not (_HEX_PAIR_RE.fullmatch(text) or _HEX_RE.fullmatch(text)):
        raise where.fail(
            f"{_show(value)} is not a SHA-256 fingerprint; write sha256: and 32 hex pairs (AB:CD:...) "
            "or 64 hex digits, as `openssl x509 -noout -fingerprint -sha256` prints"
        )
    digits = text.replace(":", "").upper()
    return "sha256:" + ":".join(digits[i : i + 2] for i in range(0, 64, 2))


def _schedule(value: object, where: _Where) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise where.fail(f"must be a list of durations such as [1m, 5m, 15m, 1h, 4h], not {_show(value)}")
    return tuple(_duration(item, where.index(number)) for number, item in enumerate(value))


_PASSWORD_REFERENCES: Mapping[PasswordKind, Parser] = {
    "keyring": lambda value, where: _text(value, where, "a keyring service name such as pymta"),
    "command": lambda value, where: _text(value, where, 'a shell command such as "pass show web.de"'),
    "env": lambda value, where: _env_name(value, where),
    "file": _absolute_path,
}
_PASSWORD_FIX = (
    'write one of {keyring: pymta}, {command: "pass show web.de"}, {env: VARIABLE}, '
    "{file: /etc/pymta/NAME.secret}"
)


def _env_name(value: object, where: _Where) -> str:
    name = _text(value, where, "an environment variable name")
    if not _ENV_NAME_RE.fullmatch(name):
        raise where.fail(f"{_show(name)} is not an environment variable name; use letters, digits and _")
    return name


def _password(value: object, where: _Where) -> PasswordSource:
    # The value may be the password itself: it never appears in a message.
    if isinstance(value, str | int | float):
        raise where.fail(
            "a password cannot be written in the config file, which every user can read; store it with "
            "`pymta password set HOST` and write {keyring: pymta}, or put it in a file only pymta can read "
            "and write {file: PATH}"
        )
    if not isinstance(value, dict) or len(value) != 1:
        raise where.fail(f"must name exactly one password source; {_PASSWORD_FIX}")
    ((kind, reference),) = value.items()
    if kind not in _PASSWORD_REFERENCES:
        close = difflib.get_close_matches(str(kind), PASSWORD_KINDS, n=1)
        hint = f'did you mean "{close[0]}"?' if close else _PASSWORD_FIX
        raise where.key(kind).fail(f"unknown password source; {hint}")
    return PasswordSource(kind, _PASSWORD_REFERENCES[kind](reference, where.key(kind)))


def _section(keys: Mapping[str, _Key], value: object, where: _Where, what: str) -> dict[str, Any]:
    """The fields given in one mapping, checked against its key table; absent or empty: default."""
    if not isinstance(value, dict):
        raise where.fail(f"must be {what}, not {_show(value)}")
    fields: dict[str, Any] = {}
    for key, item in value.items():
        spec = keys.get(key) if isinstance(key, str) else None
        if spec is None:
            raise where.key(key).fail(_unknown_key(key, keys))
        if item is not None:
            fields[spec.field] = spec.parse(item, where.key(key))
    for key, spec in keys.items():
        if spec.required and spec.field not in fields:
            raise where.key(key).fail(f"is missing; {spec.required}")
    return fields


def _unknown_key(key: object, keys: Mapping[str, _Key]) -> str:
    close = difflib.get_close_matches(key, list(keys), n=1) if isinstance(key, str) else []
    if close:
        return f'unknown key; did you mean "{close[0]}"?'
    home = next((name for name, table in _NESTED.items() if key in table and table is not keys), None)
    if home:
        return f"unknown key here; it belongs under {home}:"
    return f"unknown key; the keys here are {', '.join(keys)}"


def _smarthost(value: object, where: _Where) -> Smarthost:
    fields = _section(_SMARTHOST_KEYS, value, where, "a mapping with host: and the other smarthost keys")
    fields.setdefault("port", DEFAULT_PORTS[fields.get("security", DEFAULT_SECURITY)])
    host = Smarthost(**fields)
    if host.password and not host.username:
        raise where.key("password").fail("is set but username is not; add username: (usually your address)")
    if host.security == "none" and host.username and not host.auth_plaintext:
        raise where.key("security").fail(
            '"none" would send the password unencrypted; use starttls or tls, or add auth_plaintext: true '
            "if the network to this host is trusted"
        )
    if host.security == "none" and (host.ca_file or host.fingerprint):
        raise where.key("security").fail('"none" makes ca_file and fingerprint useless; use starttls or tls')
    return host


def _smarthosts(value: object, where: _Where) -> tuple[Smarthost, ...]:
    if not isinstance(value, list):
        raise where.fail(f'must be a list of smarthosts, each starting with "- host:", not {_show(value)}')
    return tuple(_smarthost(item, where.index(number)) for number, item in enumerate(value))


def _route(value: object, where: _Where) -> Route:
    return Route(**_section(_ROUTE_KEYS, value, where, "a mapping with sender: and smarthost:"))


def _routes(value: object, where: _Where) -> tuple[Route, ...]:
    if not isinstance(value, list):
        raise where.fail(f'must be a list of routes, each starting with "- sender:", not {_show(value)}')
    return tuple(_route(item, where.index(number)) for number, item in enumerate(value))


def _warn_after(value: object, where: _Where) -> float | None:
    return None if value == "never" or value is False else _duration(value, where)


def _domains(value: object, where: _Where) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise where.fail(f"must be a list of domain names such as [example.org], not {_show(value)}")
    return tuple(_domain_name(item, where.index(number)).lower() for number, item in enumerate(value))


def _login_names(value: object, where: _Where) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise where.fail(f"must be a list of login names such as [root, www-data], not {_show(value)}")
    names = []
    for number, item in enumerate(value):
        at = where.index(number)
        if not isinstance(item, str):
            raise at.fail(f"must be a login name, not {_show(item)}; quote a name that YAML reads otherwise")
        name = _text(item, at, "a login name such as www-data")
        if any(char.isspace() or char in ":@," for char in name):
            raise at.fail(f"{_show(name)} is not a login name; write the bare name, e.g. www-data")
        names.append(name)
    return tuple(names)


def _local(value: object, where: _Where) -> Local:
    return Local(**_section(_LOCAL_KEYS, value, where, "a mapping with mailbox:, mail_spool: and maildir:"))


def _home_path(value: object, where: _Where) -> str:
    path = _text(value, where, "a path such as ~/Maildir")
    if not (path.startswith("~/") or os.path.isabs(path)):
        raise where.fail(f"{_show(path)} must be absolute or start with ~/ (the recipient's home)")
    return path


def _rewrite(value: object, where: _Where) -> Rewrite:
    fields = _section(_REWRITE_KEYS, value, where, "a mapping with from: and, if wanted, envelope:, header:")
    return Rewrite(**fields)


def _retry(value: object, where: _Where) -> Retry:
    return Retry(**_section(_RETRY_KEYS, value, where, "a mapping with schedule: and lifetime:"))


_SMARTHOST_KEYS: Mapping[str, _Key] = {
    "host": _Key("host", _server, required="write the server's name, e.g. host: smtp.web.de"),
    "port": _Key("port", _port),
    "security": _Key("security", _choice(*SECURITY_CHOICES)),
    "username": _Key("username", lambda value, where: _text(value, where, "a user name")),
    "password": _Key("password", _password),
    "ca_file": _Key("ca_file", _absolute_path),
    "fingerprint": _Key("fingerprint", _fingerprint),
    "auth_plaintext": _Key("auth_plaintext", _boolean),
    "timeout": _Key("timeout", _duration),
    "data_timeout": _Key("data_timeout", _duration),
    "auth": _Key("auth", _choice(*AUTH_CHOICES)),
    "name": _Key("name", lambda value, where: _text(value, where, "a short name for routes")),
    "rewrite": _Key("rewrite", _rewrite),
}
_REWRITE_KEYS: Mapping[str, _Key] = {
    "from": _Key("from_address", _address, required="write the account's address, e.g. from: me@web.de"),
    "envelope": _Key("envelope", _boolean),
    "header": _Key("header", _boolean),
    "original": _Key("original", _choice(*ORIGINAL_FROM_CHOICES)),
}
_LOCAL_KEYS: Mapping[str, _Key] = {
    "mailbox": _Key("mailbox", _choice(*MAILBOX_CHOICES)),
    "mail_spool": _Key("mail_spool", _absolute_path),
    "maildir": _Key("maildir", _home_path),
}
_ROUTE_KEYS: Mapping[str, _Key] = {
    "sender": _Key(
        "sender",
        lambda value, where: _text(value, where, "a sender pattern"),
        required='write a sender pattern, e.g. sender: "*@example.com"',
    ),
    "smarthost": _Key(
        "smarthost",
        lambda value, where: _text(value, where, "a smarthost name"),
        required="name one of the smarthosts (its name: or host:)",
    ),
    "rewrite": _Key("rewrite", _rewrite),
}
_RETRY_KEYS: Mapping[str, _Key] = {
    "schedule": _Key("schedule", _schedule),
    "lifetime": _Key("lifetime", _duration),
    "warn_after": _Key("warn_after", _warn_after),
}
_TOP_KEYS: Mapping[str, _Key] = {
    "spool": _Key("spool", _absolute_path),
    "hostname": _Key("configured_hostname", _domain_name),
    "domain": _Key("configured_domain", _domain_name),
    "admin": _Key("admin", _address),
    "deliver": _Key("deliver", _choice(*DELIVER_CHOICES)),
    "smarthosts": _Key("smarthosts", _smarthosts),
    "routes": _Key("routes", _routes),
    "retry": _Key("retry", _retry),
    "max_message_size": _Key("max_message_size", _size),
    "failed_retention": _Key("failed_retention", _duration),
    "local_domains": _Key("local_domains", _domains),
    "aliases": _Key("aliases", _absolute_path),
    "local": _Key("local", _local),
    "rewrite": _Key("rewrite", _rewrite),
    "trusted_users": _Key("trusted_users", _login_names),
    "sender_policy": _Key("sender_policy", _choice(*SENDER_POLICY_CHOICES)),
    "max_queued_per_user": _Key("max_queued_per_user", _queue_limit),
}
# Where a misplaced key belongs, for "unknown key here; it belongs under retry:".
_NESTED: Mapping[str, Mapping[str, _Key]] = {
    "smarthosts": _SMARTHOST_KEYS,
    "routes": _ROUTE_KEYS,
    "retry": _RETRY_KEYS,
    "local": _LOCAL_KEYS,
    "rewrite": _REWRITE_KEYS,
}

# Every key of the file by its path, for documentation tests and tools.
KEYS: tuple[str, ...] = (
    *_TOP_KEYS,
    *(f"smarthosts[].{key}" for key in _SMARTHOST_KEYS),
    *(f"routes[].{key}" for key in _ROUTE_KEYS),
    *(f"retry.{key}" for key in _RETRY_KEYS),
    *(f"local.{key}" for key in _LOCAL_KEYS),
    *(f"rewrite.{key}" for key in _REWRITE_KEYS),
)


def parse(document: object, source: str) -> Config:
    """The Config for an already loaded YAML document (None: an empty file) from the file `source`."""
    where = _Where(source)
    if document is None:
        return Config(source=source)
    fields = _section(
        _TOP_KEYS, document, where, "a mapping of keys to values (spool:, smarthosts:, ...) at the top level"
    )
    config = Config(source=source, **fields)
    labels = [host.label for host in config.smarthosts]
    for number, route in enumerate(config.routes):
        at = where.key("routes").index(number).key("smarthost")
        if route.smarthost not in labels:
            close = difflib.get_close_matches(route.smarthost, labels, n=1)
            known = ", ".join(labels) or "none"
            hint = f'did you mean "{close[0]}"?' if close else f"the smarthosts are: {known}"
            raise at.fail(f"{_show(route.smarthost)} is not a smarthost's name or host; {hint}")
        if labels.count(route.smarthost) > 1:
            raise at.fail(
                f"{_show(route.smarthost)} names more than one smarthost; give each a different name:"
            )
    return config


# --- YAML ---

# A fix for the commonest YAML mistakes, by a fragment of PyYAML's problem text.
_SYNTAX_FIXES: tuple[tuple[str, str], ...] = (
    ("'\\t'", "indent with spaces, not tabs"),
    ("mapping values are not allowed", 'check the indentation, and quote values that contain ": "'),
    ("expected <block end>", "check that keys at the same level line up"),
    ("could not find expected ':'", 'write "key: value", with a space after the colon'),
    ("found unexpected end of stream", "close the quote or bracket that is still open"),
    ("expected a single document", "remove the second document (the line with --- or ...)"),
)


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice is an error rather than the last one winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_show(key)}; remove one of them", key_node.start_mark
                )
            seen.add(key if isinstance(key, str | int | float | bool) else id(key))
        return super().construct_mapping(node, deep=deep)


def _yaml_error(error: yaml.YAMLError, source: str) -> ConfigError:
    return _Where(source).fail(yaml_problem(error))


def yaml_problem(error: yaml.YAMLError) -> str:
    """What is wrong with a file PyYAML cannot read, in one line: where, what, and the likely fix."""
    if not isinstance(error, yaml.MarkedYAMLError) or error.problem_mark is None:
        return f"is not valid YAML: {' '.join(str(error).split())}"
    mark = error.problem_mark
    problem = " ".join((error.problem or "").split())
    if problem.startswith("duplicate key"):
        return f"line {mark.line + 1}: {problem}"
    said = f"{problem} {error.context or ''}"
    fix = next(
        (fix for fragment, fix in _SYNTAX_FIXES if fragment in said), "check the indentation and quoting"
    )
    context = (
        f" ({error.context} on line {error.context_mark.line + 1})"
        if error.context and error.context_mark
        else ""
    )
    return f"line {mark.line + 1}, column {mark.column + 1}: YAML syntax error: {problem}{context}; {fix}"


def loads(text: str | bytes, source: str = "<string>") -> Config:
    """The Config in YAML `text`, naming `source` in errors."""
    try:
        document = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as error:
        raise _yaml_error(error, source) from None
    except RecursionError:  # PyYAML recurses once per level of nesting: `[[[[...` a few thousand deep
        raise _Where(source).fail(
            "is nested too deeply to read (lists or mappings inside each other thousands of times); "
            "no pymta setting nests more than a few levels"
        ) from None
    return parse(document, source)


# What to do about a file that cannot be read, by the kind of failure.
_READ_FIXES: tuple[tuple[type[OSError], str], ...] = (
    (FileNotFoundError, "no such file; check the name given with -C or in $PYMTA_CONFIG"),
    (PermissionError, "cannot be read (permission denied); make it readable by every user, e.g. "
     "chmod 644 {path}: sendmail reads it, so it holds no passwords"),
    (IsADirectoryError, "is a directory; name the config file inside it, e.g. {path}/pymta.yaml"),
)  # fmt: skip


def load(path: str | None = None) -> Config:
    """The Config from `path`, else the first file in the search order (`quickconfig.find_config`).

    No file anywhere is valid and gives the defaults; a file named with `-C` or $PYMTA_CONFIG that does not
    exist is an error. Raises ConfigError with a one-line message naming the file, the key and the fix.
    """
    found = quickconfig.find_config(path)
    if found is None:
        return Config()
    try:
        with open(found, "rb") as handle:
            data = handle.read()
    except OSError as error:
        fix = next((fix for kind, fix in _READ_FIXES if isinstance(error, kind)), "")
        problem = fix.format(path=found) if fix else f"cannot be read: {error.strerror or error}"
        raise _Where(found).fail(problem) from None
    return loads(data, found)


__all__ = [
    "Config",
    "DEFAULT_DELIVER",
    "DEFAULT_LIFETIME",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_QUEUED_PER_USER",
    "DEFAULT_PORTS",
    "DEFAULT_RETRY_SCHEDULE",
    "DEFAULT_SECURITY",
    "DEFAULT_SENDER_POLICY",
    "DEFAULT_SMTP_TIMEOUT",
    "DEFAULT_TRUSTED_USERS",
    "KEYS",
    "PasswordSource",
    "Retry",
    "Smarthost",
    "default_hostname",
    "format_duration",
    "format_size",
    "load",
    "loads",
    "parse",
    "parse_duration",
    "parse_size",
]
