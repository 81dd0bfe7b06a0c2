"""The sendmail(8), mailq(1) and newaliases(1) front door: argv, exit codes, and what each mode runs.

Every program on the machine that sends mail runs this, once per message (cron, mail, git, PHP, sudo...), so
it does as little as it can: parse the flags (`pymta.submission.invocation`), read the message, commit it to
the spool (`pymta.submission.submit`) and exit with a sysexits code. It never touches the network
(ARCHITECTURE.md, invariant 5) and imports nothing heavy: no email, json, re, typing, yaml or click (a test
checks the module list of a real run); what only another mode needs (-bp, -bs, -q, newaliases) is imported
when that mode runs. Nor does it import os (`pymta.queue.commit` says why), and a plain enqueue ends the
process with `posix._exit` once its output is flushed (`_end`): there is nothing to clean up that the
kernel does not, and the interpreter's own teardown would cost more than a millisecond per message.
"""

import posix
import sys

from pymta import __version__, errors
from pymta.errors import PymtaError
from pymta.submission.invocation import Invocation, parse_args
from pymta.submission.submit import read_message, read_settings, refusal_of, say, submit

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

PROGRAM = "sendmail"
# Whether the run may end with `_end` (posix._exit): set for what runs nothing but pymta's own code, with
# nothing of its own to flush at exit (--version, --help, a plain enqueue); not for -q, -bs, -bp or
# newaliases, which run more of pymta (logging, the flush) and end as Python ends.
QUICK_EXIT = False

USAGE = {
    "sendmail": """\
usage: sendmail [flags] [--] recipient...
Queue the message on standard input for the recipients and exit; 'pymta flush' delivers it.
  -t            also send to the To, Cc and Bcc of the message (Bcc is then removed)
  -i, -oi       a line with a single dot does not end the message
  -f ADDR       envelope sender (-f '' or -f '<>' for the null sender); -r is the same
  -F NAME       the sender's full name, for a From header that is missing
  -N DSN        when to report: never, or a list of failure, delay, success
  -R hdrs|full  what a bounce returns of the message;  -V ENVID  the envelope id for reports
  -B 7BIT|8BITMIME  body type
  -C FILE       the config file (else $PYMTA_CONFIG, /etc/pymta/pymta.yaml, ~/.config/pymta/pymta.yaml)
  -odq, -odd    only queue: start no delivery run now, even with 'deliver: immediate'
  -v            say what was queued, and which flags were ignored
  -bm           queue the message (the default);  -bp  list the queue (as mailq)
  -bs           speak SMTP on standard input and output;  -bi  check the aliases (as newaliases)
  -q            deliver everything waiting now (as 'pymta flush --now'); -qf is the same, and an
                interval (-q30m) is ignored: pymta needs no daemon
  -qIID, -qRRCPT, -qSSENDER  only the messages whose queue id, waiting recipient or sender
                contains that text (as 'pymta flush --id/--recipient/--sender')
Other sendmail flags (-oem, -odi, -m, -U, ...) are accepted and ignored. It exits 0 once
the message is safely queued, else with a sysexits(3) code: 64 usage, 65 bad message, 73 cannot
write the spool, 75 try again later, 78 broken config. See sendmail(8) and pymta(1).
""",
    "mailq": """\
usage: mailq [-C FILE] [-v]
List the messages waiting in the queue: id, age, size, state, sender, recipients and the last
error. 'pymta queue' shows more, manages the queue and has --json. See pymta(1).
""",
    "newaliases": """\
usage: newaliases [-C FILE] [-v]
Check the aliases file (/etc/aliases, or 'aliases:' in the config) and report each problem with
its line number. There is no database to rebuild: the flush reads the file as it is. Exit 0 when
nothing would be ignored, 65 otherwise. See sendmail(8).
""",
}


