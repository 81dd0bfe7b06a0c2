"""Local delivery (pymta/delivery/local.py): what mail readers read back, locking, refusals, a full disk,
privileges.

Every mailbox lives in a temporary directory: nothing here writes /var/mail or a real home. The tests that
need root (a mailbox owned by someone else, delivery as a freshly created user) skip without it.
"""

from __future__ import annotations

import mailbox
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymta.config.model import Local
from pymta.delivery import local, maildir, mbox, writing

ROOT = Path(__file__).resolve().parent.parent
ME = pwd.getpwuid(os.geteuid()).pw_name
SHORT = 0.3  # seconds: the lock deadline of the tests
NOW = 1_700_000_000.0
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def message(subject: str = "hello", body: str = "Hi there.\r\n") -> bytes:
    return f"From: sender@example.org\r\nTo: {ME}\r\nSubject: {subject}\r\n\r\n{body}".encode()


def read_mbox(path: Path) -> list[mailbox.mboxMessage]:
    """The messages of the mbox at `path` as Python's mailbox reads them."""
    box = mailbox.mbox(path, create=False)
    try:
        return list(box)
    finally:
        box.close()


def read_maildir(path: Path) -> list[mailbox.MaildirMessage]:
    return list(mailbox.Maildir(path, create=False))


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    path = tmp_path / "mail"
    path.mkdir()
    return path


def deliver(spool: Path, data: bytes | None = None, user: str = ME, **kwargs: object) -> local.LocalOutcome:
    options: dict[str, object] = {"sender": "sender@example.org", "now": NOW, "lock_timeout": SHORT}
    options.update(kwargs)
    mail = options.pop("local", Local(mailbox="mbox", mail_spool=str(spool)))
    return local.deliver(user, message() if data is None else data, local=mail, **options)  # type: ignore[arg-type]


# --- mbox: what readers read back ---


def test_mbox_delivery_reads_back_with_mailbox_mbox(spool: Path) -> None:
    outcome = deliver(spool)
    path = spool / ME
    assert outcome == local.LocalOutcome("delivered", f"delivered to {path}", str(path))
    [got] = read_mbox(path)
    assert got["Subject"] == "hello"
    assert got["Return-Path"] == "<sender@example.org>"
    assert got.get_from() == f"sender@example.org {time.asctime(time.localtime(NOW))}"
    assert got.get_payload() == "Hi there.\n"
    raw = path.read_bytes()
    assert b"\r" not in raw
    assert raw.endswith(b"Hi there.\n\n")  # a blank line after each message
    info = path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.geteuid()


def test_null_sender_is_mailer_daemon(spool: Path) -> None:
    assert deliver(spool, sender="").status == "delivered"
    [got] = read_mbox(spool / ME)
    assert got.get_from().startswith("MAILER-DAEMON ")
    assert got["Return-Path"] == "<>"


def test_sender_with_spaces_and_controls_cannot_break_the_from_line(spool: Path) -> None:
    assert deliver(spool, sender='"a b"@example.org\r\nX: y').status == "delivered"
    [got] = read_mbox(spool / ME)
    assert got.get_from().startswith('"a_b"@example.orgX:_y ')
    assert got["X"] is None


@pytest.mark.parametrize(
    ("sender", "shown"),
    [("jörg@exämple.org", "j?rg@ex?mple.org"), ("raw\udcffbyte@example.org", "raw?byte@example.org")],
    ids=["utf-8", "not utf-8"],
)
def test_the_from_line_stays_ascii_and_return_path_keeps_the_sender(
    spool: Path, sender: str, shown: str
) -> None:
    assert deliver(spool, sender=sender).status == "delivered"
    raw = (spool / ME).read_bytes()
    assert raw.startswith(f"From {shown} ".encode())
    assert b"\nReturn-Path: <" + sender.encode("utf-8", "surrogateescape") + b">\n" in raw
    [got] = read_mbox(spool / ME)
    assert got["Subject"] == "hello"
    assert got.get_from().startswith(shown)


def test_messages_append_in_order(spool: Path) -> None:
    for number in range(3):
        assert deliver(spool, message(f"number {number}")).status == "delivered"
    assert [got["Subject"] for got in read_mbox(spool / ME)] == ["number 0", "number 1", "number 2"]


