"""`pymta setup`: make this machine a pymta server (system mode), check such an install, or undo it.

An install is a plan: a list of `Step`s, each with a description, a `check()` that returns what is not yet
as it should be (a list of `Change`s, empty when the step is done) and an `apply()` that makes those changes.
`run` drives a plan in one of three modes: apply it (`pymta setup`), only say what it would do (`--dry-run`),
or report each difference as a problem with its fix (`--check`). Because every step first checks, a second
run changes nothing and prints `[ok]` for every step.

What a system-mode install is (DESIGN.md, "Two ways to run"), with `SPOOL` = /var/spool/pymta and the owner
`pymta:pymta`:

    SPOOL/                 0755  pymta  every user must reach tmp/ and new/ below it; the names in it are
                                        no secret. pymta owns it so the flush, once it runs as pymta, can
                                        create and remove flush.request beside flush.lock.
    SPOOL/tmp/, new/       1733  pymta  the drop side: any user creates files, nobody but pymta (and root)
                                        lists them, and the sticky bit stops users removing or renaming each
                                        other's files (which only works because the directory is not theirs).
    SPOOL/queue/, state/,  0700  pymta  private: only the flush reads the picked-up queue.
      done/, corrupt/
    SPOOL/status/          0711  root   each user's view of their own queued messages, status/UID (0400,
                                        owned by UID), written by the root flush (pymta.queue.views);
                                        users reach their own file by name but cannot list the
                                        directory. Root's, so pymta can neither move nor link a view
                                        (a file of another uid).
    SPOOL/flush.lock       0600  pymta  the flush lock; only the flush opens it.
    /etc/pymta/            0755  root
    /etc/pymta/pymta.yaml  0644  root   every user's sendmail reads it, so it holds no password; owned by root
                                        because whoever can write it decides where the mail goes.
    /etc/pymta/secrets/    0700  pymta  files for `password: {file: ...}`, readable by pymta (and root) only.
    /usr/sbin/sendmail, /usr/lib/sendmail, /usr/bin/mailq, /usr/bin/newaliases
                                        symbolic links to this environment's console scripts; whatever was
                                        there is moved to NAME.pre-pymta and put back by --uninstall.
    /etc/systemd/system/pymta-flush.{service,timer,path}
                           0644  root   the flush every 5 minutes and whenever something is dropped into new/;
                                        or, without systemd, /etc/cron.d/pymta (0644 root) every 5 minutes.

With `root` (`--root DIR`) every path is taken under DIR, like DESTDIR: nothing outside DIR is written, no
user is created and no systemctl is run; the spool's owner is the real `pymta` user when this machine has
one, else the user running setup. Paths written into files (units, cron line) are those of the installed
system, without DIR.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pymta.config import paths as quickconfig
from pymta.errors import EX_CANTCREAT, EX_CONFIG, ConfigError, PermissionDeniedError, UsageError
from pymta.queue import audit as spool_audit
from pymta.queue.views import STATUS_DIR, STATUS_MODE

SYSTEM_CONFIG = quickconfig.SYSTEM_CONFIG
SYSTEM_SPOOL = quickconfig.SYSTEM_SPOOL
CONFIG_DIR = os.path.dirname(SYSTEM_CONFIG)
SECRETS_DIR = os.path.join(CONFIG_DIR, "secrets")
# The password file the installed config's comments suggest (and `pymta test` names, in system mode).
SECRET_FILE = os.path.join(SECRETS_DIR, "smarthost")
UNIT_DIR = "/etc/systemd/system"
CRON_FILE = "/etc/cron.d/pymta"
DEFAULT_USER = "pymta"

SPOOL_MODE = 0o755
DROP_MODE = 0o1733
PRIVATE_MODE = 0o700
LOCK_MODE = 0o600
CONFIG_DIR_MODE = 0o755
CONFIG_MODE = 0o644
SECRETS_MODE = 0o700
UNIT_MODE = 0o644
CRON_MODE = 0o644
PARENT_MODE = 0o755

DROP_DIRS = ("tmp", "new")
PRIVATE_DIRS = ("queue", "state", "done", "corrupt")
LOCK_FILE = "flush.lock"

# Each link and the console script it points at.
LINKS: tuple[tuple[str, str], ...] = (
    ("/usr/sbin/sendmail", "sendmail"),
    ("/usr/lib/sendmail", "sendmail"),
    ("/usr/bin/mailq", "mailq"),
    ("/usr/bin/newaliases", "newaliases"),
)
SCRIPTS = ("pymta", "sendmail", "mailq", "newaliases")
BACKUP_SUFFIX = ".pre-pymta"

SERVICE = "pymta-flush.service"
TIMER = "pymta-flush.timer"
PATH_UNIT = "pymta-flush.path"
UNITS = (SERVICE, TIMER, PATH_UNIT)
# The units that are enabled, and the target that wants each (their [Install] WantedBy=).
ENABLED: tuple[tuple[str, str], ...] = ((TIMER, "timers.target"), (PATH_UNIT, "paths.target"))

NOLOGIN_SHELLS = ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false")
_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,30}\$?")

APPLY = "apply"
DRY_RUN = "dry-run"
CHECK = "check"


# --- Plans, steps and changes ---


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
            echo(f"[error] {self.description}: {_reason(exc)}")
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
                    echo(f"[error] {change.what}: {_reason(exc)}; fix: {change.fix}")
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


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if isinstance(exc, subprocess.CalledProcessError):
        return f"{shlex.join(exc.cmd)} exited with status {exc.returncode}"
    return str(exc)


# --- Owners ---


@dataclass(frozen=True)
class Owner:
    """Who should own a path: uid and gid, or None when they are not known yet (the user is created later)."""

    uid: int | None
    gid: int | None
    label: str  # user:group, for messages and chown commands

    def matches(self, info: os.stat_result) -> bool:
        return self.uid is not None and (info.st_uid, info.st_gid) == (self.uid, self.gid)


def _owner_of(uid: int, gid: int) -> Owner:
    return Owner(uid, gid, f"{_user_name(uid)}:{_group_name(gid)}")


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _describe_owner(info: os.stat_result) -> str:
    return f"{_user_name(info.st_uid)}:{_group_name(info.st_gid)}"


# --- The install ---


@dataclass
class Install:
    """Where and for whom to install: `root` is --root DIR (None: this machine), `user` the spool's owner,
    `template` a config file to install instead of the example (-C), `systemd` whether to install units
    (None: when systemd runs here, always with a root)."""

    root: str | None = None
    user: str = DEFAULT_USER
    template: str | None = None
    systemd: bool | None = None
    bin_dir: str = field(default_factory=lambda: os.path.dirname(sys.executable))
    spool: str = field(init=False)  # the spool as the installed system sees it

    def __post_init__(self) -> None:
        if self.root is not None:
            self.root = os.path.abspath(self.root)
            if self.root == "/":
                self.root = None
        if not _USER_NAME.fullmatch(self.user):
            raise UsageError(
                f"--user {self.user!r}: not a user name; use lower-case letters, digits, - and _"
            )
        if self.template is not None:
            from pymta.config.load import load

            load(self.template)  # ConfigError (78) when it is not a valid config
        if self.systemd is None:
            self.systemd = self.root is not None or os.path.isdir("/run/systemd/system")
        self.spool = self._configured_spool()

    # Paths

    def host(self, path: str) -> str:
        """Where the installed system's `path` is on this machine: under the root, if there is one."""
        return path if self.root is None else self.root + path

    def _configured_spool(self) -> str:
        """The `spool:` of the installed config (else of -C FILE), else /var/spool/pymta. With a root, a
        configured spool under it is taken as that spool seen from inside (the config of a test or a
        chroot that names its spool as this machine sees it)."""
        source = self.host(SYSTEM_CONFIG)
        if not os.path.lexists(source):
            source = self.template or ""
        value: str | None = None
        if source:
            try:
                value = quickconfig.read_scalars(source, frozenset({"spool"})).get("spool")
            except quickconfig.BrokenConfigError as exc:
                value = exc.salvaged.get("spool")
            except (OSError, ValueError):
                value = None
        if not value or not os.path.isabs(value):
            return SYSTEM_SPOOL
        value = os.path.normpath(value)
        if self.root is not None and value.startswith(self.root + "/"):
            return value[len(self.root) :]
        return value

    @property
    def host_spool(self) -> str:
        return self.host(self.spool)

    # Owners

    def spool_owner(self) -> Owner:
        """The owner of the spool and the secrets: the user (once it exists); with a root and no such user,
        or when not running as root, the user running setup."""
        try:
            entry: pwd.struct_passwd | None = pwd.getpwnam(self.user)
        except KeyError:
            entry = None
        if entry is not None and (self.root is None or os.geteuid() == 0):
            return Owner(entry.pw_uid, entry.pw_gid, f"{self.user}:{_group_name(entry.pw_gid)}")
        if self.root is None:
            return Owner(None, None, f"{self.user}:{self.user}")
        return _owner_of(os.getuid(), os.getgid())

    def admin_owner(self) -> Owner:
        """The owner of the config, links and units: root, or (--root without root rights) the user
        running setup."""
        if self.root is None or os.geteuid() == 0:
            return Owner(0, 0, "root:root")
        return _owner_of(os.getuid(), os.getgid())

    # Console scripts

    def script(self, name: str) -> str | None:
        """The installed console script `name` of this environment."""
        for directory in (self.bin_dir, sysconfig.get_path("scripts")):
            if directory:
                found = shutil.which(name, path=directory)
                if found:
                    return os.path.abspath(found)
        return None

    def pymta(self) -> str:
        return self.script("pymta") or os.path.join(self.bin_dir, "pymta")

    # Running programs (never with a root)

    def command(self, argv: Sequence[str]) -> Callable[[], None]:
        def execute() -> None:
            if self.root is not None:
                raise RuntimeError(f"{shlex.join(argv)}: no command runs on this machine with --root")
            subprocess.run(list(argv), check=True, stdin=subprocess.DEVNULL)

        return execute

    def systemd_runs(self) -> bool:
        return self.root is None and os.path.isdir("/run/systemd/system")


