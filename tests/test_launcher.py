"""The launchers (pymta.setup.launcher): written for real, run for real, deaf to a hostile environment, and
never written over a file that is not pymta's."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from conftest import MtaEnv, script

from pymta.errors import LauncherError
from pymta.setup.launcher import (
    ENTRY_POINTS,
    MARKER,
    Install,
    kind_of,
    launcher_text,
    this_install,
    write_launchers,
)

ROOT = Path(__file__).resolve().parent.parent
MESSAGE = b"Subject: cron\n\njob output\n"
FOREIGN = b'#!/bin/sh\nexec /usr/sbin/exim4 -odi "$@"\n'


def launchers(tmp_path: Path, install: Install | None = None) -> Path:
    directory = tmp_path / "bin"
    directory.mkdir(mode=0o755, exist_ok=True)
    write_launchers(str(directory), install or this_install())
    return directory


def run(program: Path | str, mta: MtaEnv, *args: str, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(program), *args],
        input=kwargs.pop("input", b""),  # type: ignore[arg-type]
        env=kwargs.pop("env", mta.env),  # type: ignore[arg-type]
        capture_output=True,
        timeout=60,
        **kwargs,  # type: ignore[arg-type]
    )


def test_the_entry_points_are_pyprojects() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {name: f"{module}:{function}" for name, (module, function) in ENTRY_POINTS.items()} == declared


def test_a_launcher_queues_lists_and_checks_for_real(mta: MtaEnv, tmp_path: Path) -> None:
    directory = launchers(tmp_path)
    result = run(directory / "sendmail", mta, "-i", "root@example.org", input=MESSAGE)
    assert result.returncode == 0, result.stderr
    entry = mta.only_entry()
    assert [r.address for r in entry.recipients] == ["root@example.org"]
    listing = run(directory / "mailq", mta)
    assert listing.returncode == 0, listing.stderr
    assert entry.id.encode() in listing.stdout
    checked = run(directory / "newaliases", mta)
    assert checked.returncode == 0 and b"no aliases file" in checked.stderr, checked.stderr
    for name in ("sendmail", "mailq", "newaliases"):
        info = (directory / name).stat()
        assert stat.S_IMODE(info.st_mode) == 0o755 and kind_of(str(directory / name)) == "launcher"
    assert sorted(os.listdir(directory)) == ["mailq", "newaliases", "sendmail"]  # no temporary file left


def _plant_fake_pymta(directory: Path, marker: Path) -> None:
    """A `pymta` package whose sendmail records that it ran and exits 99, and the startup hooks of site."""
    hijack = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
    (directory / "pymta" / "submission").mkdir(parents=True)
    (directory / "pymta" / "__init__.py").write_text(hijack)
    (directory / "pymta" / "submission" / "__init__.py").write_text("")
    (directory / "pymta" / "submission" / "sendmail.py").write_text(f"{hijack}def main():\n    return 99\n")
    for hook in ("sitecustomize.py", "usercustomize.py"):
        (directory / hook).write_text(hijack)


def test_a_launcher_ignores_pythonpath_pythonhome_user_site_and_its_own_directory(
    mta: MtaEnv, tmp_path: Path
) -> None:
    directory = launchers(tmp_path)
    marker = tmp_path / "hijacked"
    hostile = tmp_path / "hostile"
    user_site = (
        hostile / "userbase" / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    )
    for place in (hostile, user_site, directory, tmp_path / "cwd"):
        place.mkdir(parents=True, exist_ok=True)
        _plant_fake_pymta(place, marker)
    env = {
        **mta.env,
        "PYTHONPATH": str(hostile),
        "PYTHONHOME": str(hostile),  # honoured, it would not even find the standard library
        "PYTHONUSERBASE": str(hostile / "userbase"),
    }
    result = run(directory / "sendmail", mta, "root", input=MESSAGE, env=env, cwd=tmp_path / "cwd")
    assert result.returncode == 0, result.stderr
    assert not marker.exists(), marker.read_text()
    assert len(mta.entries()) == 1


def test_a_launcher_loads_neither_site_nor_re(mta: MtaEnv, tmp_path: Path) -> None:
    directory = launchers(tmp_path)
    text = (directory / "sendmail").read_bytes()
    install = this_install()
    assert text.startswith(f"#!{install.interpreter} -IS\n".encode())
    # The script's own lines, run as its #! line runs them, with the import log on.
    result = run(
        install.interpreter,
        mta,
        "-I",
        "-S",
        "-X",
        "importtime",
        str(directory / "sendmail"),
        "root",
        input=MESSAGE,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.decode().splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "pymta.cli.sendmail" in modules
    assert not modules & {"site", "re", "sitecustomize", "_distutils_hack"}, modules
    assert len(mta.entries()) == 1


def test_a_launcher_finds_pymtas_modules_at_their_path_without_searching_sys_path(tmp_path: Path) -> None:
    """The launcher's finder: pymta's modules come from the install at their one path, neither the
    install's directory nor pymta's packages are listed for them (as the search of `sys.path` did on every
    message), and a name that is not there is ModuleNotFoundError as ever."""
    directory = launchers(tmp_path)
    install = this_install()
    lines = (directory / "sendmail").read_text().splitlines()
    assert lines[-2:] == ["from pymta.cli.sendmail import main", "sys.exit(main())"]
    probe = "\n".join(
        [
            *lines[1:-2],
            "import pymta.cli.sendmail, pymta.queue.listing",
            "searched = sorted(str(key) for key in sys.path_importer_cache)",
            "try:",
            "    import pymta.no_such_module",
            "except ModuleNotFoundError as exc:",
            "    missing = exc.name",
            "loader = type(pymta.cli.sendmail.__spec__.loader).__name__",
            "print(pymta.cli.sendmail.__file__, pymta.queue.listing.__spec__.parent, missing, loader)",
            "print(*searched, sep='\\n')",
        ]
    )
    result = subprocess.run(
        [install.interpreter, "-I", "-S", "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    first, *searched = result.stdout.splitlines()
    parent = next(path for path in install.paths if os.path.isdir(os.path.join(path, "pymta")))
    assert first == f"{parent}/pymta/cli/sendmail.py pymta.queue pymta.no_such_module PymtaLoader"
    assert not [path for path in searched if path.startswith(parent)], searched


def test_a_launcher_without_its_finder_still_runs_with_the_usual_search(mta: MtaEnv, tmp_path: Path) -> None:
    """A launcher outlives the files it was written for (an upgrade that moved the finder): without it,
    sendmail still queues, by the usual search of `sys.path`."""
    directory = launchers(tmp_path)
    sendmail = directory / "sendmail"
    text = sendmail.read_text()
    assert "pymta/setup/finder.py" in text
    sendmail.write_text(text.replace("pymta/setup/finder.py", "pymta/setup/no_finder.py"))
    result = run(sendmail, mta, "root", input=MESSAGE)
    assert result.returncode == 0, result.stderr
    assert len(mta.entries()) == 1


def test_a_launcher_loads_an_install_without_bytecode_and_caches_it(mta: MtaEnv, tmp_path: Path) -> None:
    """The finder's loader reads source as well as cached bytecode: an install with no .pyc yet (as a
    copy without __pycache__) queues, and leaves the bytecode behind for the next message."""
    import shutil

    copy = tmp_path / "install"
    shutil.copytree(ROOT / "pymta", copy / "pymta", ignore=shutil.ignore_patterns("__pycache__"))
    install = this_install()
    directory = launchers(tmp_path, Install(install.interpreter, (str(copy), *install.paths)))
    for _ in range(2):
        result = run(directory / "sendmail", mta, "root", input=MESSAGE)
        assert result.returncode == 0, result.stderr
    assert len(mta.entries()) == 2
    assert list((copy / "pymta" / "cli" / "__pycache__").glob("sendmail.*.pyc"))


def test_a_module_left_beside_the_package_that_replaced_it_is_not_loaded(mta: MtaEnv, tmp_path: Path) -> None:
    """An install upgraded in place may keep files of an older layout (pymta/cli.py beside pymta/cli/):
    the launcher's finder takes the package, as the usual search does, and sendmail still queues."""
    import shutil

    copy = tmp_path / "install"
    shutil.copytree(ROOT / "pymta", copy / "pymta", ignore=shutil.ignore_patterns("__pycache__"))
    for stale in ("cli", "config", "queue", "mail", "submission"):
        (copy / "pymta" / f"{stale}.py").write_text("raise ImportError('a module of an old layout')\n")
    install = this_install()
    directory = launchers(tmp_path, Install(install.interpreter, (str(copy), *install.paths)))
    result = run(directory / "sendmail", mta, "root", input=MESSAGE)
    assert result.returncode == 0, result.stderr
    assert len(mta.entries()) == 1


