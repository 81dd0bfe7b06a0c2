"""`pymta test` and `pymta password`: check each smarthost, and keep its password in the keyring.

A thin layer over `pymta.delivery.smtp` and `pymta.delivery.credentials`: each command loads the config,
makes one library
call per smarthost and turns a library error into one line that says what failed and what to do.
`pymta test` is `msmtp --serverinfo` for every configured smarthost: it connects, shows TLS, the certificate,
the server's extensions and whether AUTH succeeds, then probes MAIL FROM and RCPT TO as cron's mail would
(`probe_addresses`) and says RSET: it sends nothing.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import UTC, datetime
from typing import NoReturn

import click

from pymta import log
from pymta.cli.options import complete_smarthosts
from pymta.config.load import load
from pymta.config.model import Config, Smarthost
from pymta.config.routing import Router
from pymta.delivery.credentials import (
    CredentialError,
    Secret,
    delete_from_keyring,
    keyring_backend_problem,
    keyring_fix,
    store_in_keyring,
)
from pymta.delivery.direct import DirectRoutes
from pymta.delivery.privsep import become_spool_owner, run_flush
from pymta.delivery.sessions import route
from pymta.delivery.smtp.connection import fetch_certificate
from pymta.delivery.smtp.outcome import SessionError
from pymta.delivery.smtp.session import SmtpSession
from pymta.delivery.smtp.tls import Certificate
from pymta.errors import EX_OK, EX_UNAVAILABLE, ConfigError, PymtaError, UsageError
from pymta.mail.address import recipients_from_args
from pymta.mail.idn import domain_key
from pymta.queue.entry import QueueEntry
from pymta.queue.spool import Spool, real_user

# Days before expiry from which `pymta test` warns about the server certificate.
EXPIRY_WARNING_DAYS = 14

_config_option = click.option(
    "-C", "--config", "config_file", metavar="FILE", help="Read this config file instead of the usual ones."
)


# --- pymta test ---


@click.command("test", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--to", "to", metavar="ADDR", help="Also send a test message to ADDR through the queue.")
@_config_option
@click.pass_context
def test_command(ctx: click.Context, to: str | None, config_file: str | None) -> None:
    """Connect to each smarthost and show what a delivery would meet, without sending.

    For every smarthost in the config: the TLS version and cipher, the server certificate (subject, issuer,
    expiry, fingerprint and how it was verified), the extensions the server offers, and whether AUTH
    succeeds with the configured password. Then MAIL FROM with the sender cron's mail will have (after
    rewrite:) and RCPT TO the --to address, else admin:, else that sender, then RSET: a missing login, a
    sender policy or a refused relay shows here. Each failure is explained with the fix.

    With --to ADDR, a short test message is then queued for ADDR and a flush delivers it, like any
    other mail; the result for ADDR is shown. When ADDR's mail goes to its domain's MX hosts (direct:
    true, or a route to direct), the MX hosts are shown instead, then the first that answers: the TLS
    it got, and its answer to MAIL FROM and RCPT TO ADDR, then RSET; nothing is sent or queued.

    \b
    Exit status: 0 when every smarthost passes; 69 (EX_UNAVAILABLE) when one fails;
    78 (EX_CONFIG) when the config is invalid or names no smarthost.
    """
    settings = _load(ctx, config_file)
    direct_to = _direct_recipient(ctx, settings, to)
    if direct_to is not None:  # not through a smarthost: its MX host is the one to check
        ctx.exit(EX_OK if _check_direct(settings, direct_to) else EX_UNAVAILABLE)
    if not settings.smarthosts:
        where = settings.source or "/etc/pymta/pymta.yaml (or -C FILE)"
        if Spool(settings.spool).is_shared():  # system mode: the flush runs as a user with no keyring
            from pymta.setup.install import (  # lazy: the setup package, for this hint only
                SECRET_FILE as secret,  # where `pymta setup`'s config points (a 0700 dir)
            )

            source = f"{{file: {secret}}}"
            store = f"then put the password in that file: (umask 077; cat > {secret}) && chown pymta {secret}"
        else:
            source = "{keyring: pymta}"
            store = "then store the password with `pymta password set smtp.example.org`"
        click.echo(
            f"pymta: no smarthost configured in {where}; add one, e.g.\n"
            "  smarthosts:\n"
            "    - host: smtp.example.org\n"
            "      port: 587\n"
            "      username: me@example.org\n"
            f"      password: {source}\n"
            f"{store} (see pymta.yaml(5))",
            err=True,
        )
        ctx.exit(ConfigError.exit_code)
    try:
        probes = [probe_addresses(settings, smarthost, to) for smarthost in settings.smarthosts]
    except PymtaError as error:  # --to is no address
        _fail(ctx, error)
    failures = 0
    for number, (smarthost, probe) in enumerate(zip(settings.smarthosts, probes, strict=True)):
        if number:
            click.echo()
        if not _check(smarthost, settings.hostname, probe):
            failures += 1
    if to is not None:
        click.echo()
        if failures:
            click.echo(
                f"pymta: not sending the test message to {to}: fix the smarthost problems above first",
                err=True,
            )
            ctx.exit(EX_UNAVAILABLE)
        queue_id, entry = _send_test_message(settings, to)
        if entry is None:
            click.echo(f"Test message {queue_id} to {to}: delivered to the smarthost.")
        else:
            click.echo(
                f"Test message {queue_id} to {to}: {entry.state}; it stays in the queue (pymta queue)."
            )
            for recipient in entry.recipients:
                click.echo(
                    f"  {recipient.address}: {recipient.status} ({recipient.last_error or 'not tried yet'})"
                )
            ctx.exit(EX_UNAVAILABLE)
    ctx.exit(EX_UNAVAILABLE if failures else EX_OK)


def _direct_recipient(ctx: click.Context, settings: Config, to: str | None) -> str | None:
    """`to` as it goes out when its mail goes to its domain's MX hosts (`direct`), else None."""
    if to is None:
        return None
    try:
        recipients = recipients_from_args([to])
    except PymtaError as error:
        _fail(ctx, error)
    router = Router(settings)
    if not recipients or router.local_part(recipients[0]) is not None:
        return None
    wire = router.wire_address(recipients[0])
    hosts, _ = route(settings, router.wire_address("root"), wire)
    return wire if hosts is None else None


