"""The one place that becomes another user: who a uid is, a look with another user's rights, a switch for
good, and the forked child that makes one (ARCHITECTURE.md, "Privilege model"; pymta(1), PRIVILEGES).

Two switches exist, and only these two:

    looking_as(uid, gid, groups)   root's *effective* ids and groups become the user's for a look at their
                                   files, then root's again. The saved uid stays 0, which is what lets root
                                   come back; the user, whose uid is neither the real nor the saved one,
                                   cannot signal the process meanwhile.
    become(entry, groups)          for good, in this order: setgroups, setgid, setuid (as root setuid sets the
                                   real, effective and saved uid: no way back), then a check that it took,
                                   and umask 077. The delivery process becomes the spool's owner with it
                                   (`privsep`), and each local delivery child its recipient (`local`).

A child that becomes someone is forked without exec (`fork_child`): it needs no interpreter that user could
read, and it ends with `os._exit`. Once it is that user's process, that user may stop or signal it, so the
parent waits for it with a deadline (`reap`) and kills it, when it is seen stopped or is still there at the
deadline. The child calls no name service after the fork: what it needs (the passwd entry, the groups) is
looked up before.

A leaf: the standard library only, so that any layer may use it.
"""

from __future__ import annotations

import errno
import os
import pwd
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# Seconds between looks at a child that has not exited yet.
POLL_INTERVAL = 0.05


def user_name(uid: int) -> str:
    """The name of `uid`, or the number as text when it has no passwd entry (chown takes either)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def lookup_user(user: str) -> pwd.struct_passwd | None:
    """The passwd entry of `user`; failing that, of `user` in lower case (mail local parts ignore case)."""
    for name in dict.fromkeys((user, user.lower())):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


def groups_of(entry: pwd.struct_passwd) -> list[int]:
    """The groups `entry` has when they log in: their primary group and those that list them."""
    return os.getgrouplist(entry.pw_name, entry.pw_gid)


@contextmanager
def looking_as(uid: int, gid: int, groups: list[int]) -> Iterator[None]:
    """Root's effective ids and groups become another user's for a look at their files (through their
    links, with their rights), then root's again. The saved uid stays root's, which is what lets them come
    back; that user, whose uid is neither this process's real nor its saved one, cannot signal it."""
    own_groups, egid = os.getgroups(), os.getegid()
    os.setgroups(groups)
    try:
        os.setegid(gid)
        try:
            os.seteuid(uid)
            try:
                yield
            finally:
                os.seteuid(0)
        finally:
            os.setegid(egid)
    finally:
        os.setgroups(own_groups)


def become(entry: pwd.struct_passwd, groups: list[int]) -> None:
    """Switch this process to `entry` for good: `groups`, then the gid, then the uid (real, effective and
    saved), and umask 077. Raises PermissionError when the switch did not take. Calls no name service:
    `groups` were looked up before (`groups_of`), so a forked child can call this."""
    os.setgroups(groups)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)  # as root this sets the real, effective and saved uid: no way back
    if os.getuid() != entry.pw_uid or os.geteuid() != entry.pw_uid or os.getegid() != entry.pw_gid:
        raise PermissionError(errno.EPERM, f"the switch to {entry.pw_name} did not take")
    os.umask(0o077)


def fork_child(work: Callable[[], int], failed: int) -> int:
    """Fork a child that runs `work` and exits with what it returns (`failed` when it raises); its pid.

    Never returns in the child: it ends with `os._exit`, so nothing of the parent's (atexit handlers,
    buffered files, the test runner) runs twice. Raises OSError when the fork fails."""
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a process with threads (a reaper's, a test's): the child takes
        # none of their locks and ends with os._exit.
        warnings.filterwarnings("ignore", r".*fork\(\) may lead to deadlocks", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child; what it does is what the tests check
        code = failed
        try:
            code = work()
        finally:
            os._exit(code)
    return pid


def reap(pid: int, timeout: float) -> int:
    """Wait for the child `pid` to exit, at most `timeout` seconds; one seen stopped (by the user whose
    process it is), or still there at the deadline, is killed. Its wait status."""
    deadline = time.monotonic() + timeout
    pause = 0.001  # doubled up to POLL_INTERVAL: most children are done within a few milliseconds
    while True:
        done, status = os.waitpid(pid, os.WNOHANG | os.WUNTRACED)
        if done and not os.WIFSTOPPED(status):
            return status
        if done or time.monotonic() >= deadline:
            return kill(pid)
        time.sleep(pause)
        pause = min(2 * pause, POLL_INTERVAL)


def stopped(pid: int) -> str:
    """Why the child no longer runs, when it is stopped; else "". An exited child is left to be reaped."""
    found = os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOHANG)
    if found is not None and found.si_code == os.CLD_STOPPED:
        return f"was stopped (signal {found.si_status}: by the recipient, whose process it is)"
    return ""


def kill(pid: int) -> int:
    """Kill the child and reap it; its wait status."""
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def exit_text(wait_status: int) -> str:
    """A wait status in words: "exit status N" or "killed by signal N"."""
    if os.WIFSIGNALED(wait_status):
        return f"killed by signal {os.WTERMSIG(wait_status)}"
    return f"exit status {os.waitstatus_to_exitcode(wait_status)}"
