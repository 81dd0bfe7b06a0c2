"""`pymta setup`: the system-mode install, its check and its undoing, always under `--root` in tmp_path.

Nothing here may touch the machine's own /usr/sbin/sendmail, /etc, /var/spool or units: every run passes
--root (the session guard in conftest.py checks the guarded paths over the whole run). The one run without
--root is refused before it does anything (not root: 77).
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import local_sandbox

from pymta.cli.main import main
from pymta.config.load import load, loads
from pymta.setup import install, steps
from pymta.setup.files import owner_of
from pymta.setup.launcher import kind_of
from pymta.setup.units import path_unit, service_unit, timer_unit

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
SPOOL = "var/spool/pymta"
IS_ROOT = os.geteuid() == 0


@dataclass
class Result:
    code: int
    lines: list[str]
    err: str

    def marked(self, *marks: str) -> list[str]:
        return [line for line in self.lines if line.startswith(tuple(f"[{mark}]" for mark in marks))]

    @property
    def changes(self) -> list[str]:
        """The lines other than [ok] and [warn] (the only warning this machine may earn: a Python that other
        users cannot run, e.g. under /root)."""
        return [line for line in self.lines if not line.startswith(("[ok]", "[warn]"))]


Setup = Callable[..., Result]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    directory = tmp_path / "root"
    directory.mkdir()
    return directory


@pytest.fixture
def run_setup(capsys: pytest.CaptureFixture[str], root: Path) -> Setup:
    """`pymta setup --root ROOT ARGS...` in this process: its exit status and its lines."""

    def run(*args: str, with_root: bool = True) -> Result:
        argv = ["setup", *(["--root", str(root)] if with_root else []), *args]
        code = main(argv)
        out, err = capsys.readouterr()
        return Result(code, out.splitlines(), err)

    return run


def expected_spool_owner(user: str = "pymta") -> tuple[int, int]:
    """With --root: the real user when it exists and setup runs as root, else the user running setup."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return os.getuid(), os.getgid()
    return (entry.pw_uid, entry.pw_gid) if IS_ROOT else (os.getuid(), os.getgid())


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every path under `root` with its type and mode, owner, mtime and content (or link target)."""
    found: dict[str, tuple[object, ...]] = {}
    for directory, names, files in os.walk(root):
        for name in [*names, *files]:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                content: object = os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                content = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            else:
                content = None
            found[os.path.relpath(path, root)] = (
                info.st_mode,
                info.st_uid,
                info.st_gid,
                info.st_mtime_ns,
                content,
            )
    return found


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def unit_settings(path: Path) -> dict[str, str]:
    settings = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


def write_sandbox_config(root: Path, extra: str = "") -> Path:
    """A config under ROOT whose spool is ROOT's spool (as this machine sees it) and whose local delivery and
    aliases stay in the test's directory: what running ROOT/usr/sbin/sendmail needs."""
    path = root / "etc" / "pymta" / "pymta.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(f"spool: {root / SPOOL}\ndeliver: queue\n{local_sandbox(root.parent)}{extra}")
    path.chmod(0o644)
    return path


# --- The layout ---


