"""The configuration file: YAML in, a typed, validated, immutable `Config` out.

The file is parsed once into frozen records; nothing else in pymta reads YAML or looks at raw keys. Every
key is declared in a table (key, field, parser); an unknown key is an error with a did-you-mean, and every
error is one line that names the file, the key path (`smarthosts[0].port`), what is wrong and the fix.

The file must be readable by every user (`sendmail` reads the spool location from it), so it never holds a
password: passwords come from a source (keyring, command, environment variable or a private file) that
`pymta.delivery.credentials` resolves at delivery time. A `Config` holds only the reference to that source.

The records are in `pymta.config.model`, the size limits in `pymta.config.limits`. `sendmail` imports
none of this (it reads a few keys with `pymta.config.paths`); the CLI and the flusher do.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence

from pymta import log
from pymta.config.limits import parse_size
from pymta.config.model import (
    AUTH_CHOICES,
    DEFAULT_PORTS,
    DEFAULT_SECURITY,
    DELIVER_CHOICES,
    DIRECT,
    MAILBOX_CHOICES,
    MX_TLS_CHOICES,
    ORIGINAL_FROM_CHOICES,
    PASSWORD_KINDS,
    SECURITY_CHOICES,
    SENDER_POLICY_CHOICES,
    Config,
    DnsSettings,
    Local,
    MtaSts,
    Mx,
    PasswordSource,
    Retry,
    Rewrite,
    Route,
    Smarthost,
    parse_duration,
)
from pymta.config.paths import find_config
from pymta.config.yamlfile import read_yaml
from pymta.errors import ConfigError
from pymta.mail.idn import a_label, domain_key
from pymta.records import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from pymta.config.model import PasswordKind

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEX_PAIR_RE = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){31}")
_HEX_RE = re.compile(r"[0-9A-Fa-f]{64}")


# --- Reading and validating ---


@record(frozen=True, slots=True)
class _Where:
    """A place in the config file, for error messages: the file and the key path."""

    source: str
    path: str = ""

    def key(self, name: object) -> _Where:
        if isinstance(name, str):
            text = name if name.isprintable() and " " not in name else json.dumps(name, ensure_ascii=False)
        else:
            text = "~" if name is None else str(name)  # a null, number or date as key
        return _Where(self.source, f"{self.path}.{text}" if self.path else text)

    def index(self, number: int) -> _Where:
        return _Where(self.source, f"{self.path}[{number}]")

    def fail(self, problem: str) -> ConfigError:
        message = f"{self.source}: {self.path}: {problem}" if self.path else f"{self.source}: {problem}"
        return ConfigError(message.replace("\r", "\\r").replace("\n", "\\n"))


if TYPE_CHECKING:
    Parser = Callable[[object, _Where], Any]


@record(frozen=True, slots=True)
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


def _log_target(value: object, where: _Where) -> str:
    target = _text(value, where, "auto, journal, syslog, stderr, none or an absolute path")
    if problem := log.target_problem(target):
        raise where.fail(problem)
    return target


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
        close = _close_matches(str(kind), PASSWORD_KINDS, n=1)
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
    home = next((name for name, table in _NESTED.items() if key in table and table is not keys), None)
    close = _close_matches(key, list(keys), n=1) if isinstance(key, str) else []
    if close and not (home and close[0] not in _NESTED):  # tls_policy: under mx:, not sender_policy
        return f'unknown key; did you mean "{close[0]}"?'
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
    fields = _section(_ROUTE_KEYS, value, where, "a mapping with sender: (or recipient:) and smarthost:")
    if ("sender" in fields) == ("recipient" in fields):
        raise where.fail(
            'needs exactly one of sender: and recipient:, e.g. sender: "*@example.com"; write two routes '
            "to match both"
        )
    return Route(**{"sender": None, **fields})


def _routes(value: object, where: _Where) -> tuple[Route, ...]:
    if not isinstance(value, list):
        raise where.fail(f'must be a list of routes, each starting with "- sender:", not {_show(value)}')
    return tuple(_route(item, where.index(number)) for number, item in enumerate(value))


def _warn_after(value: object, where: _Where) -> float | None:
    return None if value == "never" or value is False else _duration(value, where)


def _domains(value: object, where: _Where) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise where.fail(f"must be a list of domain names such as [example.org], not {_show(value)}")
    return tuple(_mail_domain(item, where.index(number)).lower() for number, item in enumerate(value))


def _mail_domain(value: object, where: _Where) -> str:
    """A domain of mail addresses: as `_domain_name`, or an international one (`müller.de`) that has an
    A-label; kept as written, compared as `idn.domain_key` does."""
    if isinstance(value, str) and not value.isascii():
        ascii_form = a_label(value)
        if ascii_form is not None and _HOSTNAME_RE.fullmatch(ascii_form):
            return value
    return _domain_name(value, where)


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


def _tls_policy(value: object, where: _Where) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise where.fail(f"must be a mapping of domains to opportunistic or verify, not {_show(value)}")
    policy: dict[str, str] = {}
    for domain, choice in value.items():
        at = where.key(domain)
        key = domain_key(_mail_domain(domain, at))
        if key in policy:
            raise at.fail("is the same domain as another one here; remove one of them")
        policy[key] = _choice(*MX_TLS_CHOICES)(choice, at)
    return tuple(policy.items())


def _nameservers(value: object, where: _Where) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise where.fail(f"must be a list of IP addresses such as [127.0.0.1], not {_show(value)}")
    servers = []
    for number, item in enumerate(value):
        try:
            servers.append(str(ipaddress.ip_address(item if isinstance(item, str) else "")))
        except ValueError:
            raise where.index(number).fail(
                f"{_show(item)} is not an IP address; write e.g. 127.0.0.1"
            ) from None
    return tuple(servers)


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
    "sender": _Key("sender", lambda value, where: _text(value, where, "a sender pattern")),
    "recipient": _Key("recipient", lambda value, where: _text(value, where, "a recipient pattern")),
    "smarthost": _Key(
        "smarthost",
        lambda value, where: _text(value, where, "a smarthost name"),
        required=f"name one of the smarthosts (its name: or host:), or {DIRECT} for the MX hosts",
    ),
    "rewrite": _Key("rewrite", _rewrite),
}
_RETRY_KEYS: Mapping[str, _Key] = {
    "schedule": _Key("schedule", _schedule),
    "lifetime": _Key("lifetime", _duration),
    "warn_after": _Key("warn_after", _warn_after),
}
_MX_KEYS: Mapping[str, _Key] = {
    "port": _Key("port", _port),
    "tls": _Key("tls", _choice(*MX_TLS_CHOICES)),
    "tls_policy": _Key("tls_policy", _tls_policy),
    "timeout": _Key("timeout", _duration),
}
_DNS_KEYS: Mapping[str, _Key] = {
    "nameservers": _Key("nameservers", _nameservers),
    "port": _Key("port", _port),
    "timeout": _Key("timeout", _duration),
}
_MTA_STS_KEYS: Mapping[str, _Key] = {
    "enabled": _Key("enabled", _boolean),
    "port": _Key("port", _port),
    "ca_file": _Key("ca_file", _absolute_path),
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
    "log": _Key("log", _log_target),
    "direct": _Key("direct", _boolean),
    "mx": _Key(
        "mx", lambda value, where: Mx(**_section(_MX_KEYS, value, where, "a mapping with tls: and port:"))
    ),
    "dns": _Key(
        "dns",
        lambda value, where: DnsSettings(**_section(_DNS_KEYS, value, where, "a mapping with nameservers:")),
    ),
    "mta_sts": _Key(
        "mta_sts",
        lambda value, where: MtaSts(
            **_section(_MTA_STS_KEYS, value, where, "a mapping such as {enabled: false}")
        ),
    ),
}
# Where a misplaced key belongs, for "unknown key here; it belongs under retry:".
_NESTED: Mapping[str, Mapping[str, _Key]] = {
    "smarthosts": _SMARTHOST_KEYS,
    "routes": _ROUTE_KEYS,
    "retry": _RETRY_KEYS,
    "local": _LOCAL_KEYS,
    "rewrite": _REWRITE_KEYS,
    "mx": _MX_KEYS,
    "dns": _DNS_KEYS,
    "mta_sts": _MTA_STS_KEYS,
}

# Every key of the file by its path, for documentation tests and tools.
KEYS: tuple[str, ...] = (
    *_TOP_KEYS,
    *(f"smarthosts[].{key}" for key in _SMARTHOST_KEYS),
    *(f"routes[].{key}" for key in _ROUTE_KEYS),
    *(f"retry.{key}" for key in _RETRY_KEYS),
    *(f"local.{key}" for key in _LOCAL_KEYS),
    *(f"rewrite.{key}" for key in _REWRITE_KEYS),
    *(f"mx.{key}" for key in _MX_KEYS),
    *(f"dns.{key}" for key in _DNS_KEYS),
    *(f"mta_sts.{key}" for key in _MTA_STS_KEYS),
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
    if DIRECT in labels:
        number = labels.index(DIRECT)
        raise (
            where.key("smarthosts")
            .index(number)
            .fail(f'is called "{DIRECT}", the name routes use for the MX hosts; give it another name:')
        )
    for number, route in enumerate(config.routes):
        at = where.key("routes").index(number).key("smarthost")
        if route.smarthost == DIRECT:
            continue
        if route.smarthost not in labels:
            close = _close_matches(route.smarthost, labels, n=1)
            known = ", ".join(labels) or "none"
            hint = f'did you mean "{close[0]}"?' if close else f"the smarthosts are: {known}"
            raise at.fail(f"{_show(route.smarthost)} is not a smarthost's name or host; {hint}")
        if labels.count(route.smarthost) > 1:
            raise at.fail(
                f"{_show(route.smarthost)} names more than one smarthost; give each a different name:"
            )
    return config


def loads(text: str | bytes, source: str = "<string>") -> Config:
    """The Config in YAML `text`, naming `source` in errors."""
    return parse(read_yaml(text, source), source)


# What to do about a file that cannot be read, by the kind of failure.
_READ_FIXES: tuple[tuple[type[OSError], str], ...] = (
    (FileNotFoundError, "no such file; check the name given with -C or in $PYMTA_CONFIG"),
    (PermissionError, "cannot be read (permission denied); make it readable by every user, e.g. "
     "chmod 644 {path}: sendmail reads it, so it holds no passwords"),
    (IsADirectoryError, "is a directory; name the config file inside it, e.g. {path}/pymta.yaml"),
)  # fmt: skip


def load(path: str | None = None) -> Config:
    """The Config from `path`, else the first file in the search order (`pymta.config.paths.find_config`).

    No file anywhere is valid and gives the defaults; a file named with `-C` or $PYMTA_CONFIG that does not
    exist is an error. Raises ConfigError with a one-line message naming the file, the key and the fix.
    """
    found = find_config(path)
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


def _close_matches(word: str, choices: Sequence[str], n: int) -> list[str]:
    """difflib's guesses for a did-you-mean, loaded only when a config has a mistake to name."""
    import difflib

    return difflib.get_close_matches(word, choices, n=n)
