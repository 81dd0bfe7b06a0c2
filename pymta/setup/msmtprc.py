"""msmtp's configuration (~/.msmtprc, $XDG_CONFIG_HOME/msmtp/config, /etc/msmtprc) read into pymta's keys.

msmtp reads `command argument` lines. `defaults` starts settings every later account begins with;
`account NAME [: PARENT, ...]` starts an account that also takes its parents' settings; the account named
`default` is used when no other is chosen, and `-f ADDRESS` chooses the account whose `from` matches.

In pymta each account becomes a smarthost named after it. An account other than the default is chosen by
a route on its `from` address; a last route sends every other sender to the default account only, as
msmtp does (without it pymta would fail over from one account to the next). `password` moves to a private
file, `passwordeval` becomes `{command: ...}`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from pymta.errors import ConfigError
from pymta.setup.foreign import (
    _AUTH_MECHANISMS,
    _WHY_NO_VERIFY,
    MSMTP_SYSTEM,
    Imported,
    _port,
    _secure_login,
    read_text,
)

# Commands pymta has no use for, and why; a command in neither table is noted as unknown.
_DROPPED = {
    "tls_certcheck": _WHY_NO_VERIFY,
    "tls_cert_file": "pymta does not log in with a client certificate",
    "tls_key_file": "pymta does not log in with a client certificate",
    "tls_crl_file": "pymta uses the system's revocation handling",
    "tls_priorities": "pymta uses Python's TLS defaults",
    "tls_min_dh_prime_bits": "pymta uses Python's TLS defaults",
    "tls_host_override": "pymta checks the certificate against host:",
    "logfile": "pymta logs every delivery to syslog (facility mail)",
    "syslog": "pymta logs every delivery to syslog (facility mail)",
    "domain": "pymta says EHLO with hostname:, which also names this machine's local domain",
    "set_from_header": "pymta keeps the From: a sender wrote (rewrite: handles local senders)",
    "auto_from": "pymta qualifies local senders with domain:",
    "undisclosed_recipients": "pymta keeps the To: and Cc: the message has",
    "dsn_notify": "pymta asks for no DSN; it bounces what fails itself",
    "dsn_return": "pymta asks for no DSN; it bounces what fails itself",
    "remove_bcc_headers": "pymta always removes Bcc:",
    "add_missing_from_header": "pymta adds a missing From: itself",
    "add_missing_date_header": "pymta adds a missing Date: itself",
    "allow_from_override": "pymta decides who may set a sender with trusted_users:",
    "source_ip": "pymta does not choose the source address",
    "proxy_host": "pymta connects directly",
    "proxy_port": "pymta connects directly",
    "socket": "pymta connects over TCP only",
    "ntlmdomain": "pymta does not speak NTLM",
    "eval": "pymta does not run commands to make its settings",
}
_USED = {
    "host", "port", "tls", "tls_starttls", "tls_trust_file", "tls_fingerprint", "auth", "user",
    "password", "passwordeval", "from", "timeout", "maildomain", "aliases", "protocol",
}  # fmt: skip
_EITHER = {"password": "passwordeval", "passwordeval": "password"}


def default_path() -> str:
    """The file msmtp reads: ~/.msmtprc, else $XDG_CONFIG_HOME/msmtp/config, else /etc/msmtprc."""
    home = os.path.expanduser("~")
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    for path in (os.path.join(home, ".msmtprc"), os.path.join(xdg, "msmtp", "config")):
        if os.path.exists(path):
            return path
    return MSMTP_SYSTEM


def _argument(text: str, where: str) -> str:
    """The argument of a command: as written, or unquoted when it is one "quoted string"."""
    if not text.startswith('"'):
        return text
    value, escaped = [], False
    for position, char in enumerate(text[1:], 1):
        if escaped:
            value.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            if text[position + 1 :].strip():
                raise ConfigError(f"{where}: text after the closing quote; quote the whole value")
            return "".join(value)
        else:
            value.append(char)
    raise ConfigError(f'{where}: the quote is never closed; end the value with "')


def _sections(text: str, path: str) -> tuple[dict[str, dict[str, tuple[str, str]]], list[str]]:
    """Each account's commands, its defaults and parents applied, as {command: (argument, where)}, and
    the accounts in file order."""
    accounts: dict[str, dict[str, tuple[str, str]]] = {}
    defaults: dict[str, tuple[str, str]] = {}
    current: dict[str, tuple[str, str]] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line, where = raw.strip(), f"{path}:{number}"
        if not line or line.startswith("#"):
            continue
        command, *rest = line.split(None, 1)
        argument = _argument(rest[0].strip() if rest else "", where)
        if command == "defaults":
            current = defaults
        elif command == "account":
            name, _, parents = argument.partition(":")
            name = name.strip()
            if not name or name in accounts:
                problem = "names no account" if not name else f"defines account {name} a second time"
                raise ConfigError(f"{where}: {problem}; give each account its own name")
            current = accounts[name] = dict(defaults)
            for parent in (p.strip() for p in parents.split(",") if p.strip()):
                if parent not in accounts:
                    raise ConfigError(f"{where}: account {parent} is not defined above; define it first")
                current.update(accounts[parent])
            current["\0parents"] = (parents.strip(), where)
        elif current is None:
            raise ConfigError(f"{where}: {command} comes before any account or defaults line; start one")
        else:
            current[command] = (argument, where)
            if command in _EITHER:  # an account's own password replaces an inherited passwordeval
                current.pop(_EITHER[command], None)
    return accounts, list(accounts)


def read_msmtp(path: str, secrets_dir: str) -> Imported:
    """The msmtp configuration file at `path`."""
    imported = Imported("msmtp", [path])
    accounts, order = _sections(read_text(path, "msmtp's configuration file"), path)
    default = "default" if "default" in accounts else (order[0] if order else "")
    if not default:
        raise ConfigError(f"{path}: defines no account; msmtp needs at least one (account NAME, host ...)")
    # `account default : gmx` with nothing of its own is another name for gmx: one smarthost, not two.
    parents, _ = accounts[default].get("\0parents", ("", ""))
    own = {key for key in accounts[default] if key != "\0parents"} - set(accounts.get(parents, {}))
    if default == "default" and parents in accounts and not own:
        default = parents
        order.remove("default")
    elif default != "default":
        imported.notes.append(f"no account named default: {default}, the first one, is used as msmtp would")
    hosts: list[dict[str, object]] = []
    routes: list[dict[str, str]] = []
    for name in [default, *(n for n in order if n != default)]:
        host = _account(name, accounts[name], imported, secrets_dir)
        if host is None:
            continue
        hosts.append(host)
        sender = accounts[name].get("from", ("", ""))[0]
        if name != default and sender:
            routes.append({"sender": sender, "smarthost": name})
        elif name != default:
            imported.notes.append(
                f"account {name}: has no from, so no mail chooses it; it is kept as a smarthost"
            )
    if not hosts:
        raise ConfigError(f"{path}: no account pymta can use (each needs host and SMTP); see the notes above")
    if len(hosts) > 1:
        routes.append({"sender": "*", "smarthost": default})
    _top_level(accounts[default], imported)
    imported.document["smarthosts"] = hosts
    if routes:
        imported.document["routes"] = routes
    return imported


def _flag(value: str) -> bool:
    return value.strip().lower() in ("", "on")


def _account(
    name: str, commands: dict[str, tuple[str, str]], imported: Imported, secrets_dir: str
) -> dict[str, object] | None:
    notes = imported.notes

    def get(command: str, fallback: str = "") -> str:
        return commands.get(command, (fallback, ""))[0]

    who = f"account {name}"
    if get("protocol", "smtp").lower() != "smtp":
        notes.append(f"{who}: speaks {get('protocol')}; pymta speaks only SMTP, so it is left out")
        return None
    if not get("host"):
        notes.append(f"{who}: has no host; left out")
        return None
    tls, starttls = _flag(get("tls", "off")), _flag(get("tls_starttls", "on"))
    if "tls" not in commands and get("user") and get("auth", "on").lower() != "off":
        # Older msmtp had TLS off unless told; sending a password in clear on a guess is worse than a
        # deferral that says the server offers no STARTTLS.
        tls = True
        notes.append(
            f"{who}: tls is not set; pymta uses STARTTLS so that the password is never sent in clear"
        )
    security = ("starttls" if starttls else "tls") if tls else "none"
    port = get("port")
    where = commands.get("port", ("", imported.sources[0]))[1]
    host: dict[str, object] = {
        "name": name,
        "host": get("host"),
        "port": _port(port, where) if port else (465 if security == "tls" else 25),
        "security": security,
    }
    auth = get("auth", "on" if get("user") else "off").lower()
    if auth in ("", "on"):
        auth = "auto"
    if auth == "off":
        if get("user"):
            notes.append(f"{who}: auth off, so its user and password are left out")
    else:
        _login(host, get, auth, who, imported, secrets_dir)
    trust = get("tls_trust_file")
    if trust and trust != "system" and tls:
        host["ca_file"] = os.path.expanduser(trust)
    fingerprint = get("tls_fingerprint")
    if fingerprint and tls:
        if len(fingerprint.replace(":", "")) == 64:
            host["fingerprint"] = fingerprint
        else:
            notes.append(
                f"{who}: tls_fingerprint is SHA-1 or MD5; pymta pins SHA-256 (`pymta test` shows it)"
            )
    timeout = get("timeout")
    if timeout.isdigit() and int(timeout) > 0:
        host["timeout"] = f"{timeout}s"
    _secure_login(host, notes, who, "msmtp")
    for command, (value, where) in commands.items():
        if command.startswith("\0") or command in _USED or (command == "tls_certcheck" and _flag(value)):
            continue
        why = _DROPPED.get(command, "pymta has no such setting")
        notes.append(f"{where}: {command} not carried over; {why}")
    return host


def _login(
    host: dict[str, object],
    get: Callable[[str], str],
    auth: str,
    who: str,
    imported: Imported,
    secrets_dir: str,
) -> None:
    user = get("user")
    if auth in _AUTH_MECHANISMS:
        host["auth"] = auth
    elif auth != "auto":
        imported.notes.append(f"{who}: auth {auth}: pymta chooses the best mechanism the server offers")
    if not user:
        imported.notes.append(f"{who}: auth is on but there is no user; add username: and a password:")
        return
    host["username"] = user
    if get("passwordeval"):
        host["password"] = {"command": get("passwordeval")}
        imported.notes.append(
            f"{who}: passwordeval runs as the user who runs the flush (pymta in system mode), with no "
            "terminal; make sure that user can run it"
        )
    elif get("password"):
        host["password"] = imported.password_file(
            secrets_dir, who.split()[1], get("password"), f"msmtp {who}"
        )
    else:
        host["password"] = {"keyring": "pymta"}
        imported.notes.append(
            f"{who}: msmtp took the password from ~/.netrc or the system keyring; store it for pymta "
            f"with `pymta password set {host['name']}`"
        )


def _top_level(commands: dict[str, tuple[str, str]], imported: Imported) -> None:
    """What the default account says for every message: its from (the rewrite), maildomain, aliases."""
    sender = commands.get("from", ("", ""))[0]
    if sender and not any(char in sender for char in "*?["):
        imported.document["rewrite"] = {"from": sender}
        imported.notes.append(
            f"from {sender}: pymta sends mail from local senders (root, cron, daemons) as {sender}; mail "
            "with a full sender address keeps it"
        )
    if domain := commands.get("maildomain", ("", ""))[0]:
        imported.document["domain"] = domain
    if aliases := commands.get("aliases", ("", ""))[0]:
        imported.document["aliases"] = os.path.expanduser(aliases)
        imported.notes.append(
            "aliases: pymta reads it as aliases(5); a `default:` entry has no meaning there, use admin:"
        )
    imported.notes.append(
        "admin: not set: pymta delivers mail for root and cron to a mailbox on this machine; add "
        "admin: YOUR-ADDRESS to send it out, as msmtp did"
    )
