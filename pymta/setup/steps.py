"""The steps of `pymta setup`: the user, the spool, the config, the links, and the units or the cron line.

`install_plan` lists them in order, with the looking-only steps of `checks`; each step checks first, so a
second run changes nothing (the plan engine is `plan`, what an install is `install`).
"""

from __future__ import annotations

import os
import pwd
import shlex
import stat
import subprocess

from pymta.config.load import load
from pymta.errors import EX_CONFIG, ConfigError
from pymta.queue import audit
from pymta.queue.views import STATUS_DIR, STATUS_MODE
from pymta.setup import launcher
from pymta.setup.checks import scripts_step, unreachable_parents, untold_step, warning
from pymta.setup.files import (
    Owner,
    describe_owner,
    dir_changes,
    file_changes,
    kind_of,
    lstat_or_none,
    make_parents,
    node_changes,
    set_attributes,
    symlink,
    write_file,
)
from pymta.setup.install import (
    BACKUP_SUFFIX,
    CONFIG_DIR,
    CONFIG_DIR_MODE,
    CONFIG_MODE,
    CRON_FILE,
    CRON_MODE,
    DROP_DIRS,
    DROP_MODE,
    ENABLED,
    LINKS,
    LOCK_FILE,
    LOCK_MODE,
    PATH_UNIT,
    PRIVATE_DIRS,
    PRIVATE_MODE,
    SECRETS_DIR,
    SECRETS_MODE,
    SERVICE,
    SPOOL_MODE,
    SYSTEM_CONFIG,
    TIMER,
    UNIT_DIR,
    UNIT_MODE,
    UNITS,
    Install,
    initial_config,
)
from pymta.setup.plan import Change, Step, reason
from pymta.setup.units import cron_file, path_unit, service_unit, timer_unit

NOLOGIN_SHELLS = ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false")


def _nologin() -> str:
    return next((shell for shell in NOLOGIN_SHELLS if os.path.exists(shell)), "/bin/false")


def user_step(install: Install) -> Step:
    user = install.user
    if install.root is not None:
        owner = install.spool_owner()
        if owner.label.split(":")[0] == user:
            text = f"user {user} exists on this machine (uid {owner.uid}); --root: it owns the spool"
        else:
            text = (
                f"--root: no user {user} is created; the spool and secrets are owned by {owner.label} "
                f"(uid {owner.uid}, gid {owner.gid}), the user running setup"
            )
        return Step(text, lambda: [])
    argv = [
        "useradd",
        "--system",
        "--home-dir",
        install.spool,
        "--no-create-home",
        "--shell",
        _nologin(),
        "--user-group",
        "--comment",
        "pymta mail relay",
        user,
    ]

    def check() -> list[Change]:
        try:
            pwd.getpwnam(user)
        except KeyError:
            return [
                Change(
                    "create",
                    f"system user {user} ({shlex.join(argv)})",
                    f"there is no user {user}",
                    shlex.join(argv),
                    install.command(argv),
                )
            ]
        return []

    return Step(f"system user {user} exists", check)


def spool_step(install: Install) -> Step:
    spool = install.host_spool

    def check() -> list[Change]:
        owner = install.spool_owner()
        changes = dir_changes(spool, SPOOL_MODE, owner)
        for name in DROP_DIRS:
            changes += dir_changes(os.path.join(spool, name), DROP_MODE, owner)
        for name in PRIVATE_DIRS:
            changes += dir_changes(os.path.join(spool, name), PRIVATE_MODE, owner)
        changes += dir_changes(os.path.join(spool, STATUS_DIR), STATUS_MODE, install.admin_owner())
        lock = os.path.join(spool, LOCK_FILE)
        changes += node_changes(lock, LOCK_MODE, owner, False, lambda: write_file(lock, "", LOCK_MODE, owner))
        changes += unreachable_parents(spool, install.root)
        directories = (*DROP_DIRS, *PRIVATE_DIRS, STATUS_DIR)
        changes += [warning(*finding) for finding in audit.spool_findings(spool, directories)]
        return changes

    return Step(
        f"spool {spool}: 0755, tmp/ new/ 1733, queue/ state/ done/ corrupt/ 0700, flush.lock 0600, owner "
        f"{install.spool_owner().label}; status/ 0711 root; nothing planted or left behind",
        check,
    )


def config_step(install: Install) -> Step:
    directory = install.host(CONFIG_DIR)
    path = install.host(SYSTEM_CONFIG)
    secrets = install.host(SECRETS_DIR)

    def check() -> list[Change]:
        admin = install.admin_owner()
        changes = dir_changes(directory, CONFIG_DIR_MODE, admin)
        changes += _config_file_changes(install, path, admin)
        changes += dir_changes(secrets, SECRETS_MODE, install.spool_owner())
        changes += [warning(*finding) for finding in audit.secret_findings(secrets)]
        return changes

    exists = "exists, left as it is (setup never overwrites it)" if os.path.lexists(path) else "0644"
    if install.template and os.path.lexists(path):
        exists += f"; {install.template} is not installed"
    return Step(
        f"config {path} {exists}; {directory} 0755; {secrets} 0700 {install.spool_owner().label}",
        check,
    )


