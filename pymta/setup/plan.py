"""The plan engine of `pymta setup`: a plan is a list of `Step`s, run in one of three modes.

Each step has a description, a `check()` that returns what is not yet as it should be (a list of `Change`s,
empty when the step is done), and `apply()`, which makes those changes. `run` drives a plan: apply it
(`pymta setup`), only say what it would do (`--dry-run`), or report each difference as a problem with its
fix (`--check`). Because every step checks first, a second run changes nothing and prints `[ok]` for every
step. What the steps are lives in `steps` (install), `checks` (what only looks) and `uninstall`; what an
install is, in `install`. See ARCHITECTURE.md.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pymta.errors import EX_CANTCREAT

APPLY = "apply"
DRY_RUN = "dry-run"
CHECK = "check"


@dataclass(frozen=True)
class Change:
    """One thing a step would change. `what` says what applying it does ("[create] what"), `problem` what is
    wrong now and `fix` how to put it right by hand (--check). A change without an `action` cannot be made by
    setup (a file in the way, an invalid config): setup reports it as an error with `exit_code`. A `warn`
    change is a problem setup cannot fix and that does not stop it."""

    kind: str  # create, fix, backup, run, remove, restore, warn
    what: str
    problem: str
    fix: str
    action: Callable[[], None] | None = None
    exit_code: int = EX_CANTCREAT


@dataclass
class Step:
    """A step of a plan: `check()` lists what is not yet done (nothing: the step is done)."""

    description: str
    check: Callable[[], list[Change]]

    def apply(self, mode: str, echo: Callable[[str], None]) -> int:
        """Check, then (in `mode`) make, pretend to make or report each change, one line each. Returns 0, or
        the exit status this step calls for."""
        try:
            changes = self.check()
        except OSError as exc:
            echo(f"[error] {self.description}: {reason(exc)}")
            return EX_CANTCREAT
        if not changes:
            echo(f"[ok] {self.description}")
            return 0
        status = 0
        for change in changes:
            if mode == CHECK:
                label = "warn" if change.kind == "warn" else "problem"
                echo(f"[{label}] {change.problem}; fix: {change.fix}")
                status = status or 1
            elif change.kind == "warn":
                echo(f"[warn] {change.problem}; fix: {change.fix}")
            elif change.action is None:
                echo(f"[error] {change.problem}; fix: {change.fix}")
                status = status or change.exit_code
            elif mode == DRY_RUN:
                echo(f"[would {change.kind}] {change.what}")
            else:
                try:
                    change.action()
                except (OSError, subprocess.SubprocessError) as exc:
                    echo(f"[error] {change.what}: {reason(exc)}; fix: {change.fix}")
                    status = status or change.exit_code
                    continue
                echo(f"[{change.kind}] {change.what}")
        return status


def run(plan: Sequence[Step], mode: str, echo: Callable[[str], None]) -> int:
    """Run every step of `plan` in `mode` (APPLY, DRY_RUN or CHECK) and return the exit status: 0 when all
    went well (CHECK: nothing is wrong); in CHECK 1 when something is wrong; otherwise the first error's
    sysexits code. A step that fails does not stop the ones after it."""
    status = 0
    for step in plan:
        result = step.apply(mode, echo)
        status = status or result
    return status


def reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if isinstance(exc, subprocess.CalledProcessError):
        return f"{shlex.join(exc.cmd)} exited with status {exc.returncode}"
    return str(exc)
