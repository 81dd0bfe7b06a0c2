"""What `pymta setup` (and `--check`) only looks at and warns about: it changes none of it.

Failed messages no one was told about, directories above the spool that users cannot pass, console scripts
other users cannot run. Each is a `warn` change: reported, and it never stops the install.
"""

from __future__ import annotations

import os
import shlex
import stat

from pymta.delivery.privsep import spool_owner
from pymta.errors import PymtaError
from pymta.queue.listing import UNTOLD_FIX, untold, untold_summary
from pymta.queue.spool import Spool
from pymta.queue.views import entries_as
from pymta.setup.files import lstat_or_none
from pymta.setup.install import SCRIPTS, Install
from pymta.setup.plan import Change, Step, reason


def warning(problem: str, fix: str) -> Change:
    return Change("warn", "", problem, fix)


def untold_step(install: Install) -> Step:
    """A warning when the queue holds failed messages no one was told about (`listing.untold`): they stay
    until an admin reads and deletes them, and nothing else points at them."""
    spool = install.host_spool

    def check() -> list[Change]:
        if not os.path.isdir(os.path.join(spool, "queue")):
            return []
        count = _untold_count(spool)
        if count is None:
            return [
                warning(
                    f"cannot read the queue in {spool} to look for failed messages no one was told about",
                    "run pymta setup --check as root",
                )
            ]
        summary = untold_summary(count)
        return [] if summary is None else [warning(f"{summary} (in {spool})", UNTOLD_FIX)]

    return Step(f"no failed message in {spool} that no one was told about", check)


def _untold_count(spool: str) -> int | None:
    """How many messages in the queue no one was told about, read with the spool owner's rights: root
    opens nothing in a directory its owner may change (`views.entries_as`). None when the queue cannot be
    read."""
    try:
        owner = spool_owner(spool)
        if owner is None:
            entries = Spool(spool).entries()[0]
        else:
            entries = entries_as(Spool(spool), owner.pw_uid, owner.pw_gid)
    except (OSError, PymtaError):
        return None
    return sum(1 for entry in entries if untold(entry))


def unreachable_parents(path: str, root: str | None) -> list[Change]:
    """A warning for each directory above `path` (up to the root) that not every user may pass through."""
    changes = []
    parent = os.path.dirname(path)
    stop = root or "/"
    while parent != stop and parent != os.path.dirname(parent):
        info = lstat_or_none(parent)
        if info is not None and not info.st_mode & stat.S_IXOTH:
            changes.append(
                Change(
                    "warn",
                    "",
                    f"{parent} has mode {stat.S_IMODE(info.st_mode):04o}: ordinary users cannot reach "
                    f"{path} to submit mail",
                    f"chmod o+x {shlex.quote(parent)}",
                )
            )
        parent = os.path.dirname(parent)
    return changes


def scripts_step(install: Install) -> Step:
    """The console scripts the links point at exist, and every user can run them (a venv under /root cannot
    be run by anyone else: their sendmail would fail)."""

    def check() -> list[Change]:
        changes = []
        for name in SCRIPTS:
            found = install.script(name)
            if found is None:
                changes.append(
                    Change(
                        "fix",
                        "",
                        f"the console script {name} is not in {install.bin_dir}",
                        "install pymta into this environment (pip install pymta), then run pymta setup",
                    )
                )
                continue
            blocked = _not_runnable_by_others(found)
            if blocked:
                changes.append(
                    Change(
                        "warn",
                        "",
                        f"{found} cannot be run by other users: {blocked}",
                        "install pymta where every user can run it, e.g. python3 -m venv /opt/pymta && "
                        "/opt/pymta/bin/pip install pymta, then run /opt/pymta/bin/pymta setup",
                    )
                )
                break
        return changes

    return Step(f"console scripts in {install.bin_dir}, runnable by every user", check)


def _not_runnable_by_others(script: str) -> str | None:
    """Why a user other than the owner cannot run `script` (the script, its interpreter and this package
    must be reachable and readable or executable by others), or None when they can."""
    paths = [("the script", os.path.realpath(script), stat.S_IROTH | stat.S_IXOTH)]
    try:
        with open(script, "rb") as handle:
            first = handle.readline(1024)
    except OSError as exc:
        return reason(exc)
    if first.startswith(b"#!"):
        interpreter = first[2:].decode("utf-8", "replace").split()
        if interpreter:
            paths.append(("its interpreter", os.path.realpath(interpreter[0]), stat.S_IXOTH))
    paths.append(("the pymta package", os.path.realpath(__file__), stat.S_IROTH))
    for what, path, bits in paths:
        info = lstat_or_none(path)
        if info is None:
            return f"{what} {path} is missing"
        if info.st_mode & bits != bits:
            return f"{what} {path} has mode {stat.S_IMODE(info.st_mode):04o}"
        parent = os.path.dirname(path)
        while True:
            info = os.stat(parent)
            if not info.st_mode & stat.S_IXOTH:
                return f"{what} is {path}, and {parent} has mode {stat.S_IMODE(info.st_mode):04o}"
            if parent == os.path.dirname(parent):
                break
            parent = os.path.dirname(parent)
    return None