def test_setup_creates_the_layout_with_exact_modes_and_owners(run_setup: Setup, root: Path) -> None:
    result = run_setup()
    assert result.code == 0, result.lines
    spool = root / SPOOL
    modes = {
        spool: 0o755,
        spool / "tmp": 0o1733,
        spool / "new": 0o1733,
        spool / "queue": 0o700,
        spool / "state": 0o700,
        spool / "done": 0o700,
        spool / "corrupt": 0o700,
        spool / "flush.lock": 0o600,
        root / "etc/pymta": 0o755,
        root / "etc/pymta/pymta.yaml": 0o644,
        root / "etc/pymta/secrets": 0o700,
        root / "etc/systemd/system/pymta-flush.service": 0o644,
        root / "etc/systemd/system/pymta-flush.timer": 0o644,
        root / "etc/systemd/system/pymta-flush.path": 0o644,
    }
    for path, want in modes.items():
        assert mode(path) == want, f"{path}: {mode(path):04o}, want {want:04o}"
    assert stat.S_ISDIR(os.lstat(spool / "new").st_mode)
    assert stat.S_ISREG(os.lstat(spool / "flush.lock").st_mode)
    spool_owner = expected_spool_owner()
    for path in [spool, *spool.iterdir(), root / "etc/pymta/secrets"]:
        info = os.lstat(path)
        assert (info.st_uid, info.st_gid) == spool_owner, path
    admin = (0, 0) if IS_ROOT else (os.getuid(), os.getgid())
    for path in (
        root / "etc/pymta",
        root / "etc/pymta/pymta.yaml",
        root / "etc/systemd/system/pymta-flush.service",
    ):
        info = os.lstat(path)
        assert (info.st_uid, info.st_gid) == admin, path
    # Directories setup had to make above them are 0755, whatever the umask.
    assert mode(root / "var/spool") == 0o755
    assert mode(root / "usr/sbin") == 0o755
    # It says who owns the spool, since no user is created under --root.
    assert result.lines[0].startswith("[ok] ")
    assert "--root" in result.lines[0] or "exists on this machine" in result.lines[0]


def test_setup_under_umask_077_still_gives_the_exact_modes(run_setup: Setup, root: Path) -> None:
    old = os.umask(0o077)
    try:
        assert run_setup().code == 0
    finally:
        os.umask(old)
    assert mode(root / SPOOL) == 0o755
    assert mode(root / SPOOL / "new") == 0o1733
    assert mode(root / "etc/pymta/pymta.yaml") == 0o644
    assert mode(root / "var") == 0o755


