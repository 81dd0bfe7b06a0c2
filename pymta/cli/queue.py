"""`pymta queue ...`: list the queue, show one message, and hold, release, retry, delete or bounce messages.

A thin click layer over `pymta.queue.listing` (what is printed) and `pymta.queue.ops` (what is done). Every
command
that takes ids takes several, reports each on its own line (`ID: held` on stdout, a failure as
`pymta: ID: why` on stderr) or, with --json, as one object per id in a JSON array, and exits with 0 when every
id succeeded, else with the code of the first id that failed (see EXIT_STATUS).
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from pymta import log
from pymta.cli.options import complete_queue_ids, name_config_for_subcommands
from pymta.config.load import load
from pymta.config.model import Config, parse_duration
from pymta.errors import ConfigError
from pymta.queue import ids as queue_ids
from pymta.queue import listing
from pymta.queue import ops as queue_ops
from pymta.submission.submit import read_settings

F = TypeVar("F", bound=Callable[..., Any])

EXIT_STATUS = """\b
Exit status:
  0   every id was done (or needed nothing: already held, not held)
  64  EX_USAGE: bad options; an id prefix too short (under 4 digits) or
      ambiguous (the candidates are named); the command does not apply to
      the message as it is (retry of a held or failed message)
  65  EX_DATAERR: the queued file cannot be read (see corrupt/ in the spool)
  67  EX_NOUSER: no such message, or it is no longer in the queue
      (delivered, deleted, or expired after failing)
  75  EX_TEMPFAIL: a flush is delivering the message right now and did not
      finish within 10 seconds; try again in a moment
  77  EX_NOPERM: this user may not change the spool
  78  EX_CONFIG: the configuration file is invalid
