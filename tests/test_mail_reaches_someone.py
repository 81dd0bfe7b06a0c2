"""User mode on a Debian-like mail spool (issue 11, items 2 and 3): mail for the user's own local names
must end in a mailbox that user can read, and never in the bin.

A real unprivileged user (the `system` fixtures' alice) runs the installed `sendmail` and `pymta flush`
with a user-mode config: a spool in her home and a mail spool directory that is root:mail 2775, as
Debian's /var/mail is, so she cannot create her mbox there. The mail must land in a ~/Maildir created
for it (cur, new, tmp, 0700), said once in the log; mail for `root` goes there too. When even that
cannot be created, the mail expires, its bounce and the double bounce expire, and the last notice (to
postmaster) stays in the queue, listed as told to no one, instead of being deleted.

Everything skips when not run as root (see tests/system_install.py).
"""

from __future__ import annotations

import grp
import json
import mailbox
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from system_install import DOMAIN, HOSTNAME, SystemInstall, User, queue_ids

from pymta.queue.directory import encode_json, new_id

MESSAGE = b"Subject: user mode\n\nhello from a user-mode install\n"
# Seconds to wait for a chain of expiries (lifetimes of a fraction of a second) to settle.
DEADLINE = 60.0


@dataclass
class UserMode:
    """A user-mode install of `user`: their own spool and config, a mail spool they may not create in."""

    system: SystemInstall
    user: User
    config: Path
    spool: Path
    mail_spool: Path

    @property
    def maildir(self) -> Path:
        return Path(self.user.home) / "Maildir"

    def write_config(self, extra: str = "", maildir: str = "~/Maildir", mailbox: str = "auto") -> None:
        self.config.write_text(
            f"spool: {self.spool}\nhostname: {HOSTNAME}\ndomain: {DOMAIN}\ndeliver: queue\n"
            f"local:\n  mailbox: {mailbox}\n  mail_spool: {self.mail_spool}\n  maildir: {maildir}\n"
            f"aliases: {self.system.aliases}\n{extra}"
        )
        self.config.chmod(0o644)

    def run(self, program: str, *args: str, input: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        env = self.system.environment(self.user, PYMTA_CONFIG=str(self.config))
        return self.system.run_as(self.user, [self.system.script(program), *args], input=input, env=env)

    def sendmail(self, *args: str) -> str:
        result = self.run("sendmail", "-v", *args, input=MESSAGE)
        assert result.returncode == 0, result.stderr
        [queue_id] = queue_ids(result.stderr)
        return queue_id

    def flush(self) -> list[str]:
        result = self.run("pymta", "flush", "--now", "-v")
        assert result.returncode == 0, result.stderr
        return result.stderr.decode().splitlines()

    def queue(self) -> list[dict[str, object]]:
        result = self.run("pymta", "queue", "--json")
        assert result.returncode == 0, result.stderr
        listed: list[dict[str, object]] = json.loads(result.stdout)
        return listed


@pytest.fixture
def user_mode(system: SystemInstall) -> Iterator[UserMode]:
    """alice in user mode; the mail spool is root:mail 2775 (Debian's /var/mail), so her mbox cannot be
    created. Her Maildir and spool are removed afterwards."""
    alice = system.alice
    mail_spool = system.base / "debian-mail"
    mail_spool.mkdir()
    os.chown(mail_spool, 0, grp.getgrnam("mail").gr_gid)
    mail_spool.chmod(0o2775)
    spool = Path(alice.home) / "pymta-spool"
    setup = UserMode(system, alice, system.base / "alice.yaml", spool, mail_spool)
    setup.write_config()
    try:
        yield setup
    finally:
        for path in (setup.maildir, spool, mail_spool, system.base / "locked-out"):
            shutil.rmtree(path, ignore_errors=True)
        setup.config.unlink(missing_ok=True)


def test_own_mail_falls_back_to_a_new_maildir_when_the_mbox_cannot_be_created(user_mode: UserMode) -> None:
    """`echo hi | sendmail "$(id -un)"` on a stock Debian, user mode, no smarthost: ~/Maildir, not the bin."""
    alice = user_mode.user
    user_mode.sendmail(alice.name)

    lines = user_mode.flush()

    assert user_mode.queue() == []
    [line] = [line for line in lines if "status=" in line]
    assert "status=sent" in line, lines
    assert f"{user_mode.mail_spool}/{alice.name}" in line and str(user_mode.maildir) in line, line
    assert not (user_mode.mail_spool / alice.name).exists()
    for sub in ("", "cur", "new", "tmp"):
        info = os.stat(user_mode.maildir / sub)
        assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700, sub
        assert info.st_uid == alice.uid, sub
    [name] = os.listdir(user_mode.maildir / "new")
    delivered = user_mode.maildir / "new" / name
    assert delivered.stat().st_uid == alice.uid
    assert stat.S_IMODE(delivered.stat().st_mode) == 0o600
    # She can read it with her own rights (mailbox.Maildir, as her mail reader would).
    read = user_mode.system.run_as(
        alice,
        [
            str(user_mode.system.venv / "bin" / "python"),
            "-c",
            "import mailbox, sys; [m] = mailbox.Maildir(sys.argv[1]); print(m['Subject'])",
            str(user_mode.maildir),
        ],
    )
    assert read.returncode == 0, read.stderr
    assert read.stdout.decode().strip() == "user mode"


def test_mail_for_root_in_user_mode_reaches_the_users_maildir_and_the_fallback_is_logged_once(
    user_mode: UserMode,
) -> None:
    """Root's mail submitted by a user in user mode is the user's own (their mailbox, no admin set); the
    fallback is said once, when the Maildir is created, not for every message after."""
    alice = user_mode.user
    user_mode.sendmail(alice.name)
    first = user_mode.flush()
    user_mode.sendmail("root")
    user_mode.sendmail(f"postmaster@{HOSTNAME}")
    later = user_mode.flush()

    assert user_mode.queue() == []
    box = mailbox.Maildir(str(user_mode.maildir), create=False)
    assert len(box) == 3
    said = [line for line in first + later if "cannot be created" in line]
    assert len(said) == 1 and said[0] in first, first + later
    assert all("status=sent" in line for line in later if "status=" in line), later


def test_with_mailbox_mbox_the_mail_waits_for_the_mbox_with_the_fix_and_no_maildir_is_made(
    user_mode: UserMode,
) -> None:
    """The fallback is `auto`'s: who asked for mbox gets mbox, and the fix while it cannot be created."""
    user_mode.write_config(mailbox="mbox")
    queue_id = user_mode.sendmail(user_mode.user.name)

    user_mode.flush()

    [waiting] = user_mode.queue()
    assert (waiting["id"], waiting["state"]) == (queue_id, "deferred")
    assert "install -m 600" in str(waiting["last_error"])
    assert not user_mode.maildir.exists()


def test_undeliverable_user_mode_mail_ends_told_to_no_one_and_is_kept_not_deleted(
    user_mode: UserMode,
) -> None:
    """Neither the mbox nor the Maildir can be created: the message expires, its bounce to alice expires, the
    double bounce goes to postmaster (alice's own mailbox in user mode) and expires too. That last notice
    reached no one: it stays in the queue, failed, marked as such, whatever failed_retention says."""
    locked_out = user_mode.system.base / "locked-out"
    locked_out.mkdir(mode=0o755)  # root's: alice cannot create her Maildir in it
    user_mode.write_config(
        "retry: {schedule: [0.2s], lifetime: 0.3s, warn_after: never}\nfailed_retention: 0.3s\n",
        maildir=f"{locked_out}/Maildir",
    )
    user_mode.sendmail(user_mode.user.name)

    deadline = time.monotonic() + DEADLINE
    while True:
        user_mode.flush()
        listed = user_mode.queue()
        recipients = [
            [r["address"] for r in entry["recipients"]]  # type: ignore[index, union-attr]
            for entry in listed
        ]
        # The notice to postmaster (and, as the aliases may name it, root: alice's own mailbox either way).
        if len(recipients) == 1 and recipients[0][0] == "postmaster" and listed[0]["state"] == "failed":
            break
        assert time.monotonic() < deadline, listed
    [kept] = listed
    assert kept["sender"] == ""

    # Past failed_retention, a flush still keeps it; `pymta queue` says why.
    failed_at = time.time()
    while time.time() < failed_at + 0.5:
        user_mode.flush()
    assert [entry["id"] for entry in user_mode.queue()] == [kept["id"]]
    table = user_mode.run("pymta", "queue").stdout.decode()
    assert "no one was told" in table, table
    assert "1 failed message no one was told about" in table, table


def double_bounce_in_system_mode(
    system: SystemInstall, *, postmaster: str
) -> tuple[str, subprocess.CompletedProcess[bytes]]:
    """Root queues a message from <> to a user that does not exist (no admin is set), with `postmaster`
    aliased as given; one flush as root. The message's id and the flush."""
    system.aliases.write_text(f"postmaster: {postmaster}\n")
    result = system.sendmail(None, "-v", "-f", "", "nosuchuser-pymta-a", input=MESSAGE)
    assert result.returncode == 0, result.stderr
    [queue_id] = queue_ids(result.stderr)
    flushed = system.flush()
    assert flushed.returncode == 0, flushed.stderr
    return queue_id, flushed


def test_setup_check_and_the_queue_point_at_a_system_mode_message_no_one_was_told_about(
    system: SystemInstall,
) -> None:
    """System mode, no admin: a message from <> to a user that does not exist fails; the notice to
    postmaster fails too (its alias names no user). That notice is kept, and `pymta setup --check` and
    `pymta queue` say so."""
    queue_id, flushed = double_bounce_in_system_mode(system, postmaster="nosuchuser-pymta-test")

    entries = system.entries()
    assert len(entries) == 2 and {e.state for e in entries} == {"failed"}
    [kept] = [e for e in entries if e.id != queue_id]
    assert kept.to_postmaster and kept.dsn_of == queue_id
    assert b"nobody can be told" in flushed.stderr
    checked = system.run_as(
        None,
        [
            system.script("pymta"),
            "setup",
            "--check",
            "--root",
            str(system.root),
            "--user",
            system.spool_user.name,
            "--no-systemd",
        ],
    )
    assert checked.returncode == 1
    [line] = [line for line in checked.stdout.decode().splitlines() if "no one was told" in line]
    assert line.startswith("[warn] 1 failed message no one was told about: see pymta queue"), line
    assert "pymta queue delete ID" in line
    listed = system.run_as(None, [system.script("pymta"), "queue"]).stdout.decode()
    assert "-- 1 failed message no one was told about: see pymta queue" in listed, listed


def test_system_mode_double_bounce_without_admin_reaches_roots_mailbox(system: SystemInstall) -> None:
    """System mode (the split flush: root, the spool owner, a child per recipient), no admin: a message
    from <> to a user that does not exist fails, and the notice goes to postmaster, root's mbox."""
    queue_id, flushed = double_bounce_in_system_mode(system, postmaster="root")

    assert [(e.id, e.state) for e in system.entries()] == [(queue_id, "failed")]
    box = mailbox.mbox(str(system.mail_spool / "root"), create=False)
    try:
        [notice] = list(box)
    finally:
        box.close()
    assert notice["Subject"] == "Undelivered Mail Returned to Sender"
    assert "Final-Recipient: rfc822; nosuchuser-pymta-a" in notice.as_string()
    assert b"nobody can be told" not in flushed.stderr


def test_a_users_drop_cannot_claim_to_be_the_notice_to_postmaster(system: SystemInstall) -> None:
    """alice writes a drop herself, from <>, marked `to_postmaster` (which would make its failure told to
    no one, kept for good, and route it past the admin rule). The pick-up refuses it (sendmail writes no
    such field): set aside in corrupt/, never queued as a notice."""
    system.aliases.write_text("postmaster: root\n")
    name = new_id()
    envelope = {
        "v": 1,
        "id": name,
        "sender": "",
        "recipients": ["nosuchuser-pymta-a"],
        "submitted_by": "root",
        "uid": 0,
        "queued_at": time.time(),
        "to_postmaster": True,
    }
    drop = encode_json(envelope).encode() + b"\n" + MESSAGE
    path = system.spool / "new" / name
    written = system.run_as(
        system.alice, ["/bin/sh", "-c", 'set -C; cat > "$1"', "sh", str(path)], input=drop
    )
    assert written.returncode == 0, written.stderr

    flushed = system.flush()

    assert flushed.returncode == 0, flushed.stderr
    assert system.entries() == []
    assert system.names("corrupt") == [name]
    assert b"to_postmaster" in flushed.stderr and b"nobody can be told" not in flushed.stderr
