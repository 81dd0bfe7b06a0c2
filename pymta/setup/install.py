"""What `pymta setup` installs: paths, modes and owners (`Install`), the config it writes, `require_root`.

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
                           0755  root   pymta's launchers for this environment (`pymta.setup.launcher`);
                                        whatever else was there is moved to NAME.pre-pymta and put back by
                                        --uninstall.
    /etc/systemd/system/pymta-flush.{service,timer,path}
                           0644  root   the flush every 5 minutes and whenever something is dropped into new/;
                                        or, without systemd, /etc/cron.d/pymta (0644 root) every 5 minutes.

With `root` (`--root DIR`) every path is taken under DIR, like DESTDIR: nothing outside DIR is written, no
user is created and no systemctl is run; the spool's owner is the real `pymta` user when this machine has
one, else the user running setup. Paths written into files (units, cron line) are those of the installed
system, without DIR.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pymta.config import paths
from pymta.config.load import load
from pymta.errors import PermissionDeniedError, UsageError
from pymta.setup.files import Owner, group_name, owner_of
from pymta.setup.plan import APPLY

SYSTEM_CONFIG = paths.SYSTEM_CONFIG
SYSTEM_SPOOL = paths.SYSTEM_SPOOL
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

DROP_DIRS = ("tmp", "new")
PRIVATE_DIRS = ("queue", "state", "done", "corrupt")
LOCK_FILE = "flush.lock"

# Each launcher `pymta setup` writes, and the program it starts.
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

_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,30}\$?")


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
            value = paths.read_plain(source, frozenset({"spool"}))[0].get("spool")
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
            return Owner(entry.pw_uid, entry.pw_gid, f"{self.user}:{group_name(entry.pw_gid)}")
        if self.root is None:
            return Owner(None, None, f"{self.user}:{self.user}")
        return owner_of(os.getuid(), os.getgid())

    def admin_owner(self) -> Owner:
        """The owner of the config, links and units: root, or (--root without root rights) the user
        running setup."""
        if self.root is None or os.geteuid() == 0:
            return Owner(0, 0, "root:root")
        return owner_of(os.getuid(), os.getgid())

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


def require_root(install: Install, mode: str) -> None:
    """Changing this machine needs root; --root DIR, --check and --dry-run do not."""
    if install.root is None and mode == APPLY and os.geteuid() != 0:
        raise PermissionDeniedError(
            "pymta setup changes this machine (a system user, /var/spool, /etc, /usr/sbin/sendmail) and must "
            "run as root: sudo pymta setup; or install under another directory with --root DIR"
        )


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