def _check_direct(settings: Config, to: str) -> bool:
    """For a recipient whose mail goes to the MX hosts: the MX hosts of its domain, then a session with the
    first that answers (its TLS, as the domain's policy gets it), MAIL FROM and RCPT TO `to`, and RSET:
    nothing is sent. True when the recipient would be taken."""
    from pymta.delivery.mx import MxLookupError  # lazy: dnspython, for direct delivery only

    domain = to.rpartition("@")[2]
    click.echo(f"{to} goes to the MX hosts of {domain} (direct delivery, TLS {settings.mx.tls_for(domain)}):")
    quiet = logging.Logger("pymta.test")  # what the flush would log is shown here instead
    quiet.addHandler(logging.NullHandler())
    routes = DirectRoutes(settings, logger=quiet)
    names: list[str] = []
    try:
        destination = routes.destination(domain)
        for host in destination.hosts:
            kind = "implicit MX (no MX records)" if destination.implicit else f"MX {host.preference}"
            _field(kind, f"{host.name} {', '.join(host.addresses)}")
            names.append(host.name)
        for note in destination.notes:
            _field("note", note)
        relays = routes.relays(domain)
    except MxLookupError as error:
        _sts_field(routes, domain, names)
        click.echo(f"  FAILED:       {error.reply}")
        return False
    _sts_field(routes, domain, names)
    sender = Router(settings).wire_address("root")
    for relay in relays:
        session = SmtpSession(relay, settings.hostname)
        try:
            session.open()
            replies = session.probe(sender, to)
        except SessionError as error:
            _field("not used", str(error))
            continue
        finally:
            session.close()
        info = session.info
        click.echo(f"{info.relay} (tls={session.tls_level})")
        _field("greeting", info.greeting)
        if info.tls:
            _field("TLS", f"{info.tls.version}, {info.tls.cipher} ({info.tls.bits} bits)")
            _certificate(info.tls.certificate)
        else:
            _field("TLS", "none: the MX host does not offer STARTTLS (or its handshake failed)")
        _field("probe", f"MAIL FROM:<{sender}> {replies[0]}")
        if replies[1] is not None:
            _field("", f"RCPT TO:<{to}> {replies[1]}; RSET, nothing sent")
        accepted = replies[1] is not None and replies[1].startswith("2")
        click.echo(
            "  result:       OK" if accepted else "  FAILED:       the MX host does not take this mail now"
        )
        return accepted
    click.echo("  FAILED:       no MX host of the domain could be reached; the mail would wait")
    return False