@pytest.mark.skipif(not IS_ROOT, reason="chown to another user needs root")
def test_an_existing_user_owns_the_spool(run_setup: Setup, root: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    result = run_setup("--user", "nobody")
    assert result.code == 0, result.lines
    assert "user nobody exists on this machine" in result.lines[0]
    for path in [root / SPOOL, *(root / SPOOL).iterdir(), root / "etc/pymta/secrets"]:
        info = os.lstat(path)
        if path.name == "status":  # root's, where root writes the users' views (pymta(1), PRIVILEGES)
            assert (info.st_uid, info.st_gid) == (0, 0), path
        else:
            assert (info.st_uid, info.st_gid) == (nobody.pw_uid, nobody.pw_gid), path
    info = os.lstat(root / "etc/pymta/pymta.yaml")
    assert (info.st_uid, info.st_gid) == (0, 0)
    assert not run_setup("--user", "nobody").changes


def test_a_second_run_changes_nothing(run_setup: Setup, root: Path) -> None:
    assert run_setup().code == 0
    before = snapshot(root)
    again = run_setup()
    assert again.code == 0
    assert again.changes == [], again.lines
    assert len(again.marked("ok", "warn")) == len(steps.install_plan(install.Install(root=str(root))))
    assert snapshot(root) == before


def test_dry_run_changes_nothing(run_setup: Setup, root: Path) -> None:
    result = run_setup("--dry-run")
    assert result.code == 0
    assert list(root.iterdir()) == []
    assert result.marked("would create")
    assert all(line.startswith(("[ok]", "[warn]", "[would create]")) for line in result.lines), result.lines
    # Every change it announces is one setup then makes.
    made = run_setup()
    assert [line.removeprefix("[would create]") for line in result.marked("would create")] == [
        line.removeprefix("[create]") for line in made.marked("create")
    ]
    before = snapshot(root)
    assert run_setup("--dry-run").changes == []
    assert snapshot(root) == before


# --- Launchers ---


def test_the_launchers_are_installed_and_work(run_setup: Setup, root: Path, tmp_path: Path) -> None:
    config_file = write_sandbox_config(root)
    config_text = config_file.read_text()
    result = run_setup()
    assert result.code == 0, result.lines
    assert config_file.read_text() == config_text, "an existing config is never overwritten"
    assert any("left as it is" in line for line in run_setup().lines)
    for link, _ in install.LINKS:
        path = root / link.lstrip("/")
        assert kind_of(str(path)) == "launcher", path
        assert mode(path) == 0o755
    # The spool is the one the config names (as this machine sees it): the unit watches it from inside.
    assert (
        unit_settings(root / "etc/systemd/system/pymta-flush.path")["PathChanged"] == "/var/spool/pymta/new"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "PYMTA_CONFIG": str(config_file),
        "LANG": "C.UTF-8",
    }
    sent = subprocess.run(
        [root / "usr/sbin/sendmail", "-i", "you@example.org"],
        input=b"Subject: through the link\n\nhello\n",
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stderr
    dropped = list((root / SPOOL / "new").iterdir())
    assert len(dropped) == 1
    assert b"through the link" in dropped[0].read_bytes()
    listed = subprocess.run([root / "usr/bin/mailq"], env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "you@example.org" in listed.stdout
    lib = subprocess.run(
        [root / "usr/lib/sendmail", "-i", "-odq", "me@example.org"], input=b"\n", env=env, timeout=60
    )
    assert lib.returncode == 0
    assert len(list((root / SPOOL / "new").iterdir())) == 2


def test_an_existing_sendmail_is_backed_up_and_uninstall_restores_it(run_setup: Setup, root: Path) -> None:
    sendmail = root / "usr/sbin/sendmail"
    sendmail.parent.mkdir(parents=True)
    sendmail.write_text("#!/bin/sh\necho another MTA\n")
    sendmail.chmod(0o755)
    mailq = root / "usr/bin/mailq"
    mailq.parent.mkdir(parents=True)
    mailq.symlink_to("/usr/sbin/sendmail.postfix")
    result = run_setup()
    assert result.code == 0
    backup = root / "usr/sbin/sendmail.pre-pymta"
    assert (
        f"[backup] {sendmail} (a regular file) moved to {backup}; {sendmail}: pymta's launcher"
        in result.lines
    )
    assert any(
        line.startswith(f"[backup] {mailq} (a link to /usr/sbin/sendmail.postfix)") for line in result.lines
    )
    assert backup.read_text() == "#!/bin/sh\necho another MTA\n"
    assert kind_of(str(sendmail)) == "launcher"
    assert run_setup().changes == []

    removed = run_setup("--uninstall")
    assert removed.code == 0, removed.lines
    assert f"[restore] {backup} moved back to {sendmail}" in removed.lines
    assert not sendmail.is_symlink()
    assert sendmail.read_text() == "#!/bin/sh\necho another MTA\n"
    assert os.readlink(mailq) == "/usr/sbin/sendmail.postfix"
    assert not backup.exists()
    assert not os.path.lexists(root / "usr/lib/sendmail")
    assert not os.path.lexists(root / "usr/bin/newaliases")
    units = root / "etc/systemd/system"
    assert not [path for path in units.rglob("*") if "pymta" in path.name]
    # The spool and the config stay.
    assert (root / SPOOL / "new").is_dir()
    assert (root / "etc/pymta/pymta.yaml").is_file()
    assert run_setup("--uninstall").changes == []


def test_uninstall_purge_removes_the_spool_and_the_config(run_setup: Setup, root: Path) -> None:
    assert run_setup().code == 0
    (root / SPOOL / "new" / "x").write_text("{}\n")
    result = run_setup("--uninstall", "--purge")
    assert result.code == 0, result.lines
    assert f"[remove] {root / SPOOL} (1 queued messages deleted)" in result.lines
    assert not (root / SPOOL).exists()
    assert not (root / "etc/pymta").exists()
    assert run_setup("--uninstall", "--purge").changes == []


def test_a_backup_is_never_overwritten(run_setup: Setup, root: Path) -> None:
    sendmail = root / "usr/sbin/sendmail"
    sendmail.parent.mkdir(parents=True)
    sendmail.write_text("new")
    (root / "usr/sbin/sendmail.pre-pymta").write_text("old")
    result = run_setup()
    assert result.code == 73
    (error,) = result.marked("error")
    assert "sendmail.pre-pymta exists already" in error and "fix: move" in error
    assert sendmail.read_text() == "new"
    assert (root / "usr/sbin/sendmail.pre-pymta").read_text() == "old"
    # The other steps were done all the same.
    assert kind_of(str(root / "usr/bin/mailq")) == "launcher"


def test_pips_scripts_and_links_to_them_are_replaced_by_the_launcher(run_setup: Setup, root: Path) -> None:
    # What an earlier pymta setup left (links to this or another environment's console scripts), or a copy
    # of pip's script: pymta's, so replaced without a backup; --check says each is the slower script.
    sendmail = root / "usr/sbin/sendmail"
    sendmail.parent.mkdir(parents=True)
    sendmail.symlink_to(BIN / "sendmail")
    other = root / "opt/old-pymta/bin/mailq"
    other.parent.mkdir(parents=True)
    other.write_text("#!/usr/bin/python3\nfrom pymta.cli.sendmail import mailq\n")
    mailq = root / "usr/bin/mailq"
    mailq.parent.mkdir(parents=True)
    mailq.symlink_to(other)
    lib = root / "usr/lib/sendmail"
    lib.parent.mkdir(parents=True)
    shutil.copy(BIN / "sendmail", lib)
    checked = "\n".join(run_setup("--check").marked("problem"))
    assert (
        f"[problem] {sendmail} is a link to {BIN / 'sendmail'}, a script of pymta's that starts slower"
        in checked
    )
    assert f"[problem] {mailq} is a link to {other}" in checked
    assert (
        f"[problem] {lib} is pip's console script of pymta, which starts slower than pymta's launcher"
        in checked
    )
    assert "fix: pymta setup" in checked
    result = run_setup()
    assert result.code == 0, result.lines
    assert f"[fix] {mailq}: pymta's launcher (was a link to {other})" in result.lines
    assert f"[fix] {lib}: pymta's launcher (was pip's console script)" in result.lines
    for path in (sendmail, mailq, lib):
        assert kind_of(str(path)) == "launcher", path
    assert other.exists() and not list(root.rglob("*.pre-pymta"))
    assert run_setup("--check").changes == []


def test_launchers_replace_this_environments_pip_scripts(
    run_setup: Setup, root: Path, tmp_path: Path
) -> None:
    # `pymta setup --launchers`, the README's user-mode install: under --root, into ROOT + this venv's bin.
    bin_dir = root / str(BIN).lstrip("/")
    bin_dir.mkdir(parents=True)
    for name in ("sendmail", "mailq", "newaliases"):
        shutil.copy(BIN / name, bin_dir / name)  # pip's console scripts
    checked = run_setup("--launchers", "--check")
    assert checked.code == 1
    assert f"[problem] {bin_dir / 'sendmail'} is pip's console script of pymta" in "\n".join(checked.lines)
    result = run_setup("--launchers")
    assert result.code == 0, result.lines
    assert sorted(os.listdir(bin_dir)) == ["mailq", "newaliases", "sendmail"]
    assert all(kind_of(str(bin_dir / name)) == "launcher" for name in os.listdir(bin_dir))
    assert run_setup("--launchers", "--check").code == 0
    assert sorted(path for path in root.rglob("*") if not path.is_dir()) == sorted(bin_dir.iterdir())
    config = tmp_path / "pymta.yaml"
    config.write_text(f"spool: {tmp_path / 'spool'}\ndeliver: queue\n{local_sandbox(tmp_path)}")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYMTA_CONFIG": str(config), "LANG": "C.UTF-8"}
    sent = subprocess.run(
        [bin_dir / "sendmail", "-i", "you@example.org"], input=b"\n", env=env, capture_output=True, timeout=60
    )
    assert sent.returncode == 0, sent.stderr
    assert len(os.listdir(tmp_path / "spool" / "new")) == 1


# --- --check ---


def test_check_is_clean_after_setup(run_setup: Setup, root: Path) -> None:
    assert run_setup().code == 0
    result = run_setup("--check")
    assert result.changes == [], result.lines
    # Clean means exit 0; a warning (an interpreter other users cannot run) is reported with 1.
    assert result.code == (1 if result.marked("warn") else 0)
    for line in result.marked("warn"):
        assert "cannot be run by other users" in line


def test_check_before_setup_names_what_is_missing(run_setup: Setup, root: Path) -> None:
    result = run_setup("--check")
    assert result.code == 1
    assert f"[problem] {root / SPOOL / 'new'} is missing; fix: install -d -m 1733" in "\n".join(result.lines)
    assert list(root.iterdir()) == []


def test_check_reports_tampering_each_with_its_fix(run_setup: Setup, root: Path) -> None:
    assert run_setup().code == 0
    new = root / SPOOL / "new"
    new.chmod(0o755)
    (root / "usr/bin/mailq").unlink()
    lib = root / "usr/lib/sendmail"
    lib.unlink()
    lib.symlink_to("/bin/true")
    (root / "etc/systemd/system/pymta-flush.path").unlink()
    (root / "etc/pymta/pymta.yaml").chmod(0o600)
    service = root / "etc/systemd/system/pymta-flush.service"
    service.write_text(service.read_text().replace(" flush\n", " flush --now\n"))
    if IS_ROOT:
        os.chown(root / SPOOL / "queue", 65534, 65534)
    result = run_setup("--check")
    assert result.code == 1
    problems = "\n".join(result.marked("problem"))
    assert f"[problem] {new} has mode 0755, should be 1733; fix: chmod 1733 {new}" in problems
    assert f"[problem] {root}/usr/bin/mailq is missing; fix: pymta setup" in problems
    assert (
        f"[problem] {lib} is a link to /bin/true, not pymta's; fix: mv {lib} {lib}.pre-pymta && pymta setup"
        in problems
    )
    assert f"[problem] {root}/etc/systemd/system/pymta-flush.path is missing; fix: pymta setup" in problems
    assert f"{service} differs from what this pymta installs" in problems
    assert "pymta.yaml has mode 0600, should be 0644" in problems
    if IS_ROOT:
        owner = expected_spool_owner()
        assert f"{root / SPOOL / 'queue'} is owned by" in problems
        assert f"fix: chown {owner_of(*owner).label}" in problems
    # Checking changed nothing; setup then fixes it all.
    assert mode(new) == 0o755
    fixed = run_setup()
    assert fixed.code == 0
    assert f"[fix] {new}: mode 0755 -> 1733" in fixed.lines
    assert run_setup("--check").changes == []
    assert mode(new) == 0o1733
    assert kind_of(str(lib)) == "launcher"
    assert os.readlink(f"{lib}.pre-pymta") == "/bin/true"


def test_check_reports_an_invalid_config_and_setup_exits_78(run_setup: Setup, root: Path) -> None:
    assert run_setup().code == 0
    config_file = root / "etc/pymta/pymta.yaml"
    config_file.write_text("smarthosts:\n  - host: smtp.example.org\n    securty: tls\n")
    checked = run_setup("--check")
    assert checked.code == 1
    assert any(
        'did you mean "security"' in line and "fix: edit it" in line for line in checked.marked("problem")
    )
    applied = run_setup()
    assert applied.code == 78
    assert config_file.read_text().startswith("smarthosts:"), "an invalid config is reported, not replaced"


def test_a_path_of_the_wrong_kind_is_reported_not_replaced(run_setup: Setup, root: Path) -> None:
    new = root / SPOOL / "new"
    new.parent.mkdir(parents=True)
    new.symlink_to("/etc")
    result = run_setup()
    assert result.code == 73
    assert any(f"{new} is a symbolic link, not a directory" in line for line in result.marked("error"))
    assert os.readlink(new) == "/etc"


# --- Units and cron ---


def test_units_run_the_flush_of_this_environment(run_setup: Setup, root: Path) -> None:
    assert run_setup().code == 0
    units = root / "etc/systemd/system"
    service = unit_settings(units / "pymta-flush.service")
    assert service["Type"] == "oneshot"
    assert service["ExecStart"] == f"{BIN / 'pymta'} flush"
    assert "User" not in service, "it starts as root: local delivery needs it (pymta.delivery.privsep)"
    assert "switched to `pymta` for good" in (units / "pymta-flush.service").read_text()
    timer = unit_settings(units / "pymta-flush.timer")
    assert timer["OnCalendar"] == "*:0/5"
    assert timer["WantedBy"] == "timers.target"
    path = unit_settings(units / "pymta-flush.path")
    assert path["PathChanged"] == "/var/spool/pymta/new"
    assert path["Unit"] == "pymta-flush.service"
    assert path["WantedBy"] == "paths.target"
    assert "DirectoryNotEmpty" not in path
    # Enabled as `systemctl --root` would: links in the targets' .wants, to the paths inside the root.
    assert (
        os.readlink(units / "timers.target.wants/pymta-flush.timer")
        == "/etc/systemd/system/pymta-flush.timer"
    )
    assert (
        os.readlink(units / "paths.target.wants/pymta-flush.path") == "/etc/systemd/system/pymta-flush.path"
    )
    assert not (root / "etc/cron.d").exists()


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_accepts_the_units(run_setup: Setup, root: Path) -> None:
    assert run_setup().code == 0
    units = [str(root / "etc/systemd/system" / name) for name in install.UNITS]
    verified = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True, timeout=60
    )
    assert verified.returncode == 0, verified.stderr
    assert verified.stderr == ""


def test_the_examples_are_what_setup_installs() -> None:
    assert (ROOT / "examples/pymta-flush.path").read_text() == path_unit("/var/spool/pymta")
    assert (ROOT / "examples/pymta-flush.timer").read_text() == timer_unit()


def test_the_templates_go_into_the_wheel() -> None:
    """A wheel (not an editable install) has only the package data pyproject.toml names."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["pymta.setup"]
    templates = ROOT / "pymta/setup/templates"
    named = {path for pattern in patterns for path in (ROOT / "pymta/setup").glob(pattern)}
    assert set(templates.iterdir()) <= named and len(named) >= 4


def test_no_systemd_writes_a_cron_line(run_setup: Setup, root: Path) -> None:
    result = run_setup("--no-systemd")
    assert result.code == 0
    cron = root / "etc/cron.d/pymta"
    assert mode(cron) == 0o644
    assert f"*/5 * * * * root {BIN / 'pymta'} flush" in cron.read_text().splitlines()
    assert not (root / "etc/systemd").exists()
    assert run_setup("--no-systemd").changes == []
    assert run_setup("--no-systemd", "--check").changes == []
    assert run_setup("--uninstall").code == 0
    assert not cron.exists()


def test_exec_start_quotes_a_path_with_spaces() -> None:
    assert 'ExecStart="/opt/my pymta/bin/pymta" flush\n' in service_unit("/opt/my pymta/bin/pymta", "/s")
    assert "ExecStart=/opt/100%%/pymta flush\n" in service_unit("/opt/100%/pymta", "/s")


# --- The config ---


def test_the_installed_config_is_valid_and_relays_nothing(run_setup: Setup, root: Path) -> None:
    assert run_setup().code == 0
    path = root / "etc/pymta/pymta.yaml"
    loaded = load(str(path))
    assert loaded.smarthosts == ()
    assert loaded.rewrite is None
    assert loaded.admin is None
    text = path.read_text()
    assert "\n#smarthosts:\n#  - host: smtp.web.de\n" in text
    assert "\n#rewrite:\n" in text
    assert "{file: /etc/pymta/secrets/" in text


def test_adapting_the_example_comments_out_only_those_blocks() -> None:
    example = (ROOT / "examples/pymta.yaml").read_text()
    adapted = install.adapt_example(example)
    assert loads(adapted).smarthosts == ()
    # Each line is the example's, or the example's behind a '#': the lines of those four keys.
    pairs = list(zip(adapted.splitlines(), example.splitlines(), strict=True))
    assert all(mine in (theirs, f"#{theirs}") for mine, theirs in pairs)
    keys = {theirs.split(":")[0] for mine, theirs in pairs if mine != theirs and not theirs[0].isspace()}
    assert keys == {"admin", "smarthosts", "routes", "rewrite"}
    assert install.adapt_example(
        "deliver: queue\nadmin: a@b.c\nroutes:\n  - x: 1\n\n  - y: 2\n# note\nretry: {}\n"
    ) == ("deliver: queue\n#admin: a@b.c\n#routes:\n#  - x: 1\n\n#  - y: 2\n# note\nretry: {}\n")


def test_a_config_given_with_C_is_installed(run_setup: Setup, root: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text("hostname: mx.example.org\n")
    assert run_setup("-C", str(mine)).code == 0
    assert (root / "etc/pymta/pymta.yaml").read_text() == "hostname: mx.example.org\n"
    mine.write_text("hostnme: x\n")
    assert run_setup("-C", str(mine)).code == 78


def test_a_config_naming_another_spool_gets_that_spool(run_setup: Setup, root: Path) -> None:
    write_sandbox_config(root, "").write_text("spool: /srv/mail/queue\n")
    assert run_setup().code == 0
    assert mode(root / "srv/mail/queue/new") == 0o1733
    assert not (root / SPOOL).exists()
    assert unit_settings(root / "etc/systemd/system/pymta-flush.path")["PathChanged"] == "/srv/mail/queue/new"


# --- Refusals ---


def test_without_root_rights_and_without_root_it_is_refused(
    run_setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = run_setup(with_root=False)
    assert result.code == 77
    assert "must run as root: sudo pymta setup" in result.err
    assert "--root DIR" in result.err
    assert result.lines == []


def test_nobody_is_refused_with_77(tmp_path: Path) -> None:
    argv = [str(BIN / "pymta"), "setup"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    if not IS_ROOT:
        refused = subprocess.run(argv, env=env, capture_output=True, text=True)
    else:
        nobody = pwd.getpwnam("nobody")
        uid, gid = nobody.pw_uid, nobody.pw_gid
        try:
            probe = subprocess.run(
                [sys.executable, "-c", "import pymta"],
                user=uid,
                group=gid,
                extra_groups=[],
                capture_output=True,
            )
        except PermissionError:
            probe = None
        if probe is None or probe.returncode != 0:
            pytest.skip("nobody cannot run this environment's Python (it lies under a private directory)")
        refused = subprocess.run(
            argv, env=env, capture_output=True, text=True, cwd="/", user=uid, group=gid, extra_groups=[]
        )
    assert refused.returncode == 77, refused.stderr
    assert "sudo pymta setup" in refused.stderr


@pytest.mark.parametrize(
    "args",
    [["--check", "--dry-run"], ["--check", "--uninstall"], ["--purge"], ["--user", "Not A User"]],
    ids=["check+dry-run", "check+uninstall", "purge alone", "bad user"],
)
def test_bad_option_combinations_are_usage_errors(run_setup: Setup, root: Path, args: list[str]) -> None:
    result = run_setup(*args)
    assert result.code == 64
    assert list(root.iterdir()) == []


def test_the_root_must_exist(run_setup: Setup, tmp_path: Path) -> None:
    code = main(["setup", "--root", str(tmp_path / "missing")])
    assert code == 64
    assert not (tmp_path / "missing").exists()