# --- Helpers that change the file system (never following a link) ---


def _open_node(path: str, directory: bool) -> int:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    return os.open(path, flags | (os.O_DIRECTORY if directory else 0))


def _set_attributes(path: str, mode: int, owner: Owner, directory: bool) -> None:
    """Give `path` its owner and mode through a descriptor, so a link swapped in is never followed."""
    fd = _open_node(path, directory)
    try:
        info = os.fstat(fd)
        if not directory and not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path} is not a regular file")
        if owner.uid is not None and owner.gid is not None and not owner.matches(info):
            os.fchown(fd, owner.uid, owner.gid)
        if stat.S_IMODE(info.st_mode) != mode or not owner.matches(info):
            os.fchmod(fd, mode)  # after chown, which may clear mode bits
    finally:
        os.close(fd)


def _make_parents(path: str) -> None:
    """Create the missing directories above `path`, 0755 whatever the umask."""
    missing = []
    parent = os.path.dirname(path)
    while not os.path.isdir(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    for directory in reversed(missing):
        os.mkdir(directory, PARENT_MODE)
        os.chmod(directory, PARENT_MODE)


def _make_dir(path: str, mode: int, owner: Owner) -> None:
    _make_parents(path)
    os.mkdir(path, 0o700)
    _set_attributes(path, mode, owner, directory=True)


def _write_file(path: str, text: str, mode: int, owner: Owner, replace: bool = True) -> None:
    """Write `text` to `path` atomically: a new file beside it, then rename (or, when not `replace`, link,
    which fails rather than replace a file that appeared meanwhile)."""
    _make_parents(path)
    tmp_path = f"{path}.pymta-setup"
    try:
        os.unlink(tmp_path)
    except FileNotFoundError:
        pass
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, text.encode("utf-8"))
            if owner.uid is not None and owner.gid is not None:
                os.fchown(fd, owner.uid, owner.gid)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.rename(tmp_path, path)
        else:
            os.link(tmp_path, path)
            os.unlink(tmp_path)
    except BaseException:
        try:
            os.unlink(tmp_path)
        except FileNotFoundError:
            pass
        raise


