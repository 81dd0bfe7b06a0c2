"""Launchers: the `sendmail`, `mailq` and `newaliases` scripts that start pymta at the interpreter's floor.

pip's console scripts start Python with `site` (every `.pth` hook of the environment runs, the user's
site-packages and `PYTHONPATH` are searched) and then `import re` to tidy `sys.argv[0]`. sendmail runs for
every cron job, so that is paid on every message, and a `PYTHONPATH` (or `PYTHONHOME`, or a `pymta`
directory beside the script) decides what root's cron runs. A launcher instead starts this install's
interpreter with `-I -S`: isolated (no `PYTHON*` variables, no user site, not even the script's own
directory on `sys.path`) and without `site`. It puts the install's package directories on `sys.path`
itself, after the standard library as `site` would, imports the one entry function and calls it:

    #!/opt/pymta/bin/python3 -IS
    # pymta launcher (pymta.setup.launcher): ...
    import sys
    sys.path.append('/opt/pymta/lib/python3.11/site-packages')
    try:  # pymta's modules at their path, not searched for along sys.path (pymta.setup.finder)
        from _frozen_importlib_external import SourceFileLoader
        exec(SourceFileLoader('pymta.setup.finder', '/opt/.../pymta/setup/finder.py').get_code(None))
        install('/opt/pymta/lib/python3.11/site-packages')
    except (ImportError, OSError):
        pass
    from pymta.cli.sendmail import main
    sys.exit(main())

Between the two, the finder of pymta's own modules (`pymta.setup.finder`): `pymta.x.y` is the file x/y.py
(or the package x/y/__init__.py) of the install's pymta directory, found with a stat rather than searched
for along `sys.path`, which lists lib-dynload, site-packages and each of pymta's packages on every message
(about a third of sendmail's imports). What it does not find there goes to the usual search.

An interpreter path the kernel cannot take on a `#!` line (over `SHEBANG_MAX` bytes, or with a blank in it)
gets pip's two-line form instead: `/bin/sh` execs the interpreter with `-IS` and the script.

A launcher is written atomically (a new file beside it, fsynced, renamed over the old name, the directory
fsynced) with mode 0755. It replaces only a launcher or a console script of pymta's; anything else in the
way (another MTA's sendmail, a symbolic link) is refused unless the caller says `replace`. The directory
must not be writable by other users, who could swap the launcher after it is written.

This is a library: no click, nothing printed. `pymta setup` and the README's install use it (issue 12).
"""

from __future__ import annotations

import os
import stat
import sys
import sysconfig
from dataclasses import dataclass

import pymta
from pymta.errors import LauncherError

# Each program and its entry function: the same as pyproject.toml's [project.scripts] (a test compares them).
ENTRY_POINTS = {
    "pymta": ("pymta.cli.entry", "main"),
    "sendmail": ("pymta.cli.sendmail", "main"),
    "mailq": ("pymta.cli.sendmail", "mailq"),
    "newaliases": ("pymta.cli.sendmail", "newaliases"),
}
# What runs once per message or per look at the queue, where start-up is most of the cost.
FAST_PROGRAMS = ("sendmail", "mailq", "newaliases")
# The second line of every launcher: how `kind_of` knows one.
MARKER = b"# pymta launcher (pymta.setup.launcher)"
# Linux reads 256 bytes of a `#!` line since 5.1, 128 before: keep to the older limit.
SHEBANG_MAX = 127
# A launcher or a console script is a few hundred bytes; a file in the way is read no further than this.
SNIFF_SIZE = 4096


@dataclass(frozen=True)
class Install:
    """An installed pymta: the interpreter to start and the directories to put on `sys.path` (the one that
    holds the `pymta` package, and the site-packages with its dependencies when that is another)."""

    interpreter: str
    paths: tuple[str, ...]


