"""Local mail and addresses (issue 5), end to end through the console scripts: local recipients, aliases, the
admin rule, sender rewriting for smarthosts, mbox and Maildir delivery, newaliases, and bad input.

Local mail never reaches the machine's /var/mail: every config keeps `local.mail_spool`, `local.maildir` and
`aliases` inside the test's tmp_path (conftest.local_sandbox). Tests run as root and as a plain user; in user
mode every local recipient's mail goes to the running user's own mailbox, so mailboxes are looked up under
OWNER, the login of the effective user.
"""

from __future__ import annotations

import email
import email.policy
import json
import mailbox
import os
import pwd
import subprocess
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from conftest import MtaEnv, local_sandbox
from mailservers import Received, SmtpServer
from test_flush import configure, enqueue, flush, log_lines, plain_host, state_of
from test_lifecycle import parse_dsn

OWNER = pwd.getpwuid(os.geteuid()).pw_name  # whose mailbox local mail lands in, as root and in user mode
LOGIN = pwd.getpwuid(os.getuid()).pw_name  # who submits (the envelope sender of a plain `sendmail`)
AS_ROOT = os.geteuid() == 0
SENDER = "alice@elsewhere.example"  # not local: never rewritten; bounces to her go to the smarthost
CONTRACT_STATUSES = {"pending", "delivered", "deferred", "failed"}  # DESIGN.md, `pymta queue --json`


@pytest.fixture
def server() -> Iterator[SmtpServer]:
    """aiosmtpd without TLS or AUTH."""
    with SmtpServer("plain") as smtp:
        yield smtp


def read_mbox(path: Path) -> list[mailbox.mboxMessage]:
    box = mailbox.mbox(str(path), create=False)
    try:
        return list(box)
    finally:
        box.close()


def owner_mbox(mta: MtaEnv) -> list[mailbox.mboxMessage]:
    path = mta.mail_spool / OWNER
    return read_mbox(path) if path.exists() else []


def subjects(messages: list[mailbox.mboxMessage]) -> list[str]:
    return sorted(str(m["Subject"]) for m in messages)