def _sts_field(routes: DirectRoutes, domain: str, names: list[str]) -> None:
    """The MTA-STS policy that applies to `domain` (whose MX hosts are `names`), and how it was found."""
    found = routes.sts.get(domain_key(domain))
    if found is None:  # mta_sts.enabled: false, or the MX lookup failed first
        return
    policy = found.policy
    if policy is not None:
        what = f"mode {policy.mode}, mx: {', '.join(policy.mx) or '-'}, max_age {policy.max_age}"
        if policy.mode == "enforce":
            what += "; only these MX hosts, with a certificate valid for their name"
        _field("MTA-STS", what)
        unnamed = [name for name in names if not policy.matches(name)]
        if policy.mode == "testing" and unnamed:
            _field("", f"in mode enforce, {', '.join(unnamed)} would not get the mail")
    _field("MTA-STS" if policy is None else "", found.note)


def probe_addresses(settings: Config, smarthost: Smarthost, to: str | None) -> tuple[str, str]:
    """The envelope `pymta test` probes `smarthost` with: the sender cron's mail gets (root, qualified,
    after `rewrite:` as the flush applies it), and `to`, else the admin, else that sender itself."""
    router = Router(settings)
    sender = router.wire_address("root")
    hosts, route_rewrite = route(settings, sender)
    if hosts is None or smarthost not in hosts:  # cron's mail goes elsewhere: this host sees other senders
        route_rewrite = None
    rewrite = route_rewrite or smarthost.rewrite or settings.rewrite
    if rewrite is not None and rewrite.envelope:
        sender = rewrite.from_address
    if to is not None:
        recipients = recipients_from_args([to])
        if recipients:
            return sender, router.wire_address(recipients[0])
    if settings.admin and router.local_part(settings.admin) is None:
        return sender, settings.admin
    return sender, sender


def _check(smarthost: Smarthost, hostname: str, probe: tuple[str, str]) -> bool:
    """Open one session, probe MAIL and RCPT as a delivery would (`SmtpSession.probe`), print what it
    learned; True when all of it worked."""
    session = SmtpSession(smarthost, hostname)
    error: SessionError | None = None
    refused: str | None = None
    replies: tuple[str, str | None] = ("", None)
    opened = False
    try:
        session.open()
        opened = True
        replies = session.probe(*probe)
        refused = _refusal(probe, replies)
    except SessionError as failure:
        error = failure
    finally:
        session.close()
    info = session.info
    click.echo(f"{info.relay} (security: {smarthost.security})")
    if info.greeting:
        _field("greeting", info.greeting)
    if info.tls:
        _field("TLS", f"{info.tls.version}, {info.tls.cipher} ({info.tls.bits} bits)")
        _certificate(info.tls.certificate)
    elif smarthost.security == "none" and info.greeting:
        _field("TLS", "none (security: none): mail travels unencrypted")
    if info.extensions:
        _field("extensions", ", ".join(info.extensions))
    if opened:
        _field(
            "auth", f"ok, {info.authenticated}" if info.authenticated else "not used (no username configured)"
        )
    if replies[0]:
        _field("probe", f"MAIL FROM:<{probe[0]}> {replies[0]}")
        if replies[1] is not None:
            _field("", f"RCPT TO:<{probe[1]}> {replies[1]}; RSET, nothing sent")
    if error is None and refused is None:
        click.echo("  result:       OK")
        return True
    if refused is not None:
        click.echo(f"  FAILED:       {refused}")
        return False
    assert error is not None
    if error.certificate_failed:
        _offer_pin(smarthost, hostname)
    click.echo(f"  FAILED:       {error.reason}")
    return False


