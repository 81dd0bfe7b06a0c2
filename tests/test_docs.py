"""The documentation covers what the code offers, and what it shows actually works.

Every sendmail flag, `-o` option and `-b` mode has an entry in man/sendmail.8; every `pymta` command and
option has one in man/pymta.1 and every command is named in the README; the example configs (files and
README blocks) load; the README's quickstart runs; `.ci/run` runs exactly the README's test command; the
exit codes the docs list are the ones in `pymta.errors`. (That man/pymta.yaml.5 covers every config key is
tested in tests/test_config.py.)
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from conftest import local_sandbox

from pymta import errors
from pymta.cli.main import cli
from pymta.config.load import load, loads
from pymta.config.model import PASSWORD_KINDS
from pymta.submission.invocation import FLAGS, MODES, OPTIONS

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
README = (ROOT / "README.md").read_text()
SENDMAIL_8 = (ROOT / "man" / "sendmail.8").read_text()
PYMTA_1 = (ROOT / "man" / "pymta.1").read_text()


# --- Reading roff and Markdown ---


def roff_text(line: str) -> str:
    """A roff source line as plain text: no macro name, font escapes, quotes or escaped hyphens."""
    line = re.sub(r"^\.[A-Z]{1,2}\s*", "", line)
    line = re.sub(r"\\f[BIRP]|\\f\[\w*\]|\\&", "", line)
    return line.replace("\\-", "-").replace('"', "")


def tags(page: str) -> list[str]:
    """The tag lines of the page's .TP entries (and .TQ continuations), as plain text."""
    lines = page.splitlines()
    return [roff_text(lines[i + 1]) for i, line in enumerate(lines[:-1]) if line in (".TP", ".TQ")]


def sections(page: str) -> dict[str, str]:
    """The page's .SH and .SS sections by their plain title, each up to the next heading."""
    found: dict[str, str] = {}
    title = ""
    for line in page.splitlines():
        if line.startswith((".SH ", ".SS ")):
            title = roff_text(line[4:]).strip()
            found[title] = ""
        elif title:
            found[title] += line + "\n"
    return found


def fenced_block_after(marker: str, text: str = README) -> str:
    """The content of the fenced block right after the line `marker`."""
    match = re.search(rf"^{re.escape(marker)}\n```[a-z]*\n(.*?)^```$", text, re.M | re.S)
    assert match, f"no fenced block right after {marker} in README.md"
    return match.group(1)


# --- man/sendmail.8 covers the flag tables ---


def flag_tag(flag: str) -> re.Pattern[str]:
    """`-X` at the start of a tag word, not followed by a letter (so -t does not match -ti)."""
    return re.compile(rf"(?<![\w-]){re.escape(flag)}(?![A-Za-z])")


@pytest.mark.parametrize("letter", sorted(FLAGS))
def test_sendmail_man_page_has_an_entry_for_every_flag(letter: str) -> None:
    pattern = flag_tag(f"-{letter}")
    assert any(pattern.search(tag) for tag in tags(SENDMAIL_8)), f"-{letter} has no .TP entry in sendmail.8"


@pytest.mark.parametrize("prefix", [prefix for prefix, _ in OPTIONS])
def test_sendmail_man_page_has_an_entry_for_every_o_option(prefix: str) -> None:
    pattern = flag_tag(f"-o{prefix}")
    assert any(pattern.search(tag) for tag in tags(SENDMAIL_8)), f"-o{prefix} has no .TP entry in sendmail.8"


@pytest.mark.parametrize("mode", sorted(MODES))
def test_sendmail_man_page_has_an_entry_for_every_b_mode(mode: str) -> None:
    pattern = flag_tag(f"-b{mode}")
    assert any(pattern.search(tag) for tag in tags(SENDMAIL_8)), f"-b{mode} has no .TP entry in sendmail.8"


@pytest.mark.parametrize("message", [message for _, message in MODES.values() if message])
def test_sendmail_man_page_quotes_what_a_refused_mode_says(message: str) -> None:
    said = message.partition(": ")[2]
    text = roff_text(SENDMAIL_8.replace("\n", " ")).replace("\\(aq", "'")
    assert said in re.sub(r"\s+", " ", text), said