@pytest.mark.parametrize("where", ["a" * 130, "with blank"])
def test_an_interpreter_path_too_long_or_with_a_blank_is_started_by_sh(
    mta: MtaEnv, tmp_path: Path, where: str
) -> None:
    install = this_install()
    place = tmp_path / where
    place.mkdir()
    (place / "python3").symlink_to(install.interpreter)
    directory = launchers(tmp_path, Install(str(place / "python3"), install.paths))
    assert (directory / "sendmail").read_bytes().startswith(b"#!/bin/sh\n")
    result = run(
        directory / "sendmail", mta, "root", input=MESSAGE, env={**mta.env, "PYTHONPATH": "/nonexistent"}
    )
    assert result.returncode == 0, result.stderr
    assert len(mta.entries()) == 1
    assert kind_of(str(directory / "sendmail")) == "launcher"


def test_a_foreign_file_is_refused_and_left_as_it_was_unless_replaced(tmp_path: Path) -> None:
    directory = tmp_path / "bin"
    directory.mkdir()
    (directory / "sendmail").write_bytes(FOREIGN)
    with pytest.raises(LauncherError, match="is not pymta's"):
        write_launchers(str(directory), this_install())
    assert (directory / "sendmail").read_bytes() == FOREIGN
    assert sorted(os.listdir(directory)) == ["sendmail"]  # refused before anything was written
    write_launchers(str(directory), this_install(), replace=True)
    assert kind_of(str(directory / "sendmail")) == "launcher"