def _refusal(probe: tuple[str, str], replies: tuple[str, str | None]) -> str | None:
    """What a refused probe means for real mail, and the fix, in one line; None when both were taken."""
    sender, recipient = probe
    mail, rcpt = replies
    if rcpt is None:
        when = "waits" if mail.startswith("4") else "bounces"
        return (
            f"the smarthost refuses the sender <{sender}> ({mail}), so cron's mail {when}; set rewrite: "
            "from: to your account's address there (pymta.yaml(5), REWRITE KEYS)"
        )
    if not rcpt.startswith("2"):
        when = "waits" if rcpt.startswith("4") else "bounces"
        return (
            f"the smarthost refuses mail to <{recipient}> ({rcpt}), so such mail {when}; check that your "
            "account may send to other domains, or name another address with --to"
        )
    return None


def _certificate(certificate: Certificate) -> None:
    if certificate.subject:
        _field("certificate", certificate.subject)
    if certificate.issuer:
        _field("issuer", certificate.issuer)
    if certificate.not_after:
        days = (certificate.not_after - datetime.now(UTC)).days
        note = f" (in {days} days)" if days >= 0 else " (EXPIRED)"
        if 0 <= days < EXPIRY_WARNING_DAYS:
            note += " - renew it soon"
        _field("expires", f"{certificate.not_after:%Y-%m-%d %H:%M} UTC{note}")
    _field("fingerprint", certificate.fingerprint)
    _field("verified", certificate.verification)


def _offer_pin(smarthost: Smarthost, hostname: str) -> None:
    """After a verification failure: show the certificate the server presents, so it can be pinned."""
    try:
        certificate = fetch_certificate(smarthost, hostname)
    except SessionError:
        return
    if certificate is None:
        return
    click.echo("  the server presents this certificate (NOT verified):")
    _certificate(certificate)
    click.echo(
        "  if you trust it (compare the fingerprint with the one your provider publishes), pin it with\n"
        f'    fingerprint: "{certificate.fingerprint}"'
    )


def _field(name: str, value: str) -> None:
    """One line of a smarthost's report; a `name` of "" continues the field above."""
    click.echo(f"  {name + ':' if name else '':<13} {value}")


# --- pymta password ---


@click.group("password", context_settings={"help_option_names": ["-h", "--help"]})
def password_group() -> None:
    """Store or delete a smarthost password in the keyring.

    The smarthost must take its password from the keyring (password: {keyring: SERVICE} in the config);
    the entry is stored under that service and the smarthost's username.
    """


@password_group.command("set")
@click.argument("host", shell_complete=complete_smarthosts)
@_config_option
@click.pass_context
def password_set(ctx: click.Context, host: str, config_file: str | None) -> None:
    """Store the password for the smarthost HOST in the keyring.

    Asks twice without echo on a terminal; otherwise reads one line from standard input.

    \b
    Exit status: 0 stored; 64 no such smarthost or no password given; 69 no keyring backend;
    78 invalid config, or the smarthost does not use the keyring.
    """
    settings = _load(ctx, config_file)
    try:
        smarthost, service, username = _keyring_entry(settings, host)
        if problem := keyring_backend_problem():
            raise CredentialError(f"{problem}; {keyring_fix(smarthost.host)}")
        secret = _read_password(username, smarthost.host)
        store_in_keyring(service, username, secret, host=smarthost.host)
    except PymtaError as error:
        _fail(ctx, error)
    click.echo(f"stored the password for {username} at {smarthost.host} in the keyring ({service})")


