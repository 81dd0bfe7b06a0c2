"""The sendmail(8), mailq(1) and newaliases(1) front door: flags, standard input, exit codes.

Every program on the machine that sends mail runs this, once per message (cron, mail, git, PHP, sudo...), so
it does as little as it can: parse the flags, read the message, prepare it, commit it to the spool and exit
with a sysexits code. It never touches the network (DESIGN.md invariant 5) and imports nothing heavy: no
email, json, re, typing, yaml or click (a test checks the module list of a real run).

The flags are one table, `FLAGS`, read like getopt(3) on Linux: boolean flags group (`-ti`), a flag that
takes a value takes the rest of its word or else the next word (`-fX`, `-f X`), options may follow
recipients, and `--` ends them. What each flag means, and why the ignored ones are ignored, is in the table.
"""

from __future__ import annotations

import os
import sys

from pymta import errors
from pymta.errors import MessageError, PymtaError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from pymta.queue.views import QuotaHold

PROGRAM = "sendmail"

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
  -q            deliver everything waiting now (as 'pymta flush --now')
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


class Invocation:
    """Everything the command line asked for."""

    __slots__ = (
        "mode",
        "extract",
        "ignore_dots",
        "verbose",
        "sender",
        "full_name",
        "body_type",
        "notify",
        "ret",
        "envid",
        "config",
        "queue_only",
        "recipients",
        "notes",
    )

    def __init__(self) -> None:
        self.mode = "deliver"
        self.extract = False
        self.ignore_dots = False
        self.verbose = False
        self.sender: str | None = None
        self.full_name: str | None = None
        self.body_type: str | None = None
        self.notify: str | None = None
        self.ret: str | None = None
        self.envid: str | None = None
        self.config: str | None = None
        self.queue_only = False
        self.recipients: list[str] = []
        self.notes: list[str] = []  # what was accepted and ignored, said under -v


def _ignored(reason: str) -> Callable[[Invocation, str | None], None]:
    def note(invocation: Invocation, value: str | None) -> None:
        invocation.notes.append(reason)

    return note


def _set_sender(invocation: Invocation, value: str | None) -> None:
    from pymta.mail.address import parse_envelope_address

    invocation.sender = parse_envelope_address(value or "")


def _set_full_name(invocation: Invocation, value: str | None) -> None:
    name = value or ""
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        raise UsageError("-F: the full name contains a line break or control character; give a plain name")
    invocation.full_name = name


def _choice(field: str, flag: str, allowed: tuple[str, ...]) -> Callable[[Invocation, str | None], None]:
    def store(invocation: Invocation, value: str | None) -> None:
        normal = (value or "").strip().upper() if flag == "-B" else (value or "").strip().lower()
        if normal not in allowed:
            raise UsageError(f"{flag} {value!r}: takes {' or '.join(allowed)}")
        setattr(invocation, field, normal)

    return store


def _set_notify(invocation: Invocation, value: str | None) -> None:
    from pymta.queue.spool import is_notify

    notify = ",".join(word.strip().lower() for word in (value or "").split(","))
    if not is_notify(notify):
        raise UsageError(
            f"-N {value!r}: takes 'never' or a list of success, failure, delay (e.g. -N failure,delay)"
        )
    invocation.notify = notify


def _set_envid(invocation: Invocation, value: str | None) -> None:
    from pymta.queue.spool import is_envid

    envid = value or ""
    if not is_envid(envid):
        raise UsageError("-V: the envelope id must be 1 to 100 printable ASCII characters without spaces")
    invocation.envid = envid


def _set_config(invocation: Invocation, value: str | None) -> None:
    invocation.config = value


def _set(field: str, value: object) -> Callable[[Invocation, str | None], None]:
    def store(invocation: Invocation, _: str | None) -> None:
        setattr(invocation, field, value)

    return store


