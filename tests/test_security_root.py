"""Root never touches the spool by path (ARCHITECTURE.md invariant 10; issue 10, C1 and M3), with real users.

The hostile side here is the spool's owner (`pymta`, as a compromised delivery process would be) and, for
sendmail, any user: they own or can write the directories root's commands work in, so they swap a spool
directory for a symbolic link, plant a FIFO, a link to /dev/zero or to a root-only file, and watch for the
moment root looks. What is proved: root's flush, queue commands and mailq never change a root-owned file
outside the spool (no file is "given back"), never hang, never read without a limit and never print what
only root may read; root's and any user's sendmail refuse a drop side that is a link; root writes the users'
views only in a directory of its own; `pymta setup --check` reports the tampering; `pymta test` run by a
user gives advice that holds.

Everything skips when not run as root (see tests/system_install.py).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from system_install import SPOOL_DIRS, SystemInstall, User
from test_security import secret_file, smarthost_config, submit, tls_server

MESSAGE = b"Subject: root and the spool\n\nhello\n"
SECRET = "TOPSECRET-only-root-reads-this"
EX_CANTCREAT, EX_TEMPFAIL = 73, 75
# The address space a root command may use here (KiB): reading /dev/zero into memory fails at once.
MEMORY_LIMIT_KIB = 1024 * 1024
# Seconds a root command may take before it counts as hung.
HANG = 15.0


@pytest.fixture
def hostile(system: SystemInstall) -> Iterator[SystemInstall]:
    """The install, and afterwards the spool put back as setup made it, whatever a test swapped in, and the
    root-only directory the tests aim at removed (the next test's reset never follows a planted link)."""
    try:
        yield system
    finally:
        owner = system.spool_user
        for entry in os.scandir(system.spool):
            if entry.name not in (*SPOOL_DIRS, "flush.lock", "status") or entry.is_symlink():
                _remove(entry.path)
        for name, mode in [(name, 0o1733 if name in ("tmp", "new") else 0o700) for name in SPOOL_DIRS]:
            path = system.spool / name
            if not path.is_dir() or path.is_symlink():
                _remove(str(path))
                path.mkdir()
            os.chown(path, owner.uid, owner.gid)
            path.chmod(mode)
        lock = system.spool / "flush.lock"
        if lock.is_symlink() or not lock.is_file():
            _remove(str(lock))
            lock.touch()
        os.chown(lock, owner.uid, owner.gid)
        lock.chmod(0o600)
        shutil.rmtree(system.base / "rootonly", ignore_errors=True)
        for path in Path(system.alice.home).glob("elsewhere-*"):
            shutil.rmtree(path)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def root_only_dir(system: SystemInstall) -> Path:
    """A directory only root may enter, with a root-owned file `victim` in it."""
    directory = system.base / "rootonly"
    directory.mkdir(mode=0o700)
    (directory / "victim").write_text("root's own\n")
    (directory / "victim").chmod(0o600)
    return directory


def as_owner(system: SystemInstall, command: str, *args: str) -> None:
    """A shell command as the spool's owner (the hostile side); it must work."""
    result = system.run_as(system.spool_user, ["/bin/sh", "-ec", command, "sh", *args])
    assert result.returncode == 0, result.stderr


def limited(system: SystemInstall, user: User | None, argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    """`argv` as `user` with little memory and a short deadline: a hang or an unbounded read fails."""
    wrapped = ["/bin/sh", "-c", f'ulimit -v {MEMORY_LIMIT_KIB}; exec "$@"', "sh", *argv]
    return system.run_as(user, wrapped, timeout=HANG)


def deferred_message(system: SystemInstall) -> str:
    """A message of alice's waiting in queue/ with a state file (no smarthost: it is deferred)."""
    queue_id = submit(system, system.alice, "friend@example.net")
    result = system.flush()
    assert result.returncode == 0, result.stderr
    assert (system.spool / "state" / queue_id).is_file()
    return queue_id


# --- C1: root gives nothing back, and never acts in the spool as root ---

# Waits for root (or whoever it became) to open flush.lock, then swaps done/ for a link to the root-only
# directory: the moment a root command that walks the spool by path would open done/victim.
SWAPPER = """
import ctypes, os, select, struct, sys, time
spool, target = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(0)
assert fd >= 0 and libc.inotify_add_watch(fd, spool.encode(), 0x20) >= 0  # IN_OPEN, in the spool
print("ready", flush=True)
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    if not select.select([fd], [], [], 0.5)[0]:
        continue
    data = os.read(fd, 65536)
    names = []
    while data:
        length = struct.unpack_from("iIII", data)[3]
        names.append(data[16:16 + length].rstrip(b"\\0"))
        data = data[16 + length:]
    if b"flush.lock" in names:
        os.rename(os.path.join(spool, "done"), os.path.join(spool, "done.old"))
        os.symlink(target, os.path.join(spool, "done"))
        print("swapped", flush=True)
        break
"""


@pytest.mark.parametrize(
    "command", [["flush", "--now"], ["queue", "retry", "--all"]], ids=["flush", "queue-retry"]
)
def test_a_spool_dir_swapped_for_a_link_never_gets_a_root_file_chowned(
    hostile: SystemInstall, command: list[str]
) -> None:
    system, owner = hostile, hostile.spool_user
    target = root_only_dir(system)
    # A root-owned flush.lock, as an older all-root flush left it, and a file named like root's in done/;
    # padding in corrupt/ gives the swap time, as in the review that found it.
    os.chown(system.spool / "flush.lock", 0, 0)
    as_owner(
        system,
        'cd "$1"; : > done/victim; i=0; while [ $i -lt 3000 ]; do : > corrupt/pad$i; i=$((i+1)); done',
        str(system.spool),
    )
    swapper = subprocess.Popen(
        [system.script("python3"), "-c", SWAPPER, str(system.spool), str(target)],
        user=owner.uid,
        group=owner.gid,
        extra_groups=[],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=str(system.base),
        env=system.environment(owner),
    )
    try:
        assert swapper.stdout is not None and swapper.stdout.readline() == b"ready\n"
        result = system.run_as(None, [system.script("pymta"), *command], timeout=HANG)
    finally:
        swapper.kill()  # root's command has ended: a swap now comes too late for anything
        swapper.communicate()
    info = os.lstat(target / "victim")
    assert (info.st_uid, info.st_gid) == (0, 0), "root gave its own file to the spool's owner"
    for path in target.iterdir():
        assert os.lstat(path).st_uid == 0, path
    if command[0] == "flush":  # the lock it cannot open is named, with the way out
        assert result.returncode != 0 and b"Traceback" not in result.stderr, result.stderr
        assert b"flush.lock" in result.stderr and b"pymta setup --check" in result.stderr, result.stderr


def test_a_queue_dir_swapped_for_a_link_to_roots_makes_no_root_flush(hostile: SystemInstall) -> None:
    """With queue/ a link to a directory of root's, a flush that judged the spool by queue/ ran all of it
    as root: in a directory its owner controls. It must still become the spool's owner."""
    system = hostile
    target = root_only_dir(system)
    submit(system, system.alice, "friend@example.net")
    as_owner(system, 'cd "$1"; mv queue queue.old; ln -s "$2" queue', str(system.spool), str(target))
    before = sorted(path.name for path in target.iterdir())
    system.run_as(None, [system.script("pymta"), "flush", "--now", "-v"], timeout=HANG)
    assert sorted(path.name for path in target.iterdir()) == before, "root picked up into root's directory"
    assert os.lstat(system.spool / "flush.lock").st_uid == system.spool_user.uid
    for directory in ("new", "queue.old", "state", "corrupt", "done", "tmp"):
        for path in (system.spool / directory).iterdir():
            assert os.lstat(path).st_uid != 0, path


# --- M3: root's listings read state/ as the spool's owner, without following or blocking ---


def plant_fifo(system: SystemInstall, state: Path) -> None:
    as_owner(system, 'rm -f "$1"; mkfifo "$1"', str(state))


def plant_zero(system: SystemInstall, state: Path) -> None:
    as_owner(system, 'rm -f "$1"; ln -s /dev/zero "$1"', str(state))


def plant_secret(system: SystemInstall, state: Path) -> None:
    directory = root_only_dir(system)
    secret = {"state": "deferred", "attempts": 1, "last_error": SECRET, "recipients": {}}
    (directory / "state.json").write_text(json.dumps(secret))
    (directory / "state.json").chmod(0o600)
    as_owner(system, 'rm -f "$1"; ln -s "$2" "$1"', str(state), str(directory / "state.json"))


def plant_huge(system: SystemInstall, state: Path) -> None:
    as_owner(system, 'rm -f "$1"; truncate -s 8G "$1"', str(state))


@pytest.mark.parametrize("plant", [plant_fifo, plant_zero, plant_secret, plant_huge])
def test_a_planted_state_file_neither_hangs_nor_floods_nor_leaks_roots_listings(
    hostile: SystemInstall, plant: object
) -> None:
    system = hostile
    queue_id = deferred_message(system)
    assert callable(plant)
    plant(system, system.spool / "state" / queue_id)
    pymta = system.script("pymta")
    for argv in (
        [system.script("mailq")],
        [system.script("sendmail"), "-bp"],
        [pymta, "queue"],
        [pymta, "queue", "--json"],
        [pymta, "queue", "show", queue_id],
    ):
        result = limited(system, None, argv)
        output = result.stdout + result.stderr
        assert b"Traceback" not in output and b"MemoryError" not in output, (argv, output[-2000:])
        assert SECRET.encode() not in output, argv
        assert queue_id.encode() in output, (argv, output[-2000:])  # reported, not hidden
        assert result.returncode in (0, 65), (argv, result.returncode, output[-2000:])


# --- M3: sendmail never follows a link the spool's owner made for tmp/ or new/ ---


@pytest.mark.parametrize("directory", ["tmp", "new"])
@pytest.mark.parametrize("who", ["root", "alice"])
def test_sendmail_refuses_a_drop_directory_that_is_a_link(
    hostile: SystemInstall, directory: str, who: str
) -> None:
    system = hostile
    user = None if who == "root" else system.alice
    # Where the spool's owner points the link: somewhere the submitter may write and the owner may not read.
    target = root_only_dir(system) if user is None else Path(system.alice.home) / f"elsewhere-{directory}"
    if user is not None:
        target.mkdir(mode=0o700)
        os.chown(target, user.uid, user.gid)
    before = sorted(path.name for path in target.iterdir())
    as_owner(
        system,
        'cd "$1"; mv "$2" "$2.old"; ln -s "$3" "$2"',
        str(system.spool),
        directory,
        str(target),
    )
    result = system.sendmail(user, "-v", "friend@example.net", input=MESSAGE)
    assert result.returncode in (EX_CANTCREAT, EX_TEMPFAIL), result.stderr
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and "link" in lines[0] and "pymta setup --check" in lines[0], lines
    assert sorted(path.name for path in target.iterdir()) == before, "the mail went where the link points"


def test_sendmail_refuses_a_drop_directory_without_the_sticky_bit(hostile: SystemInstall) -> None:
    """In new/ 0733 anyone may rename another's file: root's drop could be swapped before the flush."""
    system = hostile
    as_owner(system, 'chmod 0733 "$1"', str(system.spool / "new"))
    result = system.sendmail(None, "-v", "friend@example.net", input=MESSAGE)
    assert result.returncode == EX_CANTCREAT, result.stderr
    assert b"has mode 0733" in result.stderr and b"pymta setup --check" in result.stderr
    assert system.names("new") == [] and system.names("tmp") == []


def test_sendmail_of_root_still_queues_in_a_sound_spool(hostile: SystemInstall) -> None:
    system = hostile
    queue_id = submit(system, None, "friend@example.net")
    info = os.lstat(system.spool / "new" / queue_id)
    assert stat.S_ISREG(info.st_mode) and info.st_uid == 0
    result = system.flush()
    assert result.returncode == 0, result.stderr
    [entry] = system.entries()
    assert (entry.id, entry.submitted_by, entry.uid) == (queue_id, "root", 0)


# --- the users' views: written by root only in a directory of root's ---


def test_the_spool_owner_can_neither_move_a_view_nor_redirect_root_writing_it(hostile: SystemInstall) -> None:
    system, owner = hostile, hostile.spool_user
    deferred_message(system)  # the flush publishes alice's view
    status = system.spool / "status"
    view = status / str(system.alice.uid)
    info = os.lstat(status)
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o711)
    assert os.lstat(view).st_uid == system.alice.uid
    # a file owned by alice, with content the spool's owner could forge, must stay where root put it
    stolen = system.run_as(owner, ["/bin/mv", str(view), str(system.spool / "stolen")])
    assert stolen.returncode != 0 and not (system.spool / "stolen").exists()
    linked = system.run_as(owner, ["/bin/ln", str(view), str(system.spool / "linked")])
    assert linked.returncode != 0 and not (system.spool / "linked").exists()

    # status/ replaced by a directory of the owner's, or by a link to root's: root takes the one over and
    # never writes through the other
    as_owner(system, 'cd "$1"; mv status status.old; mkdir status', str(system.spool))
    system.flush()
    info = os.lstat(status)
    assert (info.st_uid, stat.S_ISDIR(info.st_mode), stat.S_IMODE(info.st_mode)) == (0, True, 0o711)
    assert os.lstat(view).st_uid == system.alice.uid
    target = root_only_dir(system)
    as_owner(system, 'cd "$1"; mv status status.gone; ln -s "$2" status', str(system.spool), str(target))
    system.flush()
    assert sorted(path.name for path in target.iterdir()) == ["victim"]
    mailq = system.run_as(system.alice, [system.script("mailq")])
    assert mailq.returncode in (0, 77) and b"Traceback" not in mailq.stderr


# --- pymta setup --check reports tampering ---


def test_setup_check_reports_tampering_in_the_spool_and_the_secrets(hostile: SystemInstall) -> None:
    system, owner = hostile, hostile.spool_user
    secrets = system.root / "etc" / "pymta" / "secrets"
    (secrets / "smarthost").write_text("hunter2\n")
    (secrets / "smarthost").chmod(0o666)
    os.chown(secrets / "smarthost", owner.uid, owner.gid)
    stale = time.time() - 2 * 86400
    as_owner(
        system,
        'cd "$1"; : > new/leftover; : > corrupt/broken; ln -s /etc/passwd state/planted',
        str(system.spool),
    )
    os.utime(system.spool / "new" / "leftover", (stale, stale))
    (system.spool / "queue" / "rootfile").write_text("left by root\n")
    (system.spool / "tmp").chmod(0o1777)
    result = system.run_as(
        None, [system.script("pymta"), "setup", "--check", "--root", str(system.root), "--user", owner.name]
    )
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 1, output
    for expected in (
        f"{secrets / 'smarthost'} has mode 0666",
        f"{system.spool / 'new'}: 1 file",
        f"{system.spool / 'corrupt'}: 1 file",
        f"{system.spool / 'state' / 'planted'} is a symbolic link",
        f"{system.spool / 'queue' / 'rootfile'} belongs to root",
        f"{system.spool / 'tmp'} has mode 1777",
    ):
        assert expected in output, (expected, output)
    assert "Traceback" not in output
    # and it only looked: nothing it reports was changed
    assert stat.S_IMODE(os.stat(secrets / "smarthost").st_mode) == 0o666
    assert os.path.islink(system.spool / "state" / "planted")


# --- pymta test, run by a user, gives advice that holds ---


def test_pymta_test_by_a_user_does_not_advise_giving_them_the_password(hostile: SystemInstall) -> None:
    system = hostile
    with tls_server(system) as server:
        system.write_config(smarthost_config(server, {"file": str(secret_file(system))}))
        result = system.run_as(system.alice, [system.script("pymta"), "test"])
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode != 0, output
    assert f"chown {system.alice.name}" not in output, output
    assert "sudo pymta test" in output, output