@password_group.command("delete")
@click.argument("host", shell_complete=complete_smarthosts)
@_config_option
@click.pass_context
def password_delete(ctx: click.Context, host: str, config_file: str | None) -> None:
    """Delete the password for the smarthost HOST from the keyring.

    \b
    Exit status: 0 deleted or nothing stored; 64 no such smarthost; 69 no keyring backend;
    78 invalid config, or the smarthost does not use the keyring.
    """
    settings = _load(ctx, config_file)
    try:
        smarthost, service, username = _keyring_entry(settings, host)
        deleted = delete_from_keyring(service, username, host=smarthost.host)
    except PymtaError as error:
        _fail(ctx, error)
    if deleted:
        click.echo(f"deleted the password for {username} at {smarthost.host} from the keyring ({service})")
    else:
        click.echo(
            f"the keyring ({service}) holds no password for {username} at {smarthost.host}; nothing to do"
        )


def _keyring_entry(settings: Config, host: str) -> tuple[Smarthost, str, str]:
    """The smarthost called `host`, its keyring service and username; PymtaError explaining what is wrong."""
    matches = [s for s in settings.smarthosts if host.lower() in (s.host.lower(), s.label.lower())]
    if not matches:
        known = ", ".join(s.label for s in settings.smarthosts) or "none"
        raise UsageError(f"no smarthost {host} in {settings.source or 'the config'}; configured: {known}")
    smarthost = matches[0]
    source = smarthost.password
    if source is None or source.kind != "keyring" or not smarthost.username:
        now = (
            f"takes its password from {{{source.kind}: {source.reference}}}" if source else "has no password:"
        )
        raise ConfigError(
            f"{settings.source}: smarthost {smarthost.label} {now}, not from the keyring; to use the "
            "keyring write password: {keyring: pymta} (and username:) under it"
        )
    return smarthost, source.reference, smarthost.username


def _read_password(username: str, host: str) -> Secret:
    if _stdin_is_terminal():
        password = click.prompt(
            f"Password for {username} at {host}",
            hide_input=True,
            confirmation_prompt=True,
            prompt_suffix=": ",
        )
    else:
        line = sys.stdin.readline()
        password = line.rstrip("\r\n")
    if not password:
        raise UsageError("no password given; type it at the prompt, or pipe it in on one line")
    return Secret(password)


def _stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


def _load(ctx: click.Context, config_file: str | None) -> Config:
    """The config; as root on a system spool, the command then goes on as the spool's owner, who is the one
    that reads the credentials and talks to the smarthost in a flush (pymta(1), PRIVILEGES)."""
    try:
        settings = load(config_file)
        become_spool_owner(settings.spool)
    except PymtaError as error:
        _fail(ctx, error)
    return settings


def _fail(ctx: click.Context, error: PymtaError) -> NoReturn:
    click.echo(f"pymta: {error}", err=True)
    ctx.exit(error.exit_code)


TEST_MESSAGE = (
    "Subject: pymta test message\r\n"
    "To: {to}\r\n"
    "Auto-Submitted: auto-generated\r\n"
    "\r\n"
    "This is a test message from pymta on {host}, sent with `pymta test --to`.\r\n"
    "If you read it, delivery through the smarthost works.\r\n"
)


def _send_test_message(
    settings: Config, to: str, logger: logging.Logger | None = None
) -> tuple[str, QueueEntry | None]:
    """Queue a test message for `to` as the user running this, and run a flush.

    Returns the queue id and, when the message is still waiting (deferred, failed, or left to a flush that
    was already running), its entry; None when it was delivered.
    """
    recipients = recipients_from_args([to])
    login, gecos, uid = real_user()
    envelope: dict[str, object] = {
        "sender": login,
        "recipients": recipients,
        "submitted_by": login,
        "uid": uid,
        "full_name": gecos,
        "queued_at": time.time(),
    }
    text = TEST_MESSAGE.format(to=", ".join(recipients), host=settings.hostname)
    spool = Spool(settings.spool)
    queue_id = spool.submit(envelope, text.encode("utf-8"))
    run_flush(settings, logger or logging.getLogger(log.LOGGER_NAME))
    for location in ("queue", "new"):
        try:
            return queue_id, spool.read_entry(location, queue_id)
        except FileNotFoundError:
            continue
    return queue_id, None


__all__ = ["password_group", "test_command"]