def parsed(received: Received) -> EmailMessage:
    message = email.message_from_bytes(received.data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def pymta(mta: MtaEnv, *args: str) -> subprocess.CompletedProcess[bytes]:
    return mta.run("pymta", list(args))


def queue_json(mta: MtaEnv) -> list[dict[str, object]]:
    result = pymta(mta, "queue", "--json")
    assert result.returncode == 0, result.stderr
    listing: list[dict[str, object]] = json.loads(result.stdout)
    return listing


def statuses(listed: dict[str, object]) -> dict[str, tuple[object, object]]:
    recipients = listed["recipients"]
    assert isinstance(recipients, list)
    return {r["address"]: (r["status"], r["last_error"]) for r in recipients}


def write_aliases(mta: MtaEnv, text: str) -> None:
    path = mta.root / "aliases"
    path.write_text(text)
    path.chmod(0o644)


def mail(subject: str, body: str = "hello\n", headers: str = "") -> bytes:
    return f"{headers}Subject: {subject}\n\n{body}".encode()


# --- zero config ---


def test_zero_config_delivers_local_mail_and_keeps_other_mail_waiting(mta: MtaEnv) -> None:
    # Nothing but the spool and the sandbox that keeps local delivery in tmp_path: no hostname, no smarthost.
    mta.config.write_text(f"spool: {mta.spool}\n{local_sandbox(mta.root)}")
    body = "Cron <root@host> run-parts /etc/cron.daily\n\nline two\n  indented . line\n"
    local = mta.sendmail("-odq", "-i", "root", input=mail("cron output", body))
    remote = mta.sendmail("-odq", "-i", "someone@elsewhere.example", input=mail("for elsewhere"))
    assert local.returncode == remote.returncode == 0, (local.stderr, remote.stderr)

    result = mta.run("pymta", ["flush", "-v"])
    assert result.returncode == 0, result.stderr

    [delivered] = owner_mbox(mta)
    assert delivered["Subject"] == "cron output"
    for name in ("Date", "Message-ID", "From"):
        assert delivered[name], name
    return_path = str(delivered["Return-Path"])
    assert return_path.startswith(f"<{LOGIN}@") and return_path.endswith(">")
    assert str(delivered["From"]).endswith(f"{return_path}")  # From: completed with the qualified sender
    assert delivered.get_payload() == body
    assert delivered.get_from().startswith(f"{LOGIN}@")
    [waiting] = queue_json(mta)
    assert waiting["state"] == "deferred"
    assert str(waiting["last_error"]).startswith("no smarthost configured")
    assert statuses(waiting) == {"someone@elsewhere.example": ("deferred", waiting["last_error"])}


# --- which addresses are local ---


def test_localhost_the_hostname_and_local_domains_are_local_and_the_rest_goes_out(
    mta: MtaEnv, server: SmtpServer
) -> None:
    configure(mta, plain_host(server.port), extra="local_domains: [lan.example]\n")
    addresses = [
        f"{OWNER}@localhost",
        f"{OWNER}@mx.example.org",
        f"{OWNER}@LAN.example",
        f"{OWNER}@elsewhere.example",
    ]
    for address in addresses:
        enqueue(mta, address, message=mail(address))

    flush(mta)

    assert subjects(owner_mbox(mta)) == sorted(addresses[:3])
    [sent] = server.handler.messages
    assert sent.rcpt_tos == [f"{OWNER}@elsewhere.example"]
    assert mta.entries() == []


# --- aliases ---


def test_aliases_expand_with_continuation_lines_and_comments_and_never_run_a_program(
    mta: MtaEnv, server: SmtpServer, tmp_path: Path
) -> None:
    marker = tmp_path / "program-ran"
    write_aliases(
        mta,
        f"# aliases for the test\n"
        f"staff: {OWNER},\n"
        f"  # a comment inside the entry\n"
        f"\text@example.net\n"
        f"\n"
        f"postmaster: staff\n"
        f'prog: "|/usr/bin/touch {marker}", {OWNER}\n',
    )
    configure(mta, plain_host(server.port))
    enqueue(mta, "-f", SENDER, "postmaster", message=mail("to postmaster"))
    enqueue(mta, "-f", SENDER, "prog", message=mail("to prog"))

    result = flush(mta)

    # prog's copy for the program went to postmaster (no admin:), which is staff: the owner and ext@
    delivered = owner_mbox(mta)
    assert subjects(delivered) == ["to postmaster", "to prog", "to prog"]
    assert sorted(str(m["X-Pymta-Unhonoured"]) for m in delivered) == [
        "None",
        "None",
        f"|program target of prog (line 7 of {mta.root / 'aliases'})",
    ]
    sent = {str(parsed(m)["Subject"]): m.rcpt_tos for m in server.handler.messages}
    assert sent == {"to postmaster": ["ext@example.net"], "to prog": ["ext@example.net"]}
    assert not marker.exists()
    assert any("never runs programs" in line for line in log_lines(result)), log_lines(result)
    assert mta.entries() == []


def test_an_unsafe_aliases_file_holds_back_only_local_mail_until_it_is_fixed(
    mta: MtaEnv, server: SmtpServer
) -> None:
    write_aliases(mta, f"postmaster: {OWNER}\n")
    (mta.root / "aliases").chmod(0o666)  # anyone could redirect mail: it is not used
    configure(mta, plain_host(server.port))
    local_id = enqueue(mta, "-f", SENDER, "postmaster", message=mail("for postmaster"))
    enqueue(mta, "-f", SENDER, "ext@example.net", message=mail("for elsewhere"))

    flush(mta)  # exits 0: the other mail is not held up

    [sent] = server.handler.messages
    assert parsed(sent)["Subject"] == "for elsewhere"
    assert owner_mbox(mta) == []
    [waiting] = mta.entries()
    assert (waiting.id, waiting.state) == (local_id, "deferred")
    assert "writable by everyone" in (waiting.last_error or "")
    assert f"chmod o-w {mta.root / 'aliases'}" in (waiting.last_error or "")

    (mta.root / "aliases").chmod(0o644)
    flush(mta, "--now")
    assert subjects(owner_mbox(mta)) == ["for postmaster"]
    assert mta.entries() == []


def test_a_missing_include_file_makes_the_mail_wait_instead_of_bouncing(
    mta: MtaEnv, server: SmtpServer, tmp_path: Path
) -> None:
    members = tmp_path / "staff.list"
    write_aliases(mta, f"staff: :include:{members}\n")
    configure(mta, plain_host(server.port))
    queue_id = enqueue(mta, "-f", SENDER, "staff", message=mail("for staff"))

    flush(mta)

    assert server.handler.messages == []  # no bounce: the list's members are unknown, not wrong
    [waiting] = mta.entries()
    assert (waiting.id, waiting.state) == (queue_id, "deferred")
    assert f"{members} cannot be read (No such file or directory)" in (waiting.last_error or "")
    members.write_text(f"{OWNER}\n")  # the file is back (an NFS mount, an edit that replaced it)
    members.chmod(0o644)
    flush(mta, "--now")
    assert subjects(owner_mbox(mta)) == ["for staff"]
    assert mta.entries() == []


def test_names_that_differ_only_in_case_get_one_copy_in_their_mailbox(mta: MtaEnv) -> None:
    configure(mta)
    enqueue(mta, "-f", SENDER, OWNER, f"{OWNER.upper()}@localhost", message=mail("once"))

    flush(mta)

    assert subjects(owner_mbox(mta)) == ["once"]
    assert mta.entries() == []


@pytest.mark.skipif(not AS_ROOT, reason="admin: takes system accounts; the owner here is root only as root")
def test_a_backslashed_name_keeps_its_own_mailbox_even_with_admin_set(
    mta: MtaEnv, server: SmtpServer
) -> None:
    write_aliases(mta, f"abuse: \\{OWNER}, copy@example.net\n")
    configure(mta, plain_host(server.port), extra="admin: boss@example.net\n")
    enqueue(mta, "-f", SENDER, "abuse", message=mail("for abuse"))

    flush(mta)

    assert subjects(owner_mbox(mta)) == ["for abuse"]  # \root: root's mailbox, as pymta.yaml(5) says
    assert [m.rcpt_tos for m in server.handler.messages] == [["copy@example.net"]]  # not boss@


def test_an_alias_loop_ends_and_delivers_to_the_name_it_comes_back_to(
    mta: MtaEnv, server: SmtpServer
) -> None:
    write_aliases(mta, f"{OWNER}: helper\nhelper: {OWNER}\n")
    configure(mta, plain_host(server.port))
    enqueue(mta, "-f", SENDER, OWNER, message=mail("looping"))

    result = mta.run("pymta", ["flush", "-v"], timeout=20)

    assert result.returncode == 0, result.stderr
    assert subjects(owner_mbox(mta)) == ["looping"]
    assert any("alias loop" in line for line in log_lines(result)), log_lines(result)
    assert server.handler.messages == []
    assert mta.entries() == []


@pytest.mark.parametrize("self_target", [OWNER, f"\\{OWNER}"], ids=["plain", "backslash"])
def test_a_self_reference_delivers_to_the_local_user_as_well(
    mta: MtaEnv, server: SmtpServer, self_target: str
) -> None:
    # aliases.py: "A self-reference (`root: root, me@example.org`) delivers to the local user root as well".
    write_aliases(mta, f"{OWNER}: {self_target}, ext@example.net\n")
    configure(mta, plain_host(server.port))
    enqueue(mta, "-f", SENDER, OWNER, message=mail("self"))

    flush(mta)

    assert [m.rcpt_tos for m in server.handler.messages] == [["ext@example.net"]]
    assert subjects(owner_mbox(mta)) == ["self"]


def test_alias_targets_show_in_the_queue_with_their_statuses_while_the_message_waits(
    mta: MtaEnv, server: SmtpServer
) -> None:
    server.handler.rejections = {"ext@example.net": "451 4.3.0 try later"}
    write_aliases(mta, f"staff: {OWNER}, ext@example.net\n")
    configure(mta, plain_host(server.port))
    queue_id = enqueue(mta, "-f", SENDER, "staff", message=mail("to staff"))

    flush(mta)

    [listed] = queue_json(mta)
    assert (listed["id"], listed["state"]) == (queue_id, "deferred")
    found = statuses(listed)
    assert found[OWNER] == ("delivered", None)
    assert found["ext@example.net"] == ("deferred", "451 4.3.0 try later")
    assert list(found)[0] == "staff"

    server.handler.rejections = {}
    assert pymta(mta, "queue", "retry", queue_id).returncode == 0
    flush(mta)

    assert queue_json(mta) == []
    assert [m.rcpt_tos for m in server.handler.messages] == [["ext@example.net"]]
    assert subjects(owner_mbox(mta)) == ["to staff"]  # delivered once, not again at the retry


def test_queue_json_statuses_of_an_expanded_alias_stay_within_the_contract(
    mta: MtaEnv, server: SmtpServer
) -> None:
    server.handler.rejections = {"ext@example.net": "451 4.3.0 try later"}
    write_aliases(mta, f"staff: {OWNER}, ext@example.net\n")
    configure(mta, plain_host(server.port))
    enqueue(mta, "-f", SENDER, "staff")

    flush(mta)

    [listed] = queue_json(mta)
    assert {status for status, _ in statuses(listed).values()} <= CONTRACT_STATUSES


# --- |program and /file targets: the admin gets the mail (issue 11) ---


@pytest.mark.parametrize("target", ["|/usr/bin/procmail", "/var/log/prog.log"], ids=["program", "file"])
def test_mail_for_an_unhonoured_target_goes_to_the_admin_with_a_header_naming_the_line(
    mta: MtaEnv, server: SmtpServer, target: str
) -> None:
    write_aliases(mta, f"# line 1\nprog: {target}\n")
    configure(mta, plain_host(server.port), extra="admin: boss@example.net\n")
    queue_id = enqueue(mta, "-f", SENDER, "prog", message=mail("for prog", "the body\n"))

    result = flush(mta)

    [copy] = server.handler.messages
    assert (copy.mail_from, copy.rcpt_tos) == ("<>", ["boss@example.net"])
    message = parsed(copy)
    kind = "|program" if target.startswith("|") else "/file"
    assert message["X-Pymta-Unhonoured"] == f"{kind} target of prog (line 2 of {mta.root / 'aliases'})"
    assert message["Subject"] == "for prog" and message.get_content().replace("\r\n", "\n") == "the body\n"
    assert message["Message-ID"] == f"<{queue_id}@mx.example.org>"  # the original, as it was sent
    assert not list((mta.root / "mail").iterdir())  # no mailbox called prog, or any other
    assert not os.path.exists("/var/log/prog.log")
    [line] = [line for line in log_lines(result) if "status=unhonoured" in line]
    assert f"id={queue_id} to=<prog> status=unhonoured ({kind} target of prog" in line, line
    assert "to <boss@example.net>" in line
    assert target not in result.stderr.decode()  # the line's text is not quoted
    assert mta.entries() == []


@pytest.mark.skipif(not AS_ROOT, reason="root's mailbox is the owner's only as root")
def test_with_no_admin_mail_for_an_unhonoured_target_reaches_roots_mailbox(mta: MtaEnv) -> None:
    write_aliases(mta, "prog: |/usr/bin/procmail\n")
    configure(mta)
    enqueue(mta, "-f", SENDER, "prog", message=mail("for prog"))

    flush(mta)

    [copy] = owner_mbox(mta)  # postmaster's, which is root's
    assert copy["Subject"] == "for prog"
    assert copy["X-Pymta-Unhonoured"] == f"|program target of prog (line 1 of {mta.root / 'aliases'})"
    assert sorted(os.listdir(mta.root / "mail")) == ["root"]
    assert mta.entries() == []


@pytest.mark.skipif(not AS_ROOT, reason="root's mailbox is the owner's only as root")
@pytest.mark.parametrize("admin", ["", "admin: postmaster@mx.example.org\n"], ids=["no-admin", "local-admin"])
def test_a_program_alias_for_postmaster_itself_makes_no_loop_of_copies(mta: MtaEnv, admin: str) -> None:
    write_aliases(mta, "postmaster: |/usr/bin/procmail\nprog: |/usr/bin/other\n")
    configure(mta, extra=admin)
    enqueue(mta, "-f", SENDER, "prog", message=mail("for prog"))
    enqueue(mta, "-f", SENDER, "root", message=mail("for root"))

    for _ in range(3):
        flush(mta, "--now")

    delivered = owner_mbox(mta)
    assert subjects(delivered) == ["for prog", "for root"]  # the copy for prog, once; root's own
    assert [str(m["X-Pymta-Unhonoured"]) for m in delivered if m["Subject"] == "for prog"] == [
        f"|program target of prog (line 2 of {mta.root / 'aliases'})"
    ]
    assert mta.entries() == []


# --- postmaster and a local admin (issue 11) ---


@pytest.mark.skipif(not AS_ROOT, reason="root's mailbox is the owner's only as root")
def test_postmaster_works_with_no_aliases_file(mta: MtaEnv, server: SmtpServer) -> None:
    configure(mta, plain_host(server.port))
    enqueue(mta, "-f", SENDER, "postmaster", "postmaster@mx.example.org", message=mail("for postmaster"))

    flush(mta)

    assert subjects(owner_mbox(mta)) == ["for postmaster"]  # root's, once
    assert server.handler.messages == []  # no bounce
    assert mta.entries() == []


@pytest.mark.skipif(not AS_ROOT, reason="root's mailbox is the owner's only as root")
def test_an_admin_address_with_no_mailbox_gets_roots_mailbox_not_a_bounce_loop(
    mta: MtaEnv, server: SmtpServer
) -> None:
    # `admin: postmaster@` this host, and no aliases file: every cron mail bounced back to the admin.
    configure(mta, plain_host(server.port), extra="admin: postmaster@mx.example.org\n")
    enqueue(mta, "root", message=mail("cron says", "disk full\n"))
    enqueue(mta, "-f", "", "daemon", message=mail("a notice for a system account"))

    result = flush(mta)

    assert subjects(owner_mbox(mta)) == ["a notice for a system account", "cron says"]
    assert server.handler.messages == []
    assert not any("bounce" in line for line in log_lines(result)), log_lines(result)
    assert sorted(os.listdir(mta.root / "mail")) == ["root"]
    assert mta.entries() == []


@pytest.mark.skipif(not AS_ROOT, reason="root's mailbox is the owner's only as root")
def test_a_local_admin_address_is_looked_up_in_the_aliases(mta: MtaEnv, server: SmtpServer) -> None:
    write_aliases(mta, "postmaster: ops\nops: ops@example.net, root\n")
    configure(mta, plain_host(server.port), extra="admin: postmaster@mx.example.org\n")
    enqueue(mta, "root", message=mail("cron says"))

    flush(mta)

    assert [m.rcpt_tos for m in server.handler.messages] == [["ops@example.net"]]
    assert subjects(owner_mbox(mta)) == ["cron says"]  # root: its own mailbox, not the admin again
    assert mta.entries() == []


def test_config_check_flags_an_admin_address_that_leads_to_no_mailbox(mta: MtaEnv) -> None:
    configure(mta, extra="admin: nobody-here-pymta@mx.example.org\n")
    flagged = pymta(mta, "config", "check")
    assert flagged.returncode == 0, flagged.stderr  # valid: the mail goes to root's mailbox
    [warning] = flagged.stderr.decode().splitlines()
    assert warning.startswith(
        "pymta: warning: admin: nobody-here-pymta@mx.example.org is a local address that leads to no"
        " mailbox (nobody-here-pymta: no such user and no alias), so the admin's mail goes to root's mailbox;"
    ), warning
    for fine in ("admin: boss@example.net\n", "admin: postmaster@mx.example.org\n", ""):
        configure(mta, extra=fine)
        result = pymta(mta, "config", "check")
        assert (result.returncode, result.stderr) == (0, b""), (fine, result.stderr)


# --- the admin rule ---


def test_with_admin_set_root_mail_goes_to_the_admin_through_the_smarthost(
    mta: MtaEnv, server: SmtpServer
) -> None:
    configure(mta, plain_host(server.port), extra="admin: boss@example.net\n")
    enqueue(mta, "root", message=mail("cron says", "disk full\n"))

    flush(mta)

    [sent] = server.handler.messages
    assert sent.rcpt_tos == ["boss@example.net"]
    assert parsed(sent)["Subject"] == "cron says"
    assert owner_mbox(mta) == []
    assert mta.entries() == []


# --- sender rewriting, as the smarthost sees it ---

CRON = b"From: root (Cron Daemon)\nTo: ext@example.net\nSubject: Cron <root@host> backup\n\nbackup done\n"


def rewritten(mta: MtaEnv, server: SmtpServer, sender: str, extra: str, **host: object) -> Received:
    configure(mta, plain_host(server.port, **host), extra=extra)
    enqueue(mta, "-f", sender, "ext@example.net", message=CRON)
    flush(mta)
    [sent] = server.handler.messages
    assert sent.rcpt_tos == ["ext@example.net"]
    return sent


def test_cron_mail_from_root_gets_the_accounts_address(mta: MtaEnv, server: SmtpServer) -> None:
    sent = rewritten(mta, server, "root", "rewrite: {from: me@web.example}\n")

    assert sent.mail_from == "me@web.example"
    message = parsed(sent)
    [author] = message["From"].addresses
    assert (author.display_name, author.addr_spec) == ("Cron Daemon", "me@web.example")
    assert "root" in str(message["X-Original-From"])
    assert message["Reply-To"] is None
    assert message.get_content().splitlines() == ["backup done"]


def test_original_reply_to_puts_the_old_from_in_reply_to(mta: MtaEnv, server: SmtpServer) -> None:
    sent = rewritten(mta, server, "root", "rewrite: {from: me@web.example, original: reply-to}\n")

    message = parsed(sent)
    assert message["From"].addresses[0].addr_spec == "me@web.example"
    [reply_to] = message["Reply-To"].addresses
    assert reply_to.username == "root"
    assert message["X-Original-From"] is None


def test_a_smarthosts_own_rewrite_wins_over_the_top_level_one(mta: MtaEnv, server: SmtpServer) -> None:
    sent = rewritten(
        mta,
        server,
        "root",
        "rewrite: {from: top@web.example}\n",
        rewrite={"from": "host@web.example"},
    )

    assert sent.mail_from == "host@web.example"
    assert parsed(sent)["From"].addresses[0].addr_spec == "host@web.example"


def test_a_routes_own_rewrite_wins_for_the_senders_it_matches(mta: MtaEnv, server: SmtpServer) -> None:
    routes = (
        "rewrite: {from: me@web.example}\n"
        "routes:\n"
        '  - {sender: "root@*", smarthost: web, rewrite: {from: alerts@web.example}}\n'
        '  - {sender: "*", smarthost: web}\n'
    )
    configure(mta, plain_host(server.port, name="web"), extra=routes)
    for sender in ("root", "backup"):
        enqueue(mta, "-f", sender, "ext@example.net", message=CRON.replace(b"backup done", sender.encode()))
    flush(mta)

    by_body = {parsed(sent).get_content().strip(): sent.mail_from for sent in server.handler.messages}
    # One smarthost, two identities: the route's rewrite for root, the top-level one for the rest.
    assert by_body == {"root": "alerts@web.example", "backup": "me@web.example"}


def test_on_failover_the_rewrite_of_the_smarthost_that_takes_the_mail_applies(
    mta: MtaEnv, server: SmtpServer
) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as probe:
        closed = probe.getsockname()[1]  # nothing listens here once the probe is closed
    configure(mta, plain_host(closed), plain_host(server.port, rewrite={"from": "me@web.example"}))
    enqueue(mta, "-f", "root", "ext@example.net", message=CRON)
    flush(mta)

    [sent] = server.handler.messages
    assert sent.mail_from == "me@web.example"


def test_a_sender_that_is_not_local_is_not_rewritten(mta: MtaEnv, server: SmtpServer) -> None:
    sent = rewritten(mta, server, SENDER, "rewrite: {from: me@web.example}\n")

    assert sent.mail_from == SENDER
    message = parsed(sent)
    assert message["X-Original-From"] is None
    assert "me@web.example" not in sent.data.decode()


def test_envelope_false_keeps_mail_from_and_rewrites_only_the_header(mta: MtaEnv, server: SmtpServer) -> None:
    sent = rewritten(mta, server, "root", "rewrite: {from: me@web.example, envelope: false}\n")

    assert sent.mail_from == "root@example.org"
    assert parsed(sent)["From"].addresses[0].addr_spec == "me@web.example"


# --- Maildir and mbox ---


def test_maildir_delivery_reads_back_with_mailbox_maildir(mta: MtaEnv) -> None:
    maildir = mta.root / "Maildir"
    mta.write_config(
        "domain: example.org\nhostname: mx.example.org\ndeliver: queue\n"
        f"local:\n  mailbox: maildir\n  mail_spool: {mta.mail_spool}\n  maildir: {maildir}\n"
    )
    enqueue(mta, "root", message=mail("into the maildir", "From me\nbody\n"))

    flush(mta)

    box = mailbox.Maildir(str(maildir), factory=None, create=False)
    [delivered] = list(box)
    assert delivered["Subject"] == "into the maildir"
    assert str(delivered["Return-Path"]).startswith(f"<{LOGIN}@")
    assert delivered.get_payload() == "From me\nbody\n"  # no From_ quoting in a Maildir
    assert not (mta.mail_spool / OWNER).exists()
    assert mta.entries() == []


def test_concurrent_flushes_into_one_mbox_keep_every_message_whole(tmp_path: Path, mta: MtaEnv) -> None:
    """Three installations (three spools, so three flushes really run at once) deliver into one mbox."""
    mta.mail_spool.mkdir(exist_ok=True)
    envs: list[MtaEnv] = []
    for number in range(3):
        root = tmp_path / f"site{number}"
        (root / "home").mkdir(parents=True)
        env = MtaEnv(root=root, config=root / "pymta.yaml", spool=root / "spool")
        env.config.write_text(
            f"spool: {env.spool}\ndomain: example.org\nhostname: mx.example.org\ndeliver: queue\n"
            f"local:\n  mailbox: mbox\n  mail_spool: {mta.mail_spool}\naliases: {root / 'aliases'}\n"
        )
        envs.append(env)
    expected = {}
    for number, env in enumerate(envs):
        for index in range(5):
            subject = f"site {number} message {index}"
            body = f"{subject}\nFrom the middle\n" + f"{subject} line\n" * 2000
            expected[subject] = body.replace("\nFrom ", "\n>From ")
            enqueue(env, "root", message=mail(subject, body))

    runs = [
        subprocess.Popen(
            [str(Path(env.env["PATH"].split(":")[0]) / "pymta"), "flush"],
            env=env.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for env in envs
    ]
    for run in runs:
        out, err = run.communicate(timeout=60)
        assert run.returncode == 0, err

    delivered = owner_mbox(mta)
    assert sorted(str(m["Subject"]) for m in delivered) == sorted(expected)
    for message in delivered:
        assert message.get_payload() == expected[str(message["Subject"])]
    for env in envs:
        assert env.entries() == []


# --- newaliases ---


def newaliases_runs(mta: MtaEnv) -> list[subprocess.CompletedProcess[bytes]]:
    """The installed `newaliases`, `sendmail -bi` and `sendmail -I`."""
    return [mta.run("newaliases"), mta.sendmail("-bi"), mta.sendmail("-I")]


def test_newaliases_accepts_a_clean_aliases_file(mta: MtaEnv) -> None:
    write_aliases(mta, f"# fine\npostmaster: {OWNER}\nstaff: {OWNER},\n  ext@example.net\n")
    for result in newaliases_runs(mta):
        assert result.returncode == 0, result.stderr
        assert b"error" not in result.stderr


def test_newaliases_reports_problems_with_their_line_numbers(mta: MtaEnv, tmp_path: Path) -> None:
    marker = tmp_path / "program-ran"
    write_aliases(mta, f"# a comment\npostmaster: {OWNER}\nno colon here\nprog: |/usr/bin/touch {marker}\n")
    for result in newaliases_runs(mta):
        assert result.returncode == 65, result.stderr  # EX_DATAERR: something in the file is not used
        lines = result.stderr.decode().splitlines()
        assert any("line 3" in line and "no ':'" in line for line in lines), lines
        assert any("line 4" in line and "program" in line for line in lines), lines
    assert not marker.exists()


def test_newaliases_names_the_include_file_of_a_problem_once(mta: MtaEnv, tmp_path: Path) -> None:
    members = tmp_path / "members"
    members.write_text(f"{OWNER}\n|/bin/true\n")
    write_aliases(mta, f"team: :include:{members}\n")
    for result in newaliases_runs(mta):
        assert result.returncode == 65, result.stderr
        [line] = [line for line in result.stderr.decode().splitlines() if "program" in line]
        assert line.count(str(members)) == 1 and f": error: line 2 of {members}: " in line, line


def test_newaliases_warns_of_a_loop_and_still_exits_0(mta: MtaEnv) -> None:
    write_aliases(mta, f"{OWNER}: helper\nhelper: {OWNER}\n")
    for result in newaliases_runs(mta):
        assert result.returncode == 0, result.stderr
        assert b"loop" in result.stderr


# --- bad input ---


def test_an_alias_to_a_missing_user_fails_that_recipient(mta: MtaEnv, server: SmtpServer) -> None:
    write_aliases(mta, "ghost: nosuchuser-pymta-test\n")
    configure(mta, plain_host(server.port))
    queue_id = enqueue(mta, "-f", SENDER, "ghost", message=mail("to a ghost"))

    result = flush(mta)

    if not AS_ROOT:  # user mode: every local name is the running user's own mailbox
        assert subjects(owner_mbox(mta)) == ["to a ghost"]
        return
    assert any("no such local user: nosuchuser-pymta-test" in line for line in log_lines(result))
    [bounce] = server.handler.messages
    assert (bounce.mail_from, bounce.rcpt_tos) == ("<>", [SENDER])
    assert b"no such local user: nosuchuser-pymta-test" in bounce.data
    state = state_of(mta, queue_id)
    assert state["state"] == "failed"
    recipients = state["recipients"]
    assert isinstance(recipients, dict)
    assert recipients["nosuchuser-pymta-test"]["status"] == "failed"
    assert owner_mbox(mta) == []


@pytest.mark.skipif(not AS_ROOT, reason="in user mode every local name is the running user's own mailbox")
def test_the_bounce_for_a_missing_local_user_says_the_mailbox_does_not_exist(
    mta: MtaEnv, server: SmtpServer
) -> None:
    write_aliases(mta, "ghost: nosuchuser-pymta-test\n")
    configure(mta, plain_host(server.port))
    enqueue(mta, "-f", SENDER, "ghost", message=mail("to a ghost"))

    flush(mta)

    [bounce] = server.handler.messages
    dsn = parse_dsn(bounce)
    [recipient] = dsn.recipients
    assert recipient["Status"] == "5.1.1"  # RFC 3463: bad destination mailbox address
    assert "in the time allowed" not in dsn.text


def test_a_symlinked_mailbox_defers_and_loses_nothing(mta: MtaEnv, tmp_path: Path) -> None:
    configure(mta)
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    mta.mail_spool.mkdir(exist_ok=True)
    (mta.mail_spool / OWNER).symlink_to(target)
    queue_id = enqueue(mta, "root", message=mail("behind a symlink"))

    flush(mta)

    [listed] = queue_json(mta)
    assert (listed["id"], listed["state"]) == (queue_id, "deferred")
    assert "symbolic link" in str(listed["last_error"])
    assert target.read_bytes() == b""

    (mta.mail_spool / OWNER).unlink()
    assert pymta(mta, "queue", "retry", queue_id).returncode == 0
    flush(mta)

    assert subjects(owner_mbox(mta)) == ["behind a symlink"]
    assert mta.entries() == []


@pytest.mark.parametrize("name", ["a/b", "x/../../etc", "x|touch", "$HOME", "`id`", "-rf", '"a b"@localhost'])
def test_a_user_name_with_shell_or_path_characters_fails_and_nothing_is_written(
    mta: MtaEnv, tmp_path: Path, name: str
) -> None:
    configure(mta)
    queue_id = enqueue(mta, "-f", SENDER, "--", name, message=mail("odd name"))
    before = sorted(str(path) for path in tmp_path.rglob("*") if "spool" not in path.parts)

    result = flush(mta)

    after = sorted(str(path) for path in tmp_path.rglob("*") if "spool" not in path.parts)
    if not AS_ROOT:  # user mode: the running user's own mailbox gets it
        assert subjects(owner_mbox(mta)) == ["odd name"]
        return
    assert after == before  # no mailbox, no lock file, nothing anywhere
    assert any("status=bounced (5.1.3 refused:" in line for line in log_lines(result)), log_lines(result)
    [bounce] = [e for e in mta.entries() if e.id != queue_id]
    assert (bounce.sender, [r.address for r in bounce.recipients]) == ("", [SENDER])
    state = state_of(mta, queue_id)
    assert state["state"] == "failed"