def test_sendmail_man_page_covers_the_names_it_answers_to() -> None:
    invoked_as = sections(SENDMAIL_8)["Invoked as mailq or newaliases"]
    for name in ("sendmail", "mailq", "newaliases"):
        assert f".B {name}\n" in invoked_as, name


# --- man/pymta.1 and the README cover the pymta commands ---


def walk(
    command: click.Command, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every command under `command`, with its path of names, hidden ones left out."""
    yield path, command
    if isinstance(command, click.Group):
        context = click.Context(command)  # the commands as click lists them: `pymta`'s load lazily
        for name in command.list_commands(context):
            sub = command.get_command(context, name)
            if sub is not None and not sub.hidden:
                yield from walk(sub, (*path, name))


def option_names(command: click.Command) -> list[str]:
    names = []
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            names += [*param.opts, *param.secondary_opts]
    return names


COMMANDS = [(path, command) for path, command in walk(cli) if path]


def test_the_walk_sees_the_commands() -> None:
    paths = {" ".join(path) for path, _ in COMMANDS}
    assert {"queue", "queue list", "flush", "config", "config check"} <= paths


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(path) for path, _ in COMMANDS])
def test_pymta_man_page_has_a_section_for_every_command_with_its_options(
    path: tuple[str, ...], command: click.Command
) -> None:
    title = "pymta " + " ".join(path)
    section = sections(PYMTA_1).get(title)
    assert section is not None, f"no .SS {title} in man/pymta.1"
    entries = tags(section)
    for name in option_names(command):
        assert any(flag_tag(name).search(tag) for tag in entries), f"{title}: {name} has no .TP entry"


def test_pymta_man_page_documents_the_general_options() -> None:
    entries = tags(sections(PYMTA_1)["GENERAL OPTIONS"])
    with click.Context(cli) as ctx:
        names = option_names(cli) + cli.get_help_option_names(ctx)
    for name in names:
        assert any(flag_tag(name).search(tag) for tag in entries), name


def test_pymta_man_page_lists_no_command_that_does_not_exist() -> None:
    documented = {title for title in sections(PYMTA_1) if title.startswith("pymta ")}
    existing = {"pymta " + " ".join(path) for path, _ in COMMANDS}
    assert documented <= existing, documented - existing


@pytest.mark.parametrize("path", [path for path, _ in COMMANDS], ids=[" ".join(p) for p, _ in COMMANDS])
def test_readme_names_every_command(path: tuple[str, ...]) -> None:
    assert f"pymta {' '.join(path)}" in README


# --- The JSON contract is documented field by field ---


@pytest.fixture
def queued_json(tmp_path: Path) -> list[dict[str, object]]:
    """`pymta queue --json` after the installed sendmail queued one message."""
    spool = tmp_path / "spool"
    config_file = tmp_path / "pymta.yaml"
    config_file.write_text(f"spool: {spool}\ndeliver: queue\n{local_sandbox(tmp_path)}")
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path), "PYMTA_CONFIG": str(config_file)}
    subprocess.run(
        [BIN / "sendmail", "-f", "", "you@example.org"], input=b"Subject: x\n\ny\n", env=env, check=True
    )
    listed = subprocess.run(
        [BIN / "pymta", "queue", "--json"], env=env, check=True, capture_output=True, text=True
    )
    entries: list[dict[str, object]] = json.loads(listed.stdout)
    return entries


def test_every_queue_json_field_is_documented(queued_json: list[dict[str, object]]) -> None:
    (entry,) = queued_json
    recipients = entry["recipients"]
    assert isinstance(recipients, list)
    fields = [*entry, *recipients[0]]
    page = sections(PYMTA_1)["QUEUE JSON"]
    for field in fields:
        assert f".B {field}\n" in page, f"{field} is not in QUEUE JSON of man/pymta.1"
        assert f"`{field}`" in README, f"{field} is not in the README"


# --- Example configurations load ---


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_config_loads(path: Path) -> None:
    loaded = load(str(path))
    assert loaded.smarthosts, f"{path.name} configures no smarthost"


def test_the_examples_the_readme_promises_exist() -> None:
    for name in ("webde.yaml", "gmx.yaml", "gmail.yaml", "isp-relay.yaml", "direct.yaml"):
        assert (ROOT / "examples" / name).is_file(), name
        assert f"examples/{name}" in README, name


README_YAML = re.findall(r"^```yaml\n(.*?)^```$", README, re.M | re.S)


@pytest.mark.parametrize("text", README_YAML, ids=[f"block{n}" for n in range(len(README_YAML))])
def test_readme_config_blocks_load(text: str) -> None:
    loaded = loads(text, "README.md")
    assert loaded.smarthosts or text.count("\n") == 1  # a whole example, or one line to add to one


def test_readme_shows_oauth2_and_every_password_source() -> None:
    blocks = [loads(text, "README.md") for text in README_YAML]
    kinds = {host.password.kind for loaded in blocks for host in loaded.smarthosts if host.password}
    auths = {host.auth for loaded in blocks for host in loaded.smarthosts}
    assert "xoauth2" in auths
    assert {"keyring", "command"} <= kinds
    for source in PASSWORD_KINDS:
        assert f"{{{source}:" in README, source


# --- The systemd units run the flush as a oneshot every 5 minutes ---


def unit(name: str) -> dict[str, str]:
    settings = {}
    for line in (ROOT / "examples" / name).read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


def test_flush_service_is_a_oneshot_running_pymta_flush() -> None:
    service = unit("pymta-flush.service")
    assert service["Type"] == "oneshot"
    assert service["ExecStart"].split()[-2:] == ["pymta", "flush"] or service["ExecStart"].endswith(
        "/pymta flush"
    )
    assert "User" not in service  # a user unit; setup writes the system one (started as root)


def test_flush_timer_fires_every_five_minutes() -> None:
    timer = unit("pymta-flush.timer")
    assert timer["OnCalendar"] == "*:0/5"
    assert timer["WantedBy"] == "timers.target"


# --- The README's commands work ---


def test_ci_runs_the_readme_test_command() -> None:
    script = ROOT / ".ci" / "run"
    assert os.access(script, os.X_OK), ".ci/run must be executable"
    printed = subprocess.run(
        ["bash", str(script), "--print-command"], capture_output=True, text=True, check=True
    ).stdout
    command = fenced_block_after("<!-- test-command -->")
    assert printed == command
    assert "pytest" in command
    # It reads the README rather than holding a copy of the command.
    assert command.strip() not in script.read_text()


def test_ci_takes_whatever_the_readme_says(tmp_path: Path) -> None:
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "README.md").write_text(
        "# x\n\n<!-- test-command -->\n```sh\necho other\n```\n\n```sh\nno\n```\n"
    )
    printed = subprocess.run(
        ["bash", str(tmp_path / ".ci" / "run"), "--print-command"], capture_output=True, text=True, check=True
    )
    assert printed.stdout == "echo other\n"
    (tmp_path / "README.md").write_text("# no marker\n")
    missing = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True, text=True)
    assert missing.returncode != 0
    assert "test-command" in missing.stderr


def test_ci_treats_no_tests_as_failure(tmp_path: Path) -> None:
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "README.md").write_text("<!-- test-command -->\n```sh\nexit 5\n```\n")
    run = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True, text=True)
    assert run.returncode == 1
    assert "no tests" in run.stderr


INSTALL_STEP = re.compile(
    r"^python3 -m venv (?P<venv>\S+) && (?P=venv)/bin/pip install (?:-U pip )?\. && "
    r"(?P=venv)/bin/pymta setup --launchers && "  # tests/test_setup.py runs it (into a --root)
)


def wait_for_flush(spool: Path, timeout: float = 10.0) -> None:
    """Wait until no flush holds the spool's lock (the one `sendmail` started in the background)."""
    lock = spool / "flush.lock"
    deadline = time.monotonic() + timeout
    while lock.exists() and time.monotonic() < deadline:
        with open(lock) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                time.sleep(0.05)
                continue
            return


def test_quickstart_works(tmp_path: Path) -> None:
    if os.path.exists("/etc/pymta/pymta.yaml") or os.path.isdir("/var/spool/pymta/new"):
        pytest.skip("this machine has a system-wide pymta; the quickstart would use it")
    command = fenced_block_after("<!-- quickstart -->").strip()
    install = INSTALL_STEP.match(command)
    assert install, "the quickstart should install into a venv with pip install . and pymta setup --launchers"
    # Only the install is replaced: by the console scripts of the environment running the tests.
    command = command[install.end() :].replace(f"{install['venv']}/bin/", f"{BIN}/")
    assert re.search(r"sendmail -v ", command), "the quickstart should queue a message with sendmail -v"
    assert "pymta flush" in command, "the quickstart should deliver the message"
    home = tmp_path / "home"
    (home / ".local").mkdir(parents=True)  # as `python3 -m venv ~/.local/pymta` leaves it
    spool = home / ".local" / "state" / "pymta"
    spool.parent.mkdir()  # named in the config below: its parent must exist
    # The command runs as written; only the mailboxes are kept inside tmp_path (never the machine's
    # /var/mail), through a config that names the default spool and nothing else.
    config = tmp_path / "pymta.yaml"
    config.write_text(f"spool: {spool}\n{local_sandbox(tmp_path)}")
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_STATE_HOME": str(home / ".local" / "state"),
        "PYMTA_CONFIG": str(config),
        "LANG": "C.UTF-8",
    }
    run = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60)
    wait_for_flush(spool)
    assert run.returncode == 0, run.stderr
    assert "queued as" in run.stderr
    assert "relay=local" in run.stderr and "status=sent" in run.stderr, run.stderr
    assert "Mail queue is empty" in run.stdout, run.stdout
    owner = pwd.getpwuid(os.geteuid()).pw_name
    assert b"It works." in (tmp_path / "mail" / owner).read_bytes()


