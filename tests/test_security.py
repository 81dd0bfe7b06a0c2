"""System mode's security promises with real users (issue 6): DESIGN.md "Two ways to run", invariants 6, 7.

Each test is a multi-user scenario on a real install (`tests/system_install.py`): pymta pip-installed where
every user can run it, `pymta setup --root` with a real spool owner, and the users alice and bob running
the installed `sendmail`, `mailq` and `pymta` as themselves; the flush runs as root, as the timer runs it.
What is proved: a user's drop can be neither listed nor removed by another, the picked-up queue is private,
the submitter is what the kernel says, links, FIFOs, devices and oversized files in the drop directory are
refused without being followed or blocking the flush, header injection is refused, the smarthost password
leaks nowhere, sendmail works (or fails cleanly) in hostile environments, local mail reaches the recipient's
own mailbox, the network side runs as the spool owner, users see only their own queue, the per-user
quota holds, and a list a user keeps for the admin can include only what that user may read.

Everything skips when not run as root (see the fixture for the other reasons).
"""

from __future__ import annotations

import base64
import json
import mailbox
import os
import secrets
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mailservers import USER, Authenticator, SmtpServer, make_certificates
from system_install import (
    HOSTNAME,
    PROJECT,
    SystemInstall,
    User,
    queue_ids,
)

from pymta.queue.directory import encode_json, new_id

MESSAGE = b"Subject: security test\n\nhello from a real user\n"
EX_USAGE, EX_NOINPUT, EX_NOUSER, EX_TEMPFAIL, EX_NOPERM = 64, 66, 67, 75, 77


# --- helpers ---


def submit(system: SystemInstall, user: User | None, *args: str, message: bytes = MESSAGE) -> str:
    """`sendmail -v ARGS` as `user`: it must queue; the queue id."""
    result = system.sendmail(user, "-v", *args, input=message)
    assert result.returncode == 0, result.stderr
    [queue_id] = queue_ids(result.stderr)
    return queue_id