def _mode(invocation: Invocation, value: str | None) -> None:
    entry = MODES.get(value or "")
    if entry is None:
        raise UsageError(
            f"-b{value}: unknown mode; pymta's sendmail knows -bm (send), -bp (list the queue), -bi"
        )
    mode, message = entry
    if message:
        raise UsageError(message)
    invocation.mode = mode


def _queue_run(invocation: Invocation, value: str | None) -> None:
    if value:  # -q30m and friends start a daemon's periodic run: Postfix ignores them too
        invocation.notes.append(
            f"-q{value}: ignored; pymta's timer (pymta-flush.timer) decides when to retry"
        )
        return
    invocation.mode = "flush"


def _option(invocation: Invocation, value: str | None) -> None:
    text = value or ""
    for prefix, handler in OPTIONS:
        if text.startswith(prefix):
            handler(invocation, text[len(prefix) :])
            return
    invocation.notes.append(f"-o{text}: unknown option, ignored as sendmail does")


def _error_mode(invocation: Invocation, value: str | None) -> None:
    if value not in ("m", "e", "p", "q", "w"):
        invocation.notes.append(f"-oe{value}: unknown error mode, ignored")
    else:
        invocation.notes.append(
            f"-oe{value}: accepted; errors are reported on stderr with a sysexits code, and failed deliveries"
            " are bounced to the sender"
        )


def _delivery_mode(invocation: Invocation, value: str | None) -> None:
    if value in ("q", "d"):
        invocation.queue_only = True
        invocation.notes.append(f"-od{value}: queue only; the timer delivers")
    else:
        invocation.notes.append(f"-od{value}: accepted; sendmail always queues and never waits for delivery")


# flag letter -> (takes a value, handler). Letters not listed are usage errors.
FLAGS: dict[str, tuple[bool, Callable[[Invocation, str | None], None]]] = {
    "t": (False, _set("extract", True)),
    "i": (False, _set("ignore_dots", True)),
    "v": (False, _set("verbose", True)),
    "f": (True, _set_sender),
    "r": (True, _set_sender),  # the obsolete form of -f
    "F": (True, _set_full_name),
    "B": (True, _choice("body_type", "-B", ("7BIT", "8BITMIME"))),
    "N": (True, _set_notify),
    "R": (True, _choice("ret", "-R", ("hdrs", "full"))),
    "V": (True, _set_envid),
    "C": (True, _set_config),
    "b": (True, _mode),
    "o": (True, _option),
    "q": (False, _queue_run),  # takes only a glued value (-q30m), handled in parse_args
    "I": (False, _set("mode", "newaliases")),
    "m": (False, _ignored("-m: ignored; the sender always gets a copy when listed as a recipient")),
    "n": (False, _ignored("-n: ignored; aliases are applied at delivery")),
    "U": (False, _ignored("-U: ignored; every submission is an initial user submission")),
    "G": (False, _ignored("-G: ignored; pymta does not relay for others")),
    "c": (False, _ignored("-c: ignored (sendmail's 'hold expensive connections')")),
    "x": (False, _ignored("-x: ignored")),
    "A": (True, _ignored("-A: ignored; the same rules apply to every submission")),
    "L": (True, _ignored("-L: ignored; pymta logs to syslog as 'pymta'")),
    "X": (True, _ignored("-X: ignored; see pymta's own log lines")),
    "h": (True, _ignored("-h: ignored; hop counts are not used")),
    "O": (True, _ignored("-O: ignored; long options are not used")),
    "p": (True, _ignored("-p: ignored; the protocol is always local submission")),
    "e": (True, _error_mode),  # Exim's -e<x> is -oe<x>
}

# -o<x>: prefix -> handler of the rest. Checked in order; anything else is ignored with a note.
OPTIONS: tuple[tuple[str, Callable[[Invocation, str | None], None]], ...] = (
    ("i", _set("ignore_dots", True)),
    ("e", _error_mode),
    ("d", _delivery_mode),
    ("m", _ignored("-om: ignored; the sender always gets a copy when listed as a recipient")),
    ("A", _ignored("-oA: ignored; aliases are read at delivery")),
)