# --- Exit codes in the docs are the ones in the code ---


def test_readme_exit_codes_are_the_codes_in_pymta_errors() -> None:
    rows = re.findall(r"^\| (\d+) \| (EX_[A-Z]+) \|", README, re.M)
    assert len(rows) >= 9
    for code, name in rows:
        assert getattr(errors, name) == int(code), f"README: {code} {name}"


@pytest.mark.parametrize("page", ["sendmail.8", "pymta.1"])
def test_man_page_exit_codes_are_the_codes_in_pymta_errors(page: str) -> None:
    text = sections((ROOT / "man" / page).read_text())["EXIT STATUS"]
    rows = re.findall(r"^\.B (\d+)\n(EX_[A-Z]+):", text, re.M)
    assert rows
    for code, name in rows:
        assert getattr(errors, name) == int(code), f"{page}: {code} {name}"


# --- The man pages render cleanly ---


@pytest.mark.parametrize("page", ["sendmail.8", "pymta.1"])
def test_man_page_renders_without_warnings(page: str) -> None:
    if not shutil.which("groff"):
        pytest.skip("groff is not installed")
    rendered = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(ROOT / "man" / page)], capture_output=True, text=True
    )
    assert rendered.returncode == 0
    assert rendered.stderr == ""


def test_every_example_and_man_page_is_installed_with_the_package() -> None:
    """A file added to examples/ or man/ must be named in pyproject's data-files, or a wheel lacks it."""
    import tomllib

    data_files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    listed = {name for names in data_files.values() for name in names}
    present = {
        f"{folder}/{path.name}" for folder in ("examples", "man") for path in (ROOT / folder).iterdir()
    }
    assert listed == present


def test_the_readme_quotes_the_no_smarthost_reason_as_the_flush_writes_it() -> None:
    from pymta.delivery.flush import NO_SMARTHOST

    readme = (ROOT / "README.md").read_text()
    quoted = re.findall(r"no smarthost configured[^)\"\n]*", readme)
    assert quoted and all(NO_SMARTHOST.startswith(text.rstrip(" .")) for text in quoted), quoted