def flush(system: SystemInstall, timeout: float = 20) -> str:
    """A root flush that must work; its log (stderr)."""
    result = system.flush(timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stderr.decode()


def drop_file(
    sender: str, recipients: list[str], body: bytes = MESSAGE, name: str | None = None
) -> tuple[str, bytes]:
    """What a user can write into new/ without sendmail: a submission claiming to come from root."""
    name = name or new_id()
    envelope = {
        "v": 1,
        "id": name,
        "sender": sender,
        "recipients": recipients,
        "submitted_by": "root",  # a lie: only the file's owner counts
        "uid": 0,
        "full_name": "",
        "queued_at": time.time(),
    }
    return name, encode_json(envelope).encode() + b"\n" + body


def write_as(system: SystemInstall, user: User, path: Path, data: bytes) -> None:
    """Create `path` as `user` (no sendmail: a plain shell redirection)."""
    result = system.run_as(user, ["/bin/sh", "-c", 'set -C; cat > "$1"', "sh", str(path)], input=data)
    assert result.returncode == 0, result.stderr


def shell_as(
    system: SystemInstall, user: User, command: str, *args: str
) -> subprocess.CompletedProcess[bytes]:
    return system.run_as(user, ["/bin/sh", "-c", command, "sh", *args])


def mbox_messages(path: Path) -> list[mailbox.mboxMessage]:
    box = mailbox.mbox(str(path), create=False)
    try:
        return list(box)
    finally:
        box.close()


def files_under(*roots: Path, limit: int = 1 << 20) -> list[Path]:
    """The regular files under `roots` (no links) of at most `limit` bytes: a sparse 2 GB drop is not read."""
    found = []
    for root in roots:
        for directory, _, names in os.walk(root):
            for name in names:
                info = os.lstat(os.path.join(directory, name))
                if stat.S_ISREG(info.st_mode) and info.st_size <= limit:
                    found.append(Path(directory, name))
    return found


# --- the install ---


def test_setup_by_a_user_is_refused_with_77_and_changes_nothing(system: SystemInstall) -> None:
    before = sorted(str(path) for path in system.root.rglob("*"))
    for argv in (["setup"], ["setup", "--uninstall"]):
        refused = system.run_as(system.alice, [system.script("pymta"), *argv])
        assert refused.returncode == 77, (argv, refused.stderr)
        assert b"sudo pymta setup" in refused.stderr and refused.stderr.count(b"\n") == 1, refused.stderr
    # --root is for a tree of one's own (DESTDIR); into root's, a user gets the reason, not a traceback
    into_roots = system.run_as(system.alice, [system.script("pymta"), "setup", "--root", str(system.root)])
    assert into_roots.returncode == 73 and b"Permission denied" in into_roots.stdout + into_roots.stderr
    assert b"Traceback" not in into_roots.stdout + into_roots.stderr
    assert sorted(str(path) for path in system.root.rglob("*")) == before


def test_an_install_from_a_wheel_brings_the_example_config_and_the_man_pages(system: SystemInstall) -> None:
    shared = system.venv / "share"
    assert (shared / "pymta" / "examples" / "pymta.yaml").read_bytes() == (
        PROJECT / "examples" / "pymta.yaml"
    ).read_bytes()
    for page in ("man1/pymta.1", "man5/pymta.yaml.5", "man8/sendmail.8"):
        assert (shared / "man" / page).is_file(), page
    # so `pymta setup` installs the commented example, not its short built-in fallback
    assert "installed by `pymta setup` from examples/pymta.yaml" in system.installed_config
    assert "\n#admin: me@web.de\n" in system.installed_config


# --- the drop directory and the private queue ---


def test_a_drop_can_be_neither_listed_nor_removed_by_another_user(system: SystemInstall) -> None:
    alice, bob = system.alice, system.bob
    queue_id = submit(system, alice, "friend@example.net")
    drop = system.spool / "new" / queue_id
    info = os.lstat(drop)
    assert (info.st_uid, stat.S_IMODE(info.st_mode), info.st_nlink) == (alice.uid, 0o644, 1)

    for user in (alice, bob):  # nobody but the spool's owner lists the drop directories, not even the writer
        for directory in ("new", "tmp"):
            listing = system.run_as(user, ["/bin/ls", str(system.spool / directory)])
            assert listing.returncode != 0 and b"Permission denied" in listing.stderr, (user, directory)
    # bob, even told the name, can neither remove, rename, replace nor change it (sticky bit, mode 0644)
    attacks = {
        "rm": 'rm -f "$1"',
        "rename": 'mv -f "$1" "$1.x"',
        "move to tmp/": 'mv -f "$1" "$2"',
        "replace": 'printf x > "$3" && mv -f "$3" "$1"',
        "append": 'printf "Bcc: x@example.net\\n" >> "$1"',
        "truncate": ': > "$1"',
        "chmod": 'chmod 666 "$1"',
    }
    before = drop.read_bytes()
    for what, command in attacks.items():
        paths = (drop, system.spool / "tmp" / queue_id, system.spool / "tmp" / new_id())
        result = shell_as(system, bob, command, *map(str, paths))
        assert result.returncode != 0, what
        assert drop.read_bytes() == before, what
    after = os.lstat(drop)
    assert (after.st_ino, after.st_uid, stat.S_IMODE(after.st_mode)) == (info.st_ino, alice.uid, 0o644)
    assert system.names("new") == [queue_id]

    flush(system)  # no smarthost: the message waits in queue/
    assert system.names("new") == [] and system.names("queue") == [queue_id]
    assert system.names("state") == [queue_id]
    for user in (alice, bob):
        for directory in ("queue", "state", "corrupt", "done"):
            listing = system.run_as(user, ["/bin/ls", str(system.spool / directory)])
            assert listing.returncode != 0, (user, directory)
        for path in (system.spool / "queue" / queue_id, system.spool / "state" / queue_id):
            read = system.run_as(user, ["/bin/cat", str(path)])
            assert read.returncode != 0 and read.stdout == b"", (user, path)
            removed = shell_as(system, user, 'rm -f "$1"', str(path))
            assert removed.returncode != 0 and path.exists(), (user, path)
    assert [entry.id for entry in system.entries()] == [queue_id]


# --- who sent it: the kernel's word ---


def test_the_submitter_is_the_owner_of_the_drop_whatever_it_claims(system: SystemInstall) -> None:
    alice, bob = system.alice, system.bob
    # -f with bob's address: queued, marked with X-Authentication-Warning, recorded as alice's
    claimed = submit(system, alice, "-f", f"{bob.name}@example.org", "-F", "Bob", "friend@example.net")
    # a file written straight into new/, whose envelope says root sent it
    forged, data = drop_file("root@example.org", ["friend@example.net"])
    write_as(system, alice, system.spool / "new" / forged, data)
    own = submit(system, alice, "-f", f"{alice.name}@example.org", "friend@example.net")

    flush(system)

    entries = {entry.id: entry for entry in system.entries()}
    assert set(entries) == {claimed, forged, own}
    for entry in entries.values():
        assert (entry.submitted_by, entry.uid) == (alice.name, alice.uid), entry.id
    warning = f"X-Authentication-Warning: {HOSTNAME}: {alice.name} set sender to {{}} using -f\r\n"
    assert system.message(entries[claimed]).startswith(warning.format(f"{bob.name}@example.org").encode())
    assert entries[claimed].sender == f"{bob.name}@example.org"
    assert system.message(entries[forged]).startswith(warning.format("root@example.org").encode())
    assert b"X-Authentication-Warning" not in system.message(entries[own])


def test_strict_refuses_another_users_sender_from_sendmail_and_from_a_drop(system: SystemInstall) -> None:
    alice, bob = system.alice, system.bob
    system.write_config("sender_policy: strict\n")
    refused = system.sendmail(alice, "-f", f"{bob.name}@example.org", "friend@example.net", input=MESSAGE)
    assert refused.returncode == EX_NOPERM, refused.stderr
    [line] = refused.stderr.decode().splitlines()
    assert line.startswith("sendmail: ") and "nothing was queued" in line
    assert system.names("new") == []

    forged, data = drop_file(f"{bob.name}@example.org", ["friend@example.net"])
    write_as(system, alice, system.spool / "new" / forged, data)
    own = submit(system, alice, "-f", f"{alice.name}@example.org", "friend@example.net")
    log = flush(system)

    assert [entry.id for entry in system.entries()] == [own]
    assert system.names("corrupt") == [forged]
    assert f"refused new/{forged}: {alice.name} may not set the sender {bob.name}@example.org" in log


# --- what a user may put into the drop directory ---


SECRET_MARK = b"root-only-secret-7d1f"


def root_only_submission(system: SystemInstall) -> Path:
    """A root-only file (0600) that would be a valid submission to bob, were the flush to read it."""
    _, data = drop_file("root", [system.bob.name], b"Subject: secret\n\n" + SECRET_MARK + b"\n")
    path = system.base / "root-only"
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def symlink_to_secret(system: SystemInstall, name: str) -> str:
    target = root_only_submission(system)
    result = shell_as(system, system.alice, 'ln -s "$1" "$2"', str(target), str(system.spool / "new" / name))
    assert result.returncode == 0, result.stderr
    return "a symbolic link"


def symlink_to_shadow(system: SystemInstall, name: str) -> str:
    result = shell_as(system, system.alice, 'ln -s /etc/shadow "$1"', str(system.spool / "new" / name))
    assert result.returncode == 0, result.stderr
    return "a symbolic link"


def symlink_to_bobs_file(system: SystemInstall, name: str) -> str:
    _, data = drop_file("bob", [system.bob.name], b"Subject: bob's\n\n" + SECRET_MARK + b"\n")
    target = Path(system.bob.home) / new_id()
    write_as(system, system.bob, target, data)
    result = shell_as(system, system.alice, 'ln -s "$1" "$2"', str(target), str(system.spool / "new" / name))
    assert result.returncode == 0, result.stderr
    return "a symbolic link"


def symlink_renamed_from_tmp(system: SystemInstall, name: str) -> str:
    target = root_only_submission(system)
    staged = system.spool / "tmp" / name
    command = 'ln -s "$1" "$2" && mv "$2" "$3"'
    result = shell_as(
        system, system.alice, command, str(target), str(staged), str(system.spool / "new" / name)
    )
    assert result.returncode == 0, result.stderr
    return "a symbolic link"


def hard_link_to_secret(system: SystemInstall, name: str) -> str:
    """Linux refuses alice this link (fs.protected_hardlinks); where it is allowed, the flush must refuse."""
    target = root_only_submission(system)
    link = system.spool / "new" / name
    if shell_as(system, system.alice, 'ln "$1" "$2"', str(target), str(link)).returncode != 0:
        os.link(target, link)  # what alice could do with fs.protected_hardlinks=0
    return "hard link"


def hard_link_to_own_file(system: SystemInstall, name: str) -> str:
    _, data = drop_file(system.alice.name, [system.bob.name])
    mine = Path(system.alice.home) / new_id()
    write_as(system, system.alice, mine, data)
    result = shell_as(system, system.alice, 'ln "$1" "$2"', str(mine), str(system.spool / "new" / name))
    assert result.returncode == 0, result.stderr
    return "hard link"


def fifo(system: SystemInstall, name: str) -> str:
    result = shell_as(system, system.alice, 'mkfifo -m 644 "$1"', str(system.spool / "new" / name))
    assert result.returncode == 0, result.stderr
    return "not a regular file"


def device(system: SystemInstall, name: str) -> str:
    path = system.spool / "new" / name
    os.mknod(path, 0o644 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers; only root can do this
    os.chown(path, system.alice.uid, system.alice.gid, follow_symlinks=False)
    return "not a regular file"


def oversized(system: SystemInstall, name: str) -> str:
    result = shell_as(system, system.alice, 'truncate -s 2G "$1"', str(system.spool / "new" / name))
    assert result.returncode == 0, result.stderr
    return "over max_message_size"


HOSTILE_DROPS: dict[str, Callable[[SystemInstall, str], str]] = {
    "symlink to a root-only file": symlink_to_secret,
    "symlink to /etc/shadow": symlink_to_shadow,
    "symlink to bob's file": symlink_to_bobs_file,
    "symlink renamed in from tmp/": symlink_renamed_from_tmp,
    "hard link to a root-only file": hard_link_to_secret,
    "hard link to her own file": hard_link_to_own_file,
    "FIFO": fifo,
    "device": device,
    "sparse 2 GB file": oversized,
}


@pytest.mark.parametrize("make", HOSTILE_DROPS.values(), ids=HOSTILE_DROPS.keys())
def test_a_hostile_drop_is_refused_and_logged_and_the_flush_goes_on(
    system: SystemInstall, make: Callable[[SystemInstall, str], str]
) -> None:
    shadow = os.stat("/etc/shadow")
    secret = system.base / "root-only"
    secret.unlink(missing_ok=True)
    name = new_id()
    reason = make(system, name)
    innocent = submit(system, system.bob, system.bob.name)  # bob's own mail, in the same flush

    log = flush(system, timeout=15)  # a FIFO must not block it, a link must not be followed

    refusals = [line for line in log.splitlines() if f"refused new/{name}" in line]
    assert len(refusals) == 1 and reason in refusals[0], log
    assert name not in system.names("new") and name not in system.names("queue")
    assert system.names("queue") == []  # bob's was delivered, nothing else was queued
    [delivered] = mbox_messages(system.mail_spool / system.bob.name)
    assert delivered["Message-ID"] == f"<{innocent}@{HOSTNAME}>"
    for path in files_under(system.spool, system.mail_spool):
        assert SECRET_MARK not in path.read_bytes(), path
    after = os.stat("/etc/shadow")
    assert (after.st_mtime_ns, after.st_size, after.st_mode) == (
        shadow.st_mtime_ns,
        shadow.st_size,
        shadow.st_mode,
    )
    if secret.exists():  # it was a link's target: untouched, and again the only name of its file
        assert SECRET_MARK in secret.read_bytes() and os.stat(secret).st_nlink == 1


def test_an_unreadable_or_odd_drop_stops_no_one_elses_mail(system: SystemInstall) -> None:
    """A drop alice made unreadable (mode 0000) or a directory in new/ may be kept or set aside, but the
    flush runs to its end and bob's mail is delivered."""
    alice = system.alice
    unreadable, data = drop_file(alice.name, ["friend@example.net"])
    write_as(system, alice, system.spool / "new" / unreadable, data)
    assert shell_as(system, alice, 'chmod 000 "$1"', str(system.spool / "new" / unreadable)).returncode == 0
    directory = new_id()
    assert shell_as(system, alice, 'mkdir "$1"', str(system.spool / "new" / directory)).returncode == 0
    innocent = submit(system, system.bob, system.bob.name)

    flush(system)

    [delivered] = mbox_messages(system.mail_spool / system.bob.name)
    assert delivered["Message-ID"] == f"<{innocent}@{HOSTNAME}>"
    queued = {entry.id: entry for entry in system.entries(problems=1) if entry.location == "queue"}
    assert directory not in queued  # the directory stays in new/ for the admin: the one problem listed
    if unreadable in queued:  # picked up (the flush could read it): then it is alice's
        assert queued[unreadable].submitted_by == alice.name


def test_a_forged_envelope_makes_the_flush_write_no_file_and_run_no_program(system: SystemInstall) -> None:
    """Recipients a drop file may name that are no addresses: paths, programs, includes. None is obeyed."""
    alice, bob = system.alice, system.bob
    target = system.base / "written-by-the-flush"
    recipients = [
        str(target),
        f"|touch {target}",
        f"../../../..{target}",
        f"{bob.name}/../../../written-by-the-flush",
        ":include:/etc/shadow",
        f"\\{bob.name}/../x",
    ]
    name, data = drop_file(alice.name, recipients)
    write_as(system, alice, system.spool / "new" / name, data)
    innocent = submit(system, bob, bob.name)

    log = flush(system)

    assert not target.exists()
    for recipient in recipients:  # each refused as no user name, and bounced to alice
        [line] = [line for line in log.splitlines() if f"to=<{recipient}>" in line]
        assert "status=bounced" in line and "is not a user name" in line, line
    assert sorted(os.listdir(system.mail_spool)) == sorted([alice.name, bob.name])
    [delivered] = mbox_messages(system.mail_spool / bob.name)
    assert delivered["Message-ID"] == f"<{innocent}@{HOSTNAME}>"
    [bounce] = mbox_messages(system.mail_spool / alice.name)
    assert bounce["Subject"] == "Undelivered Mail Returned to Sender"
    assert all(entry.location == "queue" and entry.state == "failed" for entry in system.entries())


# --- header injection ---


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["-F", "Alice\nBcc: everyone@example.net", "friend@example.net"], EX_USAGE),
        (["-F", "Alice\rBcc: everyone@example.net", "friend@example.net"], EX_USAGE),
        (["-f", "alice@example.org\nBcc: everyone@example.net", "friend@example.net"], EX_NOUSER),
        (["-f", "alice@example.org\r\nX-Evil: 1", "friend@example.net"], EX_NOUSER),
        (["friend@example.net\r\nBcc: everyone@example.net"], EX_NOUSER),
        (["friend@example.net\nBcc: everyone@example.net"], EX_NOUSER),
    ],
    ids=["-F LF", "-F CR", "-f LF", "-f CRLF", "recipient CRLF", "recipient LF"],
)
def test_header_injection_is_refused(system: SystemInstall, args: list[str], code: int) -> None:
    result = system.sendmail(system.alice, *args, input=MESSAGE)
    assert result.returncode == code, result.stderr
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sendmail: "), lines
    assert system.names("new") == [] and system.names("tmp") == []