def _config_file_changes(install: Install, path: str, admin: Owner) -> list[Change]:
    info = lstat_or_none(path)
    if info is None:

        def create() -> None:
            write_file(path, initial_config(install)[0], CONFIG_MODE, admin, replace=False)

        return [
            Change(
                "create",
                f"{path} (mode 0644, {initial_config(install)[1]})",
                f"{path} is missing",
                "pymta setup (or write it by hand; see pymta.yaml(5))",
                create,
            )
        ]
    changes = []
    if stat.S_ISLNK(info.st_mode):
        try:
            info = os.stat(path)
        except OSError as exc:
            return [Change("fix", "", f"{path}: {reason(exc)}", f"repair the link {path}", None, EX_CONFIG)]
    elif stat.S_ISREG(info.st_mode):
        # Never rewritten; but every user must read it, and only root write it.
        if not admin.matches(info):
            changes.append(
                Change(
                    "fix",
                    f"{path}: owner {describe_owner(info)} -> {admin.label} (whoever can write it decides "
                    "where the mail goes)",
                    f"{path} is owned by {describe_owner(info)}, should be {admin.label}",
                    f"chown {admin.label} {shlex.quote(path)}",
                    lambda: set_attributes(path, CONFIG_MODE, admin, False),
                )
            )
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o444 != 0o444 or mode & 0o022:
            changes.append(
                Change(
                    "fix",
                    f"{path}: mode {mode:04o} -> 0644 (every user's sendmail reads it)",
                    f"{path} has mode {mode:04o}, should be 0644 (readable by all, writable by its owner)",
                    f"chmod 0644 {shlex.quote(path)}",
                    lambda: set_attributes(path, CONFIG_MODE, admin, False),
                )
            )
    if not stat.S_ISREG(info.st_mode):
        return [
            Change(
                "fix",
                "",
                f"{path} is {kind_of(info)}, not a config file",
                f"move {path} away",
                None,
                EX_CONFIG,
            )
        ]
    try:
        load(path)
    except ConfigError as exc:
        fix = f"edit it, then run pymta config check -C {path}"
        changes.append(Change("fix", "", str(exc), fix, None, EX_CONFIG))
    return changes


def launchers_step(install: Install) -> Step:
    """/usr/sbin/sendmail, /usr/lib/sendmail, /usr/bin/mailq and /usr/bin/newaliases are pymta's launchers
    (`pymta.setup.launcher`: Python isolated and without site, this install's packages only), not links to
    pip's console scripts, which start slower and honour a user's PYTHONPATH."""

    def check() -> list[Change]:
        this = launcher.this_install()
        changes = []
        for link, name in LINKS:
            changes += _launcher_changes(install.host(link), name, this)
        return changes

    names = ", ".join(link for link, _ in LINKS)
    return Step(f"launchers {names} for {install.bin_dir}", check)


def bin_launchers_step(install: Install) -> Step:
    """`pymta setup --launchers`: the environment's own sendmail, mailq and newaliases (pip's console
    scripts) become launchers; what a user-mode install runs (the README's quickstart). No root needed."""

    def check() -> list[Change]:
        this = launcher.this_install()
        changes = []
        for name in launcher.FAST_PROGRAMS:
            changes += _launcher_changes(install.host(os.path.join(install.bin_dir, name)), name, this)
        return changes

    names = ", ".join(launcher.FAST_PROGRAMS)
    return Step(f"launchers {names} in {install.host(install.bin_dir)}", check)


def _launcher_changes(path: str, name: str, this: launcher.Install) -> list[Change]:
    text = launcher.launcher_text(name, this)
    backup = path + BACKUP_SUFFIX
    fix = "pymta setup"
    slower = "which starts slower than pymta's launcher and honours a user's PYTHONPATH"

    def write() -> None:
        make_parents(path)
        launcher.write_launchers(os.path.dirname(path), this, (name,), replace=True)

    kind = launcher.kind_of(path)
    if kind == "absent":
        return [Change("create", f"{path}: pymta's launcher", f"{path} is missing", fix, write)]
    if kind == "launcher":
        with open(path, "rb") as handle:
            if handle.read(len(text) + 1) == text:
                return []
        was, problem = "another install's launcher", f"{path} is the launcher of another pymta install"
    elif kind == "console script":
        was, problem = "pip's console script", f"{path} is pip's console script of pymta, {slower}"
    elif os.path.islink(path) and launcher.kind_of(os.path.realpath(path)) in ("launcher", "console script"):
        # What pymta setup made before it wrote launchers: a link to this or another environment's script.
        was = f"a link to {os.readlink(path)}"
        problem = f"{path} is {was}, a script of pymta's that {slower.removeprefix('which ')}"
    else:
        info = os.lstat(path)
        was = f"a link to {os.readlink(path)}" if stat.S_ISLNK(info.st_mode) else kind_of(info)
        if os.path.lexists(backup):
            return [
                Change(
                    "backup",
                    "",
                    f"{path} is {was}, not pymta's, and {backup} exists already",
                    f"move {shlex.quote(path)} or {shlex.quote(backup)} away, then run pymta setup",
                )
            ]

        def move_and_write() -> None:
            if os.path.lexists(backup):
                raise FileExistsError(f"{backup} exists")
            os.rename(path, backup)
            write()

        return [
            Change(
                "backup",
                f"{path} ({was}) moved to {backup}; {path}: pymta's launcher",
                f"{path} is {was}, not pymta's",
                f"mv {shlex.quote(path)} {shlex.quote(backup)} && pymta setup",
                move_and_write,
            )
        ]
    return [Change("fix", f"{path}: pymta's launcher (was {was})", problem, fix, write)]


