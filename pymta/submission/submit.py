"""Submitting one message: read it from standard input, read the few settings it needs, and commit it.

`submit` is what `sendmail` and each message of `sendmail -bs` end in: prepare the message (normalise, -t,
strip Bcc), check the size limit, the sender policy and the user's queue limit, commit it to the spool
(`pymta.queue.commit`'s protocol) and, in user mode with `deliver: immediate`, start a detached flush.
It runs for every message on the machine, so it imports nothing heavy and reads the config without YAML
(`read_settings`); it never touches the network (ARCHITECTURE.md, invariant 5). Nor does it import os:
the built-in `posix` under it is loaded already (`pymta.queue.commit` says why).

A message larger than `STREAM_AFTER` is not held whole: once its header block has been read, the rest is
read block by block as it is written to the spool (`read_message`, `submit`), with the same size limit and
the same line endings, so a 30 MB message costs a few MiB of memory rather than three copies of itself.
"""

import posix
import sys
import time

from pymta import errors
from pymta.config import limits, paths
from pymta.errors import MessageError, PymtaError, UsageError
from pymta.mail.address import unique_addresses
from pymta.mail.message import LineEndings, header_read, prepare_submission
from pymta.queue.commit import SUBMIT_MIN_FREE, commit, real_user

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from pymta.queue.views import QuotaHold
    from pymta.submission.invocation import Invocation


# A message read up to this size is handled whole; past it, once its header block is read, the rest
# streams to the spool. Most mail is far smaller, and takes exactly the path it always took.
STREAM_AFTER = 1 << 20
_BLOCK = 1 << 20
_FIRST_BLOCK = 1 << 16


def read_blocks(stop_at_dot: bool, limit: int | None = None) -> "Iterator[bytes]":
    """Standard input, block by block (line by line at a terminal); with `stop_at_dot`, up to a line
    holding only '.'.

    DESIGN.md, "Lone dot": reading ends at EOF, except at a terminal without -i/-oi, where a line with only
    '.' ends the message as sendmail(8) always did. With a `limit`, reading stops once more than `limit`
    bytes have come (at most `limit + 1` are given): the caller refuses the message as too large.
    """
    room = -1 if limit is None else limit + 1  # bytes still wanted; -1: no limit
    if stop_at_dot:
        with open(posix.dup(0), "rb", buffering=0) as terminal:
            while room:
                line = terminal.readline(room)
                if not line or line.rstrip(b"\r\n") == b".":
                    break
                yield line
                room = max(room - len(line), 0) if room > 0 else room
        return
    # Reads of 64 KiB (what a pipe holds), growing to `_BLOCK` while they come back full (a file): a read
    # of n bytes allocates n first, and a mebibyte is a mapping of its own (mmap, mremap, munmap) that a
    # cron job's message never needs.
    block = _FIRST_BLOCK
    while room:
        try:
            chunk = posix.read(0, block if room < 0 else min(room, block))
        except OSError as exc:
            raise errors.NoInputError(
                f"cannot read the message from standard input: {exc.strerror}; pipe the message into sendmail"
            ) from None
        if not chunk:
            break
        yield chunk
        room = room - len(chunk) if room > 0 else room
        if len(chunk) == block:  # more is waiting than a pipe holds (a file): larger reads
            block = min(2 * block, _BLOCK)


def read_stdin(stop_at_dot: bool, limit: int | None = None) -> bytes:
    """The whole of standard input as bytes (`read_blocks`, joined)."""
    return b"".join(read_blocks(stop_at_dot, limit))


def read_message(stop_at_dot: bool, limit: int | None = None) -> "tuple[bytes, Iterator[bytes] | None]":
    """The message on standard input (`read_blocks`): whole, with None; or, once more than `STREAM_AFTER`
    bytes have come and they hold the whole header block, those whole lines and the blocks still to come
    (for `submit`, which writes them to the spool as they are read)."""
    blocks = read_blocks(stop_at_dot, limit)
    parts: list[bytes] = []
    size = 0
    checked = 0  # the size when the header block was last looked for
    for block in blocks:
        parts.append(block)
        size += len(block)
        if size >= STREAM_AFTER and size >= 2 * checked:  # look again only once it has doubled
            checked = size
            data = b"".join(parts)
            parts = [data]
            cut = header_read(data)
            if cut:
                return data[:cut], _chained(data[cut:], blocks)
    return b"".join(parts), None