@pytest.mark.parametrize(
    "before",
    [
        b"From a Mon Jan  1 00:00:00 2024\nSubject: old\n\nno final newline",
        b"From a Mon Jan  1 00:00:00 2024\n",
    ],
    ids=["no newline at the end", "no blank line at the end"],
)
def test_a_damaged_end_of_the_mbox_is_mended(spool: Path, before: bytes) -> None:
    (spool / ME).write_bytes(before)
    (spool / ME).chmod(0o600)
    assert deliver(spool).status == "delivered"
    messages = read_mbox(spool / ME)
    assert len(messages) == 2
    assert messages[1]["Subject"] == "hello"
    assert (spool / ME).read_bytes().startswith(before)


def test_from_lines_in_the_body_are_quoted_so_the_message_stays_whole(spool: Path) -> None:
    body = "From here on\r\n>From the quote\r\nFromage\r\n From indented\r\n\r\nFrom the end\r\n"
    assert deliver(spool, message(body=body)).status == "delivered"
    assert deliver(spool, message("second")).status == "delivered"
    first, second = read_mbox(spool / ME)
    # mboxo: only 'From ' is quoted; '>From ' is left as it is, so readers that do not unquote show it right.
    assert first.get_payload() == (
        ">From here on\n>From the quote\nFromage\n From indented\n\n>From the end\n"
    )
    assert second["Subject"] == "second"


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.sampled_from(["From x", "From ", ">From y", ">>From z", "From: h", "", " From", "text"]),
        max_size=8,
    )
)
def test_from_quoting_round_trip(lines: list[str]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        spool = Path(directory)
        body = "".join(f"{line}\r\n" for line in lines)
        assert deliver(spool, message(body=body)).status == "delivered"
        assert deliver(spool, message("next", "From the next\r\n")).status == "delivered"
        first, second = read_mbox(spool / ME)
        expected = "".join(f">{line}\n" if line.startswith("From ") else f"{line}\n" for line in lines)
        assert first.get_payload() == expected
        assert second.get_payload() == ">From the next\n"


def test_a_message_without_final_newline_still_ends_with_a_blank_line(spool: Path) -> None:
    assert deliver(spool, message(body="no newline")).status == "delivered"
    assert deliver(spool, message("second")).status == "delivered"
    first, second = read_mbox(spool / ME)
    assert first.get_payload() == "no newline\n"
    assert second["Subject"] == "second"


# --- concurrency and locking ---


def test_concurrent_deliveries_from_several_processes_never_interleave(spool: Path) -> None:
    writers, each = 6, 5
    code = """
        import sys
        from pymta.delivery.local import deliver
        from pymta.config.model import Local
        spool, user, writer, each = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        for number in range(each):
            body = (f"writer {writer} message {number} " * 4000 + "\\r\\n").encode()
            data = f"Subject: {writer}.{number}\\r\\n\\r\\n".encode() + body
            mail = Local(mailbox="mbox", mail_spool=spool)
            outcome = deliver(user, data, sender="s@example.org", local=mail, now=0, lock_timeout=60)
            assert outcome.status == "delivered", outcome
    """
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), str(spool), ME, str(writer), str(each)], cwd=ROOT
        )
        for writer in range(writers)
    ]
    assert [process.wait(timeout=120) for process in processes] == [0] * writers
    messages = read_mbox(spool / ME)
    assert len(messages) == writers * each
    seen = set()
    for got in messages:
        writer, number = got["Subject"].split(".")
        assert got.get_payload() == f"writer {writer} message {number} " * 4000 + "\n"
        seen.add(got["Subject"])
    assert len(seen) == writers * each