# -b<x>: letter -> (mode, refusal). A refusal is a message and makes the run fail.
MODES: dict[str, tuple[str, str]] = {
    "m": ("deliver", ""),
    "p": ("list", ""),
    "i": ("newaliases", ""),
    "s": ("smtp", ""),  # SMTP on stdin/stdout (Symfony Mailer, SwiftMailer, Laravel): pymta.submission.smtpd
    "d": ("refused", "-bd: pymta never runs as a daemon; a timer runs 'pymta flush'"),
    "l": ("refused", "-bl: pymta never runs as a daemon; a timer runs 'pymta flush'"),
    "v": ("refused", "-bv: address verification is not supported"),
    "t": ("refused", "-bt: address test mode is not supported"),
    "h": ("refused", "-bh: there is no host status database"),
    "H": ("refused", "-bH: there is no host status database"),
    "D": ("refused", "-bD: pymta never runs as a daemon"),
    "P": ("refused", "-bP: there are no queue groups"),
}


def parse_args(args: list[str]) -> Invocation:
    """Parse sendmail's command line (without argv[0]) into an Invocation. Raises UsageError."""
    invocation = Invocation()
    words: list[str] = []
    position = 0
    while position < len(args):
        word = args[position]
        position += 1
        if word == "--":
            words.extend(args[position:])
            break
        if not word.startswith("-") or word == "-":
            words.append(word)
            continue
        if word.startswith("--"):
            raise UsageError(
                f"{word}: unknown option; sendmail's flags are single letters (see 'sendmail --help')"
            )
        letters = word[1:]
        while letters:
            letter, letters = letters[0], letters[1:]
            entry = FLAGS.get(letter)
            if entry is None:
                raise UsageError(
                    f"-{letter}: unknown flag (in {word!r}); 'sendmail --help' lists the flags pymta knows"
                )
            takes_value, handler = entry
            if letter == "q":
                handler(invocation, letters)
                break
            if not takes_value:
                handler(invocation, None)
                continue
            if not letters:
                if position >= len(args):
                    raise UsageError(f"-{letter}: needs a value")
                letters = args[position]
                position += 1
            handler(invocation, letters)
            break
    if words:
        from pymta.mail.address import recipients_from_args

        invocation.recipients = recipients_from_args(words)
    return invocation