def _symlink(target: str, path: str) -> None:
    """Make `path` a link to `target`, replacing a link that is there (atomically)."""
    _make_parents(path)
    tmp_path = f"{path}.pymta-setup"
    try:
        os.unlink(tmp_path)
    except FileNotFoundError:
        pass
    os.symlink(target, tmp_path)
    os.replace(tmp_path, path)


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _kind(info: os.stat_result) -> str:
    if stat.S_ISLNK(info.st_mode):
        return "a symbolic link"
    if stat.S_ISDIR(info.st_mode):
        return "a directory"
    if stat.S_ISREG(info.st_mode):
        return "a regular file"
    return "a special file"


def _node_changes(
    path: str, mode: int, owner: Owner, directory: bool, create: Callable[[], None]
) -> list[Change]:
    """What is wrong with the directory or file `path` that should have `mode` and `owner`."""
    want = "directory" if directory else "file"
    info = _lstat(path)
    if info is None:
        return [
            Change(
                "create",
                f"{path} ({want}, mode {mode:04o}, owner {owner.label})",
                f"{path} is missing",
                (
                    f"install -d -m {mode:04o} -o {owner.label.replace(':', ' -g ')} {shlex.quote(path)}"
                    if directory
                    else "pymta setup"
                ),
                create,
            )
        ]
    right_type = stat.S_ISDIR(info.st_mode) if directory else stat.S_ISREG(info.st_mode)
    if not right_type:
        return [
            Change(
                "fix",
                f"{path}: replace {_kind(info)} by a {want}",
                f"{path} is {_kind(info)}, not a {want}",
                f"move {shlex.quote(path)} away, then run pymta setup",
            )
        ]
    changes = []
    if not owner.matches(info):
        changes.append(
            Change(
                "fix",
                f"{path}: owner {_describe_owner(info)} -> {owner.label}",
                f"{path} is owned by {_describe_owner(info)}, should be {owner.label}",
                f"chown {owner.label} {shlex.quote(path)}",
                lambda: _set_attributes(path, mode, owner, directory),
            )
        )
    current = stat.S_IMODE(info.st_mode)
    if current != mode:
        changes.append(
            Change(
                "fix",
                f"{path}: mode {current:04o} -> {mode:04o}",
                f"{path} has mode {current:04o}, should be {mode:04o}",
                f"chmod {mode:04o} {shlex.quote(path)}",
                lambda: _set_attributes(path, mode, owner, directory),
            )
        )
    return changes