def _chained(first: bytes, blocks: "Iterator[bytes]") -> "Iterator[bytes]":
    if first:
        yield first
    yield from blocks


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
    warnings: list[str] = []
    values: dict[str, str | None] = {}
    path = paths.find_config(config_file)
    if path is not None:
        values, problem = paths.read_plain(path, _SETTING_KEYS)
        if problem is not None:
            reason = getattr(problem, "strerror", None) or str(problem)
            warnings.append(f"cannot read the config {path} ({reason}); fix it and run 'pymta config check'")
    max_size = limits.DEFAULT_MAX_MESSAGE_SIZE
    size_text = values.get("max_message_size")
    if size_text:
        try:
            max_size = limits.parse_size(size_text)
        except ValueError:
            max_size = 0
        if max_size <= 0:
            max_size = limits.DEFAULT_MAX_MESSAGE_SIZE
            warnings.append(
                f"max_message_size: {size_text!r} is not a size, so {max_size} bytes applies; "
                "fix it and run 'pymta config check'"
            )
    max_queued: int | None = limits.DEFAULT_MAX_QUEUED_PER_USER
    queued_text = values.get("max_queued_per_user")
    if queued_text:
        try:
            max_queued = limits.parse_queue_limit(queued_text)
        except ValueError:
            warnings.append(
                f"max_queued_per_user: {queued_text!r} is not a number of messages, so {max_queued} "
                "applies; fix it and run 'pymta config check'"
            )
    spool = values.get("spool")
    if spool and not spool.startswith("/"):
        warnings.append(
            f"{path}: spool: {spool!r} is not an absolute path, so the message goes to the default spool; "
            "fix it and run 'pymta config check'"
        )
        spool = None
    default = not spool
    return Settings(
        spool or paths.default_spool(),
        default,
        values.get("deliver"),
        max_size,
        values.get("sender_policy"),
        warnings,
        max_queued,
    )


def _check_sender(invocation: "Invocation", login: str, sender: str) -> None:
    """Under `sender_policy: strict`, refuse (EX_NOPERM) a sender that `login` may not set.

    The rare path (-f with another address than the login name, and a strict policy): only here is the whole
    config loaded, so the decision is the one the pick-up takes (`pymta.config.identity`). A config that
    cannot be
    loaded decides nothing here: the message is queued and the pick-up, which needs the config, judges it.
    """
    from pymta.config.identity import REFUSE, policy_of  # lazy: needs the loaded config, as above
    from pymta.config.load import load  # lazy: the YAML parser, only for -f under a strict policy

    try:
        settings = load(invocation.config)
    except PymtaError:
        return
    policy = policy_of(settings)
    if policy.strict and policy.judge(login, sender) == REFUSE:
        raise errors.PermissionDeniedError(
            f"{policy.refusal(login, sender)}; ask the admin to add {login} to trusted_users, or send "
            "without -f; nothing was queued"
        )


def submit(
    invocation: "Invocation",
    data: bytes,
    settings: Settings | None = None,
    rest: "Iterator[bytes] | None" = None,
) -> tuple[str, list[str]]:
    """Prepare the message read from stdin and commit it to the spool; return its queue id and recipients.

    `settings` are what `read_settings` read from the config (read here when not given, as for -bs). With
    `rest` (`read_message`), `data` is the start of the message, whole lines holding its header block, and
    `rest` the blocks that follow: they are read, their line endings made CRLF, counted against
    max_message_size and written as the commit goes.
    """
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
    holds: list[QuotaHold] = []  # the user's drop ledger, held from the check until the id is recorded

    def check_queue_limit() -> None:
        hold = _check_queue_limit(settings, uid)
        if hold is not None:
            holds.append(hold)

    # A streamed message is checked once it is read, just before the commit makes it durable: the ledger
    # is not held while a slow writer (a cron job's output as it comes) fills the pipe.
    if rest is None:
        check_queue_limit()
    try:
        # The default user spool may be the first thing under ~/.local/state on a fresh machine.
        body = message if rest is None else _streamed(message, rest, settings, len(data), check_queue_limit)
        queue_id, private = commit(
            settings.spool, envelope, body, create_parents=settings.default_spool, reserve=SUBMIT_MIN_FREE
        )
        for hold in holds:
            hold.record(queue_id, time.time())
    except PymtaError as exc:
        if not isinstance(exc, errors.QueueLimitError) or rest is None:  # else said by _check_queue_limit
            for warning in settings.warnings:
                say(warning)
        raise
    finally:
        for hold in holds:
            hold.release()
    for warning in settings.warnings:  # one line: what is wrong, and that the mail is safe all the same
        say(f"{warning.rstrip('.')}; the message was queued all the same, as {queue_id} in {settings.spool}")
    for problem in unreadable:  # a logwatch report with one typo in To: still reaches the others
        say(f"{problem}; that address was left out, the message queued for the others as {queue_id}")
    # In system mode the spool's owner delivers (a systemd path unit or the timer); in user mode we start it.
    if settings.deliver != "queue" and not invocation.queue_only and private:
        _start_flush(invocation)
    return queue_id, recipients