def this_install() -> Install:
    """The install that is running this code: its interpreter and where `pymta` and its dependencies are."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(pymta.__file__)))
    paths = [package_parent]
    for key in ("purelib", "platlib"):
        path = os.path.normpath(sysconfig.get_path(key))
        if path not in paths and os.path.isdir(path):
            paths.append(path)
    return Install(os.path.abspath(sys.executable), tuple(paths))


def launcher_text(name: str, install: Install) -> bytes:
    """The launcher of program `name` (a key of ENTRY_POINTS) for `install`."""
    module, function = ENTRY_POINTS[name]
    interpreter = install.interpreter
    _check_install(install)
    shebang = f"#!{interpreter} -IS\n"
    if len(shebang.encode()) - 1 > SHEBANG_MAX or any(char.isspace() for char in interpreter):
        # The kernel would cut the line or split it at the blank: /bin/sh starts the interpreter instead.
        # To Python the second and third lines are one string literal; to sh the second is the exec.
        if "'" in interpreter or "\\" in interpreter:  # they would end sh's quote or make a Python escape
            raise LauncherError(
                f"cannot write a launcher for the interpreter {interpreter!r}: its path is too long for a "
                "#! line and holds a quote or a backslash; install pymta under a shorter path"
            )
        shebang = f"#!/bin/sh\n'''exec' '{interpreter}' -IS \"$0\" \"$@\"\n' '''\n"
    lines = [
        shebang.rstrip("\n"),
        f"{MARKER.decode()}: Python isolated (-I) and without site (-S),",
        "# with this install's packages only. `pymta setup` writes it; changes here are lost.",
        "import sys",
        *(f"sys.path.append({ascii(path)})" for path in install.paths),
        *_finder_lines(_package_parent(install)),
        f"from {module} import {function}",
        f"sys.exit({function}())",
    ]
    return ("\n".join(lines) + "\n").encode()


def _package_parent(install: Install) -> str:
    """The directory of `install.paths` that holds the pymta package (`_check_install`: there is one)."""
    return next(path for path in install.paths if os.path.isfile(os.path.join(path, "pymta", "__init__.py")))


def _finder_lines(parent: str) -> list[str]:
    """The lines that put `pymta.setup.finder` first on `sys.meta_path`: its code run from its cached
    bytecode by the loader the import system is made of (compiling the finder into every launcher cost
    sendmail 0.1 ms a message). An interpreter without that loader, or a pymta without that file, gets
    the usual search."""
    finder = ascii(os.path.join(parent, "pymta", "setup", "finder.py"))
    return [
        "try:  # pymta's modules at their path, not searched for along sys.path (pymta.setup.finder)",
        "    from _frozen_importlib_external import SourceFileLoader",
        f"    exec(SourceFileLoader('pymta.setup.finder', {finder}).get_code(None))",
        f"    install({ascii(parent)})",
        "except (ImportError, OSError):",
        "    pass",
    ]


def _check_install(install: Install) -> None:
    interpreter = install.interpreter
    if not os.path.isabs(interpreter) or not interpreter.isprintable() or not os.access(interpreter, os.X_OK):
        raise LauncherError(
            f"cannot write a launcher for the interpreter {interpreter!r}: it must be the absolute path of "
            "an executable Python"
        )
    try:
        interpreter.encode()
    except UnicodeEncodeError:
        raise LauncherError(
            f"cannot write a launcher for the interpreter {interpreter!r}: its path is not UTF-8; "
            "install pymta under another path"
        ) from None
    if not any(os.path.isfile(os.path.join(path, "pymta", "__init__.py")) for path in install.paths):
        raise LauncherError(
            f"cannot write a launcher: no pymta package in {', '.join(install.paths) or 'no directory'}; "
            "give the directory that holds the installed pymta"
        )


def kind_of(path: str) -> str:
    """What is at `path`, not following a link: 'absent', 'launcher' (one of these), 'console script'
    (pip's script of a pymta entry function, of any version), or 'foreign' (anything else, a symbolic link
    included)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return "absent"
    except OSError:
        return "foreign"  # a link (ELOOP), or nothing we may read
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "foreign"
        head = os.pread(fd, SNIFF_SIZE, 0)
    finally:
        os.close(fd)
    lines = head.split(b"\n")
    if head.startswith(b"#!") and any(line.startswith(MARKER) for line in lines[1:4]):
        return "launcher"
    # Of this version or an older one (whose entry functions lived in other modules).
    if head.startswith(b"#!") and any(_is_pymta_import(line.strip()) for line in lines):
        return "console script"
    return "foreign"


def _is_pymta_import(line: bytes) -> bool:
    """Whether `line` is the import of a pip console script of pymta: `from pymta.MODULE import NAME`."""
    words = line.split()
    return (
        len(words) == 4 and words[0] == b"from" and words[1].startswith(b"pymta.") and words[2] == b"import"
    )


def write_launchers(
    directory: str,
    install: Install,
    names: tuple[str, ...] = FAST_PROGRAMS,
    *,
    replace: bool = False,
) -> list[str]:
    """Write the launcher of each program in `names` into `directory` for `install`; return their paths.

    An existing launcher or pymta console script is replaced; anything else is refused (LauncherError)
    unless `replace`, before any file is written. Each launcher is written atomically, mode 0755.
    """
    unknown = [name for name in names if name not in ENTRY_POINTS]
    if unknown:
        raise LauncherError(f"no launcher for {', '.join(unknown)}: pymta has {', '.join(ENTRY_POINTS)}")
    texts = {name: launcher_text(name, install) for name in names}
    dir_fd = _open_safe_directory(directory)
    try:
        if not replace:
            for name in names:
                kind = kind_of(os.path.join(directory, name))
                if kind == "foreign":
                    raise LauncherError(
                        f"{os.path.join(directory, name)} is not pymta's (another program, or a symbolic "
                        "link); move it away first, or replace it on purpose"
                    )
        written = []
        for name, text in texts.items():
            _write_atomically(dir_fd, directory, name, text)
            written.append(os.path.join(directory, name))
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return written


def _open_safe_directory(directory: str) -> int:
    """A descriptor of `directory`, once it is known that only its owner (us or root) can change its names."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise LauncherError(
            f"cannot write launchers into {directory}: {exc.strerror}; create it first"
        ) from None
    info = os.fstat(fd)
    if info.st_uid not in (0, os.geteuid()) or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        os.close(fd)
        raise LauncherError(
            f"cannot write launchers into {directory}: other users may change it (owner uid {info.st_uid}, "
            f"mode {stat.S_IMODE(info.st_mode):04o}), and could replace what root runs; "
            "use a directory only root or you can write"
        )
    return fd


def _write_atomically(dir_fd: int, directory: str, name: str, text: bytes) -> None:
    tmp_name = f".{name}.pymta-{os.urandom(6).hex()}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp_name, flags, 0o755, dir_fd=dir_fd)
    except OSError as exc:
        raise LauncherError(f"cannot write {os.path.join(directory, name)}: {exc.strerror}") from None
    try:
        with open(fd, "wb") as handle:  # closes fd, whatever happens
            os.fchmod(fd, 0o755)  # whatever the umask
            handle.write(text)
            handle.flush()
            os.fsync(fd)
        os.rename(tmp_name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException as exc:
        try:
            os.unlink(tmp_name, dir_fd=dir_fd)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise LauncherError(f"cannot write {os.path.join(directory, name)}: {exc.strerror}") from None
        raise
