"""`pymta setup --uninstall`: the units or the cron line go, the links go and what was there before comes
back; with `--purge` also the spool, the config and the user setup made.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
from collections.abc import Callable

from pymta.setup import launcher
from pymta.setup.files import is_pymta_script
from pymta.setup.install import BACKUP_SUFFIX, CONFIG_DIR, CRON_FILE, ENABLED, LINKS, UNIT_DIR, UNITS, Install
from pymta.setup.plan import Change, Step


def _remove(path: str, rmdir: bool = False) -> Callable[[], None]:
    """Unlink `path`; with `rmdir` also its directory when that is left empty (a unit's .wants)."""

    def remove() -> None:
        os.unlink(path)
        if rmdir:
            try:
                os.rmdir(os.path.dirname(path))
            except OSError:
                pass  # not empty

    return remove


def _rename(source: str, target: str) -> Callable[[], None]:
    def rename() -> None:
        if os.path.lexists(target):
            raise FileExistsError(f"{target} exists")
        os.rename(source, target)

    return rename


def uninstall_plan(install: Install, purge: bool = False) -> list[Step]:
    """The steps of `pymta setup --uninstall`: the units or cron line, the links (putting back what was
    there before), and with `purge` the spool, the config and the user."""
    steps = [
        _disable_step(install),
        _remove_units_step(install),
        _remove_cron_step(install),
        _restore_links_step(install),
    ]
    if purge:
        steps += [_purge_step(install), _remove_user_step(install)]
    return steps


def _disable_step(install: Install) -> Step:
    units = [unit for unit, _ in ENABLED]
    if install.systemd_runs():
        argv = ["systemctl", "disable", "--now", *units]

        def check() -> list[Change]:
            if not any(os.path.lexists(install.host(os.path.join(UNIT_DIR, unit))) for unit in units):
                return []
            return [
                Change(
                    "run",
                    shlex.join(argv),
                    "the units are installed",
                    shlex.join(argv),
                    install.command(argv),
                )
            ]

        return Step(f"{' and '.join(units)} not enabled", check)

    def check_links() -> list[Change]:
        changes = []
        for unit, target in ENABLED:
            link = install.host(os.path.join(UNIT_DIR, f"{target}.wants", unit))
            if os.path.islink(link):
                changes.append(
                    Change("remove", link, f"{link} exists", f"rm {link}", _remove(link, rmdir=True))
                )
        return changes

    return Step(f"{' and '.join(units)} not enabled", check_links)


def _remove_units_step(install: Install) -> Step:
    def check() -> list[Change]:
        changes = []
        for unit in UNITS:
            path = install.host(os.path.join(UNIT_DIR, unit))
            if os.path.lexists(path):
                changes.append(Change("remove", path, f"{path} exists", f"rm {path}", _remove(path)))
        if changes and install.systemd_runs():
            argv = ["systemctl", "daemon-reload"]
            changes.append(Change("run", shlex.join(argv), "", shlex.join(argv), install.command(argv)))
        return changes

    return Step(f"no pymta units in {install.host(UNIT_DIR)}", check)


def _remove_cron_step(install: Install) -> Step:
    path = install.host(CRON_FILE)

    def check() -> list[Change]:
        if os.path.lexists(path):
            return [Change("remove", path, f"{path} exists", f"rm {path}", _remove(path))]
        return []

    return Step(f"no cron file {path}", check)


def _restore_links_step(install: Install) -> Step:
    def check() -> list[Change]:
        changes = []
        for link, name in LINKS:
            path = install.host(link)
            backup = path + BACKUP_SUFFIX
            ours = launcher.kind_of(path) == "launcher" or (
                os.path.islink(path) and (os.readlink(path) == install.script(name) or is_pymta_script(path))
            )
            if ours:
                changes.append(Change("remove", path, f"{path} is pymta's", f"rm {path}", _remove(path)))
            if os.path.lexists(backup):
                if ours or not os.path.lexists(path):
                    changes.append(
                        Change(
                            "restore",
                            f"{backup} moved back to {path}",
                            f"{backup} is not restored",
                            f"mv {backup} {path}",
                            _rename(backup, path),
                        )
                    )
                else:
                    changes.append(
                        Change(
                            "warn",
                            "",
                            f"{path} is not pymta's, so {backup} is left as it is",
                            "look at both and keep the one you want",
                        )
                    )
        return changes

    return Step("no pymta links; what was there before is back", check)


def _purge_step(install: Install) -> Step:
    spool = install.host_spool
    config_dir = install.host(CONFIG_DIR)

    def check() -> list[Change]:
        changes = []
        if os.path.lexists(spool):
            waiting = sum(len(_names(os.path.join(spool, name))) for name in ("new", "queue"))
            note = f" ({waiting} queued messages deleted)" if waiting else ""
            changes.append(
                Change(
                    "remove",
                    f"{spool}{note}",
                    f"{spool} exists",
                    f"rm -r {spool}",
                    lambda: shutil.rmtree(spool),
                )
            )
        if os.path.lexists(config_dir):
            changes.append(
                Change(
                    "remove",
                    config_dir,
                    f"{config_dir} exists",
                    f"rm -r {config_dir}",
                    lambda: shutil.rmtree(config_dir),
                )
            )
        return changes

    return Step(f"--purge: no spool {spool} and no config {config_dir}", check)


def _names(directory: str) -> list[str]:
    try:
        return [name for name in os.listdir(directory) if not name.startswith(".")]
    except OSError:
        return []


def _remove_user_step(install: Install) -> Step:
    user = install.user
    if install.root is not None:
        return Step(f"--root: the user {user} is left alone", lambda: [])
    argv = ["userdel", user]

    def check() -> list[Change]:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            return []
        if entry.pw_dir != install.spool:  # not the user setup made
            return [
                Change(
                    "warn",
                    "",
                    f"the user {user} (home {entry.pw_dir}) was not made by pymta setup; left",
                    f"userdel {user} if it is no longer needed",
                )
            ]
        return [
            Change(
                "remove",
                f"system user {user} ({shlex.join(argv)})",
                f"the user {user} exists",
                shlex.join(argv),
                install.command(argv),
            )
        ]

    return Step(f"--purge: no user {user}", check)