With several ids, the status is that of the first id that failed."""

IDS_HELP = """\b
ID is a full queue id or a unique prefix of at least 4 of its digits, as
`pymta queue` lists them; an ambiguous prefix is refused with its candidates."""

FILTERS_HELP = """\b
Instead of ids, --sender, --recipient, --older-than (and, where the command
has it, --state) choose the messages: every message they all match."""


JSON_RESULTS = """\b
With --json: a JSON array with one object per id: argument (as given), id
(the full id, or null), ok, result (a word: held, released, due now,
deleted, bounced, already held, not held, no such message, gone, ambiguous,
busy, ...), detail (the line printed without --json), exit_code, state (the
message's state afterwards, or null) and candidates (of an ambiguous prefix)."""

STATE_CHOICE = click.Choice(queue_ops.STATES)
CONFIG_OPTION = click.option(
    "-C", "--config", "config_file", metavar="FILE", help="Read this config file instead of the usual ones."
)


def _options(*, results: bool = True) -> Callable[[F], F]:
    """--json, -C and (for commands that change messages) the hidden --wait."""

    def decorate(function: F) -> F:
        function = CONFIG_OPTION(function)
        function = click.option(
            "--json",
            "as_json",
            is_flag=True,
            help="Print a JSON array, one object per id." if results else "Print a JSON array.",
        )(function)
        if results:
            function = click.option(
                "--wait",
                type=click.FloatRange(min=0),
                default=queue_ops.LOCK_WAIT,
                hidden=True,
                help="Seconds to wait for a message being delivered (for tests).",
            )(function)
        return function

    return decorate


def _settings(as_json: bool, config_file: str | None, verb: str = "") -> tuple[bool, Config]:
    """Options given to `pymta queue` itself (`pymta queue --json -C FILE hold ID`) count for its commands.

    As root on a system spool the command goes on as the spool's owner, so what it writes stays theirs.
    With a `verb` (a command that changes messages), a user who may not is refused first (EX_NOPERM)."""
    parent = click.get_current_context().find_root().meta
    config = load(config_file or parent.get("pymta.queue.config"))
    if verb:
        queue_ops.require_admin(config, verb)
    _become_spool_owner(config.spool)
    return as_json or bool(parent.get("pymta.queue.json")), config


def _become_spool_owner(spool: str) -> None:
    """As root on a system spool, list as its owner (pymta(1), PRIVILEGES): what the owner planted in the
    queue (a FIFO, a link to a file of root's) is then read with the owner's rights, never root's."""
    from pymta.delivery.privsep import become_spool_owner  # lazy: it loads the flush, for root only

    become_spool_owner(spool)


def _spool_to_list(config_file: str | None) -> tuple[str, int]:
    """The spool to list, and the exit status. A broken config does not hide the queue: like mailq, the
    listing goes on with the spool sendmail keeps mail in meanwhile, after the config's error, and then
    exits 78 (the commands that change messages refuse outright)."""
    try:
        return load(config_file).spool, 0
    except ConfigError as exc:
        spool = read_settings(config_file).spool
        click.echo(f"pymta: {exc}", err=True)
        click.echo(f"pymta: listing {spool}, where sendmail queues while the config is broken", err=True)
        return spool, exc.exit_code


def _report(results: list[queue_ids.Result], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([result.to_json() for result in results], indent=2))
    else:
        for result in results:
            if result.ok:
                click.echo(result.line)
            else:
                click.echo(f"pymta: {listing.printable(result.line)}", err=True)
    click.get_current_context().exit(queue_ids.exit_code(results))


def _logger(config: Config) -> logging.Logger:
    return log.setup(target=config.log)


def _filter_options(*, states: bool = True) -> Callable[[F], F]:
    """--state (where it is not an option of its own), --sender, --recipient and --older-than."""

    def decorate(function: F) -> F:
        function = click.option(
            "--older-than",
            metavar="AGE",
            callback=_duration,
            help="Only messages queued longer ago than AGE (90s, 30m, 4h, 2d, 1w).",
        )(function)
        function = click.option(
            "--recipient",
            "recipients",
            metavar="ADDRESS",
            multiple=True,
            help="Only messages to ADDRESS (or any address @domain) still to be delivered (repeatable).",
        )(function)
        function = click.option(
            "--sender",
            "senders",
            metavar="ADDRESS",
            multiple=True,
            help="Only messages from ADDRESS (@domain: any sender there; <>: the null sender) (repeatable).",
        )(function)
        if states:
            function = click.option(
                "--state",
                "states",
                type=STATE_CHOICE,
                multiple=True,
                help="Only messages in this state (repeatable).",
            )(function)
        return function

    return decorate


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an age: give 90s, 30m, 4h, 2d or 1w") from None


class _Listing:
    """The options of a listing, given to `pymta queue` or to `pymta queue list`."""

    def __init__(self, params: dict[str, Any]) -> None:
        parent = click.get_current_context().find_root().meta.get("pymta.queue.listing", {})
        self.as_json = bool(params["as_json"] or parent.get("as_json"))
        self.summary = bool(params["summary"] or parent.get("summary"))
        self.config_file = params["config_file"] or parent.get("config_file")
        self.filter = listing.Filter(
            params["states"] or parent.get("states", ()),
            params["senders"] or parent.get("senders", ()),
            params["recipients"] or parent.get("recipients", ()),
            params["older_than"] if params["older_than"] is not None else parent.get("older_than"),
        )


def _listing_options(function: F) -> F:
    function = CONFIG_OPTION(function)
    function = _filter_options()(function)
    function = click.option(
        "--summary", is_flag=True, help="Count the messages by state, by destination domain and by age."
    )(function)
    return click.option(
        "--json", "as_json", is_flag=True, help="Print a JSON array (the format scripts rely on)."
    )(function)


@click.group("queue", invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@_listing_options
@click.pass_context
def queue_group(ctx: click.Context, /, **params: Any) -> None:
    """See what is waiting in the queue, and why; hold, release, retry, delete or bounce messages.

    With no subcommand, lists the queue like `pymta queue list`: the messages grouped by why they wait
    (the largest group first), one line per message with its id, age, size, state, sender and the
    recipients still to be delivered. --summary counts them instead.

    \b
    With --json: a JSON array, one object per message with id, state (queued, deferred, held, failed),
    sender ("" is the null sender), recipients (address, status, last_error), size, submitted_by,
    queued_at, next_attempt (ISO 8601, UTC; null when none is planned), attempts and last_error.

    --json and -C given here count for the subcommand too: `pymta queue --json hold ID`.

    On a system spool (`pymta setup`), a user other than root and the spool's owner sees only their own
    messages, as the last delivery run published them, and may change none (exit 77). Run as root, the
    commands do their work as the spool's owner.
    """
    ctx.meta["pymta.queue.json"] = params["as_json"]
    ctx.meta["pymta.queue.config"] = params["config_file"]
    ctx.meta["pymta.queue.listing"] = params
    name_config_for_subcommands(ctx, params["config_file"])
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_queue, **params)


@queue_group.command("list")
@_listing_options
def list_queue(**params: Any) -> None:
    """List the queued messages, oldest first, grouped by why they wait.

    Messages that wait for the same reason (their state and last error) are listed under one line that
    gives how many and why, the largest group first. `mailq` stays the sendmail-style view: every message
    in order, its last error below it.

    --state keeps only the messages in that state: queued (not tried yet), deferred (waiting for its next
    attempt), held (by `pymta queue hold`) or failed (every recipient done, some failed; kept for
    failed_retention, 7 days by default, so you can see what was bounced). --sender, --recipient and
    --older-than narrow it down further (the commands that change messages take them too).

    --summary counts the messages instead: by state, and per destination domain by age (under 5 minutes,
    an hour, 4 hours, a day, 2 days, 7 days, and older), as Postfix's qshape does.

    In system mode a user other than root and the spool's owner sees only their own messages, as the
    last delivery run left them, after a line that says so (with --json: only their objects).

    When the config is broken, the error comes first, then the listing of the spool sendmail keeps
    mail in meanwhile, as mailq shows it; the exit status is then 78.

    \b
    The JSON has one object per message with: id, state (queued, deferred, held, failed), sender ("" is
    the null sender), recipients (address, status, last_error), size, submitted_by, queued_at,
    next_attempt (ISO 8601, UTC; null when none is planned), attempts and last_error. It is written one
    object a line, each as soon as its message is read. With --summary: one object with messages, size,
    by_state, by_age and by_domain (a list of domain, messages, by_age).
    """
    options = _Listing(params)
    spool, status = _spool_to_list(options.config_file)
    _become_spool_owner(spool)
    visible = listing.load_visible(spool)
    entries = options.filter.apply(visible.reported(_problem))
    write = sys.stdout.write
    if options.summary:
        summary = listing.summarize(entries)
        if options.as_json:
            write(json.dumps(summary.to_json(), indent=2) + "\n")
        else:
            write("".join(line + "\n" for line in [*listing.view_notes(visible), *summary.lines()]))
    elif options.as_json:
        listing.write_json(entries, write)
    else:
        for note in listing.view_notes(visible):
            write(note + "\n")
        if options.filter:
            blocks = listing.grouped_text(entries)
            first = next(blocks)
            if first == "Mail queue is empty\n":
                states = options.filter.states
                only_states = states and not (options.filter.senders or options.filter.recipients)
                if only_states and options.filter.older_than is None:
                    write(f"No {' or '.join(sorted(states))} messages in the queue\n")
                else:
                    write("No messages in the queue match\n")
            else:
                write(first)
                for block in blocks:
                    write(block)
        elif visible.entries or not visible.own_view:
            for block in listing.grouped_text(entries):
                write(block)
    sys.stdout.flush()
    click.get_current_context().exit(status)


def _problem(line: str) -> None:
    click.echo(f"pymta: cannot read {line}", err=True)


@queue_group.command("show")
@click.argument("ids", metavar="ID...", shell_complete=complete_queue_ids, nargs=-1, required=True)
@click.option("--body", is_flag=True, help="Print the whole stored message instead of its headers.")
@_options(results=False)
def show(ids: tuple[str, ...], body: bool, as_json: bool, config_file: str | None) -> None:
    """Show everything about queued messages.

    For each ID: its state, the envelope sender and who submitted it (the login the operating system
    reported), when it was queued, its size, the attempts so far and the next one, the last error, each
    recipient's status and the server's last reply for it, and the message's header fields. A message that
    no flush has picked up yet (in new/) is shown too. With --body, the whole stored message follows instead
    of the headers, as it is stored (before the flush adds Date, Message-ID or From).

    Reads only: it never changes the message, never waits for a delivery, never takes a lock. In system
    mode a user other than root and the spool's owner may show only their own messages, as the last
    delivery run left them, without header fields (and not with --body).

    \b
    With --json: a JSON array with, per ID, the object `pymta queue --json` gives
    (see QUEUE JSON in pymta(1)) plus argument, ok (true), location (new or
    queue), last_attempt, relay, held_from, bounce_due, headers (a list of
    {"name", "value"}) and, with --body, message (the stored message as text,
    undecodable bytes replaced). An ID that cannot be shown gives the object
    of the other queue commands: argument, id, ok (false), result, detail,
    exit_code, state, candidates.
    """
    as_json, config = _settings(as_json, config_file)
    shown = queue_ops.show(config, list(ids), body=body)
    failures = [item for item in shown if isinstance(item, queue_ids.Result)]
    if as_json:
        click.echo(
            json.dumps(
                [
                    item.to_json() if isinstance(item, queue_ids.Result) else listing.details_to_json(item)
                    for item in shown
                ],
                indent=2,
            )
        )
    else:
        first = True
        for item in shown:
            if isinstance(item, queue_ids.Result):
                click.echo(f"pymta: {listing.printable(item.line)}", err=True)
                continue
            if not first:
                click.echo("")
            first = False
            click.echo("\n".join(listing.format_details(item)))
            if item.message is not None:
                click.echo("message:")
                click.echo(item.message, nl=not item.message.endswith(b"\n"))
    click.get_current_context().exit(queue_ids.exit_code(failures))


show.help = f"""{inspect.cleandoc(show.help or "")}

{IDS_HELP}

\b
Exit status:
  0   every id was shown
  64  EX_USAGE: bad options; an id prefix too short or ambiguous
  65  EX_DATAERR: the queued file cannot be read
  67  EX_NOUSER: no such message, or it is no longer in the queue
  77  EX_NOPERM: this user may not read the spool
  78  EX_CONFIG: the configuration file is invalid
With several ids, the status is that of the first id that failed."""


@queue_group.command("hold")
@click.argument("ids", metavar="ID...", shell_complete=complete_queue_ids, nargs=-1)
@_filter_options()
@_options()
def hold(ids: tuple[str, ...], as_json: bool, config_file: str | None, wait: float, **filters: Any) -> None:
    """Hold messages: keep them in the queue, undelivered, until released.

    A held message is never delivered, not even by `pymta flush --now` or `sendmail -q`, and never expires:
    retry.lifetime does not bounce it and failed_retention does not remove it. Its state becomes held; the
    state it had (queued, deferred or failed) is kept and restored by `pymta queue release`. Holding a
    held message changes nothing and succeeds. A message not yet picked up (in new/) is picked up into the
    queue first, as a flush would, and held there.

    It never sends anything and never deletes anything. When a flush is delivering the message right now,
    it waits up to 10 seconds for that delivery to end, then looks again (the message may be gone,
    delivered); past that it says so and exits 75.
    """
    as_json, config = _settings(as_json, config_file, "hold")
    targets = _targets(ids, False, (), config, filters)
    if targets is None:
        return _nothing(as_json, "No messages in the queue match")
    _report(queue_ops.hold(config, targets, wait=wait, logger=_logger(config)), as_json)


@queue_group.command("release")
@click.argument("ids", metavar="ID...", shell_complete=complete_queue_ids, nargs=-1, required=True)
@_options()
def release(ids: tuple[str, ...], as_json: bool, config_file: str | None, wait: float) -> None:
    """Release held messages: back to the state they were held in, due now.

    A released message is delivered by the next flush (run `pymta flush` to send it at once). The time it
    spent on hold does not count toward retry.lifetime: it gets the rest of its lifetime, so even one held
    for longer than that is tried again before it can expire. A message that was failed when held stays
    failed. Releasing a message that is not held changes nothing and succeeds.

    It never delivers by itself and never deletes anything; it waits for a running delivery as hold does.
    """
    as_json, config = _settings(as_json, config_file, "release")
    _report(queue_ops.release(config, list(ids), wait=wait, logger=_logger(config)), as_json)


@queue_group.command("retry")
@click.argument("ids", metavar="ID...", shell_complete=complete_queue_ids, nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every deferred message.")
@_filter_options(states=False)
@_options()
def retry(
    ids: tuple[str, ...], every: bool, as_json: bool, config_file: str | None, wait: float, **filters: Any
) -> None:
    """Make messages due now, instead of at their next retry time.

    The next flush tries them (run `pymta flush` to try at once; `pymta flush --now` and `sendmail -q`
    try every waiting message without changing its schedule). With --all: every deferred message. The
    retry schedule goes on from the number of attempts made.

    It never delivers by itself, never touches a held message (release it instead) and never revives a
    failed one (exit 64 for either); it waits for a running delivery as hold does.
    """
    as_json, config = _settings(as_json, config_file, "retry")
    targets = _targets(ids, every, ("deferred",), config, filters)
    if targets is None:
        return _nothing(as_json, "No deferred messages to retry")
    _report(queue_ops.retry(config, targets, wait=wait, logger=_logger(config)), as_json)


@queue_group.command("delete")
@click.argument("ids", metavar="ID...", shell_complete=complete_queue_ids, nargs=-1)
@click.option(
    "--all", "every", is_flag=True, help="Every message in --state STATE (or, with --yes, every message)."
)
@click.option(
    "--state", "states", type=STATE_CHOICE, multiple=True, help="With --all: messages in this state."
)
@click.option("--yes", is_flag=True, help="With --all and no --state: really delete every message.")
@_filter_options(states=False)
@_options()
def delete(
    ids: tuple[str, ...],
    every: bool,
    states: tuple[str, ...],
    yes: bool,
    as_json: bool,
    config_file: str | None,
    wait: float,
    **filters: Any,
) -> None:
    """Delete messages from the queue, without telling their senders.

    The message and its state are removed for good; its sender gets no bounce (use `pymta queue bounce`
    for that). A message not yet picked up (in new/) is removed from there. `--all --state failed` clears
    the failed messages (the flush also removes them after failed_retention); --all without --state
    deletes every message and needs --yes, so that a slip of the keyboard empties nothing.

    It never sends anything. It waits for a running delivery as hold does, so a message is never deleted
    in the middle of being sent; one delivered meanwhile is reported as no longer in the queue.
    """
    narrowed = _narrowed(filters)
    if states and not every and not narrowed:
        raise click.UsageError("--state selects messages for --all; give --all --state STATE, or ids")
    if every and not states and not narrowed and not yes:
        raise click.UsageError(
            "refusing to delete every message: add --state STATE to choose which, or --yes to delete them all"
        )
    as_json, config = _settings(as_json, config_file, "delete")
    targets = _targets(ids, every or bool(states), states, config, filters)
    if targets is None:
        return _nothing(
            as_json, f"No {' or '.join(states)} messages to delete" if states else "Nothing to delete"
        )
    _report(queue_ops.delete(config, targets, wait=wait, logger=_logger(config)), as_json)


@queue_group.command("bounce")
@click.argument("ids", metavar="ID...", shell_complete=complete_queue_ids, nargs=-1)
@_filter_options()
@_options()
def bounce(ids: tuple[str, ...], as_json: bool, config_file: str | None, wait: float, **filters: Any) -> None:
    """Give up on messages now, and tell their senders.

    Every recipient not yet delivered fails with the reason "bounced by the administrator"; recipients
    already delivered stay delivered. The message becomes failed, and the next flush returns it to its
    sender in a delivery status notification (for a message from the null sender, <>, the flush reports it
    to the admin address instead), unless the sender asked for no failure notice (sendmail -N never or
    -N delay); the line for each id says which. It then stays visible as failed for failed_retention. A
    held message can be bounced; a message with nothing left to deliver is left alone and succeeds.

    It never sends by itself (the flush does) and never deletes anything; it waits for a running delivery
    as hold does.
    """
    as_json, config = _settings(as_json, config_file, "bounce")
    targets = _targets(ids, False, (), config, filters)
    if targets is None:
        return _nothing(as_json, "No messages in the queue match")
    _report(queue_ops.bounce(config, targets, wait=wait, logger=_logger(config)), as_json)


for _command in (hold, release, retry, delete, bounce):
    _filters = "" if _command is release else f"\n\n{FILTERS_HELP}"
    _command.help = (
        f"{inspect.cleandoc(_command.help or '')}\n\n{IDS_HELP}{_filters}\n\n{JSON_RESULTS}\n\n{EXIT_STATUS}"
    )


def _narrowed(filters: dict[str, Any]) -> bool:
    return any(value not in (None, ()) for value in filters.values())


def _targets(
    ids: tuple[str, ...],
    every: bool,
    states: tuple[str, ...],
    config: Config,
    filters: dict[str, Any] | None = None,
) -> list[str] | None:
    """The ids to act on: those given, or with --all (or the filters: `_filter_options`) the messages in
    `states` that the filters match; None when these find none."""
    filters = filters or {}
    narrowed = _narrowed(filters)
    if (every or narrowed) and ids:
        raise click.UsageError("give ids, or --all and filters (--sender, --recipient, ...), not both")
    if not every and not narrowed and not ids:
        raise click.UsageError("give at least one id (or --all, or a filter: --sender, --recipient, ...)")
    if ids:
        return list(ids)
    wanted = listing.Filter(
        filters.get("states") or (),
        filters.get("senders", ()),
        filters.get("recipients", ()),
        filters.get("older_than"),
    )
    return queue_ops.select(config, states, wanted) or None


def _nothing(as_json: bool, line: str) -> None:
    click.echo("[]" if as_json else line)
