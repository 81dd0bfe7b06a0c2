"""A real system-mode install, and real users to use it: the fixtures of tests/test_security.py.

The security promises of system mode (DESIGN.md, "Two ways to run", invariants 6 and 7) are about what one
local user can do to another, so they are tested with real users running the installed console scripts:

- `system_install` (session): as root only, it
  1. makes a world-traversable directory under /tmp (pytest's own base, /tmp/pytest-of-root, is 0700);
  2. creates a venv there from a system Python that every user can run (the project's venv, and the pyenv
     Python it is made from, lie under /root, 0700) and pip-installs a copy of this source tree into it,
     not editable, so every user can run its `sendmail`, `mailq` and `pymta`;
  3. creates real users with useradd: a system user owning the spool, and two ordinary users, alice and
     bob, with homes in that directory; their names carry this process's id, so two test runs on one
     machine never share (or delete) each other's users; users left by a run that died are removed first;
  4. runs `pymta setup --root ROOT --user SPOOL_USER --no-systemd` with the installed `pymta`.
  At the end the users and the directory are removed, whatever happened.
- `system` (per test): the same install with an empty spool, an empty mail spool (mode 1777, in the
  directory, never /var/mail) and a fresh config ROOT/etc/pymta/pymta.yaml whose spool is ROOT's.

It skips, with the reason, when not root, when useradd is missing, or when no Python every user can run
exists. conftest.py registers this module as a plugin (`pytest_plugins`), so the session fixture is made
once per run: test modules use the fixtures by name and must not import them (an imported fixture is a
fixture of that module, and would make a second install whose users clash with the first).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from pymta.queue.entry import QueueEntry
from pymta.queue.spool import Spool

PROJECT = Path(__file__).resolve().parent.parent
# What pip needs to build the package: a copy is installed, so no build/ or egg-info lands in the tree that
# other people are editing.
SOURCE_FILES = ("pyproject.toml", "README.md")
SOURCE_DIRS = ("pymta", "examples", "man")  # the last two are data-files of the wheel
PREFIX = "pymtat"  # every test user's name starts with it
COMMENT = "pymta test user"  # their GECOS field: "pymta test user, pid N"
SPOOL = "var/spool/pymta"
SPOOL_DIRS = ("tmp", "new", "queue", "state", "done", "corrupt")
# Seconds a console script may take here; a flush that hangs (a FIFO) is killed and fails the test.
TIMEOUT = 30.0
HOSTNAME = "mx.example.org"
DOMAIN = "example.org"


@dataclass(frozen=True)
class User:
    """A user a test runs programs as. A uid without a passwd entry has the name `uid<N>`."""

    name: str
    uid: int
    gid: int
    home: str


@dataclass
class SystemInstall:
    """pymta installed for real under `base`, with the users who use it."""

    base: Path  # the world-traversable temporary directory that holds everything
    venv: Path
    root: Path  # pymta setup --root
    spool_user: User
    alice: User
    bob: User
    stranger: User  # a uid with no passwd entry
    installed_config: str = ""  # the config `pymta setup` wrote, before the tests replace it
    mail_spool: Path = field(init=False)
    aliases: Path = field(init=False)

    def __post_init__(self) -> None:
        self.mail_spool = self.base / "mail"
        self.aliases = self.base / "aliases"

    @property
    def spool(self) -> Path:
        return self.root / SPOOL

    @property
    def config(self) -> Path:
        return self.root / "etc" / "pymta" / "pymta.yaml"

    def script(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    # -- the config and a clean slate --

    def write_config(self, extra: str = "") -> None:
        """ROOT's config: ROOT's spool, local mail and aliases in the temporary directory, then `extra`."""
        self.config.write_text(
            f"spool: {self.spool}\nhostname: {HOSTNAME}\ndomain: {DOMAIN}\ndeliver: queue\n"
            f"local:\n  mailbox: mbox\n  mail_spool: {self.mail_spool}\n  maildir: {self.base}/Maildir\n"
            f"aliases: {self.aliases}\n{extra}"
        )
        self.config.chmod(0o644)

    def reset(self) -> None:
        """An empty spool (its directories as setup made them), an empty mail spool, the default config."""
        for name in SPOOL_DIRS:
            directory = self.spool / name
            for entry in os.scandir(directory):
                _remove(entry.path)
        for entry in os.scandir(self.spool):
            if entry.name not in (*SPOOL_DIRS, "flush.lock"):
                _remove(entry.path)
        if self.mail_spool.exists():
            shutil.rmtree(self.mail_spool)
        self.mail_spool.mkdir()
        self.mail_spool.chmod(0o1777)
        self.aliases.write_text("")
        self.aliases.chmod(0o644)
        self.write_config()

    # -- running programs --

    def environment(self, user: User, **changes: str | None) -> dict[str, str]:
        """What a login shell of `user` would have, with the config pointed at ROOT's; `changes` set
        variables (None removes one)."""
        env = {
            "PATH": f"{self.venv / 'bin'}:/usr/bin:/bin",
            "HOME": user.home,
            "USER": user.name,
            "LOGNAME": user.name,
            "LANG": "C.UTF-8",
            "PYMTA_CONFIG": str(self.config),
        }
        for name, value in changes.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env

    def run_as(
        self,
        user: User | None,
        argv: Sequence[str],
        *,
        input: bytes | None = b"",
        stdin: int | IO[Any] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        umask: int = 0o022,
        timeout: float = TIMEOUT,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run `argv` as `user` (None: root) with only that user's own groups and a controlled environment
        (`environment(user)` unless `env` is given). A program still running after `timeout` seconds is killed
        and fails the test."""
        identity: dict[str, Any] = {}
        if user is not None:
            identity = {"user": user.uid, "group": user.gid, "extra_groups": []}
        who = user or self.root_user
        try:
            return subprocess.run(
                list(argv),
                input=input if stdin is None else None,
                stdin=stdin,
                capture_output=True,
                env=dict(self.environment(who) if env is None else env),
                cwd=cwd or (who.home if os.path.isdir(who.home) else str(self.base)),
                umask=umask,
                timeout=timeout,
                **identity,
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(
                f"{' '.join(argv)} as {who.name} still ran after {timeout} s (stderr: {exc.stderr!r})"
            )

    @property
    def root_user(self) -> User:
        return User("root", 0, 0, str(self.base))

    def sendmail(
        self, user: User | None, *args: str, input: bytes = b""
    ) -> subprocess.CompletedProcess[bytes]:
        return self.run_as(user, [self.script("sendmail"), *args], input=input)

    def flush(self, *args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[bytes]:
        """`pymta flush --now -v` as root, as the timer runs it in system mode."""
        return self.run_as(None, [self.script("pymta"), "flush", "--now", "-v", *args], timeout=timeout)

    # -- looking at the spool (as root, with this tree's library) --

    def entries(self, *, problems: int = 0) -> list[QueueEntry]:
        """The queue's entries; the listing must report exactly `problems` entries it could not read."""
        entries, found = Spool(str(self.spool)).entries()
        assert len(found) == problems, found
        return entries

    def message(self, entry: QueueEntry) -> bytes:
        return Spool(str(self.spool)).read_message(entry)

    def names(self, directory: str) -> list[str]:
        return sorted(os.listdir(self.spool / directory))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


# --- finding a Python every user can run ---


def _reachable_by_everyone(path: str) -> bool:
    """Whether every user may run `path`: the file is o+rx and each directory above it o+x."""
    real = os.path.realpath(path)
    try:
        if os.stat(real).st_mode & (stat.S_IROTH | stat.S_IXOTH) != stat.S_IROTH | stat.S_IXOTH:
            return False
        directory = os.path.dirname(real)
        while True:
            if not os.stat(directory).st_mode & stat.S_IXOTH:
                return False
            if directory == os.path.dirname(directory):
                return True
            directory = os.path.dirname(directory)
    except OSError:
        return False


def public_python() -> tuple[str | None, str]:
    """A Python (3.11 or later, with venv) that every user can run, and why none was found otherwise."""
    found: list[str] = []
    for directory in ("/usr/bin", "/usr/local/bin"):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            match = re.fullmatch(r"python3\.(\d+)", name)
            if match and int(match.group(1)) >= 11:
                found.append(os.path.join(directory, name))
    found.sort(key=lambda path: int(path.rsplit(".", 1)[1]), reverse=True)
    tried = []
    for python in found:
        if not _reachable_by_everyone(python):
            tried.append(f"{python} (under a private directory)")
            continue
        probe = subprocess.run([python, "-c", "import ensurepip, venv"], capture_output=True)
        if probe.returncode != 0:
            tried.append(f"{python} (no venv/ensurepip: install python3-venv)")
            continue
        return python, ""
    what = ", ".join(tried) or "no /usr/bin/python3.X or /usr/local/bin/python3.X (3.11 or later)"
    return None, f"no Python that every user can run to install pymta for them: {what}"


# --- users ---


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, stdin=subprocess.DEVNULL)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_processes_of(uid: int) -> None:
    """Kill what still runs as a test user: only processes this session started as that user."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid == uid:
                os.kill(int(entry), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            continue


def _delete_user(name: str, *, ours: bool) -> str:
    """userdel NAME (its user group goes with it); "" or the error. Never -r: no home or mail spool is
    touched by userdel (the homes are in the temporary directory, removed with it). For a user this session
    made (`ours`), what still runs as it (a program a test started) is killed first."""
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        return ""
    if ours:
        _kill_processes_of(uid)
    result = _run(["userdel", name])
    if result.returncode != 0:
        return f"userdel {name}: {result.stderr.strip()}"
    _run(["groupdel", name])  # when userdel left the group behind (it had other members): ignore errors
    return ""


def remove_leftover_users() -> None:
    """Users of an earlier test run that died before its teardown (its pid no longer runs)."""
    for entry in pwd.getpwall():
        if not entry.pw_name.startswith(PREFIX) or not entry.pw_gecos.startswith(COMMENT):
            continue
        found = re.search(r"pid (\d+)", entry.pw_gecos)
        if found and _pid_alive(int(found.group(1))):
            continue
        _delete_user(entry.pw_name, ours=False)


def _create_user(name: str, home: Path, *, system: bool) -> User:
    argv = ["useradd", "--user-group", "--comment", f"{COMMENT}, pid {os.getpid()}"]
    if system:
        argv += ["--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"]
    else:
        argv += ["--no-create-home", "--home-dir", str(home), "--shell", "/bin/sh"]
    result = _run([*argv, name])
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} {name}: {result.stderr.strip()}")
    entry = pwd.getpwnam(name)
    if not system:
        home.mkdir(mode=0o700)
        os.chown(home, entry.pw_uid, entry.pw_gid)
    return User(name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def unused_uid(start: int = 54321) -> int:
    """A uid (and gid) with no passwd entry: the submitter a container or NSS hiccup produces."""
    known = {entry.pw_uid for entry in pwd.getpwall()}
    uid = start
    while uid in known:
        uid += 1
    return uid


# --- the install ---


def _install(base: Path) -> Path:
    python, why = public_python()
    if python is None:
        pytest.skip(why)
    source = base / "source"
    source.mkdir()
    for name in SOURCE_FILES:
        shutil.copy2(PROJECT / name, source / name)
    for name in SOURCE_DIRS:
        shutil.copytree(PROJECT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    venv = base / "venv"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    for argv in (
        [python, "-m", "venv", str(venv)],
        [str(venv / "bin" / "pip"), "install", "-q", "--no-warn-script-location", str(source)],
    ):
        result = subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stdout}{result.stderr}")
    shutil.rmtree(source)
    return venv


@pytest.fixture(scope="session")
def system_install() -> Iterator[SystemInstall]:
    """pymta installed for every user, real users, `pymta setup --root` done (see the module docstring)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates real users (useradd) and runs pymta as them")
    for tool in ("useradd", "userdel", "groupdel"):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            pytest.skip(f"needs {tool} to create and remove the test users")
    remove_leftover_users()
    base = Path(tempfile.mkdtemp(prefix="pymta-system-", dir="/tmp"))
    base.chmod(0o755)
    created: list[str] = []
    try:
        venv = _install(base)
        (base / "home").mkdir(mode=0o755)
        tag = f"{PREFIX}{os.getpid()}"
        users = {}
        for role, system in (("spool", True), ("alice", False), ("bob", False)):
            name = f"{tag}-{role}"
            created.append(name)
            users[role] = _create_user(name, base / "home" / name, system=system)
        stranger_uid = unused_uid()
        install = SystemInstall(
            base=base,
            venv=venv,
            root=base / "root",
            spool_user=users["spool"],
            alice=users["alice"],
            bob=users["bob"],
            stranger=User(f"uid{stranger_uid}", stranger_uid, stranger_uid, str(base)),
        )
        install.root.mkdir(mode=0o755)
        setup = subprocess.run(
            [
                install.script("pymta"),
                "setup",
                "--root",
                str(install.root),
                "--user",
                users["spool"].name,
                "--no-systemd",
            ],
            capture_output=True,
            text=True,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(base), "LANG": "C.UTF-8"},
            stdin=subprocess.DEVNULL,
            timeout=TIMEOUT,
        )
        if setup.returncode != 0:
            raise RuntimeError(
                f"pymta setup --root failed ({setup.returncode}):\n{setup.stdout}{setup.stderr}"
            )
        install.installed_config = install.config.read_text()
        yield install
    finally:
        problems = [problem for name in created if (problem := _delete_user(name, ours=True))]
        shutil.rmtree(base, ignore_errors=True)
        if problems:
            raise RuntimeError("; ".join(problems))


@pytest.fixture
def system(system_install: SystemInstall) -> SystemInstall:
    """The install with an empty spool and mail spool, and the default config (see `SystemInstall.reset`)."""
    system_install.reset()
    return system_install


def queue_ids(text: bytes) -> list[str]:
    """The queue ids sendmail -v printed ("queued as ID")."""
    return re.findall(r"queued as (\w+)", text.decode())


__all__ = ["SystemInstall", "User", "public_python", "queue_ids", "system", "system_install"]
