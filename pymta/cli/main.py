"""The `pymta` command: a thin click layer over the library. Each command parses its options, makes one or
two library calls and turns a library error (PymtaError) into one line on stderr and its sysexits code.
"""

from __future__ import annotations

import importlib
import sys

import click

from pymta import __version__, log
from pymta.cli.options import complete_queue_ids, name_config_for_subcommands
from pymta.errors import EX_TEMPFAIL, EX_USAGE, PymtaError
from pymta.queue.directory import write_error
from pymta.queue.selection import Selection

config_option = click.option(
    "-C", "--config", "config_file", metavar="FILE", help="Read this config file instead of the usual ones."
)

# Each command group's module by its name, loaded only when it runs (or `--help` lists it): `pymta flush`
# does not pay for the queue commands, nor `pymta queue` and `pymta --version` for SMTP, TLS and click's
# prompts. The flush itself is below, and imports its library when it runs.
LAZY_COMMANDS = {
    "config": "pymta.cli.config:config_group",
    "import": "pymta.cli.importer:import_command",
    "password": "pymta.cli.smarthost:password_group",
    "queue": "pymta.cli.queue:queue_group",
    "setup": "pymta.cli.setup:setup_command",
    "test": "pymta.cli.smarthost:test_command",
}


class LazyGroup(click.Group):
    """A click group whose commands (`LAZY_COMMANDS`) are imported when they are looked up by name."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in LAZY_COMMANDS:
            return super().get_command(ctx, cmd_name)
        module, _, name = LAZY_COMMANDS[cmd_name].partition(":")
        command = getattr(importlib.import_module(module), name)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pymta")
@click.option(
    "-C",
    "--config",
    "config_file",
    metavar="FILE",
    help="Read this config file for the command (a -C given to the command itself wins).",
)
@click.pass_context
def cli(ctx: click.Context, config_file: str | None) -> None:
    """pymta: a small, trustworthy mail relay.

    `sendmail` queues each message in the spool; `pymta flush` delivers the queue to the configured
    smarthost. These commands let you look at and manage what is waiting.

    The config is read from -C FILE (given before or after the command), else $PYMTA_CONFIG, else
    /etc/pymta/pymta.yaml, else $XDG_CONFIG_HOME/pymta/pymta.yaml. See pymta(1) and pymta.yaml(5).
    """
    name_config_for_subcommands(ctx, config_file)


@cli.command()
@click.option(
    "-v", "--verbose", is_flag=True, help="Log each delivery attempt on stderr, as it goes to syslog."
)
@click.option(
    "--now", "force", is_flag=True, help="Try every waiting message now, not only those that are due."
)
@click.option("--background", is_flag=True, hidden=True, help="Started by sendmail: print nothing.")
@click.option(
    "--id",
    "ids",
    metavar="TEXT",
    multiple=True,
    shell_complete=complete_queue_ids,
    help="Only messages whose queue id contains TEXT (repeatable; as sendmail -qI).",
)
@click.option(
    "--recipient",
    "recipients",
    metavar="TEXT",
    multiple=True,
    help="Only messages with a waiting recipient that contains TEXT, e.g. a domain (as sendmail -qR).",
)
@click.option(
    "--sender",
    "senders",
    metavar="TEXT",
    multiple=True,
    help="Only messages whose envelope sender contains TEXT (as sendmail -qS).",
)
@config_option
def flush(
    verbose: bool,
    force: bool,
    background: bool,
    ids: tuple[str, ...],
    recipients: tuple[str, ...],
    senders: tuple[str, ...],
    config_file: str | None,
) -> None:
    """Deliver the queue: to local mailboxes and to the smarthost.

    Picks up what `sendmail` queued, then delivers every message that is due (with --now: every waiting
    message): local users (after aliases and `admin:`) into their mailboxes, everyone else over one
    connection per smarthost. 4xx answers and network, TLS or AUTH trouble defer a recipient until its
    next retry; a 5xx answer fails it, and its sender gets a bounce. Exits 0 when the run itself worked,
    even if messages were deferred; when another flush is running it exits 0 at once and that one looks
    again.

    Run it from a timer every few minutes; `deliver: immediate` also starts it after each message.
    On a system spool, start it as root: it delivers as the spool's owner and writes each local mailbox
    as its recipient (pymta(1), PRIVILEGES); other users are refused with exit 77.
    Every attempt is logged to syslog (facility mail) as `id=... to=<...> relay=... status=...`.

    --id, --recipient and --sender limit the run to the messages they name: each is a text that the
    queue id, a recipient still waiting, or the sender contains (case does not matter). Several of one
    kind add up; different kinds must all match. Others wait for the next run.
    """
    from pymta.config.load import load  # lazy: YAML, not for --version or --help
    from pymta.delivery.privsep import run_flush  # lazy: the delivery stage, for this command only

    config = load(config_file)
    logger = log.setup(verbose=verbose and not background, target=config.log)
    show_progress = not (verbose or background) and sys.stderr.isatty()
    selection = Selection(ids=ids, recipients=recipients, senders=senders)
    progress = _progress_line if show_progress else None
    report = run_flush(config, logger, force=force, progress=progress, selection=selection)
    if show_progress:
        click.echo("", err=True)
    if verbose or (not background and sys.stdout.isatty()):
        click.echo(report.summary())


def _progress_line(done: int, total: int) -> None:
    """A one-line progress display on the terminal: messages done of the total, and the percentage."""
    if total >= 10:
        click.echo(f"\rdelivering {done}/{total} ({100 * done // total}%)", err=True, nl=False)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pymta` console script: click's usage errors become EX_USAGE (64)."""
    try:
        code = cli.main(args=argv, prog_name="pymta", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:  # Ctrl-C, or the end of input at a prompt: try again later
        click.echo("pymta: interrupted; what was done before is kept", err=True)
        return EX_TEMPFAIL
    except click.ClickException as exc:
        exc.show()
        return EX_USAGE if isinstance(exc, click.UsageError) else exc.exit_code
    except PymtaError as exc:
        click.echo(f"pymta: {exc}", err=True)
        return exc.exit_code
    except BrokenPipeError:
        return 0
    except OSError as exc:  # a file of the spool that could not be written: say which, why and what to do
        error = write_error("cannot use", exc.filename or "a file of the spool", exc, "run it again")
        click.echo(f"pymta: {error}", err=True)
        return error.exit_code
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
