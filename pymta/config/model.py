"""The configuration as pymta uses it: frozen records, the defaults with their reasons, durations.

A `Config` is immutable and valid by construction: `pymta.config.load` builds it from the YAML file and is the
only reader of raw keys. `Config()` is the configuration when there is no file. The size limits are in
`pymta.config.limits`, shared with the YAML-free reader `sendmail` uses (ARCHITECTURE.md).
"""

from __future__ import annotations

import functools
import os
import re
import socket
import threading
from collections.abc import Mapping

from pymta.config.limits import DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_MAX_QUEUED_PER_USER, format_size
from pymta.config.paths import default_spool
from pymta.mail.idn import domain_key
from pymta.records import field, record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from fractions import Fraction
    from typing import Literal

    Deliver = Literal["immediate", "queue"]
    Security = Literal["starttls", "tls", "none"]
    AuthMechanism = Literal["auto", "plain", "login", "cram-md5", "xoauth2", "oauthbearer"]
    PasswordKind = Literal["keyring", "command", "env", "file"]
    MailboxFormat = Literal["auto", "mbox", "maildir"]
    OriginalFrom = Literal["x-original-from", "reply-to", "none"]
    SenderPolicyChoice = Literal["warn", "strict"]
    MxTls = Literal["opportunistic", "verify"]


DELIVER_CHOICES: tuple[Deliver, ...] = ("immediate", "queue")
SECURITY_CHOICES: tuple[Security, ...] = ("starttls", "tls", "none")
AUTH_CHOICES: tuple[AuthMechanism, ...] = ("auto", "plain", "login", "cram-md5", "xoauth2", "oauthbearer")
MAILBOX_CHOICES: tuple[MailboxFormat, ...] = ("auto", "mbox", "maildir")
ORIGINAL_FROM_CHOICES: tuple[OriginalFrom, ...] = ("x-original-from", "reply-to", "none")
PASSWORD_KINDS: tuple[PasswordKind, ...] = ("keyring", "command", "env", "file")
SENDER_POLICY_CHOICES: tuple[SenderPolicyChoice, ...] = ("warn", "strict")
MX_TLS_CHOICES: tuple[MxTls, ...] = ("opportunistic", "verify")
# The smarthost name a route gives to send its mail to the recipients' MX hosts (issue 15); no smarthost
# may be called this.
DIRECT = "direct"

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
# Accounts that may set any envelope sender: root, as sendmail(8) trusts it. Others get a warning field.
DEFAULT_TRUSTED_USERS: tuple[str, ...] = ("root",)
# warn: mark a foreign sender with X-Authentication-Warning (sendmail's way), never lose the mail for it.
DEFAULT_SENDER_POLICY: SenderPolicyChoice = "warn"
# Direct delivery (issue 15). Port 25 is where MX hosts take mail from other MTAs (RFC 5321 2.3.5).
DEFAULT_MX_PORT = 25
# Opportunistic STARTTLS is what MTAs do between MX hosts: most offer it, few have a certificate for the
# name their MX record gives, and refusing them would stop the mail (RFC 3207 4.1, RFC 7435).
DEFAULT_MX_TLS: MxTls = "opportunistic"
# Seconds per SMTP command with an MX host: RFC 5321 4.5.3.2 asks a client to wait 5 minutes for the
# greeting, MAIL and RCPT; a receiving MTA may be slow on purpose (tarpitting) and must not be given up.
DEFAULT_MX_TIMEOUT = 300
# Seconds a DNS lookup may take, retries over the servers included; a slow one defers the domain.
DEFAULT_DNS_TIMEOUT = 10
DEFAULT_DNS_PORT = 53
# MTA-STS (RFC 8461) is applied wherever mail goes to MX hosts, unless switched off: a domain that publishes
# a policy asks for verified TLS to named MX hosts, and without it an attacker on the path can strip
# STARTTLS or answer for the MX. It costs one TXT lookup per domain and run, and one HTTPS fetch per
# policy and max_age (the cache in SPOOL/mta-sts); a domain without a record costs only the lookup.
DEFAULT_MTA_STS = True
DEFAULT_MTA_STS_PORT = 443
# Seconds to wait for the resolver when naming this host: /etc/hosts answers at once, a dead DNS server never.
HOSTNAME_LOOKUP_TIMEOUT = 2.0

# --- Durations ---

DURATION_UNITS: Mapping[str, int] = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
_NUMBER = r"[0-9]+(?:\.[0-9]+)?"
_DURATION_RE = re.compile(rf"(?:{_NUMBER}[{''.join(DURATION_UNITS)}])+")
_DURATION_PART_RE = re.compile(rf"({_NUMBER})([{''.join(DURATION_UNITS)}])")


def _seconds(value: Fraction | int) -> float:
    """A whole number of seconds as int (how it reads back), anything else as float."""
    return int(value) if value.denominator == 1 else float(value)


def _exact(number: str) -> Fraction | int:
    """`number` (`_NUMBER`) exactly: an int, or a Fraction when it has a decimal point (1.5h is 5400s, not
    5399.999...). `fractions` is imported only then: the flush reads the config on every run."""
    if "." not in number:
        return int(number)
    from fractions import Fraction

    return Fraction(number)


def parse_duration(text: str) -> float:
    """Seconds in `text`: `90s`, `5m`, `4h`, `5d`, `1w`, combinations like `1h30m`, or a plain number.

    Raises ValueError when `text` is not a duration.
    """
    text = text.strip()
    if re.fullmatch(_NUMBER, text):
        return _seconds(_exact(text))
    if not _DURATION_RE.fullmatch(text):
        raise ValueError(f"{text!r} is not a duration")
    total = sum(_exact(number) * DURATION_UNITS[unit] for number, unit in _DURATION_PART_RE.findall(text))
    return _seconds(total)


