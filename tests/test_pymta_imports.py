"""What `pymta`'s commands import: each pays only for what it uses (issue 12). `pymta flush` loads SMTP and
TLS only when it opens a smarthost session, `pymta queue` never, and no command loads another's module.
The figures (milliseconds) are bench/compare.py's; this holds the list, which does not drift with the load.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import MtaEnv
from mailservers import SmtpServer, certificates, smtp_server

__all__ = ["certificates", "smtp_server"]  # fixtures

# Only for a smarthost session (SMTP, TLS) or a password from the keyring.
SESSION_ONLY = {
    "smtplib", "ssl", "keyring", "email", "pymta.delivery.smtp.session", "pymta.delivery.credentials"
}  # fmt: skip
# Each command group's own module (cli/main.py's LAZY_COMMANDS).
OTHER_COMMANDS = {"pymta.cli.queue", "pymta.cli.smarthost", "pymta.cli.setup", "pymta.cli.config"}


def imported(mta: MtaEnv, *args: str, entry: str = "pymta.cli.main") -> set[str]:
    """The modules loaded once `pymta ARGS` has run (sys.modules: `-X importtime` does not see the lazy
    group's importlib.import_module), in the test's interpreter (click is installed beside it), entering
    through the click group (`pymta.cli.main`) or the console script's entry (`pymta.cli.entry`)."""
    code = (
        f"import sys\nfrom {entry} import main\n"
        f"code = main({list(args)!r})\n"
        "sys.stderr.write('MODULES ' + ' '.join(sys.modules) + '\\n')\nsys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, env=mta.env, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    line = result.stderr.decode().splitlines()[-1]
    assert line.startswith("MODULES "), result.stderr[-2000:]
    modules = set(line.split()[1:])
    assert entry in modules  # the measurement saw pymta
    return modules


def loaded(modules: set[str], names: set[str]) -> list[str]:
    return sorted(m for m in modules if m in names or m.split(".")[0] in names)


@pytest.fixture
def with_smarthost(mta: MtaEnv) -> MtaEnv:
    mta.write_config(
        "hostname: mx.example.org\ndeliver: queue\n"
        "smarthosts:\n  - host: 127.0.0.1\n    port: 9\n    security: none\n"
    )
    return mta


def test_version_loads_no_command(with_smarthost: MtaEnv) -> None:
    modules = imported(with_smarthost, "--version")
    assert loaded(modules, SESSION_ONLY | OTHER_COMMANDS | {"yaml", "pymta.delivery"}) == []


def test_flush_with_nothing_due_opens_no_session(with_smarthost: MtaEnv) -> None:
    modules = imported(with_smarthost, "flush")
    assert "pymta.delivery.flush" in modules and "yaml" in modules
    assert loaded(modules, SESSION_ONLY | OTHER_COMMANDS) == []
    # Nor what only a mistake in the config (did-you-mean) or a syslog target needs.
    assert loaded(modules, {"difflib", "logging.handlers", "pickle"}) == []


def test_flush_of_a_local_message_opens_no_session(with_smarthost: MtaEnv) -> None:
    assert with_smarthost.sendmail("root", input=b"Subject: local\n\nbody\n").returncode == 0
    # Through the console script's entry: click (which the click group loads) imports inspect.
    modules = imported(with_smarthost, "flush", entry="pymta.cli.entry")
    assert "pymta.delivery.local" in modules and with_smarthost.entries() == []  # delivered
    assert loaded(modules, SESSION_ONLY | OTHER_COMMANDS) == []
    assert loaded(modules, {"dataclasses", "inspect"}) == []  # the aliases and local delivery: records too


@pytest.mark.skipif(os.geteuid() != 0, reason="in user mode every local name is the running user's mailbox")
def test_a_flush_that_bounces_loads_no_dataclasses(with_smarthost: MtaEnv) -> None:
    assert with_smarthost.sendmail("nosuchuser-pymta-test", input=b"Subject: lost\n\nbody\n").returncode == 0
    modules = imported(with_smarthost, "flush", entry="pymta.cli.entry")
    assert "pymta.mail.dsn" in modules  # no such local user: a bounce to root
    assert loaded(modules, {"dataclasses", "inspect"}) == []


def test_a_flush_to_a_smarthost_loads_only_what_it_uses(mta: MtaEnv, smtp_server: SmtpServer) -> None:
    # The flush runs after every message: typing (a twentieth of its start-up), the aliases and local delivery
    # (no local recipient), decimal and fractions (no fractional duration), pkgutil (no split flush).
    mta.write_config(
        "hostname: mx.example.org\ndeliver: queue\nretry:\n  lifetime: 5d\n  schedule: [5m, 1h30m]\n"
        f"smarthosts:\n  - host: 127.0.0.1\n    port: {smtp_server.port}\n    security: none\n"
    )
    assert mta.sendmail("bob@example.net", input=b"Subject: out\n\nbody\n").returncode == 0
    modules = imported(mta, "flush", entry="pymta.cli.entry")
    [received] = smtp_server.handler.messages  # it did deliver
    assert received.rcpt_tos == ["bob@example.net"] and mta.entries() == []
    assert "pymta.delivery.smtp.session" in modules
    unused = {"typing", "decimal", "fractions", "pkgutil", "click", "difflib", "logging.handlers"}
    unused |= {"pymta.delivery.local", "pymta.config.aliases", "pymta.config.expansion"}
    # Its classes are records (pymta.records): dataclasses loads inspect, ast, dis and tokenize, and compiles
    # six methods per class.
    unused |= {"dataclasses", "inspect", "ast", "dis"}
    assert loaded(modules, unused) == []


def test_queue_loads_neither_the_flush_nor_a_session(with_smarthost: MtaEnv) -> None:
    assert with_smarthost.sendmail("someone@example.net", input=b"Subject: q\n\nbody\n").returncode == 0
    modules = imported(with_smarthost, "queue")
    assert "pymta.cli.queue" in modules
    others = OTHER_COMMANDS - {"pymta.cli.queue"}
    assert loaded(modules, SESSION_ONLY | others | {"pymta.delivery.flush"}) == []


@pytest.mark.parametrize(
    "args",
    [["--version"], ["flush"], ["flush", "--background"], ["flush", "--now", "-v", "--config", "CONFIG"]],
)
def test_the_commonest_command_lines_do_without_click(with_smarthost: MtaEnv, args: list[str]) -> None:
    # The timer's flush, deliver: immediate's (--background, -C) and sendmail -q's (--now -v): click was a
    # third of an idle flush.
    args = [str(with_smarthost.config) if arg == "CONFIG" else arg for arg in args]
    modules = imported(with_smarthost, *args, entry="pymta.cli.entry")
    assert loaded(modules, {"click", "pymta.cli.main"}) == []
    if args != ["--version"]:
        assert "pymta.delivery.flush" in modules


@pytest.mark.parametrize(
    "args", [["flush", "--id", "x"], ["-C", "CONFIG", "flush"], ["queue"], ["flush", "-h"]]
)
def test_every_other_command_line_goes_to_click(with_smarthost: MtaEnv, args: list[str]) -> None:
    args = [str(with_smarthost.config) if arg == "CONFIG" else arg for arg in args]
    assert "click" in imported(with_smarthost, *args, entry="pymta.cli.entry")


@pytest.mark.parametrize(
    ("args", "words"),
    [(["flush", "--bogus"], b"No such option '--bogus'"), (["flush", "-C"], b"requires an argument")],
)
def test_a_flush_command_line_the_short_path_cannot_read_is_clicks_usage_error(
    mta: MtaEnv, args: list[str], words: bytes
) -> None:
    result = mta.run("pymta", args)
    assert result.returncode == 64 and words in result.stderr, result.stderr


def test_version_says_what_click_says(mta: MtaEnv) -> None:
    code = "import sys\nfrom pymta.cli.main import main\nsys.exit(main(['--version']))\n"
    clicks = subprocess.run([sys.executable, "-c", code], capture_output=True, env=mta.env, timeout=60)
    ours = mta.run("pymta", ["--version"])
    assert ours.returncode == clicks.returncode == 0
    assert ours.stdout == clicks.stdout and b"pymta, version" in ours.stdout