def test_concurrent_deliveries_from_threads_of_one_process_never_interleave(spool: Path) -> None:
    outcomes: list[local.LocalOutcome] = []

    def write(writer: int) -> None:
        for number in range(5):
            data = message(f"{writer}.{number}", f"{writer}.{number} " * 5000 + "\r\n")
            outcomes.append(deliver(spool, data, lock_timeout=60))

    threads = [threading.Thread(target=write, args=(writer,)) for writer in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {outcome.status for outcome in outcomes} == {"delivered"}
    messages = read_mbox(spool / ME)
    assert len(messages) == 20
    for got in messages:
        assert got.get_payload() == f"{got['Subject']} " * 5000 + "\n"


def test_a_held_dotlock_defers_after_the_deadline(spool: Path) -> None:
    (spool / f"{ME}.lock").write_text("12345\n")
    started = time.monotonic()
    outcome = deliver(spool)
    waited = time.monotonic() - started
    assert outcome.status == "deferred"
    assert "mailbox locked" in outcome.reason
    assert SHORT <= waited < SHORT + 5
    assert (spool / ME).read_bytes() == b""  # created, but nothing written while locked
    assert (spool / f"{ME}.lock").read_text() == "12345\n"  # someone else's lock is left alone
    (spool / f"{ME}.lock").unlink()
    assert deliver(spool).status == "delivered"
    assert not (spool / f"{ME}.lock").exists()  # our own lock is gone after delivery


def test_a_stale_dotlock_is_removed(spool: Path) -> None:
    lock = spool / f"{ME}.lock"
    lock.write_text("12345\n")
    old = time.time() - mbox.STALE_DOTLOCK_AGE - 60
    os.utime(lock, (old, old))
    assert deliver(spool).status == "delivered"
    assert not lock.exists()


@pytest.mark.parametrize("how", ["fcntl", "mailbox.mbox.lock"])
def test_a_lock_held_by_another_process_defers(spool: Path, how: str) -> None:
    path = spool / ME
    path.write_bytes(b"")
    path.chmod(0o600)
    take, release = (
        ("f = open(path, 'r+b'); fcntl.lockf(f, fcntl.LOCK_EX)", "f.close()")
        if how == "fcntl"
        else ("box = mailbox.mbox(path); box.lock()", "box.unlock(); box.close()")
    )
    code = f"import fcntl, mailbox, sys\npath = sys.argv[1]\n{take}\nprint('locked', flush=True)\n"
    code += f"sys.stdin.read()\n{release}\n"
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(path)], text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        outcome = deliver(spool)
        assert outcome.status == "deferred"
        assert "mailbox locked" in outcome.reason
        assert path.read_bytes() == b""
    finally:
        holder.communicate("")
    assert deliver(spool).status == "delivered"
    assert len(read_mbox(path)) == 1


def test_a_run_waits_for_a_locked_mailbox_once_then_defers_the_rest_for_it_at_once(
    spool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local, "_found_locked", {})
    mail = Local(mailbox="mbox", mail_spool=str(spool))
    options: dict[str, Any] = {"sender": "s@example.org", "local": mail, "now": NOW, "lock_timeout": SHORT}
    (spool / f"{ME}.lock").write_text("12345\n")  # a reader's dotlock, fresh
    first = local.deliver_as_recipient(ME, message(), **options)
    assert first.status == "deferred" and "stayed locked" in first.reason and first.locked
    assert local.LocalOutcome.from_json(first.to_json()) == first  # as a child or root's server sends it
    again = local.deliver_as_recipient(ME, message(), **options)
    assert again.status == "deferred" and again.mailbox == first.mailbox
    assert again.reason.startswith(first.reason) and "not waiting again" in again.reason
    (spool / f"{ME}.lock").unlink()
    monkeypatch.setattr(local, "LOCKED_MEMORY", 0.0)  # the memory has run out: it is tried again
    assert local.deliver_as_recipient(ME, message(), **options).status == "delivered"
    assert local._found_locked == {}
    assert len(read_mbox(spool / ME)) == 1


# --- refusals ---