# --- the smarthost password ---


# Non-ASCII on purpose, and new in every run: no other process on the machine can hold it by chance.
PASSWORD = f"pässwörd-{secrets.token_hex(8)}-秘密"


def password_forms() -> list[bytes]:
    """The password as it could leak: as text, and base64 as AUTH PLAIN and LOGIN send it."""
    raw = PASSWORD.encode()
    return [
        raw,
        base64.b64encode(raw),
        base64.b64encode(b"\0" + USER.encode() + b"\0" + raw),
        base64.b64encode(USER.encode() + b"\0" + USER.encode() + b"\0" + raw),
    ]


def leaks(data: bytes) -> list[bytes]:
    return [form for form in password_forms() if form in data]


def smarthost_config(server: SmtpServer, password: dict[str, str]) -> str:
    assert server.tls is not None
    host = {
        "host": "127.0.0.1",
        "port": server.port,
        "security": "starttls",
        "ca_file": str(server.tls.ca_file),
        "username": USER,
        "password": password,
        "timeout": "5s",
    }
    return f"smarthosts: {json.dumps([host])}\n"


def tls_server(system: SystemInstall) -> SmtpServer:
    """A STARTTLS server with AUTH; its CA where the spool's owner can read it too."""
    certificates = make_certificates(system.base / "tls")
    certificates.directory.chmod(0o755)
    certificates.ca_file.chmod(0o644)
    return SmtpServer("starttls", certificates, auth=Authenticator(password=PASSWORD))


