"""The privilege split of a flush started as root on a system spool (pymta.delivery.privsep).

The network and the credentials are handled by a process that runs as the spool's owner; root only forks it
and writes local mailboxes through a child that runs as each recipient. These tests run the real `pymta flush`
as root, from this environment's Python, which the spool's owner (here `nobody`) cannot even read: so they
also prove the delivery process needs no file it cannot open after the switch.
"""

from __future__ import annotations

import json
import mailbox
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MtaEnv, local_sandbox
from mailservers import HOST, PASSWORD, USER, SmtpServer, certificates, smtp_server

from pymta.queue.spool import Spool

__all__ = ["certificates", "smtp_server"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the split needs root (it switches users)")

NOBODY = pwd.getpwnam("nobody") if os.geteuid() == 0 else None


@pytest.fixture
def system_mta() -> Iterator[MtaEnv]:
    """A spool owned by `nobody` (as setup gives it to `pymta`) in a directory every user can reach."""
    assert NOBODY is not None
    base = Path(tempfile.mkdtemp(prefix="pymta-privsep-", dir="/tmp"))
    try:
        base.chmod(0o755)
        (base / "home").mkdir()
        env = MtaEnv(root=base, config=base / "pymta.yaml", spool=base / "spool")
        spool = Spool(str(env.spool))
        spool.create_private()
        for path in [env.spool, *env.spool.iterdir()]:
            os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
        (env.spool / "new").chmod(0o1733)
        (env.spool / "tmp").chmod(0o1733)
        env.spool.chmod(0o755)
        yield env
    finally:
        shutil.rmtree(base)


def not_the_owners(spool: Path) -> list[Path]:
    """What in the spool is not its owner's, but for status/, root's (the users' views, owned by each)."""
    assert NOBODY is not None
    return [
        path
        for path in spool.rglob("*")
        if path.lstat().st_uid != NOBODY.pw_uid and "status" not in path.relative_to(spool).parts
    ]


def configure(mta: MtaEnv, server: SmtpServer, password: str) -> None:
    assert server.tls is not None
    ca_file = mta.root / "ca.pem"  # where the delivery process (nobody) can read it
    shutil.copyfile(server.tls.ca_file, ca_file)
    ca_file.chmod(0o644)
    host = {
        "host": HOST,
        "port": server.port,
        "security": "starttls",
        "ca_file": str(ca_file),
        "username": USER,
        "password": {"command": password},
        "timeout": "5s",
    }
    text = (
        f"domain: example.org\nhostname: mx.example.org\ndeliver: queue\nsmarthosts: {json.dumps([host])}\n"
    )
    sandbox = local_sandbox(mta.root)
    mta.config.write_text(f"spool: {mta.spool}\n{sandbox}{text}")
    (mta.root / "mail").chmod(0o1777)


def configure_recording_user(mta: MtaEnv, server: SmtpServer) -> Path:
    """Configure a password command that also writes, into the file returned, which user ran it."""
    who = mta.root / "who"
    who.touch()
    who.chmod(0o666)
    configure(mta, server, f"id -un >> {who}; echo {PASSWORD}")
    return who


def test_the_network_runs_as_the_spool_owner_and_local_mail_as_root(
    system_mta: MtaEnv, smtp_server: SmtpServer
) -> None:
    who = configure_recording_user(system_mta, smtp_server)
    queued = system_mta.sendmail("-i", "root", "bob@example.net", input=b"Subject: split\n\nhello\n")
    assert queued.returncode == 0, queued.stderr

    result = system_mta.run("pymta", ["flush", "-v"], timeout=60)

    assert result.returncode == 0, result.stderr
    assert who.read_text().split() == ["nobody"]  # the credential was read by nobody, never by root
    [received] = smtp_server.handler.messages
    assert received.login == USER and received.rcpt_tos == ["bob@example.net"]
    box = mailbox.mbox(str(system_mta.mail_spool / "root"))
    try:
        [copy] = box
    finally:
        box.close()
    assert copy["Subject"] == "split"
    assert system_mta.entries() == []
    # Whatever the run wrote in the spool is the owner's: a later run as that user can read it all.
    assert NOBODY is not None
    assert not_the_owners(system_mta.spool) == []


def test_a_deferred_message_keeps_its_state_owned_by_the_spool_owner(
    system_mta: MtaEnv, smtp_server: SmtpServer
) -> None:
    assert NOBODY is not None
    configure(system_mta, smtp_server, "echo wrong-password")
    queued = system_mta.sendmail("-i", "bob@example.net", input=b"Subject: later\n\nhello\n")
    assert queued.returncode == 0, queued.stderr

    result = system_mta.run("pymta", ["flush", "-v"], timeout=60)

    assert result.returncode == 0, result.stderr
    [entry] = system_mta.entries()
    assert entry.state == "deferred" and entry.last_error and "535" in entry.last_error
    for sub in ("queue", "state"):
        [path] = (system_mta.spool / sub).iterdir()
        info = path.lstat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (NOBODY.pw_uid, 0o600), path
    assert PASSWORD not in result.stderr.decode()


def test_root_gives_no_file_back_and_a_lock_of_roots_is_named(
    system_mta: MtaEnv, smtp_server: SmtpServer
) -> None:
    """Files of root's in the spool (an older flush ran wholly as root) are not chowned by a root command:
    doing it by path let the spool's owner swap a directory for a link and get any file of root's (issue
    10, C1). They stay root's; the flush names the lock it cannot open and `pymta setup --check` reports
    them (tests/test_security_root.py)."""
    assert NOBODY is not None
    configure(system_mta, smtp_server, f"echo {PASSWORD}")
    queued = system_mta.sendmail("-i", "bob@example.net", input=b"Subject: old\n\nhello\n")
    assert queued.returncode == 0, queued.stderr
    spool = Spool(str(system_mta.spool))
    spool.pick_up(1 << 20, print)  # as root, as the old flush did: queue/ID is root's now
    (system_mta.spool / "flush.lock").touch()
    outside = system_mta.root / "secret"
    outside.write_text("root only\n")
    outside.chmod(0o600)
    (system_mta.spool / "state" / "planted").symlink_to(outside)
    [queued_file] = (system_mta.spool / "queue").iterdir()

    result = system_mta.run("pymta", ["flush", "-v"], timeout=60)

    assert result.returncode == 73, result.stderr
    assert b"cannot open the flush lock" in result.stderr and b"pymta setup --check" in result.stderr
    assert smtp_server.handler.messages == []
    for path in (system_mta.spool / "flush.lock", queued_file, outside):
        assert path.stat().st_uid == 0, path


def test_pymta_test_as_root_meets_the_smarthost_as_the_spool_owner(
    system_mta: MtaEnv, smtp_server: SmtpServer
) -> None:
    who = configure_recording_user(system_mta, smtp_server)

    result = system_mta.run("pymta", ["test"], timeout=60)

    assert result.returncode == 0, result.stdout + result.stderr
    assert who.read_text().split() == ["nobody"]
    assert smtp_server.handler.messages == []  # a check sends nothing


@pytest.mark.parametrize("command", [["hold"], ["retry"], ["bounce"], ["delete"]])
def test_queue_commands_as_root_leave_the_spool_to_its_owner(
    system_mta: MtaEnv, smtp_server: SmtpServer, command: list[str]
) -> None:
    assert NOBODY is not None
    configure(system_mta, smtp_server, "echo wrong-password")
    queued = system_mta.sendmail("-i", "bob@example.net", input=b"Subject: steer\n\nhello\n")
    assert queued.returncode == 0, queued.stderr
    assert system_mta.run("pymta", ["flush"], timeout=60).returncode == 0
    [entry] = system_mta.entries()

    result = system_mta.run("pymta", ["queue", *command, entry.id], timeout=60)

    assert result.returncode == 0, result.stdout + result.stderr
    assert not_the_owners(system_mta.spool) == []


def test_views_are_published_after_a_change_and_left_alone_otherwise(
    system_mta: MtaEnv, smtp_server: SmtpServer
) -> None:
    configure(system_mta, smtp_server, "echo wrong-password")
    queued = system_mta.sendmail("-v", "-i", "bob@example.net", input=b"Subject: mine\n\nhello\n")
    assert queued.returncode == 0, queued.stderr
    [drop] = (system_mta.spool / "new").iterdir()
    os.chown(drop, 4321, 4321)  # another user's submission (a uid with no passwd entry will do)
    view = system_mta.spool / "status" / "4321"

    assert system_mta.run("pymta", ["flush"], timeout=60).returncode == 0
    first = view.lstat()
    assert (first.st_uid, stat.S_IMODE(first.st_mode)) == (4321, 0o400)
    assert system_mta.run("pymta", ["flush"], timeout=60).returncode == 0  # nothing due, nothing changed
    assert view.lstat().st_ino == first.st_ino

    [entry] = system_mta.entries()
    assert system_mta.run("pymta", ["queue", "delete", entry.id], timeout=60).returncode == 0
    assert system_mta.run("pymta", ["flush"], timeout=60).returncode == 0
    assert not view.exists()  # the user has no message left: no view


def test_a_password_file_the_owner_cannot_read_defers_with_the_fix(
    system_mta: MtaEnv, smtp_server: SmtpServer
) -> None:
    configure(system_mta, smtp_server, "unused")
    secret = system_mta.root / "webde.secret"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)  # root's: the delivery process (nobody) may not read it
    text = system_mta.config.read_text().replace('{"command": "unused"}', f'{{"file": "{secret}"}}')
    system_mta.config.write_text(text)
    queued = system_mta.sendmail("-i", "bob@example.net", input=b"Subject: x\n\nhello\n")
    assert queued.returncode == 0, queued.stderr

    assert system_mta.run("pymta", ["flush"], timeout=60).returncode == 0

    [entry] = system_mta.entries()
    assert entry.state == "deferred" and entry.last_error is not None
    assert f"run chown nobody {secret} && chmod 600 {secret}" in entry.last_error


def test_the_user_to_become_is_the_owner_of_the_spool_directory(tmp_path: Path) -> None:
    """Never what a name inside a directory the owner may change says (issue 10: queue/ made a link to a
    directory of root's made the flush run all of its work as root)."""
    from pymta.delivery.privsep import spool_owner

    assert NOBODY is not None
    spool, roots = tmp_path / "spool", tmp_path / "roots"
    spool.mkdir()
    roots.mkdir()
    os.chown(spool, NOBODY.pw_uid, NOBODY.pw_gid)
    (spool / "queue").symlink_to(roots)
    owner = spool_owner(str(spool))
    assert owner is not None and owner.pw_uid == NOBODY.pw_uid
    # a spool directory of root's (made by hand): queue/, not followed, names the owner
    os.chown(spool, 0, 0)
    assert spool_owner(str(spool)) is None
    (spool / "queue").unlink()
    (spool / "queue").mkdir()
    os.chown(spool / "queue", NOBODY.pw_uid, NOBODY.pw_gid)
    owner = spool_owner(str(spool))
    assert owner is not None and owner.pw_uid == NOBODY.pw_uid
