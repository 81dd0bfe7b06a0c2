"""The configuration of another relay (nullmailer, msmtp, ssmtp) read into pymta's config keys.

Each reader returns an `Imported`: the pymta.yaml document as plain data, the notes on what could not be
carried over (and why), and the passwords found in plain text. A password is never part of the document:
the smarthost points at `{file: SECRETS/NAME}` (or the `{command:}` of msmtp's passwordeval) and the
password waits, wrapped in a `Secret`, until `pymta.setup.migrate` writes it to that file (0600).

Facts about the formats, from their manuals: nullmailer keeps one setting per file in /etc/nullmailer
(`remotes`: one server a line, `host protocol --option=value ...`); msmtp reads `command argument` lines
grouped in `defaults` and `account NAME [: PARENT, ...]` sections; ssmtp reads `Key=Value` lines
(keys in any case) and `revaliases` lines `user:address[:mailhub[:port]]`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from pymta.delivery.credentials import Secret
from pymta.errors import ConfigError, NoInputError

# Bytes read from one foreign file: real ones are a few hundred; a bigger one is not a relay's config.
MAX_FILE_BYTES = 1 << 20
NULLMAILER_DIR = "/etc/nullmailer"
SSMTP_CONF = "/etc/ssmtp/ssmtp.conf"
MSMTP_SYSTEM = "/etc/msmtprc"
RELAYS = ("nullmailer", "msmtp", "ssmtp")
_SAFE_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")
_AUTH_MECHANISMS = ("plain", "login", "cram-md5", "xoauth2", "oauthbearer")
_WHY_NO_VERIFY = (
    "pymta always verifies the server's certificate; for a self-signed one, add ca_file: or the "
    "fingerprint: that `pymta test` shows"
)


@dataclass(frozen=True)
class PendingSecret:
    """A password found in plain text, to be written to `path` (0600) with `--write`."""

    path: str
    secret: Secret
    owner_of: str  # what it belongs to, for messages: "msmtp account gmx"


@dataclass
class Imported:
    """The pymta.yaml document made from another relay's files, and what did not carry over."""

    relay: str
    sources: list[str]
    document: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    secrets: list[PendingSecret] = field(default_factory=list)

    def password_file(self, secrets_dir: str, name: str, secret: str, owner_of: str) -> dict[str, str]:
        """A `{file: ...}` source for `secret`, found in the file in plain text; it is kept to be written."""
        base = _SAFE_NAME_RE.sub("-", name).strip(".-") or "smarthost"
        path, number = os.path.join(secrets_dir, base), 2
        while any(pending.path == path for pending in self.secrets):
            path, number = os.path.join(secrets_dir, f"{base}-{number}"), number + 1
        self.secrets.append(PendingSecret(path, Secret(secret), owner_of))
        return {"file": path}


def read_text(path: str, what: str) -> str:
    """The text of one foreign file: NoInputError (66) when missing, ConfigError (78) when unreadable."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise NoInputError(f"{path}: no such file; name {what} as PATH") from None
    except PermissionError:
        raise ConfigError(f"{path}: cannot be read (permission denied); run the import with sudo") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; name {what} itself") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read: {error.strerror or error}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: is larger than 1 MiB; it is not {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: is not UTF-8 text; it is not {what}") from None


def _port(text: str, where: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(f"{where}: {text!r} is not a port number; write a number from 1 to 65535")
    return int(text)


def _secure_login(host: dict[str, object], notes: list[str], who: str, why: str) -> None:
    """A login without TLS: kept as the old relay did it (auth_plaintext), with a note saying so."""
    if host["security"] == "none" and "username" in host:
        host["auth_plaintext"] = True
        notes.append(f"{who}: the password is sent unencrypted, as {why} did; switch to starttls or tls")


# --- nullmailer ---

_NULLMAILER_SECURITY = {"ssl": "tls", "starttls": "starttls"}
_NULLMAILER_DROPPED = {
    "insecure": _WHY_NO_VERIFY,
    "x509certfile": "pymta does not log in with a client certificate",
    "x509crlfile": "pymta uses the system's revocation handling",
    "x509fmtder": "pymta reads the CA file as PEM; convert it with `openssl x509 -inform der`",
    "source": "pymta does not choose the source address",
    "tls-anon-auth": "pymta never uses anonymous TLS",
}
_NULLMAILER_IGNORED = {
    "pausetime": "pymta retries on its own schedule (retry.schedule)",
    "maxpause": "pymta retries on its own schedule (retry.schedule)",
    "sendtimeout": "pymta times each SMTP command instead (smarthosts[].timeout)",
    "helohost": "pymta says HELO with hostname:",
    "idhost": "pymta makes Message-IDs with hostname:",
}


def _control(directory: str, name: str) -> str | None:
    """The first line of nullmailer's control file `name`, or None when it is absent or empty."""
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        return None
    lines = [line.strip() for line in read_text(path, f"nullmailer's {name}").splitlines()]
    return next((line for line in lines if line and not line.startswith("#")), None)