def _dir_changes(path: str, mode: int, owner: Owner) -> list[Change]:
    return _node_changes(path, mode, owner, True, lambda: _make_dir(path, mode, owner))


def _file_changes(path: str, text: str, mode: int, owner: Owner, describe: str) -> list[Change]:
    """A file setup owns: its content is rewritten when it differs."""
    changes = _node_changes(path, mode, owner, False, lambda: _write_file(path, text, mode, owner))
    if changes and changes[0].kind == "create":
        return [
            Change(
                "create",
                f"{path} ({describe}, mode {mode:04o})",
                f"{path} is missing",
                "pymta setup",
                changes[0].action,
            )
        ]
    if any(change.action is None for change in changes):
        return changes
    with open(path, encoding="utf-8", errors="replace") as handle:
        current = handle.read()
    if current != text:
        return [
            Change(
                "fix",
                f"{path}: rewritten ({describe}; it differed from what this pymta installs)",
                f"{path} differs from what this pymta installs ({describe})",
                "pymta setup (put local changes in a drop-in or another file: setup rewrites this one)",
                lambda: _write_file(path, text, mode, owner),
            )
        ]
    return changes


# --- What gets installed: the config, the units, the cron line ---

CONFIG_HEADER = """\
# {path}: installed by `pymta setup`{source}. setup never overwrites it.
#
# As installed, the admin, smarthosts, routes and rewrite settings are commented out, so the file is valid
# as it stands: mail for this machine's users is delivered locally, and mail for elsewhere waits in the
# queue ("no smarthost configured") until a smarthost is configured. Remove the "#" in front of those lines
# and adapt them, then run `pymta config check` and `pymta test`.
#
# Every user's sendmail reads this file (mode 0644): it never holds a password. On a server keep one in a
# file that only pymta can read, and name it with {{file: ...}}:
#     install -m 600 -o {user} -g {user} /dev/null {secret}   # then write the password into it
#     password: {{file: {secret}}}

"""