def test_a_symbolic_link_is_refused_and_its_target_never_written(tmp_path: Path) -> None:
    directory = tmp_path / "bin"
    directory.mkdir()
    target = tmp_path / "exim4"
    target.write_bytes(FOREIGN)
    (directory / "sendmail").symlink_to(target)
    assert kind_of(str(directory / "sendmail")) == "foreign"
    with pytest.raises(LauncherError, match="symbolic link"):
        write_launchers(str(directory), this_install(), ("sendmail",))
    assert (directory / "sendmail").is_symlink()
    write_launchers(str(directory), this_install(), ("sendmail",), replace=True)
    assert not (directory / "sendmail").is_symlink() and target.read_bytes() == FOREIGN


def test_pips_script_and_a_launcher_are_replaced_whatever_the_umask(tmp_path: Path) -> None:
    directory = tmp_path / "bin"
    directory.mkdir()
    (directory / "sendmail").write_bytes(Path(script("sendmail")).read_bytes())
    assert kind_of(str(directory / "sendmail")) == "console script"
    old = os.umask(0o077)
    try:
        write_launchers(str(directory), this_install())
        write_launchers(str(directory), this_install())  # again, over its own
    finally:
        os.umask(old)
    for name in ("sendmail", "mailq", "newaliases"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o755
        assert kind_of(str(directory / name)) == "launcher"
    assert sorted(os.listdir(directory)) == ["mailq", "newaliases", "sendmail"]


def test_a_directory_other_users_may_write_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "bin"
    directory.mkdir()
    directory.chmod(0o777)
    with pytest.raises(LauncherError, match="other users may change it"):
        write_launchers(str(directory), this_install())
    assert os.listdir(directory) == []


def test_an_install_without_pymta_or_a_relative_interpreter_is_refused(tmp_path: Path) -> None:
    install = this_install()
    with pytest.raises(LauncherError, match="no pymta package"):
        launcher_text("sendmail", Install(install.interpreter, (str(tmp_path),)))
    with pytest.raises(LauncherError, match="absolute path"):
        launcher_text("sendmail", Install("python3", install.paths))
    with pytest.raises(LauncherError, match="absolute path"):
        launcher_text("sendmail", Install(install.interpreter + "\n", install.paths))
    for odd in ("it's here", "back\\N slash"):  # sh's quote would end, or Python read an escape
        (tmp_path / odd).mkdir()
        (tmp_path / odd / "python3").symlink_to(install.interpreter)
        with pytest.raises(LauncherError, match="a quote or a backslash"):
            launcher_text("sendmail", Install(str(tmp_path / odd / "python3"), install.paths))
    with pytest.raises(LauncherError, match="no launcher for"):
        write_launchers(str(tmp_path), install, ("exim4",))


def test_kind_of_tells_what_is_in_the_way_without_blocking(tmp_path: Path) -> None:
    assert kind_of(str(tmp_path / "absent")) == "absent"
    os.mkfifo(tmp_path / "fifo")
    assert kind_of(str(tmp_path / "fifo")) == "foreign"
    older = b"#!/usr/bin/python3\nimport re\nimport sys\nfrom pymta.sendmail import main\nsys.exit(main())\n"
    (tmp_path / "older").write_bytes(older)  # pip's script of a pymta before the packages
    assert kind_of(str(tmp_path / "older")) == "console script"
    (tmp_path / "other").write_bytes(older.replace(b"pymta.", b"pymtb."))
    assert kind_of(str(tmp_path / "other")) == "foreign"
    (tmp_path / "marker-late").write_bytes(b"#!/bin/sh\n" + b"\n" * 10 + MARKER + b"\n")
    assert kind_of(str(tmp_path / "marker-late")) == "foreign"  # the marker is where a launcher has it


def _hostile_pymta(tmp_path: Path) -> tuple[Path, Path]:
    """A directory with a `pymta` package that only leaves a mark: what a user's PYTHONPATH could hold."""
    hostile = tmp_path / "evil"
    mark = tmp_path / "evil-ran"
    (hostile / "pymta").mkdir(parents=True)
    code = f"open({str(mark)!r}, 'w').close()\n"
    (hostile / "pymta" / "__init__.py").write_text(code)
    (hostile / "pymta" / "__main__.py").write_text(code)
    return hostile, mark


def _wait_delivered(mailbox: Path, mark: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not mark.exists():
        if mailbox.exists() and b"job output" in mailbox.read_bytes():
            return
        time.sleep(0.05)


def test_the_flush_sendmail_starts_ignores_pythonpath(mta: MtaEnv, tmp_path: Path) -> None:
    # deliver: immediate in user mode: sendmail starts `python -m pymta flush` itself; a PYTHONPATH that
    # the launcher ignored must not decide what that flush runs either.
    mta.write_config("domain: example.org\nhostname: mx.example.org\n")
    hostile, mark = _hostile_pymta(tmp_path)
    directory = launchers(tmp_path)
    owner = pwd.getpwuid(os.getuid()).pw_name
    env = {**mta.env, "PYTHONPATH": str(hostile)}
    result = run(directory / "sendmail", mta, owner, input=MESSAGE, env=env, cwd=tmp_path)  # not this tree
    assert result.returncode == 0, result.stderr
    mailbox = mta.mail_spool / owner
    _wait_delivered(mailbox, mark)
    assert not mark.exists(), "the started flush imported the pymta on PYTHONPATH"
    assert b"job output" in mailbox.read_bytes()


def test_the_flush_a_queue_command_restarts_ignores_pythonpath(
    mta: MtaEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pymta.config.load import load
    from pymta.queue.ops import _Operations

    mta.write_config("domain: example.org\nhostname: mx.example.org\n")
    owner = pwd.getpwuid(os.getuid()).pw_name
    queued = run(script("sendmail"), mta, "-odq", owner, input=MESSAGE)
    assert queued.returncode == 0, queued.stderr
    hostile, mark = _hostile_pymta(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(hostile))
    monkeypatch.setenv("PYMTA_CONFIG", str(mta.config))
    monkeypatch.chdir(tmp_path)  # not this source tree, which `-m` would find first
    _Operations(load(str(mta.config)), 0.0, None, None)._restart_flush()
    mailbox = mta.mail_spool / owner
    _wait_delivered(mailbox, mark)
    assert not mark.exists(), "the restarted flush imported the pymta on PYTHONPATH"
    assert b"job output" in mailbox.read_bytes()