def format_duration(seconds: float) -> str:
    """The shortest way to write `seconds` that `parse_duration` reads back exactly, e.g. `1h30m`."""
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds != int(seconds):
        # repr() is the shortest text that reads back as the same float; Decimal drops its exponent.
        from decimal import Decimal

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


@record(frozen=True, slots=True)
class PasswordSource:
    """Where a smarthost password comes from. The reference names the place; it is not the secret."""

    kind: PasswordKind
    reference: str  # the keyring service, the shell command, the variable name or the file path

    def masked(self) -> dict[str, str]:
        """The source as written in the config, e.g. `{"keyring": "pymta"}`; it holds no secret."""
        return {self.kind: self.reference}


@record(frozen=True, slots=True)
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


@record(frozen=True, slots=True)
class Local:
    """Delivery to local mailboxes."""

    mailbox: MailboxFormat = "auto"  # auto: ~/Maildir when it exists, else mbox
    mail_spool: str = DEFAULT_MAIL_SPOOL  # mbox files are MAIL_SPOOL/USER
    maildir: str = DEFAULT_MAILDIR  # ~ is the recipient's home

    def masked(self) -> dict[str, object]:
        return {"mailbox": self.mailbox, "mail_spool": self.mail_spool, "maildir": self.maildir}


@record(frozen=True, slots=True)
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


@record(frozen=True, slots=True)
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


@record(frozen=True, slots=True)
class Route:
    """Mail from senders matching `sender`, or to recipients matching `recipient` (shell patterns such as
    *@example.com; exactly one is set), goes via one smarthost, or to the MX hosts (`DIRECT`)."""

    sender: str | None
    smarthost: str  # the smarthost's name (or host), or DIRECT
    # Sender rewriting for this route; default: the smarthost's, else the top-level one.
    rewrite: Rewrite | None = None
    recipient: str | None = None

    def masked(self) -> dict[str, object]:
        return {
            "sender": self.sender,
            "recipient": self.recipient,
            "smarthost": self.smarthost,
            "rewrite": self.rewrite.masked() if self.rewrite else None,
        }


@record(frozen=True, slots=True)
class DnsSettings:
    """Which DNS servers direct delivery asks: none given means the system's (/etc/resolv.conf).
    `nameservers` and `port` are a test and advanced option (a local resolver on another port)."""

    nameservers: tuple[str, ...] = ()  # IP addresses
    port: int = DEFAULT_DNS_PORT
    timeout: float = DEFAULT_DNS_TIMEOUT

    def masked(self) -> dict[str, object]:
        return {
            "nameservers": list(self.nameservers),
            "port": self.port,
            "timeout": format_duration(self.timeout),
        }


@record(frozen=True, slots=True)
class Mx:
    """How direct delivery talks to MX hosts: the port, the TLS policy (by default and per recipient
    domain) and the time given to each command."""

    port: int = DEFAULT_MX_PORT
    tls: MxTls = DEFAULT_MX_TLS
    # (domain_key(domain), policy) pairs, in the order written: a mapping would not be hashable
    tls_policy: tuple[tuple[str, MxTls], ...] = ()
    timeout: float = DEFAULT_MX_TIMEOUT

    def tls_for(self, domain: str) -> MxTls:
        """The TLS policy for mail to `domain` (U-label or A-label, any case)."""
        key = domain_key(domain)
        return next((policy for name, policy in self.tls_policy if name == key), self.tls)

    def masked(self) -> dict[str, object]:
        return {
            "port": self.port,
            "tls": self.tls,
            "tls_policy": dict(self.tls_policy),
            "timeout": format_duration(self.timeout),
        }


@record(frozen=True, slots=True)
class MtaSts:
    """Whether direct delivery applies the recipient domains' MTA-STS policies (RFC 8461); `port` and
    `ca_file` (the HTTPS port and CA of the policy hosts) are a test and advanced option."""

    enabled: bool = DEFAULT_MTA_STS
    port: int = DEFAULT_MTA_STS_PORT
    ca_file: str | None = None  # None: the system's CA store

    def masked(self) -> dict[str, object]:
        return {"enabled": self.enabled, "port": self.port, "ca_file": self.ca_file}


@record(frozen=True, slots=True)
class Config:
    """pymta's effective settings. `Config()` is the configuration used when there is no file."""

    spool: str = field(default_factory=default_spool)
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
    log: str = "auto"  # where the flush logs: auto, journal, syslog, stderr, none or a file (pymta.log)
    direct: bool = False  # mail no smarthost or route takes goes to the recipients' MX hosts (issue 15)
    mx: Mx = field(default_factory=Mx)
    dns: DnsSettings = field(default_factory=DnsSettings)
    mta_sts: MtaSts = field(default_factory=MtaSts)

    @property
    def hostname(self) -> str:
        """How we name ourselves (HELO, Message-ID): as configured, else this machine's FQDN."""
        return self.configured_hostname or default_hostname()

    @property
    def domain(self) -> str:
        """The domain that qualifies bare local parts: as configured, else the hostname."""
        return self.configured_domain or self.hostname

    @property
    def sends_direct(self) -> bool:
        """Whether any mail may go to the recipients' MX hosts: `direct: true`, or a route to `direct`."""
        return self.direct or any(route.smarthost == DIRECT for route in self.routes)

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
            "log": self.log,
            "direct": self.direct,
            "mx": self.mx.masked(),
            "dns": self.dns.masked(),
            "mta_sts": self.mta_sts.masked(),
        }