def read_nullmailer(directory: str, secrets_dir: str) -> Imported:
    """nullmailer's control files in `directory` (/etc/nullmailer)."""
    remotes_path = os.path.join(directory, "remotes")
    if not os.path.isdir(directory):
        raise NoInputError(f"{directory}: no such directory; name nullmailer's directory (/etc/nullmailer)")
    imported = Imported("nullmailer", [remotes_path])
    text = read_text(remotes_path, "nullmailer's remotes file")
    document, notes = imported.document, imported.notes
    me = _control(directory, "me")
    default_domain = _control(directory, "defaultdomain")
    if me:
        if "." not in me and default_domain:
            me = f"{me}.{default_domain}"
        document["hostname"] = me
    if default_domain:
        notes.append(
            f"defaultdomain {default_domain}: pymta does not add a domain to host names without a dot"
        )
    if default_host := _control(directory, "defaulthost"):
        document["domain"] = default_host
    if admin := _control(directory, "adminaddr"):
        addresses = [address.strip() for address in admin.split(",") if address.strip()]
        document["admin"] = addresses[0]
        notes.append(
            "adminaddr: nullmailer sent all mail for local users here; pymta sends only mail for root, "
            "system accounts and unknown names (people keep their mailboxes; /etc/aliases applies first)"
        )
        if len(addresses) > 1:
            notes.append(
                f"adminaddr: only the first address is the admin; add {', '.join(addresses[1:])} "
                "to root's entry in /etc/aliases"
            )
    if sender := _control(directory, "allmailfrom"):
        document["rewrite"] = {"from": sender, "header": False}
        notes.append(
            "allmailfrom: pymta rewrites the sender of mail from local accounts only, not of mail "
            "that already has a full address"
        )
    if lifetime := _control(directory, "queuelifetime"):
        if lifetime.isdigit() and int(lifetime) > 0:
            document["retry"] = {"lifetime": f"{lifetime}s"}
    for name, why in _NULLMAILER_IGNORED.items():
        if _control(directory, name):
            notes.append(f"{name}: not carried over; {why}")
    hosts = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        host = _nullmailer_remote(line, f"{remotes_path}:{number}", imported, secrets_dir)
        if host is not None:
            hosts.append(host)
    login = next((str(host["username"]) for host in hosts if "@" in str(host.get("username", ""))), "")
    if login and "rewrite" not in document:
        notes.append(
            f"providers such as web.de, GMX and Gmail refuse a sender that is not the account's: add "
            f"rewrite: {{from: {login}}} to send mail from root and cron as {login}"
        )
    if not hosts:
        notes.append("remotes: no SMTP server found; mail for other hosts waits in the queue")
    else:
        document["smarthosts"] = hosts
    return imported


def _nullmailer_remote(
    line: str, where: str, imported: Imported, secrets_dir: str
) -> dict[str, object] | None:
    words = line.split()
    name, protocol = words[0], words[1].lower() if len(words) > 1 else "smtp"
    if protocol != "smtp":
        imported.notes.append(f"{where}: {name} speaks {protocol}; pymta speaks only SMTP, so it is left out")
        return None
    options: dict[str, str | None] = {}
    for word in words[2:]:
        key, equals, value = word.removeprefix("--").partition("=")
        options[key.lower()] = value if equals else None
    security = next((_NULLMAILER_SECURITY[key] for key in ("ssl", "starttls") if key in options), "none")
    port = options.get("port")
    host: dict[str, object] = {
        "host": name,
        "port": _port(port, where) if port is not None else (465 if security == "tls" else 25),
        "security": security,
    }
    if options.get("user"):
        host["username"] = options["user"]
    if "auth-login" in options:
        host["auth"] = "login"
    if options.get("x509cafile"):
        host["ca_file"] = options["x509cafile"]
    if options.get("pass") and "username" in host:
        who = f"nullmailer remote {name}"
        host["password"] = imported.password_file(secrets_dir, name, str(options["pass"]), who)
    elif options.get("pass"):
        imported.notes.append(f"{where}: --pass without --user is left out; a login needs both")
    _secure_login(host, imported.notes, f"{where} ({name})", "nullmailer")
    known = {"port", "user", "pass", "auth-login", "x509cafile", "ssl", "starttls"}
    for key in options:
        if key not in known:
            why = _NULLMAILER_DROPPED.get(key, "pymta has no such setting")
            imported.notes.append(f"{where}: --{key} not carried over; {why}")
    return host


# --- ssmtp ---

_SSMTP_DROPPED = {
    "tlscert": "pymta does not log in with a client certificate",
    "tlskey": "pymta does not log in with a client certificate",
    "tls_ca_dir": "pymta reads one CA file (ca_file:) or the system's store",
    "debug": "run `pymta flush -v` to see each delivery",
}


