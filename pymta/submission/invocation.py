"""What sendmail's command line asks for: the flag table, `parse_args` and the `Invocation` record.

The flags are one table, `FLAGS`, read like getopt(3) on Linux: boolean flags group (`-ti`), a flag that
takes a value takes the rest of its word or else the next word (`-fX`, `-f X`), options may follow
recipients, and `--` ends them. What each flag means, and why the ignored ones are ignored, is in the table.
It is on sendmail's start-up path (ARCHITECTURE.md, invariant 5): it imports nothing heavy.
"""

from pymta.errors import UsageError
from pymta.mail.address import parse_envelope_address, recipients_from_args

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


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
        "queue_limits",
        "warnings",
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
        self.queue_limits: list[tuple[str, str]] = []  # -qR...: (`pymta flush` option, substring)
        self.warnings: list[str] = []  # said on stderr even without -v


def _ignored(reason: str) -> "Callable[[Invocation, str | None], None]":
    def note(invocation: Invocation, value: str | None) -> None:
        invocation.notes.append(reason)

    return note


def _set_sender(invocation: Invocation, value: str | None) -> None:
    invocation.sender = parse_envelope_address(value or "")


def _set_full_name(invocation: Invocation, value: str | None) -> None:
    name = value or ""
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        raise UsageError("-F: the full name contains a line break or control character; give a plain name")
    invocation.full_name = name


def _choice(field: str, flag: str, allowed: tuple[str, ...]) -> "Callable[[Invocation, str | None], None]":
    def store(invocation: Invocation, value: str | None) -> None:
        normal = (value or "").strip().upper() if flag == "-B" else (value or "").strip().lower()
        if normal not in allowed:
            raise UsageError(f"{flag} {value!r}: takes {' or '.join(allowed)}")
        setattr(invocation, field, normal)

    return store


def _set_notify(invocation: Invocation, value: str | None) -> None:
    from pymta.queue.pickup import is_notify  # lazy: the pick-up's checks, for -N only

    notify = ",".join(word.strip().lower() for word in (value or "").split(","))
    if not is_notify(notify):
        raise UsageError(
            f"-N {value!r}: takes 'never' or a list of success, failure, delay (e.g. -N failure,delay)"
        )
    invocation.notify = notify


def _set_envid(invocation: Invocation, value: str | None) -> None:
    from pymta.queue.pickup import is_envid  # lazy: the pick-up's checks, for -V only

    envid = value or ""
    if not is_envid(envid):
        raise UsageError("-V: the envelope id must be 1 to 100 printable ASCII characters without spaces")
    invocation.envid = envid


def _set_config(invocation: Invocation, value: str | None) -> None:
    invocation.config = value


def _set(field: str, value: object) -> "Callable[[Invocation, str | None], None]":
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
    """-q and its forms (sendmail(8), Postfix's sendmail(1)): each runs the queue now, in the foreground."""
    text = value or ""
    invocation.mode = "flush"
    if text in ("", "f"):  # -qf: sendmail's "do not fork"; a pymta queue run never forks off
        return
    if text[0] in QUEUE_LIMITS:
        if len(text) == 1:
            raise UsageError(f"-q{text}: needs a value glued to it (e.g. -q{text}example.org)")
        invocation.queue_limits.append((QUEUE_LIMITS[text[0]], text[1:]))
        return
    if text[0] == "!" and text[1:2] in QUEUE_LIMITS:
        raise UsageError(f"-q!{text[1]}: negated limits are not supported; run 'pymta flush' without it")
    if text[0] in "QL":
        raise UsageError(f"-q{text}: pymta has no quarantine; see 'pymta queue hold'")
    if text[0] == "G":
        invocation.notes.append(f"-q{text}: there are no queue groups; the whole queue runs")
        return
    interval = text[1:] if text[0] == "p" else text
    if _is_interval(interval):  # -q30m, -q1h30m, -qp (persistent), -qp15m
        invocation.warnings.append(
            f"-q{text}: the interval is ignored; pymta needs no daemon (a timer or 'deliver: immediate'"
            " runs 'pymta flush'), so the queue runs once now"
        )
        return
    raise UsageError(
        f"-q{text}: unknown queue run; pymta knows -q, -qf, -q<interval>, -qI<id>, -qR<recipient>,"
        " -qS<sender>"
    )


def _is_interval(text: str) -> bool:
    """sendmail's time form: numbers each followed by s, m, h, d or w (`1h30m`); a bare number is minutes.
    Empty (`-qp` alone) counts: the daemon's own default interval."""
    number = False
    for char in text:
        if char.isdigit():
            number = True
        elif char in "smhdw" and number:
            number = False
        else:
            return False
    return True


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
FLAGS: dict[str, tuple[bool, "Callable[[Invocation, str | None], None]"]] = {
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

# -q<x><substring>: the letter -> the `pymta flush` option that limits the run the same way.
QUEUE_LIMITS = {"I": "--id", "R": "--recipient", "S": "--sender"}

# -o<x>: prefix -> handler of the rest. Checked in order; anything else is ignored with a note.
OPTIONS: tuple[tuple[str, "Callable[[Invocation, str | None], None]"], ...] = (
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
    if words and invocation.mode == "flush":
        raise UsageError(
            f"-q: a queue run takes no recipients ({words[0]!r}); a limit is glued to its letter:"
            f" -qR{words[0]}"
        )
    if words:
        invocation.recipients = recipients_from_args(words)
    return invocation
