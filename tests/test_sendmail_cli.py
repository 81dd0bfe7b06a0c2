"""The installed `sendmail` script as callers meet it: real processes, exit codes, stdin and signals.

Bad input gets one line on stderr, the right sysexits code and leaves nothing in the spool; a caller killed
mid-message leaves nothing either; a broken config still keeps the mail; the dot rule, argv[0] modes, odd
environments and umasks, the startup import budget, and the detached background flush of `deliver: immediate`.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import json
import os
import pty
import pwd
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MtaEnv, local_sandbox, script

import pymta
from pymta.queue.spool import Spool

LOGIN = pwd.getpwuid(os.getuid()).pw_name
NOBODY = 65534
MESSAGE = b"Subject: test\nTo: root\n\nbody\n"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


# --- helpers ---


def wait_for(condition: Callable[[], object], what: str, timeout: float = 15.0) -> Any:
    """Poll `condition` until it returns something true; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def files_under(path: Path) -> list[str]:
    """Every non-directory below `path`, relative to it (an absent path holds nothing)."""
    if not path.exists():
        return []
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if not p.is_dir())


def assert_nothing_queued(spool: Path) -> None:
    """No entry in new/ or queue/, nothing half-written in tmp/: the spool holds no file at all."""
    assert files_under(spool) == []
    assert Spool(str(spool)).entries() == ([], [])


def assert_one_line_error(result: subprocess.CompletedProcess[bytes], code: int, *words: str) -> str:
    """Exit `code`, nothing on stdout, exactly one line on stderr that says `words`."""
    stderr = result.stderr.decode()
    assert result.returncode == code, stderr
    assert result.stdout == b""
    assert stderr.startswith("sendmail: ") and stderr.endswith("\n") and stderr.count("\n") == 1, stderr
    for word in words:
        assert word in stderr, stderr
    return stderr


def queue_ids(mta: MtaEnv) -> list[str]:
    return [entry.id for entry in mta.entries()]


def world_dir() -> Path:
    """A directory outside tmp_path (whose parent is 0700 root) that any user can reach."""
    path = Path(tempfile.mkdtemp(prefix="pymta-test-"))
    path.chmod(0o755)
    return path


_libc = ctypes.CDLL(None, use_errno=True)
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def _drop_file_capabilities() -> None:  # runs in the child, between fork and exec
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if _libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@functools.cache
def unprivileged() -> dict[str, Any] | None:
    """subprocess keyword arguments that run a child subject to file permissions, or None.

    As root: the user nobody when it can run this interpreter, else root without CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH (dropped from the bounding set before exec), which makes a 0555 directory of
    root's unwritable to it. As another user: nothing to do. Each way is probed before it is used.
    """
    candidates: list[dict[str, Any]] = [{}]
    if os.geteuid() == 0:
        candidates = [
            {"user": NOBODY, "group": NOBODY, "extra_groups": []},
            {"preexec_fn": _drop_file_capabilities},
        ]
    probe = world_dir()
    probe.chmod(0o555)
    try:
        for kwargs in candidates:
            try:
                result = subprocess.run(
                    [sys.executable, "-c", "import sys; open(sys.argv[1] + '/x', 'w')", str(probe)],
                    capture_output=True,
                    timeout=30,
                    **kwargs,
                )
            except OSError:
                continue
            if b"PermissionError" in result.stderr:
                return kwargs
    finally:
        probe.chmod(0o755)
        shutil.rmtree(probe)
    return None


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    path = world_dir()
    yield path
    for item in [path, *path.rglob("*")]:
        if item.is_dir() and not item.is_symlink():
            item.chmod(0o755)
    shutil.rmtree(path)


