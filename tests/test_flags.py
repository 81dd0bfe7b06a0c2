"""sendmail's flag table, read as real callers write their command lines (reference/sendmail-callers.md)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pymta.errors import EX_NOUSER, EX_UNAVAILABLE, EX_USAGE, PymtaError
from pymta.submission.invocation import FLAGS, Invocation, parse_args


def fields(invocation: Invocation) -> dict[str, object]:
    return {name: getattr(invocation, name) for name in Invocation.__slots__ if name != "notes"}


# caller: (argv after argv[0], what must come out)
CALLERS: dict[str, tuple[list[str], dict[str, object]]] = {
    "Debian cron": (
        ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
        {"full_name": "CronDaemon", "ignore_dots": True, "body_type": "8BITMIME", "recipients": ["root"]},
    ),
    "Debian cron, MAILTO list": (
        ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "a@example.org,b@example.org"],
        {"recipients": ["a@example.org", "b@example.org"]},
    ),
    "cronie": (
        ["-FCronDaemon", "-i", "-odi", "-oem", "-oi", "-t", "-f", "alice"],
        {
            "full_name": "CronDaemon",
            "ignore_dots": True,
            "extract": True,
            "sender": "alice",
            "recipients": [],
        },
    ),
    "anacron": (["-FAnacron", "-odi", "root"], {"full_name": "Anacron", "ignore_dots": False}),
    "atd": (["-i", "alice"], {"ignore_dots": True, "recipients": ["alice"]}),
    "systemd-cron 1.x": (["-i", "-B8BITMIME", "root"], {"body_type": "8BITMIME"}),
    "systemd-cron 2.x": (["-i", "-B", "8BITMIME", "root"], {"body_type": "8BITMIME", "recipients": ["root"]}),
    "busybox crond": (["-ti"], {"extract": True, "ignore_dots": True}),
    "bsd-mailx": (["-i", "-t"], {"extract": True, "ignore_dots": True}),
    "bsd-mailx -r": (["-i", "-t", "-f", "robot@example.org"], {"sender": "robot@example.org"}),
    "s-nail": (
        ["-i", "-F", "Bot", "-f", "bot@example.org", "--", "to@example.org", "root", "bcc@example.org"],
        {
            "full_name": "Bot",
            "sender": "bot@example.org",
            "recipients": ["to@example.org", "root", "bcc@example.org"],
        },
    ),
    "mutt": (
        [
            "-oem",
            "-oi",
            "-B8BITMIME",
            "-f",
            "me@example.org",
            "-N",
            "failure,delay",
            "-R",
            "hdrs",
            "--",
            "to@example.org",
            "cc@example.org",
        ],
        {
            "sender": "me@example.org",
            "notify": "failure,delay",
            "ret": "hdrs",
            "recipients": ["to@example.org", "cc@example.org"],
        },
    ),
    "git send-email": (
        ["-f", "dev@example.org", "-i", "list@example.org", "maint@example.org"],
        {"sender": "dev@example.org", "recipients": ["list@example.org", "maint@example.org"]},
    ),
    "PHP mail()": (["-t", "-i", "-fbounce@example.org"], {"extract": True, "sender": "bounce@example.org"}),
    "PHPMailer": (["-oi", "-fsender@example.org", "-t"], {"extract": True, "sender": "sender@example.org"}),
    "MIME::Lite": (
        ["-t", "-oi", "-oem", "-fperl@example.org"],
        {"extract": True, "sender": "perl@example.org"},
    ),
    "sudo": (["-t"], {"extract": True, "ignore_dots": False}),
    "unattended-upgrades": (["-oi", "-t"], {"extract": True, "ignore_dots": True}),
    "logwatch, mdadm": (["-t"], {"extract": True}),
    "fail2ban": (
        ["-f", "fail2ban@host.example.org", "root@localhost"],
        {"sender": "fail2ban@host.example.org", "recipients": ["root@localhost"]},
    ),
    "rkhunter": (["root", "admin@example.org"], {"recipients": ["root", "admin@example.org"]}),
    "null sender, empty": (["-f", "", "root"], {"sender": ""}),
    "null sender, brackets": (["-f", "<>", "root"], {"sender": ""}),
    "-r is -f": (["-r", "old@example.org", "root"], {"sender": "old@example.org"}),
    "-V envid": (["-V", "abc123", "root"], {"envid": "abc123"}),
    "-R full": (["-Rfull", "root"], {"ret": "full"}),
    "-N never": (["-Nnever", "root"], {"notify": "never"}),
    "-odq queues only": (["-odq", "root"], {"queue_only": True}),
    "-C config": (["-C", "/tmp/x.yaml", "root"], {"config": "/tmp/x.yaml"}),
    "options after recipients": (["root", "-i"], {"ignore_dots": True, "recipients": ["root"]}),
    "-- keeps dashes": (["--", "-odd@example.org"], {"recipients": ["-odd@example.org"]}),
    "-bm": (["-bm", "root"], {"mode": "deliver"}),
    "-q runs the queue": (["-q"], {"mode": "flush"}),
    "-q30m runs it now": (["-q30m"], {"mode": "flush", "queue_limits": []}),
    "-qR limits it": (["-qRx.org"], {"mode": "flush", "queue_limits": [("--recipient", "x.org")]}),
    "-bp": (["-bp"], {"mode": "list"}),
    "-bi": (["-bi"], {"mode": "newaliases"}),
    "-I": (["-I"], {"mode": "newaliases"}),
    "Name <addr> on argv": (["John Doe <jd@example.org>"], {"recipients": ["jd@example.org"]}),
    "-f with a name": (["-f", "Robot <robot@example.org>", "root"], {"sender": "robot@example.org"}),
}


@pytest.mark.parametrize("caller", CALLERS)
def test_real_callers_parse(caller: str) -> None:
    argv, expected = CALLERS[caller]
    got = fields(parse_args(argv))
    assert {key: got[key] for key in expected} == expected


IGNORED = [
    ["-m"],
    ["-n"],
    ["-U"],
    ["-G"],
    ["-c"],
    ["-x"],
    ["-Am"],
    ["-Ac"],
    ["-L", "label"],
    ["-Lsendmail"],
    ["-X", "/tmp/log"],
    ["-h", "10"],
    ["-O", "DeliveryMode=b"],
    ["-p", "smtp"],
    ["-eq"],
    ["-oee"],
    ["-oep"],
    ["-oeq"],
    ["-oew"],
    ["-odb"],
    ["-odi"],
    ["-odf"],
    ["-om"],
    ["-o7"],
    ["-o8"],
    ["-oA/etc/aliases"],
    ["-oL9"],
    ["-v"],
]


@pytest.mark.parametrize("flags", IGNORED, ids=" ".join)
def test_accepted_and_ignored_flags_change_nothing_that_matters(flags: list[str]) -> None:
    plain = fields(parse_args(["root"]))
    with_flag = fields(parse_args([*flags, "root"]))
    for key in ("recipients", "sender", "extract", "ignore_dots", "mode"):
        assert with_flag[key] == plain[key]


def test_ignored_flags_are_explained_under_verbose() -> None:
    invocation = parse_args(["-v", "-oQ/var/spool", "-m", "root"])
    assert invocation.verbose
    assert any("-oQ/var/spool" in note and "ignored" in note for note in invocation.notes)
    assert any(note.startswith("-m:") for note in invocation.notes)


@pytest.mark.parametrize(
    ("argv", "code", "words"),
    [
        (["-k", "root"], EX_USAGE, "-k: unknown flag"),
        (["-tk"], EX_USAGE, "-k: unknown flag"),
        (["-f"], EX_USAGE, "-f: needs a value"),
        (["-B", "9BIT", "root"], EX_USAGE, "-B '9BIT'"),
        (["-N", "sometimes", "root"], EX_USAGE, "-N 'sometimes'"),
        (["-R", "all", "root"], EX_USAGE, "-R 'all'"),
        (["-V", "has space", "root"], EX_USAGE, "-V"),
        (["-bd"], EX_USAGE, "never runs as a daemon"),
        (["-bz"], EX_USAGE, "-bz: unknown mode"),
        (["-F", "Evil\r\nBcc: victim@example.org", "root"], EX_USAGE, "line break"),
        (["-f", "a@example.org\r\nBcc: victim@example.org", "root"], EX_NOUSER, ""),
        (["root\nBcc: victim@example.org"], EX_NOUSER, ""),
    ],
)
def test_bad_command_lines_are_clear_errors(argv: list[str], code: int, words: str) -> None:
    with pytest.raises(PymtaError) as caught:
        parse_args(argv)
    assert caught.value.exit_code == code
    assert words in str(caught.value)
    assert "\n" not in str(caught.value)


def test_dash_bs_is_the_smtp_mode() -> None:
    assert parse_args(["-bs", "-i"]).mode == "smtp"


BOOLEAN = sorted(
    letter for letter, (takes_value, _) in FLAGS.items() if not takes_value and letter not in "qI"
)
VALUES = {"f": "a@example.org", "F": "Some Name", "B": "8BITMIME", "N": "failure", "R": "hdrs", "V": "id1"}


@given(
    st.lists(st.sampled_from(BOOLEAN), max_size=4),
    st.dictionaries(st.sampled_from(sorted(VALUES)), st.booleans(), max_size=4),
)
def test_grouped_glued_and_separate_forms_mean_the_same(booleans: list[str], values: dict[str, bool]) -> None:
    separate = [f"-{letter}" for letter in booleans]
    combined = [f"-{''.join(booleans)}"] if booleans else []
    for letter, glued in values.items():
        if glued:
            separate += [f"-{letter}{VALUES[letter]}"]
            combined += [f"-{letter}", VALUES[letter]]
        else:
            separate += [f"-{letter}", VALUES[letter]]
            combined += [f"-{letter}{VALUES[letter]}"]
    assert fields(parse_args([*separate, "root"])) == fields(parse_args([*combined, "root"]))


@given(st.lists(st.text(max_size=12), max_size=6))
def test_any_command_line_parses_or_fails_with_a_sysexits_error(argv: list[str]) -> None:
    try:
        parse_args(argv)
    except PymtaError as exc:
        assert exc.exit_code in (EX_USAGE, EX_NOUSER, EX_UNAVAILABLE)
        assert "\n" not in str(exc)