# Used when the example is not beside the package (an install from a wheel).
FALLBACK_CONFIG = """\
# Every key is optional and described in pymta.yaml(5).

# Where mail for local system accounts (root, cron, daemons) goes.
#admin: me@example.org

# The server that takes our mail.
#smarthosts:
#  - host: smtp.example.org
#    port: 587
#    security: starttls
#    username: me@example.org
#    password: {file: /etc/pymta/secrets/smarthost}
"""

# Top-level keys of the example that are commented out in the installed copy.
COMMENTED_KEYS = ("admin", "smarthosts", "routes", "rewrite")


def example_config_path() -> str | None:
    """examples/pymta.yaml: of the source tree this package runs from, else the copy the wheel installed
    as a data file (share/pymta/examples), found through the installed files' record, so it is found
    whatever the install scheme put it (a venv, /usr/local under `sudo pip`, ~/.local under --user)."""
    source = Path(__file__).resolve().parent.parent.parent / "examples" / "pymta.yaml"
    if source.is_file():
        return str(source)
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        files = distribution("pymta").files or []
    except PackageNotFoundError:
        return None
    for file in files:
        if file.as_posix().endswith("share/pymta/examples/pymta.yaml"):
            installed = Path(str(file.locate())).resolve()
            if installed.is_file():
                return str(installed)
    return None


def adapt_example(text: str) -> str:
    """The example config with its admin, smarthosts, routes and rewrite settings commented out: each such
    top-level key and the indented lines that belong to it get a leading '#'."""
    out = []
    commenting = False
    for line in text.splitlines():
        if line and not line[0].isspace():
            key, colon, _ = line.partition(":")
            commenting = bool(colon) and not line.startswith("#") and key in COMMENTED_KEYS
        out.append(f"#{line}" if commenting and line.strip() else line)
    return "\n".join(out) + "\n"


def initial_config(install: Install) -> tuple[str, str]:
    """The text of a new /etc/pymta/pymta.yaml and where it comes from."""
    header = {"path": SYSTEM_CONFIG, "user": install.user, "secret": SECRET_FILE}
    if install.template:
        with open(install.template, encoding="utf-8") as handle:
            return handle.read(), f"a copy of {install.template}"
    example = example_config_path()
    if example:
        with open(example, encoding="utf-8") as handle:
            text = adapt_example(handle.read())
        return CONFIG_HEADER.format(source=" from examples/pymta.yaml", **header) + text, (
            "examples/pymta.yaml with the smarthost lines commented out"
        )
    return CONFIG_HEADER.format(source="", **header) + FALLBACK_CONFIG, "a config without smarthost"


def _systemd_quote(path: str) -> str:
    """`path` as the command of an ExecStart= line: % doubled, quoted when it holds other characters."""
    path = path.replace("%", "%%")
    if re.fullmatch(r"[\w/.+@:%-]+", path):
        return path
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def service_unit(pymta: str, spool: str, user: str = DEFAULT_USER) -> str:
    return f"""\
# {SERVICE}: one delivery run of the pymta queue, `pymta flush`. Written by `pymta setup`, which
# rewrites it: put local changes in a drop-in (systemctl edit {SERVICE}), not here.
# Started every 5 minutes by {TIMER}, and by {PATH_UNIT} as soon as sendmail drops a message into
# {spool}/new.
#
# It starts as root, and root only forks and waits: the pick-up, the queue, the credentials and every
# SMTP session run in a process that has switched to `{user}` for good, and each local mailbox is written
# by a child running as its recipient (pymta(1), PRIVILEGES). Root is needed for that last part only.
#
# `pymta flush` exits 0 when the run worked, even when messages were deferred, and at once when another
# flush is running. A non-zero exit (78: broken config) marks the unit failed: `systemctl status
# {SERVICE.removesuffix(".service")}` shows the one-line reason.

[Unit]
Description=Deliver the pymta mail queue
Documentation=man:pymta(1) man:pymta.yaml(5)
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
ExecStart={_systemd_quote(pymta)} flush
UMask=0077
NoNewPrivileges=yes
LockPersonality=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
RestrictNamespaces=yes
SystemCallArchitectures=native
# Unix sockets for syslog, IP for the smarthost, netlink for the resolver.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
# /usr, /boot and /etc read-only; /var (the spool, /var/mail) and /home (Maildirs) stay writable.
ProtectSystem=full
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
"""