def _run(argv: list[str]) -> int:
    global PROGRAM, QUICK_EXIT  # messages name the program as it was called: sendmail, mailq or newaliases
    name = argv[0].rpartition("/")[2] if argv else "sendmail"
    PROGRAM = name if name in ("mailq", "newaliases") else "sendmail"
    if "--help" in argv[1:2] or "--version" in argv[1:2]:  # GNU long options, first word only
        QUICK_EXIT = True
        text = USAGE[PROGRAM] if argv[1] == "--help" else f"{PROGRAM} (pymta) {__version__}\n"
        sys.stdout.write(text)
        return errors.EX_OK
    if name == "mailq":
        invocation = parse_args(argv[1:])
        invocation.mode = "list"
    elif name == "newaliases":
        invocation = parse_args(argv[1:])
        invocation.mode = "newaliases"
    else:
        invocation = parse_args(argv[1:])
    if invocation.mode == "list":
        from pymta.queue.listing import print_queue  # lazy: the listing, for mailq only

        settings = read_settings(invocation.config)
        for warning in settings.warnings:
            _say(warning)
        if posix.geteuid() == 0:  # root lists a system spool as its owner (pymta(1), PRIVILEGES)
            from pymta.delivery.privsep import become_spool_owner  # lazy: root's mailq only

            become_spool_owner(settings.spool)
        return print_queue(settings.spool)
    if invocation.mode == "flush":  # -q: try everything waiting now, as `pymta flush --now`
        from pymta.cli.entry import main as pymta_main  # lazy: the flush, for -q only

        for line in invocation.warnings:
            _say(line)
        if invocation.verbose:
            for note in invocation.notes:
                _say(note)
        config = ["-C", invocation.config] if invocation.config else []
        limits = [f"{option}={value}" for option, value in invocation.queue_limits]
        verbose = ["--verbose"] if invocation.verbose else []
        import signal  # the flush loads enum anyway

        # The flush runs here: a smarthost that hangs up must be EPIPE (deferred, the run finished), as
        # under Python's own SIGPIPE setting, not the end of the process by the signal `main` set.
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        return pymta_main(["flush", "--now", *verbose, *limits, *config])
    if invocation.mode == "newaliases":
        return _newaliases(invocation)
    if invocation.mode == "smtp":  # -bs: each message of the session is queued by submit(), as here
        from pymta.submission.smtpd import serve_stdio  # lazy: the SMTP dialogue, for -bs only

        return serve_stdio(invocation, submit, refusal_of)
    QUICK_EXIT = True
    if invocation.verbose:
        for note in invocation.notes:
            _say(note)
    settings = read_settings(invocation.config)
    data, rest = read_message(
        stop_at_dot=not invocation.ignore_dots and posix.isatty(0), limit=settings.max_size
    )
    queue_id, recipients = submit(invocation, data, settings, rest)
    if invocation.verbose:
        _say(f"queued as {queue_id} for {', '.join(recipients)}")
    return errors.EX_OK


def _say(line: str) -> None:
    """One line on stderr, named for the program as it was called."""
    say(line, PROGRAM)


def _newaliases(invocation: Invocation) -> int:
    """newaliases(1): there is no database to rebuild (the flush reads the aliases file as it is), so check
    the file and report each problem with its line number. Exit 0 when it has no errors (warnings, such as
    an alias loop, are printed too), EX_DATAERR when something in it would be ignored."""
    import os  # newaliases only: sendmail's path does without os

    from pymta.config import expansion  # lazy: newaliases only
    from pymta.config.load import load  # lazy: the YAML parser, for newaliases only
    from pymta.config.routing import local_domains  # lazy: newaliases only

    settings = load(invocation.config)
    path = settings.aliases
    problems = expansion.validate(path, local_domains=local_domains(settings))
    for problem in problems:
        _say(f"{path}: {problem.severity}: {problem}")  # an include's problem names its file itself
    if not os.path.exists(path):
        _say(f"there is no aliases file at {path}; nothing to check (set 'aliases:' in the config)")
    elif invocation.verbose or not problems:
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        _say(f"{path}: {count}; there is no database to rebuild: the flush reads this file as it is")
    has_errors = any(problem.severity == "error" for problem in problems)
    return errors.EX_DATAERR if has_errors else errors.EX_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sendmail` console script (and of `mailq`, `newaliases` by argv[0])."""
    import _signal  # type: ignore[import-not-found]  # the C module: `signal` would import enum

    # Python ignores SIGPIPE; sendmail(8) dies of it like any C program, and must not queue when it does.
    _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
    program = argv is None  # run as a program, not called by Python code that goes on afterwards
    argv = sys.argv if argv is None else argv
    try:
        code = _run(argv)
    except PymtaError as exc:
        _say(str(exc))
        code = exc.exit_code
    except KeyboardInterrupt:
        _say("interrupted; nothing was queued")
        code = errors.EX_TEMPFAIL
    except MemoryError:
        _say("out of memory while reading the message; nothing was queued")
        code = errors.EX_TEMPFAIL
    if program and QUICK_EXIT:
        _end(code)
    return code


def _end(code: int) -> "NoReturn":
    """Exit now with `code`, once what is buffered for stdout and stderr is written, skipping the
    interpreter's teardown (the module docstring): the message is durable already, no file is open for
    writing, and no atexit handler of pymta's is registered on these paths."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            code = code or 120  # what Python's own exit gives when it cannot flush stdout
    posix._exit(code)


def mailq() -> int:
    """Entry point of the `mailq` console script: the same as `sendmail -bp`."""
    return main(["mailq", *sys.argv[1:]])


def newaliases() -> int:
    """Entry point of the `newaliases` console script."""
    return main(["newaliases", *sys.argv[1:]])