def read_stdin(stop_at_dot: bool, limit: int | None = None) -> bytes:
    """The whole of standard input as bytes; with `stop_at_dot`, up to a line holding only '.'.

    DESIGN.md, "Lone dot": reading ends at EOF, except at a terminal without -i/-oi, where a line with only
    '.' ends the message as sendmail(8) always did. With a `limit`, reading stops once more than `limit`
    bytes have come (at most `limit + 1` are kept): the caller refuses the message as too large.
    """
    room = -1 if limit is None else limit + 1  # bytes still wanted; -1: no limit
    if stop_at_dot:
        lines = []
        with os.fdopen(os.dup(0), "rb", buffering=0) as terminal:
            while room:
                line = terminal.readline(room)
                if not line or line.rstrip(b"\r\n") == b".":
                    break
                lines.append(line)
                room = max(room - len(line), 0) if room > 0 else room
        return b"".join(lines)
    chunks = []
    try:
        while room:
            chunk = os.read(0, 1 << 20 if room < 0 else min(room, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            room = room - len(chunk) if room > 0 else room
    except OSError as exc:
        raise errors.NoInputError(
            f"cannot read the message from standard input: {exc.strerror}; pipe the message into sendmail"
        ) from None
    return b"".join(chunks)


class Settings:
    """What sendmail reads from the config (without YAML where possible), and what is wrong with it."""

    __slots__ = ("spool", "default_spool", "deliver", "max_size", "sender_policy", "max_queued", "warnings")

    def __init__(
        self,
        spool: str,
        default_spool: bool,
        deliver: str | None,
        max_size: int,
        sender_policy: str | None,
        warnings: list[str],
        max_queued: int | None = None,
    ) -> None:
        self.spool = spool
        self.default_spool = default_spool  # the default user spool: its parents may be created
        self.deliver = deliver
        self.max_size = max_size  # max_message_size in bytes
        self.sender_policy = sender_policy
        self.max_queued = max_queued  # max_queued_per_user; None: no limit
        self.warnings = warnings  # one line each: what is wrong with the config; mail is queued all the same


_SETTING_KEYS = frozenset(("spool", "deliver", "max_message_size", "sender_policy", "max_queued_per_user"))


def read_settings(config_file: str | None) -> Settings:
    """The spool, the delivery mode, the size limit and the sender policy, and warnings when the config is
    broken: read without YAML where possible. A broken config never stops a submission."""
    from pymta.config import paths as quickconfig

    warnings: list[str] = []
    values: dict[str, str | None] = {}
    path = quickconfig.find_config(config_file)
    if path is not None:
        try:
            values = quickconfig.read_scalars(path, _SETTING_KEYS)
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            warnings.append(f"cannot read the config {path} ({reason}); fix it and run 'pymta config check'")
            if isinstance(exc, quickconfig.BrokenConfigError):
                values = exc.salvaged
    max_size = quickconfig.DEFAULT_MAX_MESSAGE_SIZE
    size_text = values.get("max_message_size")
    if size_text:
        try:
            max_size = quickconfig.parse_size(size_text)
        except ValueError:
            max_size = 0
        if max_size <= 0:
            max_size = quickconfig.DEFAULT_MAX_MESSAGE_SIZE
            warnings.append(
                f"max_message_size: {size_text!r} is not a size, so {max_size} bytes applies; "
                "fix it and run 'pymta config check'"
            )
    max_queued: int | None = quickconfig.DEFAULT_MAX_QUEUED_PER_USER
    queued_text = values.get("max_queued_per_user")
    if queued_text:
        try:
            max_queued = quickconfig.parse_queue_limit(queued_text)
        except ValueError:
            warnings.append(
                f"max_queued_per_user: {queued_text!r} is not a number of messages, so {max_queued} "
                "applies; fix it and run 'pymta config check'"
            )
    spool = values.get("spool")
    if spool and not os.path.isabs(spool):
        warnings.append(
            f"{path}: spool: {spool!r} is not an absolute path, so the message goes to the default spool; "
            "fix it and run 'pymta config check'"
        )
        spool = None
    default = not spool
    return Settings(
        spool or quickconfig.default_spool(),
        default,
        values.get("deliver"),
        max_size,
        values.get("sender_policy"),
        warnings,
        max_queued,
    )


def _check_sender(invocation: Invocation, login: str, sender: str) -> None:
    """Under `sender_policy: strict`, refuse (EX_NOPERM) a sender that `login` may not set.

    The rare path (-f with another address than the login name, and a strict policy): only here is the whole
    config loaded, so the decision is the one the pick-up takes (`pymta.config.identity`). A config that
    cannot be
    loaded decides nothing here: the message is queued and the pick-up, which needs the config, judges it.
    """
    from pymta.config import load as config
    from pymta.config.identity import REFUSE, policy_of

    try:
        settings = config.load(invocation.config)
    except PymtaError:
        return
    policy = policy_of(settings)
    if policy.strict and policy.judge(login, sender) == REFUSE:
        raise errors.PermissionDeniedError(
            f"{policy.refusal(login, sender)}; ask the admin to add {login} to trusted_users, or send "
            "without -f; nothing was queued"
        )


def submit(invocation: Invocation, data: bytes, settings: Settings | None = None) -> tuple[str, list[str]]:
    """Prepare the message read from stdin and commit it to the spool; return its queue id and recipients.

    `settings` are what `read_settings` read from the config (read here when not given, as for -bs).
    """
    import time

    from pymta.mail.address import unique_addresses
    from pymta.mail.message import prepare_submission
    from pymta.queue.spool import SUBMIT_MIN_FREE, Spool, real_user

    settings = settings or read_settings(invocation.config)
    if len(data) > settings.max_size:  # read_stdin stopped just past the limit
        raise _too_large(settings)
    unreadable: list[str] = []  # -t: header addresses that cannot be read; the others still get the mail
    message, header_recipients = prepare_submission(
        data, extract_recipients=invocation.extract, unreadable=unreadable
    )
    if len(message) > settings.max_size:  # counted as stored and sent: lines end in CRLF
        raise _too_large(settings)
    # -t plus argv recipients: the union (Postfix, nullmailer), each address once
    recipients = unique_addresses([*invocation.recipients, *header_recipients])
    if unreadable and not recipients:
        raise MessageError(unreadable[0])
    if not recipients:
        where = "in the To, Cc or Bcc headers" if invocation.extract else "on the command line (or use -t)"
        raise UsageError(f"no recipients: give at least one address {where}")
    login, gecos, uid = real_user()
    sender = login if invocation.sender is None else invocation.sender
    # Only a sender other than the login name, under a strict policy, needs the rest of the config.
    if sender != login and settings.sender_policy == "strict":
        _check_sender(invocation, login, sender)
    envelope: dict[str, object] = {
        "sender": sender,
        "recipients": recipients,
        "submitted_by": login,
        "uid": uid,
        "full_name": gecos if invocation.full_name is None else invocation.full_name,
        "queued_at": time.time(),
        "notify": invocation.notify,
        "ret": invocation.ret,
        "envid": invocation.envid,
        "body_type": invocation.body_type,
    }
    spool = Spool(settings.spool)
    quota = _check_queue_limit(settings, uid)  # holds the user's drop ledger until released
    try:
        # The default user spool may be the first thing under ~/.local/state on a fresh machine.
        queue_id = spool.submit(
            envelope, message, create_parents=settings.default_spool, reserve=SUBMIT_MIN_FREE
        )
        quota.record(queue_id, time.time())
    except PymtaError:
        for warning in settings.warnings:
            _say(warning)
        raise
    finally:
        quota.release()
    for warning in settings.warnings:  # one line: what is wrong, and that the mail is safe all the same
        _say(f"{warning.rstrip('.')}; the message was queued all the same, as {queue_id} in {settings.spool}")
    for problem in unreadable:  # a logwatch report with one typo in To: still reaches the others
        _say(f"{problem}; that address was left out, the message queued for the others as {queue_id}")
    # In system mode the spool's owner delivers (a systemd path unit or the timer); in user mode we start it.
    if settings.deliver != "queue" and not invocation.queue_only and spool.private:
        _start_flush(invocation)
    return queue_id, recipients


def _check_queue_limit(settings: Settings, uid: int) -> QuotaHold:
    """System mode: refuse (EX_TEMPFAIL) a user with `max_queued_per_user` messages waiting, as the last
    delivery run counted them and as the user's drops since then add up (`pymta.queue.views.hold_quota`);
    nothing is queued. Else the hold, to record the drop in and release. Costs a few stats and small reads."""
    from pymta.queue.views import hold_quota

    hold = hold_quota(settings.spool, uid, settings.max_queued, record=True)
    if hold.refusal:
        for warning in settings.warnings:
            _say(warning)
        raise errors.QueueLimitError(hold.refusal)
    return hold


def refusal_of(invocation: Invocation) -> str | None:
    """Why the running user may not queue a message now (`max_queued_per_user`), or None: for `-bs`, which
    answers MAIL FROM with it."""
    from pymta.queue.spool import real_user
    from pymta.queue.views import quota_refusal

    settings = read_settings(invocation.config)
    return quota_refusal(settings.spool, real_user()[2], settings.max_queued)


def _too_large(settings: Settings) -> PymtaError:
    for warning in settings.warnings:  # a max_message_size that could not be read says so
        _say(warning)
    return errors.MessageError(
        f"message too large: more than {settings.max_size} bytes (max_message_size); nothing was queued"
    )


def _start_flush(invocation: Invocation) -> None:
    """Start `pymta flush` detached: its own session, no stdio of the caller's, never waited for.

    The caller (cron, PHP, sudo) waits for sendmail's exit and for its stdout/stderr to close; the flush holds
    none of them, so it never delays the caller. Many flushes started at once are harmless: the spool's
    flush lock lets one deliver, and the others ask it to look again.
    """
    argv = [sys.executable, "-m", "pymta", "flush", "--background"]
    if invocation.config:
        argv += ["-C", invocation.config]
    devnull = os.devnull
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, devnull, os.O_WRONLY, 0),
    ]
    try:
        os.posix_spawn(sys.executable, argv, os.environ, file_actions=actions, setsid=True)
    except OSError as exc:
        if invocation.verbose:
            _say(f"could not start a delivery now ({exc.strerror}); the timer will deliver the message")