def _check_queue_limit(settings: Settings, uid: int) -> "QuotaHold | None":
    """System mode: refuse (EX_TEMPFAIL) a user with `max_queued_per_user` messages waiting, as the last
    delivery run counted them and as the user's drops since then add up (`pymta.queue.views.hold_quota`);
    nothing is queued. Else the hold, to record the drop in and release (None: no limit applies, root's or
    none set). Costs a few stats and small reads."""
    # What hold_quota decides first, without importing the views: no limit for root, or with none set, or
    # in user mode (new/ is the user's own).
    if settings.max_queued is None or uid == 0:
        return None
    try:
        if posix.stat(paths.join(settings.spool, "new")).st_uid == posix.geteuid():
            return None
    except OSError:
        return None  # the commit reports what is wrong with the spool
    from pymta.queue.views import hold_quota  # lazy: the views, only for a user under a queue limit

    hold = hold_quota(settings.spool, uid, settings.max_queued, record=True)
    if hold.refusal:
        for warning in settings.warnings:
            say(warning)
        raise errors.QueueLimitError(hold.refusal)
    return hold


def refusal_of(invocation: "Invocation") -> str | None:
    """Why the running user may not queue a message now (`max_queued_per_user`), or None: for `-bs`, which
    answers MAIL FROM with it."""
    from pymta.queue.views import quota_refusal  # lazy: the views, for -bs only

    settings = read_settings(invocation.config)
    return quota_refusal(settings.spool, real_user()[2], settings.max_queued)


def _streamed(
    head: bytes, rest: "Iterator[bytes]", settings: Settings, read: int, then: "Callable[[], None]"
) -> "Iterator[bytes]":
    """The stored message: `head` as `prepare_submission` left it, then the rest with its line endings made
    CRLF. MessageError (the commit takes back what it wrote) once either the bytes read (`read` so far) or
    the bytes stored pass max_message_size, as `submit` refuses a whole message; `then` runs once all of it
    is read and checked, before the commit goes on."""
    yield head
    stored = len(head)
    endings = LineEndings()
    for block in rest:
        read += len(block)
        out = endings.feed(block)
        stored += len(out)
        if read > settings.max_size or stored > settings.max_size:
            raise _too_large_error(settings)
        yield out
    tail = endings.end()
    if stored + len(tail) > settings.max_size:
        raise _too_large_error(settings)
    then()  # the last check, once the whole message is read (`submit`: the queue limit)
    yield tail


def _too_large(settings: Settings) -> PymtaError:
    for warning in settings.warnings:  # a max_message_size that could not be read says so
        say(warning)
    return _too_large_error(settings)


def _too_large_error(settings: Settings) -> PymtaError:
    return errors.MessageError(
        f"message too large: more than {settings.max_size} bytes (max_message_size); nothing was queued"
    )


def _start_flush(invocation: "Invocation") -> None:
    """Start `pymta flush` detached: its own session, no stdio of the caller's, never waited for.

    The caller (cron, PHP, sudo) waits for sendmail's exit and for its stdout/stderr to close; the flush holds
    none of them, so it never delays the caller. Many flushes started at once are harmless: the spool's
    flush lock lets one deliver, and the others ask it to look again.
    """
    # Isolated (-I): no PYTHONPATH, user site or working directory decides which pymta the flush runs.
    argv = [sys.executable, "-I", "-m", "pymta", "flush", "--background"]
    if invocation.config:
        argv += ["-C", invocation.config]
    devnull = "/dev/null"
    actions = [
        (posix.POSIX_SPAWN_OPEN, 0, devnull, posix.O_RDONLY, 0),
        (posix.POSIX_SPAWN_OPEN, 1, devnull, posix.O_WRONLY, 0),
        (posix.POSIX_SPAWN_OPEN, 2, devnull, posix.O_WRONLY, 0),
    ]
    try:
        posix.posix_spawn(sys.executable, argv, paths.environ(), file_actions=actions, setsid=True)
    except OSError as exc:
        if invocation.verbose:
            say(f"could not start a delivery now ({exc.strerror}); the timer will deliver the message")


def say(line: str, program: str = "sendmail") -> None:
    """One line on stderr, named for the program; a caller that closed stderr (at, anacron) must not make us
    fail."""
    try:
        posix.write(2, f"{program}: {line}\n".encode("utf-8", "replace"))
    except OSError:
        pass