def popen_sendmail(mta: MtaEnv, *args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([script("sendmail"), *args], env=mta.env, **kwargs)


def process_state(pid: int) -> str:
    """The one-letter state of /proc/PID/stat (R, S, Z...), or '' when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return ""
    return text.rpartition(")")[2].split()[0]


def pending_bytes(fd: int) -> int:
    """How many bytes wait unread in the pipe or terminal behind `fd` (FIONREAD)."""
    buffer = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buffer)
    return int.from_bytes(buffer, sys.byteorder)


def blocked_reading(proc: subprocess.Popen[bytes], fd: int) -> bool:
    """True once `proc` has consumed all that was written to `fd` and sleeps (in its read of stdin)."""
    assert proc.poll() is None, proc.communicate()
    return (
        Path(f"/proc/{proc.pid}/fd/0").exists() and pending_bytes(fd) == 0 and process_state(proc.pid) == "S"
    )


@pytest.fixture
def reaper() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test started; any still running at the end are killed by their id."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=15)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


# --- bad command lines and addresses: 64/67, one line, nothing queued ---


@pytest.mark.parametrize(
    ("args", "input", "code", "words"),
    [
        ([], MESSAGE, 64, ["no recipients", "-t"]),
        (["-i"], MESSAGE, 64, ["no recipients"]),
        (["-t"], b"Subject: no To\n\nbody\n", 64, ["no recipients", "To, Cc or Bcc"]),
        (["-t", "-i"], b"", 64, ["no recipients"]),
        (["-k", "root"], MESSAGE, 64, ["-k", "unknown flag"]),
        (["-tZ", "root"], MESSAGE, 64, ["-Z", "unknown flag"]),
        (["--verbose", "root"], MESSAGE, 64, ["--verbose", "single letters", "sendmail --help"]),
        (["root", "--help"], MESSAGE, 64, ["--help", "unknown option"]),  # help only as the first word
        (["root", "-f"], MESSAGE, 64, ["-f", "needs a value"]),
        (["-f"], MESSAGE, 64, ["-f", "needs a value"]),
        (["-bd"], MESSAGE, 64, ["-bd", "daemon"]),
        (["root\nBcc: victim@example.net"], MESSAGE, 67, ["line break"]),
        (["root\r"], MESSAGE, 67, ["line break"]),
        (["-f", "me@example.org\r\nBcc: victim@example.net", "root"], MESSAGE, 67, ["sender", "control"]),
        (["-fme@example.org\n", "root"], MESSAGE, 67, ["sender"]),
        (["-F", "Name\r\nBcc: victim@example.net", "root"], MESSAGE, 64, ["-F", "line break"]),
        (["-FName\n", "root"], MESSAGE, 64, ["-F"]),
    ],
)
def test_bad_input_is_one_line_the_right_code_and_nothing_queued(
    mta: MtaEnv, args: list[str], input: bytes, code: int, words: list[str]
) -> None:
    result = mta.sendmail(*args, input=input)
    assert_one_line_error(result, code, *words)
    assert_nothing_queued(mta.spool)


@pytest.mark.parametrize("program", ["sendmail", "mailq", "newaliases"])
def test_help_and_version_as_the_first_word_print_to_stdout_and_queue_nothing(
    mta: MtaEnv, program: str
) -> None:
    result = mta.run(program, ["--help"], input=MESSAGE)
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout.startswith(f"usage: {program} ".encode()) and b"See " in result.stdout
    result = mta.run(program, ["--version"], input=MESSAGE)
    assert (result.returncode, result.stdout) == (0, f"{program} (pymta) {pymta.__version__}\n".encode())
    assert_nothing_queued(mta.spool)


def test_an_unreadable_header_address_is_left_out_and_the_others_still_get_the_message(mta: MtaEnv) -> None:
    # logwatch, mdadm and sudo ignore sendmail's exit status: refusing all for one typo would lose the report
    report = b"To: root, John Smith\nCc: <broken@example.org, ops@example.org\nSubject: report\n\nbody\n"
    result = mta.sendmail("-t", "-i", input=report)
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    lines = stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith("sendmail: cannot read ") for line in lines), lines
    assert '"John Smith" in "To: root, John Smith"' in lines[0] and "left out" in lines[0]
    assert "<broken@example.org" in lines[1] and "unterminated" in lines[1]  # its comma is inside the <
    assert [r.address for r in mta.only_entry().recipients] == ["root"]
    only_bad = mta.sendmail("-t", "-i", input=b"To: John Smith\n\nbody\n")  # nobody left: refused
    assert_one_line_error(only_bad, 65, '"John Smith"')
    assert len(mta.entries()) == 1


def test_dash_bs_speaks_smtp_and_takes_no_recipients(mta: MtaEnv) -> None:
    result = mta.sendmail("-bs", "root", input=MESSAGE)
    assert_one_line_error(result, 64, "-bs", "RCPT TO")
    assert_nothing_queued(mta.spool)
    result = mta.sendmail("-bs", input=MESSAGE)  # a message is no SMTP dialogue: a header line ends it
    assert result.returncode == 75 and result.stdout.startswith(b"220 ") and b"\r\n421 4.7.0" in result.stdout
    assert_nothing_queued(mta.spool)


def test_dash_q_runs_the_queue_now(mta: MtaEnv) -> None:
    assert mta.sendmail("someone@example.net", input=MESSAGE).returncode == 0
    assert mta.only_entry().location == "new"
    result = mta.sendmail("-q", "-v", input=b"")
    assert result.returncode == 0, result.stderr
    entry = mta.only_entry()  # no smarthost in this config: tried and deferred, not lost
    assert (entry.location, entry.state, entry.attempts) == ("queue", "deferred", 1)
    assert "no smarthost configured" in (entry.last_error or "")
    assert b"1 message tried" in result.stdout


# --- the spool: missing, unwritable, full ---


def test_spool_under_a_missing_parent_is_cantcreat(mta: MtaEnv) -> None:
    spool = mta.root / "no-such-dir" / "spool"
    mta.config.write_text(f"spool: {spool}\ndeliver: queue\n{local_sandbox(mta.root)}")
    result = mta.sendmail("root", input=MESSAGE)
    assert_one_line_error(result, 73, str(spool.parent), "does not exist")
    assert not spool.parent.exists()


def test_unwritable_spool_is_cantcreat(mta: MtaEnv, shared_dir: Path) -> None:
    kwargs = unprivileged()
    if kwargs is None:
        pytest.skip(
            "cannot run a process that file permissions apply to (neither nobody nor dropped capabilities)"
        )
    spool = shared_dir / "spool"
    for name in ("", "tmp", "new", "queue", "state", "corrupt"):
        (spool / name).mkdir(mode=0o755, exist_ok=True)
        (spool / name).chmod(0o555)  # root's, and no one else may write; for root without DAC caps neither
    config = shared_dir / "pymta.yaml"
    config.write_text(f"spool: {spool}\ndeliver: queue\n{local_sandbox(mta.root)}")
    env = {**mta.env, "PYMTA_CONFIG": str(config), "HOME": str(shared_dir)}
    result = subprocess.run(
        [script("sendmail"), "-odq", "root"],
        input=MESSAGE,
        capture_output=True,
        env=env,
        timeout=30,
        **kwargs,
    )
    assert_one_line_error(result, 73, str(spool), "Permission denied")
    assert files_under(spool) == []


def _limit_file_size() -> None:  # runs in the child, between fork and exec
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_disk_full_is_tempfail_and_leaves_nothing(mta: MtaEnv) -> None:
    big = b"Subject: big\n\n" + b"x" * 100 + b"\n"
    big = big * 1000  # 100 KB, far over the 4 KB the file size limit allows
    result = subprocess.run(
        [script("sendmail"), "root"],
        input=big,
        capture_output=True,
        env=mta.env,
        preexec_fn=_limit_file_size,
        timeout=30,
    )
    assert_one_line_error(result, 75, "File too large")
    assert (mta.spool / "new").is_dir()  # the spool was made: the failure was the write itself
    assert_nothing_queued(mta.spool)


# --- a caller killed mid-message ---


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGPIPE])
def test_caller_killed_mid_message_queues_nothing(
    mta: MtaEnv, sig: signal.Signals, reaper: list[subprocess.Popen[bytes]]
) -> None:
    assert mta.sendmail("root", input=b"Subject: earlier\n\nkept\n").returncode == 0
    before = queue_ids(mta)
    proc = popen_sendmail(mta, "-i", "root", stdin=subprocess.PIPE)
    reaper.append(proc)
    assert proc.stdin is not None
    proc.stdin.write(b"Subject: half\nTo: root\n\nthe first half of the report\n")
    proc.stdin.flush()
    wait_for(lambda: blocked_reading(proc, proc.stdin.fileno()), "sendmail to read the first half")  # type: ignore[union-attr]
    proc.send_signal(sig)
    proc.stdin.close()
    proc.wait(timeout=15)
    assert proc.returncode == -sig
    assert queue_ids(mta) == before
    assert files_under(mta.spool / "tmp") == []
    listing = mta.run("mailq")
    assert listing.returncode == 0 and listing.stderr == b""
    assert listing.stdout.decode().count("\n") == 3  # header, the earlier message, total
    assert before[0] in listing.stdout.decode()


def test_half_written_tmp_file_is_invisible(mta: MtaEnv) -> None:
    assert mta.sendmail("root", input=MESSAGE).returncode == 0
    (mta.spool / "tmp" / "6b0a0000deadbeefdeadbeef").write_bytes(
        b'{"v":1,"id":"6b0a0000deadbeefdeadbeef","sen'
    )
    assert len(mta.entries()) == 1
    listing = mta.run("mailq")
    assert listing.returncode == 0 and listing.stderr == b""
    assert "deadbeef" not in listing.stdout.decode()
    assert "-- 1 message," in listing.stdout.decode()


# --- a broken config keeps the mail ---


def _default_spool_env(mta: MtaEnv, config: Path) -> tuple[dict[str, str], Path]:
    state = mta.root / "state"
    state.mkdir(exist_ok=True)
    return {**mta.env, "PYMTA_CONFIG": str(config), "XDG_STATE_HOME": str(state)}, state / "pymta"


def _assert_queued_with_one_warning(
    result: subprocess.CompletedProcess[bytes], config: Path, spool: Path
) -> None:
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert result.stdout == b""
    assert stderr.count("\n") == 1 and stderr.startswith("sendmail: "), stderr
    assert str(config) in stderr and "pymta config check" in stderr
    entries, problems = Spool(str(spool)).entries()
    assert problems == [] and len(entries) == 1
    assert [r.address for r in entries[0].recipients] == ["root"]


def _assert_config_check_fails(mta: MtaEnv, config: Path) -> None:
    check = mta.run("pymta", ["config", "check"], env={**mta.env, "PYMTA_CONFIG": str(config)})
    assert check.returncode == 78, check
    assert check.stdout == b""
    stderr = check.stderr.decode()
    assert stderr.count("\n") == 1 and str(config) in stderr, stderr


# A syntax error the line reader cannot step over: it asks PyYAML, which fails. A `spool:` line that stands
# plainly on its own is still used (so the mail is where the flush will look once the file is fixed);
# only when that line itself is broken does the mail go to the default spool. Never lost, one warning.
UNPARSABLE = {
    "unclosed flow sequence elsewhere": ("deliver: queue\nretry:\n  schedule: [1m, 5m\n", "configured"),
    "tab indentation": ("deliver: queue\n\tretry: 5d\n", "configured"),
    "the spool line itself is broken": ('spool: "/unterminated\ndeliver: queue\n', "default"),
    # PyYAML keeps the last of two; `pymta` refuses the file, so sendmail trusts neither value
    "a key written twice": ("deliver: queue\ndeliver: immediate\n", "configured"),
    "the spool written twice": ("spool: /nonexistent/one\nspool: /nonexistent/two\n", "default"),
    "a second document": ("spool: /nonexistent/one\n---\nspool: /nonexistent/two\n", "default"),
}


@pytest.mark.parametrize(("text", "where"), UNPARSABLE.values(), ids=list(UNPARSABLE))
def test_unparsable_config_still_queues(mta: MtaEnv, text: str, where: str) -> None:
    config = mta.root / "broken.yaml"
    config.write_text(text if text.startswith("spool") else f"spool: {mta.spool}\n{text}")
    env, default = _default_spool_env(mta, config)
    result = mta.sendmail("-odq", "root", input=MESSAGE, env=env)
    used, unused = (mta.spool, default) if where == "configured" else (default, mta.spool)
    _assert_queued_with_one_warning(result, config, used)
    assert "queued all the same" in result.stderr.decode()
    assert str(used) in result.stderr.decode()
    assert "(line " in result.stderr.decode()  # as `pymta config check` words it: where, what, the fix
    assert "<byte string>" not in result.stderr.decode()
    assert files_under(unused) == []
    _assert_config_check_fails(mta, config)


# Broken only where sendmail does not look: the `spool:` line is read without YAML and the mail goes there.
READABLE_SPOOL_LINE = {
    "bad indentation in a nested block": "deliver: queue\nretry:\n  schedule: 1m\n   lifetime: 5d\n",
    "a ': ' in a plain value": "deliver: queue\nhostname: a: b\n",
    "an unknown key": "deliver: queue\nsmarthost: smtp.example.org\n",
}


@pytest.mark.parametrize("text", READABLE_SPOOL_LINE.values(), ids=list(READABLE_SPOOL_LINE))
def test_config_broken_elsewhere_queues_in_the_configured_spool(mta: MtaEnv, text: str) -> None:
    mta.write_config(text)
    env, default = _default_spool_env(mta, mta.config)
    result = mta.sendmail("-odq", "root", input=MESSAGE, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(b"\n") <= 1  # at most one warning
    assert len(mta.entries()) == 1
    assert files_under(default) == []
    _assert_config_check_fails(mta, mta.config)


@pytest.mark.parametrize("value", ["relative/spool", "42", "[/a, /b]"])
def test_a_spool_that_is_no_absolute_path_queues_in_the_default_spool(mta: MtaEnv, value: str) -> None:
    config = mta.root / "relative.yaml"
    config.write_text(f"spool: {value}\n")
    env, default = _default_spool_env(mta, config)
    cwd = mta.root / "cwd"  # where a relative spool would land
    cwd.mkdir()
    result = subprocess.run(
        [script("sendmail"), "-odq", "root"], input=MESSAGE, capture_output=True, env=env, cwd=cwd
    )
    _assert_queued_with_one_warning(result, config, default)
    assert "not an absolute path" in result.stderr.decode()
    assert list(cwd.iterdir()) == []
    _assert_config_check_fails(mta, config)


def test_missing_or_unreadable_config_queues_in_the_default_spool(mta: MtaEnv) -> None:
    for config in (mta.root / "missing.yaml", mta.root / "a-directory.yaml"):
        if config.name == "a-directory.yaml":
            config.mkdir()
        env, default = _default_spool_env(mta, config)
        result = mta.sendmail("-odq", "root", input=MESSAGE, env=env)
        _assert_queued_with_one_warning(result, config, default)
        shutil.rmtree(default)


def test_config_without_read_permission_queues_in_the_default_spool(mta: MtaEnv, shared_dir: Path) -> None:
    kwargs = unprivileged()
    if kwargs is None:
        pytest.skip(
            "cannot run a process that file permissions apply to (neither nobody nor dropped capabilities)"
        )
    config = shared_dir / "pymta.yaml"
    config.write_text(f"spool: {shared_dir / 'configured'}\n")
    config.chmod(0)
    state = shared_dir / "state"
    state.mkdir()
    if "user" in kwargs:
        os.chown(state, NOBODY, NOBODY)
    env = {**mta.env, "PYMTA_CONFIG": str(config), "XDG_STATE_HOME": str(state), "HOME": str(shared_dir)}
    result = subprocess.run(
        [script("sendmail"), "-odq", "root"],
        input=MESSAGE,
        capture_output=True,
        env=env,
        timeout=30,
        **kwargs,
    )
    _assert_queued_with_one_warning(result, config, state / "pymta")
    assert "Permission denied" in result.stderr.decode()
    assert not (shared_dir / "configured").exists()


@pytest.mark.parametrize("config_text", [None, "retry: [unclosed\n"], ids=["no config", "broken config"])
def test_default_spool_is_made_on_a_fresh_home(mta: MtaEnv, config_text: str | None) -> None:
    if os.path.isdir("/var/spool/pymta/new") or os.path.exists("/etc/pymta/pymta.yaml"):
        pytest.skip("this machine has a system-wide pymta")
    home = mta.root / "fresh-home"
    home.mkdir()
    env = {"PATH": mta.env["PATH"], "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    if config_text is not None:
        mta.config.write_text(config_text)
        env["PYMTA_CONFIG"] = str(mta.config)
    result = mta.sendmail("-odq", "root", input=MESSAGE, env=env)
    assert result.returncode == 0, result.stderr
    entries, _ = Spool(str(home / ".local" / "state" / "pymta")).entries()
    assert len(entries) == 1


# --- the lone dot ---


def _run_on_a_terminal(
    mta: MtaEnv, args: list[str], reaper: list[subprocess.Popen[bytes]]
) -> tuple[subprocess.Popen[bytes], int, int]:
    master, slave = pty.openpty()
    proc = popen_sendmail(mta, *args, stdin=slave)
    reaper.append(proc)
    os.write(master, b"Subject: tty\n\nbefore\n.\nafter\n")
    return proc, master, slave


def test_lone_dot_ends_the_message_on_a_terminal(mta: MtaEnv, reaper: list[subprocess.Popen[bytes]]) -> None:
    proc, master, slave = _run_on_a_terminal(mta, ["root"], reaper)
    try:
        out, err = proc.communicate(timeout=15)  # no EOF is ever sent: only the dot can end it
    finally:
        os.close(master)
        os.close(slave)
    assert (proc.returncode, out, err) == (0, b"", b"")
    assert mta.message(mta.only_entry()).endswith(b"\r\n\r\nbefore\r\n")


@pytest.mark.parametrize("flag", ["-i", "-oi"])
def test_lone_dot_does_not_end_the_message_with_i(
    mta: MtaEnv, flag: str, reaper: list[subprocess.Popen[bytes]]
) -> None:
    proc, master, slave = _run_on_a_terminal(mta, [flag, "root"], reaper)
    try:
        # sendmail has read every line, the dot and the one after it, and still waits for more
        wait_for(lambda: blocked_reading(proc, slave), "sendmail to read past the dot")
        assert mta.entries() == []
        os.write(master, b"\x04")  # end of file at the start of a line (VEOF)
        out, err = proc.communicate(timeout=15)
    finally:
        os.close(master)
        os.close(slave)
    assert (proc.returncode, out, err) == (0, b"", b"")
    assert mta.message(mta.only_entry()).endswith(b"\r\n\r\nbefore\r\n.\r\nafter\r\n")


def test_lone_dot_never_ends_the_message_on_a_pipe(mta: MtaEnv) -> None:
    result = mta.sendmail("root", input=b"Subject: pipe\n\nbefore\n.\nafter\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert mta.message(mta.only_entry()).endswith(b"\r\n\r\nbefore\r\n.\r\nafter\r\n")


# --- stdin: closed, a file ---


def test_empty_stdin_queues_an_empty_message(mta: MtaEnv) -> None:
    result = subprocess.run(
        [script("sendmail"), "root"], stdin=subprocess.DEVNULL, capture_output=True, env=mta.env, timeout=30
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    entry = mta.only_entry()
    assert entry.size == 0 and mta.message(entry) == b""


def test_stdin_a_regular_file(mta: MtaEnv, tmp_path: Path) -> None:
    path = tmp_path / "message"
    path.write_bytes(b"Subject: from a file\n\n.\nline\n")
    with path.open("rb") as stdin:
        result = subprocess.run(
            [script("sendmail"), "root"], stdin=stdin, capture_output=True, env=mta.env, timeout=30
        )
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert mta.message(mta.only_entry()) == b"Subject: from a file\r\n\r\n.\r\nline\r\n"


# --- argv[0] and -b modes ---


def _without_age(listing: bytes) -> list[str]:
    """The table without its AGE column, which may tick between two runs."""
    lines = []
    for line in listing.decode().splitlines():
        words = line.split(None, 2)
        if len(words) == 3 and len(words[0]) == 24 and words[1][:-1].isdigit():
            line = f"{words[0]} {words[2]}"
        lines.append(line)
    return lines


def linked(mta: MtaEnv, name: str) -> str:
    """`name` as a symbolic link to the sendmail script, as `pymta setup` links mailq and newaliases.

    argv[0] given to exec() does not reach a `#!` script: the kernel hands the interpreter the script's
    path, so sys.argv[0] is the name of the link, never the caller's argv[0]. The link is how it works.
    """
    link = mta.root / "sbin" / name
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(script("sendmail"))
    return str(link)


def test_sendmail_linked_as_mailq_lists_the_queue_like_bp(mta: MtaEnv) -> None:
    mailq = linked(mta, "mailq")
    empty = subprocess.run([mailq], capture_output=True, env=mta.env, timeout=30)
    assert (empty.returncode, empty.stdout, empty.stderr) == (0, b"Mail queue is empty\n", b"")
    assert mta.sendmail("-f", "robot@example.org", "root", input=MESSAGE).returncode == 0
    by_link = subprocess.run([mailq], capture_output=True, env=mta.env, timeout=30)
    by_flag = mta.sendmail("-bp")
    by_script = mta.run("mailq")
    entry_id = mta.only_entry().id
    for result in (by_link, by_flag, by_script):
        assert result.returncode == 0 and result.stderr == b""
        assert entry_id in result.stdout.decode() and "robot@example.org -> root" in result.stdout.decode()
    assert _without_age(by_link.stdout) == _without_age(by_flag.stdout) == _without_age(by_script.stdout)


@pytest.mark.parametrize("how", ["link", "script", "-bi", "-I"])
def test_newaliases_is_a_documented_no_op(mta: MtaEnv, how: str) -> None:
    if how == "link":
        result = subprocess.run([linked(mta, "newaliases")], capture_output=True, env=mta.env, timeout=30)
    elif how == "script":
        result = mta.run("newaliases", input=None)
    else:
        result = mta.sendmail(how)
    assert result.returncode == 0 and result.stdout == b""
    assert b"newaliases" in result.stderr and result.stderr.count(b"\n") == 1
    assert not mta.spool.exists()


# --- -v ---


def test_verbose_says_queued_as_and_the_ignored_flags(mta: MtaEnv) -> None:
    result = mta.sendmail("-v", "-oem", "-m", "-oXfoo", "-odi", "root", input=MESSAGE)
    assert result.returncode == 0 and result.stdout == b""
    lines = result.stderr.decode().splitlines()
    entry = mta.only_entry()
    assert lines[-1].startswith(f"sendmail: queued as {entry.id}") and "root" in lines[-1]
    notes = "\n".join(lines[:-1])
    for flag in ("-oem", "-m:", "-oXfoo", "-odi"):
        assert flag in notes, notes


def test_quiet_without_verbose(mta: MtaEnv) -> None:
    result = mta.sendmail("-oem", "-m", "-oXfoo", "-odi", "root", input=MESSAGE)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert len(mta.entries()) == 1


# --- odd environments and umasks ---


@pytest.mark.parametrize("variant", ["HOME unset", "HOME=/", "only PYMTA_CONFIG"])
def test_odd_environments_still_queue(mta: MtaEnv, variant: str) -> None:
    env = dict(mta.env)
    if variant == "HOME unset":
        del env["HOME"]
    elif variant == "HOME=/":
        env["HOME"] = "/"
    else:
        env = {"PYMTA_CONFIG": str(mta.config)}
    result = mta.sendmail("-t", input=b"To: root\nSubject: env\n\nbody\n", env=env)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    entry = mta.only_entry()
    assert entry.submitted_by == LOGIN and entry.sender == LOGIN


@pytest.mark.parametrize("umask", [0o077, 0o000, 0o022])
def test_modes_are_private_whatever_the_umask(mta: MtaEnv, umask: int) -> None:
    for _ in range(2):  # the first run creates the spool, the second uses it
        result = subprocess.run(
            [script("sendmail"), "root"],
            input=MESSAGE,
            capture_output=True,
            env=mta.env,
            preexec_fn=lambda: os.umask(umask),
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
    paths = [mta.spool, *mta.spool.rglob("*")]
    directories = [p for p in paths if p.is_dir()]
    files = [p for p in paths if p.is_file()]
    assert len(directories) >= 6 and len(files) == 2
    for path in directories:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


# --- startup cost ---

FORBIDDEN_IMPORTS = {
    "smtplib",
    "ssl",
    "keyring",
    "email",
    "json",
    "yaml",
    "click",
    "re",
    "typing",
    "dataclasses",
    "socket",
    "subprocess",
    "logging",
    "pickle",
    "enum",
    "collections",
    "functools",
    "pathlib",
    "__future__",
    # os and what it loads (_collections_abc, stat, posixpath) cost a millisecond per message: the path
    # uses the built-in posix module instead (pymta.queue.commit).
    "os",
    "_collections_abc",
    "stat",
    "posixpath",
    "genericpath",
}
# The standard library modules a cron job's sendmail may load beyond those of `python3 -S -c pass`.
SENDMAIL_STDLIB = {"errno", "pwd"}
# Every pymta module a cron job's sendmail may import (a plain enqueue, and -t): the commit, not the spool's
# reading side, the pick-up, the locks, the views (only a user under max_queued_per_user in system mode) or
# the JSON contract. A module that joins this path costs every message on the machine: add it here only
# with a measurement (bench/compare.py --only start-up,imports).
SENDMAIL_MODULES = {
    "pymta",
    "pymta.errors",
    "pymta.cli",
    "pymta.cli.sendmail",
    "pymta.submission",
    "pymta.submission.invocation",
    "pymta.submission.submit",
    "pymta.config",
    "pymta.config.paths",
    "pymta.config.limits",
    "pymta.queue",
    "pymta.queue.commit",
    "pymta.mail",
    "pymta.mail.address",
    "pymta.mail.message",
}


@pytest.mark.parametrize("deliver", ["queue", "immediate"])
@pytest.mark.parametrize("args", ["-t root", "-i -FCronDaemon -oem someone@example.net"])  # -t, and as cron
def test_sendmail_imports_nothing_heavy(mta: MtaEnv, deliver: str, args: str) -> None:
    # -S: without site, the editable install's path hook (which imports re, pathlib...) is not loaded, so
    # the list below is pymta's own doing; the project root goes on sys.path through PYTHONPATH instead.
    mta.write_config(f"deliver: {deliver}\n")
    Spool(str(mta.spool)).create_private()  # as after the user's first message (making it needs os)
    argv = ["sendmail", *args.split()]
    code = f"import sys; from pymta.cli.sendmail import main; sys.exit(main({argv!r}))"
    env = {**mta.env, "PYTHONPATH": str(PROJECT_ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, "-S", "-X", "importtime", "-c", code],
        input=b"To: someone@example.net\nCc: other\nSubject: cron\n\nbody\n",
        capture_output=True,
        env=env,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    modules = _imported(result.stderr)
    assert "pymta.cli.sendmail" in modules and "pymta.queue.commit" in modules  # the measurement saw pymta
    assert len(mta.entries()) == 1
    heavy = sorted(m for m in modules if m.split(".")[0] in FORBIDDEN_IMPORTS)
    assert heavy == [], heavy
    beyond = sorted(m for m in modules if m.split(".")[0] == "pymta" and m not in SENDMAIL_MODULES)
    assert beyond == [], f"on sendmail's path, beyond its budget: {beyond}"
    floor = subprocess.run(
        [sys.executable, "-S", "-X", "importtime", "-c", "pass"], capture_output=True, env=env, timeout=30
    )
    stdlib = sorted(m for m in modules - _imported(floor.stderr) if m.split(".")[0] != "pymta")
    assert set(stdlib) <= SENDMAIL_STDLIB, f"sendmail loads more of the standard library: {stdlib}"
    if deliver == "immediate":
        _wait_for_flush_to_finish(mta)


def _imported(importtime: bytes) -> set[str]:
    """The modules that `-X importtime` saw imported."""
    modules = set()
    for line in importtime.decode().splitlines():
        if line.startswith("import time:") and "|" in line and "imported package" not in line:
            modules.add(line.rsplit("|", 1)[1].strip())
    return modules


# --- deliver: immediate starts a detached flush; -odq and deliver: queue do not ---


def _state(mta: MtaEnv, entry_id: str) -> dict[str, Any] | None:
    try:
        return dict(json.loads((mta.spool / "state" / entry_id).read_bytes()))
    except (FileNotFoundError, ValueError):
        return None


def _lock_is_free(mta: MtaEnv) -> bool:
    fd = os.open(mta.spool / "flush.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _wait_for_flush_to_finish(mta: MtaEnv) -> None:
    """The background flush deferred the message and let go of its lock (so tmp_path can go)."""
    ids = wait_for(lambda: os.listdir(mta.spool / "queue"), "the flush to pick the message up")
    wait_for(lambda: (_state(mta, ids[0]) or {}).get("state") == "deferred", "the flush to defer it")
    wait_for(lambda: _lock_is_free(mta), "the flush to release its lock")


def test_deliver_immediate_starts_a_detached_flush(mta: MtaEnv) -> None:
    mta.write_config("deliver: immediate\n")
    started = time.monotonic()
    proc = popen_sendmail(mta, "-v", "someone@example.net", stdin=subprocess.PIPE)
    # communicate() returns only at EOF on stdout and stderr: the flush must not hold sendmail's pipes
    out, err = proc.communicate(MESSAGE, timeout=15)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0 and out == b"", err
    assert b"queued as" in err
    # sendmail did not wait for the flush: when it returned, no attempt had been recorded yet (a flush
    # needs far longer than sendmail's exit to start Python, import click and read the config)
    entry_id = err.decode().split("queued as ")[1].split()[0]
    assert _state(mta, entry_id) is None, elapsed
    # ... and the flush ran: picked up into queue/, then deferred for want of a smarthost
    wait_for(lambda: (mta.spool / "queue" / entry_id).exists(), "the flush to pick the message up")
    wait_for(lambda: _state(mta, entry_id), "the flush to record the attempt")
    wait_for(lambda: _lock_is_free(mta), "the flush to release its lock")
    state = _state(mta, entry_id)
    assert state is not None and state["state"] == "deferred", state
    entry = mta.only_entry()
    assert entry.state == "deferred" and entry.attempts >= 1
    assert "no smarthost" in (entry.last_error or "")
    assert all(r.status == "deferred" and "no smarthost" in (r.last_error or "") for r in entry.recipients)


@pytest.mark.parametrize(
    ("config", "flags"),
    [("deliver: immediate\n", ["-odq"]), ("deliver: queue\n", []), ("deliver: queue\n", ["-odi"])],
)
def test_queue_only_starts_nothing(mta: MtaEnv, config: str, flags: list[str]) -> None:
    mta.write_config(config)
    result = mta.sendmail(*flags, "root", input=MESSAGE)
    assert result.returncode == 0, result.stderr
    entry_id = mta.only_entry().id
    deadline = time.monotonic() + 1.0  # a flush would have picked it up well within this
    while time.monotonic() < deadline:
        assert (mta.spool / "new" / entry_id).exists()
        assert not (mta.spool / "flush.lock").exists()
        time.sleep(0.05)
    assert mta.only_entry().location == "new"