def units_step(install: Install) -> Step:
    unit_dir = install.host(UNIT_DIR)
    texts = {
        SERVICE: service_unit(install.pymta(), install.spool, install.user),
        TIMER: timer_unit(),
        PATH_UNIT: path_unit(install.spool),
    }

    def check() -> list[Change]:
        admin = install.admin_owner()
        changes = []
        for name, text in texts.items():
            changes += file_changes(
                os.path.join(unit_dir, name), text, UNIT_MODE, admin, f"systemd unit {name}"
            )
        if changes and install.systemd_runs() and all(change.action for change in changes):
            argv = ["systemctl", "daemon-reload"]
            changes.append(
                Change(
                    "run",
                    shlex.join(argv),
                    "systemd has not loaded the units",
                    shlex.join(argv),
                    install.command(argv),
                )
            )
        return changes

    return Step(f"systemd units {', '.join(UNITS)} in {unit_dir}", check)


def enable_step(install: Install) -> Step:
    units = [unit for unit, _ in ENABLED]
    argv = ["systemctl", "enable", "--now", *units]
    if install.systemd_runs():

        def check() -> list[Change]:
            for unit in units:
                for question in ("is-enabled", "is-active"):
                    asked = subprocess.run(
                        ["systemctl", question, "--quiet", unit], stdin=subprocess.DEVNULL, check=False
                    )
                    if asked.returncode != 0:
                        return [
                            Change(
                                "run",
                                shlex.join(argv),
                                f"{unit} is not enabled and started",
                                shlex.join(argv),
                                install.command(argv),
                            )
                        ]
            return []

        return Step(f"{' and '.join(units)} enabled and started", check)

    # With a root (or without a running systemd): enable as `systemctl --root` does, by the links in the
    # targets' .wants directories; starting them is left to the system when it boots.
    def check_links() -> list[Change]:
        changes = []
        for unit, target in ENABLED:
            link = install.host(os.path.join(UNIT_DIR, f"{target}.wants", unit))
            want = os.path.join(UNIT_DIR, unit)
            info = lstat_or_none(link)
            if info is not None and stat.S_ISLNK(info.st_mode) and os.readlink(link) == want:
                continue
            if info is not None and not stat.S_ISLNK(info.st_mode):
                changes.append(
                    Change("fix", "", f"{link} is {kind_of(info)}", f"remove {link}, then run pymta setup")
                )
                continue

            def enable(link: str = link, want: str = want) -> None:
                symlink(want, link)

            changes.append(
                Change(
                    "create",
                    f"{link} -> {want} (enabled; systemctl is not run: start it in the installed system with "
                    f"{shlex.join(['systemctl', 'start', unit])})",
                    f"{unit} is not enabled",
                    f"{shlex.join(argv)} (or ln -s {want} {link})",
                    enable,
                )
            )
        return changes

    return Step(f"{' and '.join(units)} enabled", check_links)


def cron_step(install: Install) -> Step:
    path = install.host(CRON_FILE)
    why = (
        ""
        if install.root is not None or os.path.isdir("/run/systemd/system")
        else ", as systemd does not run"
    )

    def check() -> list[Change]:
        return file_changes(
            path,
            cron_file(install.pymta()),
            CRON_MODE,
            install.admin_owner(),
            "cron: pymta flush every 5 minutes",
        )

    return Step(f"cron file {path}: pymta flush every 5 minutes{why}", check)


def install_plan(install: Install) -> list[Step]:
    """The steps of `pymta setup` (and of --check and --dry-run), in order."""
    steps = [
        user_step(install),
        spool_step(install),
        config_step(install),
        scripts_step(install),
        launchers_step(install),
    ]
    if install.systemd:
        steps += [units_step(install), enable_step(install)]
    else:
        steps.append(cron_step(install))
    steps.append(untold_step(install))
    return steps