def _say(line: str) -> None:
    """One line on stderr; a caller that closed stderr (at, anacron) must not make us fail."""
    try:
        os.write(2, f"{PROGRAM}: {line}\n".encode("utf-8", "replace"))
    except OSError:
        pass


def _run(argv: list[str]) -> int:
    global PROGRAM  # messages name the program as it was called: sendmail, mailq or newaliases
    name = os.path.basename(argv[0]) if argv else "sendmail"
    PROGRAM = name if name in ("mailq", "newaliases") else "sendmail"
    if "--help" in argv[1:2] or "--version" in argv[1:2]:  # GNU long options, first word only
        from pymta import __version__

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
        from pymta.queue.listing import print_queue

        settings = read_settings(invocation.config)
        for warning in settings.warnings:
            _say(warning)
        if os.geteuid() == 0:  # root lists a system spool as its owner (pymta(1), PRIVILEGES)
            from pymta.delivery.privsep import become_spool_owner

            become_spool_owner(settings.spool)
        return print_queue(settings.spool)
    if invocation.mode == "flush":  # -q: try everything waiting now, as `pymta flush --now`
        from pymta.cli.main import main as pymta_main

        config = ["-C", invocation.config] if invocation.config else []
        return pymta_main(["flush", "--now", *(["--verbose"] if invocation.verbose else []), *config])
    if invocation.mode == "newaliases":
        return _newaliases(invocation)
    if invocation.mode == "smtp":  # -bs: each message of the session is queued by submit(), as here
        from pymta.submission.smtpd import serve_stdio

        return serve_stdio(invocation, submit, refusal_of)
    if invocation.verbose:
        for note in invocation.notes:
            _say(note)
    settings = read_settings(invocation.config)
    data = read_stdin(stop_at_dot=not invocation.ignore_dots and os.isatty(0), limit=settings.max_size)
    queue_id, recipients = submit(invocation, data, settings)
    if invocation.verbose:
        _say(f"queued as {queue_id} for {', '.join(recipients)}")
    return errors.EX_OK


def _newaliases(invocation: Invocation) -> int:
    """newaliases(1): there is no database to rebuild (the flush reads the aliases file as it is), so check
    the file and report each problem with its line number. Exit 0 when it has no errors (warnings, such as
    an alias loop, are printed too), EX_DATAERR when something in it would be ignored."""
    from pymta.config import aliases
    from pymta.config import load as config
    from pymta.config.routing import local_domains

    settings = config.load(invocation.config)
    path = settings.aliases
    problems = aliases.validate(path, local_domains=local_domains(settings))
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
    argv = sys.argv if argv is None else argv
    try:
        return _run(argv)
    except PymtaError as exc:
        _say(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _say("interrupted; nothing was queued")
        return errors.EX_TEMPFAIL
    except MemoryError:
        _say("out of memory while reading the message; nothing was queued")
        return errors.EX_TEMPFAIL


def mailq() -> int:
    """Entry point of the `mailq` console script: the same as `sendmail -bp`."""
    return main(["mailq", *sys.argv[1:]])


def newaliases() -> int:
    """Entry point of the `newaliases` console script."""
    return main(["newaliases", *sys.argv[1:]])