def test_a_symlinked_mailbox_is_refused(spool: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    (spool / ME).symlink_to(victim)
    outcome = deliver(spool)
    assert outcome.status == "deferred"
    assert "symbolic link" in outcome.reason
    assert victim.read_bytes() == b"precious\n"


def test_a_hard_linked_mailbox_is_refused(spool: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_bytes(b"")
    os.link(other, spool / ME)
    outcome = deliver(spool)
    assert outcome.status == "deferred"
    assert "hard links" in outcome.reason
    assert other.read_bytes() == b""


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_mailbox_that_is_no_regular_file_is_refused(spool: Path, kind: str) -> None:
    if kind == "directory":
        (spool / ME).mkdir()
    else:
        os.mkfifo(spool / ME)
    outcome = deliver(spool)  # a FIFO must not block us
    assert outcome.status == "deferred"
    assert "not a regular file" in outcome.reason


@root_only
def test_a_mailbox_owned_by_someone_else_is_refused(spool: Path) -> None:
    path = spool / ME
    path.write_bytes(b"")
    os.chown(path, 65534, 65534)
    outcome = deliver(spool)
    assert outcome.status == "deferred"
    assert f"belongs to nobody, not {ME}" in outcome.reason or f"belongs to 65534, not {ME}" in outcome.reason
    assert f"chown {ME}" in outcome.reason
    assert path.read_bytes() == b""


def test_a_missing_mail_spool_defers(tmp_path: Path) -> None:
    outcome = deliver(tmp_path / "nowhere")
    assert outcome.status == "deferred"
    assert "does not exist" in outcome.reason


@pytest.mark.parametrize(
    "user",
    ["", "a/b", "..", ".", ".hidden", "-rf", "a b", "a\tb", "a\nb", "a\x00b", "a;b", "$(id)", "`id`", "a|b",
     "a*", "x" * 300, "bob.lock", "ünïcode", "../../etc/passwd"],
)  # fmt: skip
def test_names_with_shell_or_path_characters_fail_before_touching_files(spool: Path, user: str) -> None:
    outcome = deliver(spool, user=user)
    assert outcome.status == "failed"
    assert outcome.reason.startswith("5.1.3 refused: ")
    assert list(spool.iterdir()) == []
    assert (
        local.deliver_as_recipient(
            user, message(), sender="", local=Local(mail_spool=str(spool)), now=NOW
        ).status
        == "failed"
    )


def test_a_missing_user_fails(spool: Path) -> None:
    outcome = deliver(spool, user="pymta-no-such-user")
    assert outcome == local.LocalOutcome("failed", "5.1.1 no such local user: pymta-no-such-user")
    assert list(spool.iterdir()) == []


def test_the_user_name_is_tried_in_lower_case_too(spool: Path) -> None:
    if ME.lower() != ME or ME.upper() == ME:
        pytest.skip("needs a lower-case login name")
    assert deliver(spool, user=ME.upper()).status == "delivered"
    assert (spool / ME).exists()


# --- a full disk ---


def test_a_write_that_fails_midway_leaves_the_mbox_exactly_as_before(spool: Path) -> None:
    assert deliver(spool, message("first")).status == "delivered"
    path = spool / ME
    before = path.read_bytes()
    code = """
        import resource, sys
        from pymta.delivery.local import deliver
        from pymta.config.model import Local
        spool, user, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        data = b"Subject: big\\r\\n\\r\\n" + b"x" * 200_000 + b"\\r\\n"
        print(deliver(user, data, sender="s@example.org", local=Local(mailbox="mbox", mail_spool=spool),
                      now=0, lock_timeout=5).to_json())
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), str(spool), ME, str(len(before) + 50_000)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    outcome = local.LocalOutcome.from_json(result.stdout)
    assert outcome.status == "deferred"
    assert "File too large" in outcome.reason and "unchanged" in outcome.reason
    assert path.read_bytes() == before
    assert not (spool / f"{ME}.lock").exists()
    assert deliver(spool, message("after")).status == "delivered"
    assert [got["Subject"] for got in read_mbox(path)] == ["first", "after"]


# --- Maildir ---


def maildir_local(path: Path, mailbox_format: str = "maildir") -> Local:
    return Local(mailbox=mailbox_format, mail_spool="/nonexistent", maildir=str(path))  # type: ignore[arg-type]


def test_maildir_delivery_reads_back_with_mailbox_maildir(tmp_path: Path) -> None:
    path = tmp_path / "Maildir"
    outcome = deliver(tmp_path, local=maildir_local(path))
    assert outcome.status == "delivered", outcome
    assert outcome.mailbox == str(path)
    [got] = read_maildir(path)
    assert got["Subject"] == "hello"
    assert got["Return-Path"] == "<sender@example.org>"
    assert got.get_payload() == "Hi there.\n"
    [name] = os.listdir(path / "new")
    assert outcome.reason == f"delivered to {path / 'new' / name}"
    assert os.listdir(path / "tmp") == []
    assert b"\r" not in (path / "new" / name).read_bytes()
    assert stat.S_IMODE((path / "new" / name).stat().st_mode) == 0o600
    for sub in ("", "new", "cur", "tmp"):
        assert stat.S_IMODE((path / sub).stat().st_mode) == 0o700


def test_maildir_names_are_unique(tmp_path: Path) -> None:
    path = tmp_path / "Maildir"
    for number in range(20):
        assert deliver(tmp_path, message(str(number)), local=maildir_local(path)).status == "delivered"
    assert sorted(int(got["Subject"]) for got in read_maildir(path)) == list(range(20))


def test_auto_uses_the_maildir_when_it_exists_and_the_mbox_otherwise(tmp_path: Path) -> None:
    path = tmp_path / "Maildir"
    spool = tmp_path / "mail"
    spool.mkdir()
    auto = Local(mailbox="auto", mail_spool=str(spool), maildir=str(path))
    assert deliver(spool, local=auto).mailbox == str(spool / ME)
    mailbox.Maildir(path, create=True)
    assert deliver(spool, local=auto).mailbox == str(path)
    assert len(read_mbox(spool / ME)) == 1
    assert len(read_maildir(path)) == 1


def test_an_incomplete_maildir_defers(tmp_path: Path) -> None:
    path = tmp_path / "Maildir"
    path.mkdir()
    (path / "new").mkdir()
    outcome = deliver(tmp_path, local=maildir_local(path, "auto"))
    assert outcome.status == "deferred"
    assert "not a whole Maildir" in outcome.reason


@pytest.mark.parametrize("swapped", ["tmp", "new"])
def test_a_maildir_directory_swapped_for_a_link_after_the_checks_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swapped: str
) -> None:
    """The recipient renames tmp/ (or new/) away and puts a link to another directory in its place between
    the child's checks and its writes: as a child with the mail group, that wrote into /var/mail."""
    path = tmp_path / "Maildir"
    mailbox.Maildir(path, create=True)
    elsewhere = tmp_path / "var-mail"
    elsewhere.mkdir()
    unique_name = maildir._unique_name

    def swap_then_name() -> str:  # called after the checks, before the writes
        if not (path / f"{swapped}.old").exists():
            (path / swapped).rename(path / f"{swapped}.old")
            (path / swapped).symlink_to(elsewhere)
        return unique_name()

    monkeypatch.setattr(maildir, "_unique_name", swap_then_name)

    outcome = deliver(tmp_path, local=maildir_local(path))

    assert list(elsewhere.iterdir()) == []
    assert outcome.status == "delivered", outcome
    [written] = (path / ("new.old" if swapped == "new" else "new")).iterdir()
    assert b"Subject: hello" in written.read_bytes()
    assert list((path / ("tmp.old" if swapped == "tmp" else "tmp")).iterdir()) == []


# --- privileges ---


def test_as_the_own_user_delivery_happens_in_process(spool: Path) -> None:
    outcome = local.deliver_as_recipient(
        ME, message(), sender="s@example.org", local=Local(mailbox="mbox", mail_spool=str(spool)), now=NOW
    )
    assert outcome.status == "delivered"
    assert len(read_mbox(spool / ME)) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_as_root_roots_own_mailbox_is_written_by_a_child(
    spool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The root process opens no mailbox, not even root's (pymta(1), PRIVILEGES)."""
    children: list[str] = []
    in_child = local._deliver_in_child

    def recorded(entry: pwd.struct_passwd, *args: object, **kwargs: object) -> local.LocalOutcome:
        children.append(entry.pw_name)
        return in_child(entry, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(local, "_deliver_in_child", recorded)
    outcome = local.deliver_as_recipient(
        "root", message(), sender="s@example.org", local=Local(mailbox="mbox", mail_spool=str(spool)), now=NOW
    )
    assert outcome.status == "delivered" and children == ["root"]
    assert len(read_mbox(spool / "root")) == 1


def test_without_root_other_users_mail_is_deferred(spool: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = pwd.getpwuid(0).pw_name if os.geteuid() != 0 else ME
    monkeypatch.setattr(writing, "euid", lambda: 54321)
    outcome = local.deliver_as_recipient(
        other, message(), sender="", local=Local(mailbox="mbox", mail_spool=str(spool)), now=NOW
    )
    assert outcome == local.LocalOutcome(
        "deferred", f"cannot deliver to {other}'s mailbox without root; run the flush as root (pymta setup)"
    )
    assert list(spool.iterdir()) == []


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory a test user can reach (pytest's own temporary directories are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="pymta-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
def test_user(shared_dir: Path) -> Iterator[pwd.struct_passwd]:
    """A system user that exists only for this test, with its home in `shared_dir`; removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        pytest.skip("needs useradd and userdel")
    name = f"pymtat{secrets.token_hex(4)}"
    home = shared_dir / "home"
    created = subprocess.run(
        [
            "useradd",
            "--no-create-home",
            "--home-dir",
            str(home),
            "--shell",
            "/usr/sbin/nologin",
            "--user-group",
            name,
        ],
        capture_output=True,
        text=True,
    )
    if created.returncode != 0:
        pytest.skip(f"useradd failed: {created.stderr.strip()}")
    try:
        entry = pwd.getpwnam(name)
        home.mkdir()
        os.chown(home, entry.pw_uid, entry.pw_gid)
        home.chmod(0o700)
        yield entry
    finally:
        subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", name], capture_output=True)  # in case userdel left the user's group


def test_the_child_gets_the_mail_spools_group_only_when_that_group_may_write_it(tmp_path: Path) -> None:
    me = pwd.getpwuid(os.geteuid())
    own = set(os.getgrouplist(me.pw_name, me.pw_gid))
    spool = tmp_path / "mail"
    spool.mkdir()
    gid = spool.stat().st_gid
    mail = Local(mail_spool=str(spool))
    spool.chmod(0o2775)
    expected = own | ({gid} if gid != 0 else set())
    assert set(local._child_groups(me, mail)) == expected
    for mode in (0o1777, 0o755):
        spool.chmod(mode)
        assert set(local._child_groups(me, mail)) == own


def as_recipient(user: str, mail: Local, data: bytes | None = None) -> local.LocalOutcome:
    return local.deliver_as_recipient(
        user, message() if data is None else data, sender="s@example.org", local=mail, now=NOW, lock_timeout=5
    )


@pytest.mark.parametrize(
    "mode", [0o1777, 0o2775, 0o755], ids=["1777 (Arch)", "root:mail 2775 (Debian)", "0755"]
)
def test_root_delivers_as_the_recipient(test_user: pwd.struct_passwd, shared_dir: Path, mode: int) -> None:
    spool = shared_dir / "mail"
    spool.mkdir()
    if mode & stat.S_ISGID:
        os.chown(spool, 0, test_user.pw_gid + 1 if test_user.pw_gid + 1 != 0 else 12345)
    spool.chmod(mode)
    name = test_user.pw_name
    outcome = as_recipient(name, Local(mailbox="mbox", mail_spool=str(spool)))
    assert outcome.status == "delivered", outcome
    info = (spool / name).stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (test_user.pw_uid, 0o600)
    assert (
        as_recipient(name, Local(mailbox="mbox", mail_spool=str(spool)), message("second")).status
        == "delivered"
    )
    assert [got["Subject"] for got in read_mbox(spool / name)] == ["hello", "second"]
    assert not (spool / f"{name}.lock").exists()


def test_root_delivers_into_the_recipients_maildir(test_user: pwd.struct_passwd) -> None:
    outcome = as_recipient(test_user.pw_name, Local(mailbox="maildir", mail_spool="/nonexistent"))
    assert outcome.status == "delivered", outcome
    path = Path(test_user.pw_dir) / "Maildir"
    assert outcome.mailbox == str(path)
    [name] = os.listdir(path / "new")
    info = (path / "new" / name).stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (test_user.pw_uid, 0o600)
    assert (path / "new").stat().st_uid == test_user.pw_uid
    [got] = read_maildir(path)
    assert got["Subject"] == "hello"


def test_the_recipients_child_cannot_write_what_the_recipient_cannot(
    test_user: pwd.struct_passwd, shared_dir: Path
) -> None:
    spool = shared_dir / "mail"
    spool.mkdir()
    spool.chmod(0o1777)
    victim = shared_dir / "victim"
    victim.write_bytes(b"root's file\n")
    victim.chmod(0o644)
    (spool / test_user.pw_name).symlink_to(victim)
    outcome = as_recipient(test_user.pw_name, Local(mailbox="mbox", mail_spool=str(spool)))
    assert outcome.status == "deferred"
    assert "symbolic link" in outcome.reason
    assert victim.read_bytes() == b"root's file\n"
    # a Maildir pointing at root's directory: the child, running as the user, cannot write there
    rootdir = shared_dir / "rootdir"
    for sub in ("", "new", "cur", "tmp"):
        (rootdir / sub).mkdir()
    (Path(test_user.pw_dir) / "Maildir").symlink_to(rootdir)
    outcome = as_recipient(test_user.pw_name, Local(mailbox="maildir", mail_spool=str(spool)))
    assert outcome.status == "deferred"
    assert os.listdir(rootdir / "new") == [] and os.listdir(rootdir / "tmp") == []


@pytest.mark.parametrize("stall", ["stopped", "silent", "silent before writing"])
def test_a_stalled_delivery_child_is_killed_and_only_its_mail_waits(
    test_user: pwd.struct_passwd, shared_dir: Path, monkeypatch: pytest.MonkeyPatch, stall: str
) -> None:
    """The child is the recipient's process: she may stop it (SIGSTOP), or her mailbox may hang it. The
    parent kills it at once (stopped) or at its deadline (silent), defers, and does not wait for that
    mailbox again in this run; a later run delivers the message whole."""
    spool = shared_dir / "mail"
    spool.mkdir()
    spool.chmod(0o1777)
    monkeypatch.setattr(local, "_found_locked", {})
    monkeypatch.setattr(local, "CHILD_START_TIMEOUT", 0.5)
    monkeypatch.setattr(local, "CHILD_WRITE_TIMEOUT", 0.5)
    module, where = (mbox, "_open_mbox") if stall == "silent before writing" else (writing, "begin_writing")
    original = getattr(module, where)

    def then_stall(*args: Any) -> Any:  # runs in the child only: the recipient is not the test's user
        result = original(*args)
        if stall == "stopped":
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            time.sleep(3600)
        return result

    monkeypatch.setattr(module, where, then_stall)
    mail = Local(mailbox="mbox", mail_spool=str(spool))
    name = test_user.pw_name

    def attempt() -> local.LocalOutcome:
        return local.deliver_as_recipient(
            name, message(), sender="s@example.org", local=mail, now=NOW, lock_timeout=0.2
        )

    outcome = attempt()

    assert outcome.status == "deferred" and outcome.locked, outcome
    expected = {
        "stopped": "was stopped",
        "silent": "did not finish writing",
        "silent before writing": "did not begin",
    }
    assert expected[stall] in outcome.reason and "killed" in outcome.reason, outcome.reason
    assert ("cut short" in outcome.reason) == (stall != "silent before writing")
    again = attempt()
    assert again.status == "deferred" and "not waiting again" in again.reason
    # What a child killed with the mailbox in hand leaves: its dotlock, removed once stale, and nothing of
    # the message here (it stalled before its first byte); then the next run delivers it whole.
    monkeypatch.setattr(module, where, original)
    monkeypatch.setattr(local, "_found_locked", {})
    dotlock = spool / f"{name}.lock"
    if dotlock.exists():
        old = time.time() - mbox.STALE_DOTLOCK_AGE - 1
        os.utime(dotlock, (old, old))
    assert (spool / name).read_bytes() == b""
    assert attempt().status == "delivered"
    [got] = read_mbox(spool / name)
    assert got["Subject"] == "hello"


def test_root_delivers_to_root_in_process(spool: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    outcome = as_recipient("root", Local(mailbox="mbox", mail_spool=str(spool)))
    assert outcome.status == "delivered"
    assert (spool / "root").stat().st_uid == 0