def _yes(value: str) -> bool:
    return value.strip().lower() in ("yes", "true", "on", "1")


def read_ssmtp(path: str, secrets_dir: str) -> Imported:
    """ssmtp's `ssmtp.conf` at `path`, and the `revaliases` beside it."""
    if os.path.isdir(path):
        path = os.path.join(path, "ssmtp.conf")
    imported = Imported("ssmtp", [path])
    settings: dict[str, str] = {}
    for number, raw in enumerate(read_text(path, "ssmtp.conf").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, equals, value = line.partition("=")
        if not equals or not key.strip():
            raise ConfigError(f"{path}:{number}: not a Key=Value line; fix or remove it")
        settings[key.strip().lower()] = value.strip()
    hub = settings.pop("mailhub", "")
    if not hub:
        raise ConfigError(f"{path}: has no mailhub=; ssmtp needs one (e.g. mailhub=smtp.web.de:587)")
    document, notes = imported.document, imported.notes
    if hostname := settings.pop("hostname", ""):
        document["hostname"] = hostname
    if domain := settings.pop("rewritedomain", ""):
        document["domain"] = domain
    root = settings.pop("root", "")
    if root and ("@" in root or domain):
        document["admin"] = root if "@" in root else f"{root}@{domain}"
    elif root:
        notes.append(f"root={root}: not a full address, so there is no admin:; mail for root stays here")
    host = _ssmtp_mailhub(hub, settings, path, imported, secrets_dir)
    document["smarthosts"] = [host]
    if not _yes(settings.pop("fromlineoverride", "no")):
        notes.append(
            "FromLineOverride=NO: ssmtp replaced every From: with user@domain; pymta keeps a sender's "
            "From: and rewrites only local senders (rewrite:)"
        )
    for key, value in settings.items():  # the value is not shown: a misspelt key may hold a password
        why = _SSMTP_DROPPED.get(key, "pymta has no such setting")
        if value:
            notes.append(f"{key}: not carried over; {why}")
    _ssmtp_revaliases(os.path.join(os.path.dirname(path), "revaliases"), hub, imported)
    return imported


def _ssmtp_mailhub(
    hub: str, settings: dict[str, str], path: str, imported: Imported, secrets_dir: str
) -> dict[str, object]:
    bracketed = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", hub)  # [2001:db8::1]:587
    if bracketed:
        name, port = bracketed.group(1), bracketed.group(2) or ""
        colon = ":" if bracketed.group(2) is not None else ""
    else:
        name, colon, port = hub.partition(":")
    use_tls, use_starttls = _yes(settings.pop("usetls", "no")), _yes(settings.pop("usestarttls", "no"))
    security = "starttls" if use_starttls else "tls" if use_tls else "none"
    host: dict[str, object] = {
        "host": name,
        "port": _port(port, f"{path}: mailhub") if colon else (465 if security == "tls" else 25),
        "security": security,
    }
    if user := settings.pop("authuser", ""):
        host["username"] = user
    secret = settings.pop("authpass", "")
    if secret and user:
        host["password"] = imported.password_file(secrets_dir, str(host["host"]), secret, "ssmtp's AuthPass")
    elif secret:
        imported.notes.append("AuthPass without AuthUser is left out; a login needs both")
    method = settings.pop("authmethod", "").lower()
    if method in _AUTH_MECHANISMS:
        host["auth"] = method
    elif method:
        imported.notes.append(f"AuthMethod={method}: pymta chooses the best mechanism the server offers")
    if ca_file := settings.pop("tls_ca_file", ""):
        host["ca_file"] = ca_file
    elif security != "none":
        imported.notes.append(f"ssmtp did not check {host['host']}'s certificate; {_WHY_NO_VERIFY}")
    _secure_login(host, imported.notes, str(host["host"]), "ssmtp")
    return host


def _ssmtp_revaliases(path: str, hub: str, imported: Imported) -> None:
    """`revaliases`: root's address becomes the rewrite for every local sender; the rest are notes."""
    if not os.path.exists(path):
        return
    imported.sources.append(path)
    for number, raw in enumerate(read_text(path, "ssmtp's revaliases").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, _, rest = line.partition(":")
        address, _, via = rest.partition(":")
        where = f"{path}:{number}"
        if via and via.strip() != hub:
            imported.notes.append(
                f"{where}: {user} through {via}: pymta chooses a smarthost by sender (routes:)"
            )
        if user.strip() == "root" and "@" in address:
            imported.document["rewrite"] = {"from": address.strip()}
            imported.notes.append(
                f"{where}: pymta sends mail from every local system sender (root, cron, daemons) as "
                f"{address.strip()}, not only root's"
            )
        elif address.strip():
            imported.notes.append(
                f"{where}: {user.strip()} as {address.strip()}: pymta rewrites one address for local "
                "senders; let this user send with `sendmail -f ADDRESS` or a From: header"
            )