TIMER_UNIT = """\
# pymta-flush.timer: run pymta-flush.service every 5 minutes, and a minute after boot (mail queued while
# the machine was off or offline leaves then). Install it beside pymta-flush.service; see there.
# It is the safety net that retries deferred mail when its next attempt is due; new mail leaves at once
# (deliver: immediate starts a flush in user mode, pymta-flush.path in system mode).

[Unit]
Description=Deliver the pymta mail queue every 5 minutes
Documentation=man:pymta(1)

[Timer]
OnBootSec=1min
OnCalendar=*:0/5
AccuracySec=30s
# A run missed while the machine was off happens at the next boot.
Persistent=true

[Install]
WantedBy=timers.target
"""


def path_unit(spool: str) -> str:
    return f"""\
# {PATH_UNIT}: start {SERVICE} as soon as sendmail drops a message into the spool's drop
# directory (system mode, as set up by `pymta setup`). The flush picks it up and delivers it.
#
# PathChanged= fires when a file is renamed into {spool}/new (sendmail's commit). Not
# DirectoryNotEmpty=: the flush leaves a directory a user made in new/ there for the admin, and the unit
# would start the flush again and again. A drop made while this unit is not watching (at boot, or during
# a run) leaves with the next run of {TIMER}.

[Unit]
Description=Deliver pymta mail as soon as it is queued
Documentation=man:pymta(1)

[Path]
PathChanged={spool}/new
Unit={SERVICE}

[Install]
WantedBy=paths.target
"""


def cron_file(pymta: str) -> str:
    return f"""\
# {CRON_FILE}: deliver the pymta mail queue every 5 minutes. Written by `pymta setup`, which rewrites
# it; `pymta setup --uninstall` removes it. Started as root, the flush does its work as the spool's
# owner and writes each local mailbox as its recipient (pymta(1), PRIVILEGES).
SHELL=/bin/sh
PATH=/usr/sbin:/usr/bin:/sbin:/bin
*/5 * * * * root {shlex.quote(pymta)} flush
"""


# --- The steps of an install ---


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
        changes = _dir_changes(spool, SPOOL_MODE, owner)
        for name in DROP_DIRS:
            changes += _dir_changes(os.path.join(spool, name), DROP_MODE, owner)
        for name in PRIVATE_DIRS:
            changes += _dir_changes(os.path.join(spool, name), PRIVATE_MODE, owner)
        changes += _dir_changes(os.path.join(spool, STATUS_DIR), STATUS_MODE, install.admin_owner())
        lock = os.path.join(spool, LOCK_FILE)
        changes += _node_changes(
            lock, LOCK_MODE, owner, False, lambda: _write_file(lock, "", LOCK_MODE, owner)
        )
        changes += _unreachable_parents(spool, install.root)
        directories = (*DROP_DIRS, *PRIVATE_DIRS, STATUS_DIR)
        changes += [_warning(*finding) for finding in spool_audit.spool_findings(spool, directories)]
        return changes

    return Step(
        f"spool {spool}: 0755, tmp/ new/ 1733, queue/ state/ done/ corrupt/ 0700, flush.lock 0600, owner "
        f"{install.spool_owner().label}; status/ 0711 root; nothing planted or left behind",
        check,
    )


def _warning(problem: str, fix: str) -> Change:
    return Change("warn", "", problem, fix)