def secret_file(system: SystemInstall) -> Path:
    """The password in a file only the spool's owner (and root) can read, as pymta setup advises."""
    directory = system.base / "secrets"
    directory.mkdir(mode=0o700, exist_ok=True)
    os.chown(directory, system.spool_user.uid, system.spool_user.gid)
    path = directory / "smarthost"
    path.write_text(PASSWORD + "\n", encoding="utf-8")
    path.chmod(0o600)
    os.chown(path, system.spool_user.uid, system.spool_user.gid)
    return path


def test_the_password_is_in_no_argv_log_error_or_spool_file(system: SystemInstall) -> None:
    with tls_server(system) as server:
        server.auth.password = "not-the-password"  # first the server refuses it: the error paths run too
        system.write_config(smarthost_config(server, {"file": str(secret_file(system))}))
        outputs = [system.sendmail(system.alice, "-v", "friend@example.net", input=MESSAGE)]
        assert outputs[0].returncode == 0, outputs[0].stderr

        refused = system.flush()
        assert refused.returncode == 0, refused.stderr
        assert [attempt.success for attempt in server.auth.attempts] == [False]
        server.auth.password = PASSWORD

        # the second flush, watched: no process's argv or environment holds the password while it runs
        process = subprocess.Popen(
            [system.script("pymta"), "flush", "--now", "-v"],
            env=system.environment(system.root_user),
            cwd=str(system.base),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        scans, seen = 0, []
        try:
            while process.poll() is None:
                for pid in os.listdir("/proc"):
                    if pid.isdigit():
                        for name in ("cmdline", "environ"):
                            try:
                                data = Path(f"/proc/{pid}/{name}").read_bytes()
                            except OSError:
                                continue
                            seen += [(pid, name, form) for form in leaks(data)]
                scans += 1
            stdout, stderr = process.communicate(timeout=20)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        assert process.returncode == 0, stderr
        assert scans >= 1 and seen == []
        [received] = server.handler.messages
        assert received.login == USER and received.rcpt_tos == ["friend@example.net"]
        outputs += [refused, subprocess.CompletedProcess(process.args, 0, stdout, stderr)]
        outputs.append(system.run_as(None, [system.script("pymta"), "test"]))
        for user in (None, system.alice):
            outputs.append(system.run_as(user, [system.script("pymta"), "config", "check"]))
            outputs.append(system.run_as(user, [system.script("pymta"), "queue", "--json"]))

    for result in outputs:
        assert leaks(result.stdout + result.stderr) == [], result.args
    assert b"the server rejected the login of me@example.org" in refused.stderr  # the error path ran
    secrets_dir = system.base / "secrets"
    for path in files_under(system.spool, system.mail_spool, Path(system.alice.home), system.root):
        if secrets_dir not in path.parents:
            assert leaks(path.read_bytes()) == [], path


# --- sendmail in hostile environments ---


@dataclass(frozen=True)
class Hostile:
    """How a caller may run sendmail: its environment, standard files, umask, directory, and uid."""

    changes: dict[str, str | None] = field(default_factory=dict)  # None: unset
    empty_env: bool = False  # env -i, the config named with -C
    bobs_home: bool = False  # HOME is a directory alice cannot enter
    stdin_file: bool = False
    stdio: str = ""  # "closed": stdout and stderr closed; "null": both /dev/null
    umask: int = 0o022
    cwd_of_bob: bool = False  # the working directory is one alice cannot enter
    stranger: bool = False  # a uid with no passwd entry


HOSTILE_ENVIRONMENTS = {
    "env -i, config by -C": Hostile(empty_env=True),
    "HOME unset": Hostile(changes={"HOME": None}),
    "HOME=/": Hostile(changes={"HOME": "/"}),
    "HOME unreadable": Hostile(bobs_home=True),
    "PATH empty, locale bogus": Hostile(changes={"PATH": "", "LANG": "xx_XX.bogus", "LC_ALL": "xx_XX.bogus"}),
    "stdin a regular file": Hostile(stdin_file=True),
    "stdout and stderr closed": Hostile(stdio="closed"),
    "stdout and stderr /dev/null": Hostile(stdio="null"),
    "umask 077": Hostile(umask=0o077),
    "umask 000": Hostile(umask=0o000),
    "cwd unreadable": Hostile(cwd_of_bob=True),
    "uid without a passwd entry": Hostile(stranger=True),
}
REDIRECT = {"closed": 'exec "$0" "$@" >&- 2>&-', "null": 'exec "$0" "$@" >/dev/null 2>/dev/null'}


@pytest.mark.parametrize("case", HOSTILE_ENVIRONMENTS.values(), ids=HOSTILE_ENVIRONMENTS.keys())
def test_sendmail_queues_in_a_hostile_environment(system: SystemInstall, case: Hostile) -> None:
    """Each queues (exit 0) with the kernel's submitter, a drop file of mode 0644 whatever the umask, and
    the message exactly as given; with -v the one line saying so."""
    user = system.stranger if case.stranger else system.alice
    argv = [system.script("sendmail"), "-v", *(["-C", str(system.config)] if case.empty_env else [])]
    argv.append("friend@example.net")
    if case.stdio:
        argv = ["/bin/sh", "-c", REDIRECT[case.stdio], *argv]
    changes = {**case.changes, **({"HOME": system.bob.home} if case.bobs_home else {})}
    env = {} if case.empty_env else system.environment(user, **changes)
    cwd = system.bob.home if case.cwd_of_bob else None
    if case.stdin_file:
        source = system.base / "message"
        source.write_bytes(MESSAGE)
        with open(source, "rb") as stdin:
            result = system.run_as(user, argv, stdin=stdin, env=env, cwd=cwd, umask=case.umask)
        source.unlink()
    else:
        result = system.run_as(user, argv, input=MESSAGE, env=env, cwd=cwd, umask=case.umask)

    assert result.returncode == 0, result.stderr
    [name] = system.names("new")
    if not case.stdio:
        assert result.stderr.decode().splitlines() == [f"sendmail: queued as {name} for friend@example.net"]
    assert result.stdout == b""
    drop = system.spool / "new" / name
    info = os.lstat(drop)
    assert (info.st_uid, stat.S_IMODE(info.st_mode), info.st_nlink) == (user.uid, 0o644, 1)
    envelope_line, _, stored = drop.read_bytes().partition(b"\n")
    envelope = json.loads(envelope_line)
    assert (envelope["submitted_by"], envelope["uid"]) == (user.name, user.uid)
    assert envelope["recipients"] == ["friend@example.net"]
    assert stored == MESSAGE.replace(b"\n", b"\r\n")  # nothing else got into it (no stray stderr line)
    if case.stranger:  # the flush, too, records the kernel's uid for a user it cannot name
        flush(system)
        [entry] = system.entries()
        assert (entry.submitted_by, entry.uid) == (user.name, user.uid)


def test_sendmail_with_stdin_closed_fails_cleanly(system: SystemInstall) -> None:
    argv = ["/bin/sh", "-c", 'exec "$0" "$@" <&-', system.script("sendmail"), "friend@example.net"]
    result = system.run_as(system.alice, argv)
    assert result.returncode == EX_NOINPUT
    [line] = result.stderr.decode().splitlines()
    assert line.startswith("sendmail: cannot read the message from standard input")
    assert system.names("new") == [] and system.names("tmp") == []


# --- local delivery ---


def test_local_mail_reaches_the_recipients_own_mailbox(system: SystemInstall) -> None:
    alice, bob = system.alice, system.bob
    queue_id = submit(system, alice, bob.name, message=b"Subject: for bob\n\nhi bob\n")

    log = flush(system)

    box = system.mail_spool / bob.name
    info = os.lstat(box)
    assert (info.st_uid, stat.S_IMODE(info.st_mode), stat.S_ISREG(info.st_mode)) == (bob.uid, 0o600, True), (
        log
    )
    [message] = mbox_messages(box)
    assert message["Subject"] == "for bob"
    assert message["Message-ID"] == f"<{queue_id}@{HOSTNAME}>"
    assert message["Return-Path"] == f"<{alice.name}@example.org>"
    assert message.get_payload() == "hi bob\n"
    assert sorted(os.listdir(system.mail_spool)) == [bob.name]  # nobody else's mailbox was written
    assert system.run_as(bob, ["/bin/cat", str(box)]).returncode == 0
    assert system.run_as(alice, ["/bin/cat", str(box)]).returncode != 0
    assert system.entries() == []


def test_a_flush_run_as_the_spool_owner_leaves_other_mailboxes_alone(system: SystemInstall) -> None:
    """Without root the flush may not write bob's mailbox: his mail waits for a root flush, and never lands
    in the spool owner's mailbox (as user mode would have it)."""
    alice, bob = system.alice, system.bob
    queue_id = submit(system, alice, bob.name, message=b"Subject: for bob\n\nhi bob\n")
    pymta = system.script("pymta")

    as_owner = system.run_as(system.spool_user, [pymta, "flush", "--now", "-v"])

    assert as_owner.returncode == 0, as_owner.stderr
    assert os.listdir(system.mail_spool) == []
    [entry] = system.entries()
    assert entry.id == queue_id and entry.state == "deferred"
    assert entry.last_error and "without root" in entry.last_error
    flush(system)  # as root: delivered into bob's own mailbox
    [message] = mbox_messages(system.mail_spool / bob.name)
    assert message["Subject"] == "for bob"


# --- privilege separation (the network side runs as the spool's owner) ---


def test_the_network_side_of_a_root_flush_runs_as_the_spool_owner(system: SystemInstall) -> None:
    """The password command reports who runs it: the spool's owner, never root; local delivery still works
    as the recipient, and what stays queued belongs to the spool's owner."""
    owner = system.spool_user
    who = system.base / "password-command-ran-as"
    who.write_text("")
    who.chmod(0o644)
    os.chown(who, owner.uid, owner.gid)
    secret = secret_file(system)
    with tls_server(system) as server:
        server.handler.rejections = {"later@example.net": "450 4.2.0 try again later"}
        command = f"id -un >> {who}; cat {secret}"
        system.write_config(smarthost_config(server, {"command": command}))
        queue_id = submit(system, system.alice, system.bob.name, "friend@example.net", "later@example.net")

        log = flush(system)

        [received] = server.handler.messages
        assert received.login == USER and received.rcpt_tos == ["friend@example.net"], log
    ran_as = who.read_text().split()
    assert ran_as and set(ran_as) == {owner.name}, ran_as
    box = system.mail_spool / system.bob.name
    assert os.lstat(box).st_uid == system.bob.uid and len(mbox_messages(box)) == 1
    for directory in ("queue", "state"):  # the deferred recipient keeps the message queued
        info = os.lstat(system.spool / directory / queue_id)
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (owner.uid, 0o600), directory


# --- per-user views of the queue ---


def test_each_user_sees_only_their_own_queued_mail(system: SystemInstall) -> None:
    alice, bob = system.alice, system.bob
    mine = submit(system, alice, "friend@example.net")
    theirs = submit(system, bob, "other@example.net")
    flush(system)  # no smarthost: both wait, and the flush publishes each user's view

    status = system.spool / "status" / str(alice.uid)
    info = os.lstat(status)
    assert (info.st_uid, stat.S_IMODE(info.st_mode), stat.S_ISREG(info.st_mode)) == (alice.uid, 0o400, True)
    header, *records = [json.loads(line) for line in status.read_text().splitlines()]
    assert header["v"] == 1 and header["uid"] == alice.uid and header["count"] == 1
    assert isinstance(header["published"], int | float)
    assert mine in status.read_text() and theirs not in status.read_text()
    assert [record["id"] for record in records] == [mine]
    for user in (alice, bob):  # status/ can be passed, not listed; bob's view is bob's alone
        assert system.run_as(user, ["/bin/ls", str(status.parent)]).returncode != 0
    bobs_view = system.run_as(alice, ["/bin/cat", str(status.parent / str(bob.uid))])
    assert bobs_view.returncode != 0 and bobs_view.stdout == b""

    listing = system.run_as(alice, [system.script("mailq")])
    assert listing.returncode == 0, listing.stderr
    assert mine.encode() in listing.stdout and theirs.encode() not in listing.stdout + listing.stderr
    as_json = system.run_as(alice, [system.script("pymta"), "queue", "--json"])
    assert as_json.returncode == 0, as_json.stderr
    assert [item["id"] for item in json.loads(as_json.stdout)] == [mine]
    assert theirs.encode() not in as_json.stderr
    bobs = system.run_as(bob, [system.script("pymta"), "queue", "--json"])
    assert bobs.returncode == 0 and [item["id"] for item in json.loads(bobs.stdout)] == [theirs]

    deleted = system.run_as(alice, [system.script("pymta"), "queue", "delete", theirs])
    assert deleted.returncode == EX_NOPERM, deleted.stderr
    assert sorted(entry.id for entry in system.entries()) == sorted([mine, theirs])
    flushed = system.run_as(alice, [system.script("pymta"), "flush"])
    assert flushed.returncode == EX_NOPERM, flushed.stderr
    assert flushed.stderr.decode().count("\n") == 1 and "may deliver the queue" in flushed.stderr.decode()


# --- the per-user quota ---


def test_the_queue_quota_refuses_more_and_leaves_direct_drops_waiting(system: SystemInstall) -> None:
    alice, bob = system.alice, system.bob
    system.write_config("max_queued_per_user: 2\n")
    queued = [submit(system, alice, "friend@example.net") for _ in range(2)]
    flush(system)  # both wait (no smarthost); the flush publishes alice's count

    refused = system.sendmail(alice, "friend@example.net", input=MESSAGE)
    assert refused.returncode == EX_TEMPFAIL, refused.stderr
    [line] = refused.stderr.decode().splitlines()
    assert line.startswith("sendmail: ") and "max_queued_per_user" in line
    assert system.names("new") == []
    # A message large enough to be streamed to the spool is checked once read, and refused alike.
    large = b"Subject: large\n\n" + b"a line of a large message, streamed rather than held\n" * 40_000
    refused = system.sendmail(alice, "friend@example.net", input=large)
    assert refused.returncode == EX_TEMPFAIL, refused.stderr
    assert refused.stderr.decode().splitlines() == [line]
    assert system.names("new") == [] and system.names("tmp") == []
    submit(system, bob, "friend@example.net", message=large)  # bob has his own quota

    direct = []
    for _ in range(2):
        name, data = drop_file(alice.name, ["friend@example.net"])
        write_as(system, alice, system.spool / "new" / name, data)
        direct.append(name)
    flush(system)

    assert system.names("new") == sorted(direct)  # over the quota: left waiting, not deleted
    assert system.names("corrupt") == []
    by_owner = [entry.submitted_by for entry in system.entries() if entry.location == "queue"]
    assert sorted(by_owner) == sorted([alice.name, alice.name, bob.name])
    assert {entry.id for entry in system.entries() if entry.location == "queue"} >= set(queued)


# --- include files are read with their owner's rights (issue 10, H1) ---
#
# The attack: the admin delegates a list to alice (`staff: :include:/home/alice/staff.list` in the aliases
# file), and alice writes `:include:` of the smarthost password file into her list. The flush reads include
# files as the spool's owner, who can read that file; before the rule the password came back as a
# "recipient" in alice's `mailq`, in her bounce and in the log, and root's `newaliases` printed it. Now
# alice's list is read with alice's rights, and so is everything it includes: the password file is refused
# without being read, the mail waits with a reason that names the file and the line, and the password is
# nowhere.

# An ASCII secret reads as a local name (the form of the leak in the issue); the non-ASCII one as no address.
ASCII_SECRET = f"Tr0ub4dor{secrets.token_hex(6)}"


def put_as(system: SystemInstall, user: User, path: Path, text: str, mode: str = "644") -> None:
    """Write `path` afresh as `user` (a home outlives a test), with `mode`."""
    script = 'rm -f "$1"; cat > "$1"; chmod "$2" "$1"'
    result = system.run_as(user, ["/bin/sh", "-c", script, "sh", str(path), mode], input=text.encode())
    assert result.returncode == 0, result.stderr


def ascii_secret_file(system: SystemInstall) -> Path:
    """Like `secret_file`, with a password that is a valid local part."""
    path = secret_file(system)
    path.write_text(ASCII_SECRET + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("make_secret", "secret"),
    [(secret_file, PASSWORD), (ascii_secret_file, ASCII_SECRET)],
    ids=["non-ascii", "ascii"],
)
def test_a_delegated_list_cannot_include_the_smarthost_password(
    system: SystemInstall, make_secret: Callable[[SystemInstall], Path], secret: str
) -> None:
    alice, bob = system.alice, system.bob
    password_file = make_secret(system)
    system.write_config("local_domains: [example.org]\n")  # alice's bounce, if any, lands in her mailbox
    assert shell_as(system, alice, 'chmod 711 "$HOME"').returncode == 0
    members = Path(alice.home) / "staff.list"
    put_as(system, alice, members, f"{bob.name}\n:include:{password_file}\n")
    system.aliases.write_text(f"staff: :include:{members}\n")

    queue_id = submit(system, alice, "staff")
    outputs = [flush(system)]

    for user in (alice, None):
        for argv in (
            ["mailq"],
            ["pymta", "queue", "--json"],
            ["pymta", "queue", "show", queue_id],
            ["newaliases"],
        ):
            result = system.run_as(user, [system.script(argv[0]), *argv[1:]])
            outputs.append((result.stdout + result.stderr).decode("utf-8", "replace"))
    assert any(f"{queue_id}" in output for output in outputs[1:])  # alice does see her message waiting
    for output in outputs:
        assert secret not in output, output
    alice_box = system.mail_spool / alice.name
    assert not alice_box.exists() or all(secret not in m.as_string() for m in mbox_messages(alice_box))
    secrets_dir = password_file.parent
    for path in files_under(system.spool, system.mail_spool, Path(alice.home), system.root):
        if secrets_dir not in path.parents:
            assert secret.encode() not in path.read_bytes(), path

    [entry] = system.entries()
    assert (entry.id, entry.state) == (queue_id, "deferred")  # the list's members are unknown: it waits
    assert entry.last_error is not None
    assert (
        f"line 2 of {members}: :include:{password_file} cannot be read by {alice.name}, whose rights it is"
        " read with"
    ) in entry.last_error

    # alice mends her list: the mail that waited reaches bob
    put_as(system, alice, members, f"{bob.name}\n")
    retried = system.run_as(None, [system.script("pymta"), "queue", "retry", queue_id])
    assert retried.returncode == 0, retried.stderr
    flush(system)
    [message] = mbox_messages(system.mail_spool / bob.name)
    assert message["Message-ID"].startswith(f"<{queue_id}@")
    assert system.entries() == []


def test_a_delegated_list_may_include_a_file_its_owner_can_read(system: SystemInstall) -> None:
    """The rule takes nothing away from a list's owner: alice's list may include her other files and
    root's files that she may read (the flush, as the spool's owner, must be able to read them too), and
    mail to the list reaches their members."""
    alice, bob = system.alice, system.bob
    assert shell_as(system, alice, 'chmod 711 "$HOME"; mkdir -p -m 711 "$HOME/lists"').returncode == 0
    more = Path(alice.home) / "lists" / "more"
    put_as(system, alice, more, f"{alice.name}\n")
    public = system.base / "public.list"
    public.write_text(f"{bob.name}\n")
    public.chmod(0o644)
    members = Path(alice.home) / "staff.list"
    put_as(system, alice, members, f":include:{public}\n:include:{more}\n")
    system.aliases.write_text(f"staff: :include:{members}\n")

    queue_id = submit(system, bob, "staff")
    flush(system)

    for user in (alice, bob):
        [message] = mbox_messages(system.mail_spool / user.name)
        assert message["Message-ID"].startswith(f"<{queue_id}@")
    assert system.entries() == []


def test_root_newaliases_prints_no_line_of_a_file_a_users_list_reaches(system: SystemInstall) -> None:
    """The low finding of issue 10: root's newaliases printed the lines of a root-only file that alice's
    list included, as "not an address" or "no such user"."""
    alice = system.alice
    root_only = system.base / "root-only"
    root_only.write_text(f"{ASCII_SECRET}\nsecond line, {ASCII_SECRET}x y z\n")
    root_only.chmod(0o600)
    assert shell_as(system, alice, 'chmod 711 "$HOME"').returncode == 0
    members = Path(alice.home) / "staff.list"
    put_as(system, alice, members, f":include:{root_only}\n")
    system.aliases.write_text(f"staff: :include:{members}\n")

    result: subprocess.CompletedProcess[bytes] = system.run_as(None, [system.script("newaliases")])

    output = (result.stdout + result.stderr).decode()
    assert f"line 1 of {members}: :include:{root_only} cannot be read by {alice.name}" in output, output
    assert ASCII_SECRET not in output
    assert os.stat(root_only).st_mode & 0o777 == 0o600
