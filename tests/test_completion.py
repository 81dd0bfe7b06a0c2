"""Shell completion of the installed `pymta`, driven as bash, zsh and fish drive it (click's protocol:
`_PYMTA_COMPLETE=bash_complete COMP_WORDS=... COMP_CWORD=...`), against a temporary spool and config.

Queue ids come from the user's queue, smarthost names from the config; a broken config, a missing spool
or anything else that goes wrong completes nothing, quietly: a traceback in the middle of a command line
is worse than no completion.
"""

from __future__ import annotations

import subprocess

import pytest
from conftest import MtaEnv, script

MESSAGE = b"Subject: c\n\nbody\n"


def complete(mta: MtaEnv, words: str, shell: str = "bash", env: dict[str, str] | None = None) -> list[str]:
    """What the shell would offer for the last word of `words` (which ends with a space for a new word)."""
    parts = words.split(" ")
    variables = {**(env or mta.env), "_PYMTA_COMPLETE": f"{shell}_complete"}
    if shell == "fish":
        variables |= {"COMP_WORDS": words, "COMP_CWORD": parts[-1]}
    else:
        variables |= {"COMP_WORDS": words, "COMP_CWORD": str(len(parts) - 1)}
    result = subprocess.run(
        [script("pymta")], capture_output=True, env=variables, timeout=60, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == b"", result.stderr
    lines = [line for line in result.stdout.decode().splitlines() if line]
    if shell == "bash":
        return [line.split(",", 1)[1] for line in lines]
    if shell == "zsh":  # type, value, help: three lines each
        return [lines[index + 1] for index in range(0, len(lines), 3)]
    return [line.split("\t", 1)[0].split(",", 1)[-1] for line in lines]


def queue_two(mta: MtaEnv) -> list[str]:
    for recipient in ("ann@one.example", "bob@two.example"):
        assert mta.sendmail(recipient, input=MESSAGE).returncode == 0
    return sorted(entry.id for entry in mta.entries())


def test_commands_complete(mta: MtaEnv) -> None:
    assert {"queue", "flush", "config", "test", "password", "setup"} <= set(complete(mta, "pymta "))
    assert set(complete(mta, "pymta queue h")) == {"hold"}


@pytest.mark.parametrize("command", ["hold", "release", "retry", "delete", "bounce", "show"])
def test_queue_ids_complete_for_every_command_that_takes_them(mta: MtaEnv, command: str) -> None:
    ids = queue_two(mta)
    assert sorted(complete(mta, f"pymta queue {command} ")) == ids
    assert complete(mta, f"pymta queue {command} {ids[1][:-1]}") == [ids[1]]


def test_queue_ids_complete_for_flush_id(mta: MtaEnv) -> None:
    ids = queue_two(mta)
    assert sorted(complete(mta, "pymta flush --id ")) == ids


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_zsh_and_fish_get_the_ids_too(mta: MtaEnv, shell: str) -> None:
    ids = queue_two(mta)
    assert sorted(complete(mta, "pymta queue hold ", shell=shell)) == ids


def test_the_config_named_on_the_line_is_used(mta: MtaEnv) -> None:
    ids = queue_two(mta)
    other = mta.root / "other.yaml"
    other.write_text(f"spool: {mta.root / 'other-spool'}\n")
    env = {**mta.env, "PYMTA_CONFIG": str(other)}
    assert complete(mta, "pymta queue hold ", env=env) == []
    assert sorted(complete(mta, f"pymta queue hold -C {mta.config} ", env=env)) == ids
    assert sorted(complete(mta, f"pymta -C {mta.config} queue hold ", env=env)) == ids


def test_smarthost_names_complete(mta: MtaEnv) -> None:
    mta.write_config(
        "smarthosts:\n"
        "  - host: smtp.web.de\n    username: me@web.de\n    password: {keyring: pymta}\n"
        "  - name: backup\n    host: mail.gmx.net\n"
    )
    assert sorted(complete(mta, "pymta password set ")) == ["backup", "smtp.web.de"]
    assert complete(mta, "pymta password delete sm") == ["smtp.web.de"]


@pytest.mark.parametrize(
    "text",
    ["smarthosts: [\n", "no_such_key: 1\n", "spool: relative\n", "\x00\xff"],
    ids=["unparsable", "unknown key", "bad spool", "binary"],
)
def test_a_broken_config_completes_nothing_and_says_nothing(mta: MtaEnv, text: str) -> None:
    queue_two(mta)
    mta.config.write_bytes(text.encode("latin-1"))
    assert complete(mta, "pymta queue hold ") == []
    assert complete(mta, "pymta password set ") == []
    assert "queue" in complete(mta, "pymta ")  # the commands still complete


def test_a_missing_or_unreadable_spool_completes_nothing(mta: MtaEnv) -> None:
    assert complete(mta, "pymta queue hold ") == []  # no spool yet
    missing = mta.root / "missing.yaml"
    assert complete(mta, f"pymta queue hold -C {missing} ") == []


def test_the_bash_script_is_printed(mta: MtaEnv) -> None:
    env = {**mta.env, "_PYMTA_COMPLETE": "bash_source"}
    result = subprocess.run([script("pymta")], capture_output=True, env=env, timeout=60)
    assert result.returncode == 0 and b"_pymta_completion" in result.stdout, result.stderr