def untold_step(install: Install) -> Step:
    """A warning when the queue holds failed messages no one was told about (`listing.untold`): they stay
    until an admin reads and deletes them, and nothing else points at them."""
    spool = install.host_spool

    def check() -> list[Change]:
        from pymta.queue.listing import UNTOLD_FIX, untold_summary

        if not os.path.isdir(os.path.join(spool, "queue")):
            return []
        count = _untold_count(spool)
        if count is None:
            return [
                _warning(
                    f"cannot read the queue in {spool} to look for failed messages no one was told about",
                    "run pymta setup --check as root",
                )
            ]
        summary = untold_summary(count)
        return [] if summary is None else [_warning(f"{summary} (in {spool})", UNTOLD_FIX)]

    return Step(f"no failed message in {spool} that no one was told about", check)


def _untold_count(spool: str) -> int | None:
    """How many messages in the queue no one was told about, read with the spool owner's rights: root
    opens nothing in a directory its owner may change (`views.entries_as`). None when the queue cannot be
    read."""
    from pymta.delivery.privsep import spool_owner
    from pymta.errors import PymtaError
    from pymta.queue.listing import untold
    from pymta.queue.spool import Spool
    from pymta.queue.views import entries_as

    try:
        owner = spool_owner(spool)
        if owner is None:
            entries = Spool(spool).entries()[0]
        else:
            entries = entries_as(Spool(spool), owner.pw_uid, owner.pw_gid)
    except (OSError, PymtaError):
        return None
    return sum(1 for entry in entries if untold(entry))


def _unreachable_parents(path: str, root: str | None) -> list[Change]:
    """A warning for each directory above `path` (up to the root) that not every user may pass through."""
    changes = []
    parent = os.path.dirname(path)
    stop = root or "/"
    while parent != stop and parent != os.path.dirname(parent):
        info = _lstat(parent)
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


def config_step(install: Install) -> Step:
    directory = install.host(CONFIG_DIR)
    path = install.host(SYSTEM_CONFIG)
    secrets = install.host(SECRETS_DIR)

    def check() -> list[Change]:
        admin = install.admin_owner()
        changes = _dir_changes(directory, CONFIG_DIR_MODE, admin)
        changes += _config_file_changes(install, path, admin)
        changes += _dir_changes(secrets, SECRETS_MODE, install.spool_owner())
        changes += [_warning(*finding) for finding in spool_audit.secret_findings(secrets)]
        return changes

    exists = "exists, left as it is (setup never overwrites it)" if os.path.lexists(path) else "0644"
    if install.template and os.path.lexists(path):
        exists += f"; {install.template} is not installed"
    return Step(
        f"config {path} {exists}; {directory} 0755; {secrets} 0700 {install.spool_owner().label}",
        check,
    )


def _config_file_changes(install: Install, path: str, admin: Owner) -> list[Change]:
    info = _lstat(path)
    if info is None:

        def create() -> None:
            _write_file(path, initial_config(install)[0], CONFIG_MODE, admin, replace=False)

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
            return [Change("fix", "", f"{path}: {_reason(exc)}", f"repair the link {path}", None, EX_CONFIG)]
    elif stat.S_ISREG(info.st_mode):
        # Never rewritten; but every user must read it, and only root write it.
        if not admin.matches(info):
            changes.append(
                Change(
                    "fix",
                    f"{path}: owner {_describe_owner(info)} -> {admin.label} (whoever can write it decides "
                    "where the mail goes)",
                    f"{path} is owned by {_describe_owner(info)}, should be {admin.label}",
                    f"chown {admin.label} {shlex.quote(path)}",
                    lambda: _set_attributes(path, CONFIG_MODE, admin, False),
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
                    lambda: _set_attributes(path, CONFIG_MODE, admin, False),
                )
            )
    if not stat.S_ISREG(info.st_mode):
        return [
            Change(
                "fix", "", f"{path} is {_kind(info)}, not a config file", f"move {path} away", None, EX_CONFIG
            )
        ]
    from pymta.config.load import load

    try:
        load(path)
    except ConfigError as exc:
        fix = f"edit it, then run pymta config check -C {path}"
        changes.append(Change("fix", "", str(exc), fix, None, EX_CONFIG))
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
        return _reason(exc)
    if first.startswith(b"#!"):
        interpreter = first[2:].decode("utf-8", "replace").split()
        if interpreter:
            paths.append(("its interpreter", os.path.realpath(interpreter[0]), stat.S_IXOTH))
    paths.append(("the pymta package", os.path.realpath(__file__), stat.S_IROTH))
    for what, path, bits in paths:
        info = _lstat(path)
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


