"""The `pymta` command: a thin click layer over the library. Each command parses its options, makes one or
two library calls and turns a library error (PymtaError) into one line on stderr and its sysexits code.
The console script enters through `pymta.cli.entry`, which runs the commonest flush and `--version`
without click and hands every other command line to `main` here.
"""

from __future__ import annotations

import importlib
import sys

import click

from pymta import __version__
from pymta.cli.flush import failure
from pymta.cli.flush import flush as run_flush_command
from pymta.cli.options import complete_queue_ids, name_config_for_subcommands
from pymta.errors import EX_TEMPFAIL, EX_USAGE, PymtaError
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
    selection = Selection(ids=ids, recipients=recipients, senders=senders)
    run_flush_command(
        verbose=verbose, force=force, background=background, selection=selection, config_file=config_file
    )


def main(argv: list[str] | None = None) -> int:
    """Run the `pymta` command line `argv` through click (`pymta.cli.entry` hands over every command line it
    does not run itself): click's usage errors become EX_USAGE (64)."""
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
    except (PymtaError, OSError) as exc:
        return failure(exc)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
