"""Queue runs as old habits type them, through the installed scripts and a real SMTP server on loopback.

`sendmail -q` with an interval (`-q30m`, `-qp1h`), `-qf`, and the limits `-qI<id>`, `-qR<recipient>`,
`-qS<sender>` (substrings, as sendmail(8) reads them) run the queue now, limited where a limit is given;
`pymta flush --id/--recipient/--sender` are the same limits. And `pymta -C FILE COMMAND`: the config named
before the command counts for it, unless the command names its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MtaEnv
from mailservers import PASSWORD, SmtpServer, certificates, smtp_server
from test_privsep import configure, system_mta

from pymta.queue.spool import Spool

__all__ = ["certificates", "smtp_server", "system_mta"]  # fixtures imported for use

MESSAGE = b"Subject: run\n\nbody\n"


@pytest.fixture
def server() -> Iterator[SmtpServer]:
    with SmtpServer("plain", auth_require_tls=False) as running:
        yield running


def relay_through(mta: MtaEnv, server: SmtpServer) -> None:
    mta.write_config(
        "domain: example.org\nhostname: mx.example.org\ndeliver: queue\n"
        f"smarthosts:\n  - host: 127.0.0.1\n    port: {server.port}\n    security: none\n    timeout: 5s\n"
    )


def queue_three(mta: MtaEnv) -> dict[str, str]:
    """Three messages: one per recipient domain, two senders. Returns recipient -> queue id."""
    ids = {}
    for sender, recipient in (
        ("cron@example.org", "ann@one.example"),
        ("cron@example.org", "bob@two.example"),
        ("backup@example.org", "cy@three.example"),
    ):
        before = {entry.id for entry in mta.entries()}
        result = mta.sendmail("-f", sender, recipient, input=MESSAGE)
        assert result.returncode == 0, result.stderr
        (new,) = {entry.id for entry in mta.entries()} - before
        ids[recipient] = new
    return ids


def received(server: SmtpServer) -> list[str]:
    return sorted(address for message in server.handler.messages for address in message.rcpt_tos)


def waiting(mta: MtaEnv) -> list[str]:
    return sorted(recipient.address for entry in mta.entries() for recipient in entry.recipients)


@pytest.mark.parametrize(
    ("flag", "delivered"),
    [
        ("-qRtwo.example", ["bob@two.example"]),
        ("-qRTWO.Example", ["bob@two.example"]),  # domains are case-insensitive
        ("-qSbackup@", ["cy@three.example"]),
        ("-qScron", ["ann@one.example", "bob@two.example"]),
    ],
)
def test_dash_q_limits_deliver_only_the_messages_named(
    mta: MtaEnv, server: SmtpServer, flag: str, delivered: list[str]
) -> None:
    relay_through(mta, server)
    queue_three(mta)
    result = mta.sendmail(flag)
    assert result.returncode == 0, result.stderr
    assert received(server) == delivered
    everyone = ["ann@one.example", "bob@two.example", "cy@three.example"]
    assert waiting(mta) == [address for address in everyone if address not in delivered]
    assert all(entry.attempts == 0 for entry in mta.entries())  # the others were not even tried


def test_dash_q_i_takes_a_part_of_the_queue_id(mta: MtaEnv, server: SmtpServer) -> None:
    relay_through(mta, server)
    ids = queue_three(mta)
    result = mta.sendmail(f"-qI{ids['cy@three.example'][-8:]}")
    assert result.returncode == 0, result.stderr
    assert received(server) == ["cy@three.example"]


def test_limits_of_one_kind_add_up_and_kinds_narrow(mta: MtaEnv, server: SmtpServer) -> None:
    relay_through(mta, server)
    queue_three(mta)
    result = mta.sendmail("-qRone.example", "-qRthree.example", "-qScron")
    assert result.returncode == 0, result.stderr
    assert received(server) == ["ann@one.example"]


@pytest.mark.parametrize("flag", ["-q30m", "-q1h30m", "-qp", "-qp15m", "-q15"])
def test_an_interval_is_ignored_with_a_word_and_the_queue_runs_now(
    mta: MtaEnv, server: SmtpServer, flag: str
) -> None:
    relay_through(mta, server)
    queue_three(mta)
    result = mta.sendmail(flag)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sendmail: {flag}:"), lines
    assert "interval" in lines[0] and "ignored" in lines[0] and "daemon" in lines[0]
    assert received(server) == ["ann@one.example", "bob@two.example", "cy@three.example"]
    assert mta.entries() == []


def test_dash_qf_runs_the_queue_in_the_foreground_quietly(mta: MtaEnv, server: SmtpServer) -> None:
    relay_through(mta, server)
    queue_three(mta)
    result = mta.sendmail("-qf")
    assert (result.returncode, result.stderr) == (0, b"")
    assert len(received(server)) == 3


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["-qR"], "-qR: needs"),
        (["-q!Rtwo.example"], "-q!R"),
        (["-qQ"], "quarantine"),
        (["-qX"], "-qX"),
        (["-qR", "two.example"], "-qR: needs a value glued"),  # as in sendmail(8)
        (["-q", "root"], "root"),
    ],
)
def test_queue_run_forms_that_cannot_be_done_are_refused_and_deliver_nothing(
    mta: MtaEnv, server: SmtpServer, args: list[str], words: str
) -> None:
    relay_through(mta, server)
    queue_three(mta)
    result = mta.sendmail(*args)
    stderr = result.stderr.decode()
    assert result.returncode == 64, stderr
    assert len(stderr.splitlines()) == 1 and words in stderr, stderr
    assert received(server) == []


def test_pymta_flush_takes_the_same_limits(mta: MtaEnv, server: SmtpServer) -> None:
    relay_through(mta, server)
    ids = queue_three(mta)
    result = mta.run("pymta", ["flush", "--now", "--recipient", "one.example"])
    assert result.returncode == 0, result.stderr
    assert received(server) == ["ann@one.example"]
    result = mta.run("pymta", ["flush", "--now", "--sender", "cron", "--id", ids["cy@three.example"]])
    assert result.returncode == 0, result.stderr
    assert received(server) == ["ann@one.example"]  # cy's message is not cron's: nothing matched both
    result = mta.run("pymta", ["flush", "--now", "--id", ids["cy@three.example"][:10]])
    assert result.returncode == 0, result.stderr
    assert received(server) == ["ann@one.example", "cy@three.example"]


def test_a_limit_looks_only_at_recipients_still_waiting(mta: MtaEnv, server: SmtpServer) -> None:
    relay_through(mta, server)
    server.handler.rejections = {"bob@two.example": "450 4.2.0 try later"}
    assert mta.sendmail("ann@one.example", "bob@two.example", input=MESSAGE).returncode == 0
    assert mta.run("pymta", ["flush", "--now"]).returncode == 0
    assert received(server) == ["ann@one.example"]
    server.handler.rejections = {}
    assert mta.sendmail("-qRone.example").returncode == 0  # ann is done: the message is not for one.example
    assert received(server) == ["ann@one.example"]
    assert mta.sendmail("-qRtwo.example").returncode == 0
    assert received(server) == ["ann@one.example", "bob@two.example"]
    assert mta.entries() == []


# --- pymta -C FILE COMMAND ---


def elsewhere(mta: MtaEnv, name: str) -> tuple[Path, Path]:
    """A second config with its own spool, holding one message for `name`@example.net."""
    spool = mta.root / f"spool-{name}"
    config = mta.root / f"{name}.yaml"
    config.write_text(f"spool: {spool}\ndomain: example.org\ndeliver: queue\n{local_sandbox(mta.root)}")
    env = {**mta.env, "PYMTA_CONFIG": str(config)}
    assert mta.sendmail(f"{name}@example.net", input=MESSAGE, env=env).returncode == 0
    return config, spool


def local_sandbox(root: Path) -> str:
    from conftest import local_sandbox as sandbox

    return sandbox(root)


def test_dash_c_before_the_command_names_the_config(mta: MtaEnv) -> None:
    first, _ = elsewhere(mta, "first")
    result = mta.run("pymta", ["-C", str(first), "queue"])
    assert result.returncode == 0, result.stderr
    assert b"first@example.net" in result.stdout
    result = mta.run("pymta", ["--config", str(first), "queue", "--json"])
    assert result.returncode == 0 and b"first@example.net" in result.stdout, result.stderr


def test_the_commands_own_dash_c_wins(mta: MtaEnv) -> None:
    first, _ = elsewhere(mta, "first")
    second, _ = elsewhere(mta, "second")
    for args in (
        ["-C", str(first), "queue", "-C", str(second)],
        ["-C", str(first), "queue", "list", "-C", str(second)],
        ["-C", str(first), "queue", "-C", str(second), "list"],
    ):
        result = mta.run("pymta", args)
        assert result.returncode == 0, result.stderr
        assert b"second@example.net" in result.stdout and b"first" not in result.stdout, args


def test_dash_c_before_flush_and_config_check(mta: MtaEnv) -> None:
    first, spool = elsewhere(mta, "first")
    result = mta.run("pymta", ["-C", str(first), "flush", "--now"])
    assert result.returncode == 0, result.stderr
    (entry,) = Spool(str(spool)).entries()[0]
    assert entry.attempts == 1  # tried (no smarthost there: deferred), in the spool of the config named
    broken = mta.root / "broken.yaml"
    broken.write_text("no_such_key: 1\n")
    result = mta.run("pymta", ["-C", str(broken), "config", "check"])
    assert result.returncode == 78 and str(broken) in result.stderr.decode(), result.stderr


def test_every_command_with_a_config_option_takes_the_one_before_it() -> None:
    import click

    from pymta.cli.main import cli
    from pymta.cli.options import CONFIG_PARAMETER

    def commands(group: click.Group) -> list[click.Command]:
        found: list[click.Command] = []
        for command in group.commands.values():
            found.append(command)
            if isinstance(command, click.Group):
                found.extend(commands(command))
        return found

    for command in commands(cli):
        for parameter in command.params:
            if "-C" in getattr(parameter, "opts", ()):
                assert parameter.name == CONFIG_PARAMETER, command.name  # else `pymta -C FILE` misses it


@pytest.mark.skipif(os.geteuid() != 0, reason="the split flush needs root")
def test_a_limit_holds_in_the_delivery_process_of_a_split_flush(
    system_mta: MtaEnv, smtp_server: SmtpServer
) -> None:
    configure(system_mta, smtp_server, f"echo {PASSWORD}")
    for recipient in ("ann@one.example", "bob@two.example"):
        assert system_mta.sendmail(recipient, input=MESSAGE).returncode == 0
    result = system_mta.sendmail("-qRtwo.example")
    assert result.returncode == 0, result.stderr
    assert received(smtp_server) == ["bob@two.example"]
    assert waiting(system_mta) == ["ann@one.example"]