def _is_pymta_script(path: str) -> bool:
    """Whether `path` (followed) is one of pymta's console scripts, of this or another environment."""
    try:
        with open(path, "rb") as handle:
            return b"from pymta." in handle.read(4096)
    except OSError:
        return False


def links_step(install: Install) -> Step:
    def check() -> list[Change]:
        changes = []
        for link, name in LINKS:
            target = install.script(name)
            if target is not None:
                changes += _link_changes(install.host(link), target)
        return changes

    names = ", ".join(link for link, _ in LINKS)
    return Step(f"links {names} -> {install.bin_dir}", check)


def _link_changes(path: str, target: str) -> list[Change]:
    info = _lstat(path)
    backup = path + BACKUP_SUFFIX
    if info is None:
        return [
            Change(
                "create",
                f"{path} -> {target}",
                f"{path} is missing",
                f"ln -s {shlex.quote(target)} {shlex.quote(path)}",
                lambda: _symlink(target, path),
            )
        ]
    if stat.S_ISLNK(info.st_mode):
        current = os.readlink(path)
        if current == target:
            return []
        if _is_pymta_script(path):  # another environment's pymta: replaced, not kept
            return [
                Change(
                    "fix",
                    f"{path} -> {target} (was -> {current}, another pymta)",
                    f"{path} points at {current}, not at {target}",
                    f"ln -sfn {shlex.quote(target)} {shlex.quote(path)}",
                    lambda: _symlink(target, path),
                )
            ]
        was = f"a link to {current}"
    else:
        was = _kind(info)
    if os.path.lexists(backup):
        return [
            Change(
                "backup",
                "",
                f"{path} is {was}, not pymta's, and {backup} exists already",
                f"move {shlex.quote(path)} or {shlex.quote(backup)} away, then run pymta setup",
            )
        ]

    def move_and_link() -> None:
        if os.path.lexists(backup):
            raise FileExistsError(f"{backup} exists")
        os.rename(path, backup)
        _symlink(target, path)

    return [
        Change(
            "backup",
            f"{path} ({was}) moved to {backup}; {path} -> {target}",
            f"{path} is {was}, not pymta's",
            f"mv {shlex.quote(path)} {shlex.quote(backup)} && "
            f"ln -s {shlex.quote(target)} {shlex.quote(path)}",
            move_and_link,
        )
    ]


def units_step(install: Install) -> Step:
    unit_dir = install.host(UNIT_DIR)
    texts = {
        SERVICE: service_unit(install.pymta(), install.spool, install.user),
        TIMER: TIMER_UNIT,
        PATH_UNIT: path_unit(install.spool),
    }

    def check() -> list[Change]:
        admin = install.admin_owner()
        changes = []
        for name, text in texts.items():
            changes += _file_changes(
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
            info = _lstat(link)
            if info is not None and stat.S_ISLNK(info.st_mode) and os.readlink(link) == want:
                continue
            if info is not None and not stat.S_ISLNK(info.st_mode):
                changes.append(
                    Change("fix", "", f"{link} is {_kind(info)}", f"remove {link}, then run pymta setup")
                )
                continue

            def enable(link: str = link, want: str = want) -> None:
                _symlink(want, link)

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
        return _file_changes(
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
        links_step(install),
    ]
    if install.systemd:
        steps += [units_step(install), enable_step(install)]
    else:
        steps.append(cron_step(install))
    steps.append(untold_step(install))
    return steps


# --- Uninstall ---


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
            ours = os.path.islink(path) and (
                os.readlink(path) == install.script(name) or _is_pymta_script(path)
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


# --- Entry point for the command ---


def require_root(install: Install, mode: str) -> None:
    """Changing this machine needs root; --root DIR, --check and --dry-run do not."""
    if install.root is None and mode == APPLY and os.geteuid() != 0:
        raise PermissionDeniedError(
            "pymta setup changes this machine (a system user, /var/spool, /etc, /usr/sbin/sendmail) and must "
            "run as root: sudo pymta setup; or install under another directory with --root DIR"
        )
