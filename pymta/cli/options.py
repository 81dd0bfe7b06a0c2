"""What the `pymta` commands share beyond one command: the config named before the command
(`pymta -C FILE COMMAND`), and what the shell completes (queue ids, smarthost names).
"""

from __future__ import annotations

from typing import Any

import click
from click.shell_completion import CompletionItem

CONFIG_PARAMETER = "config_file"  # the name every command's -C/--config option stores its value under


# The help shown beside a queue id in zsh and fish: the start of its recipients.
COMPLETION_HELP = 60


def config_defaults(
    group: click.Group, path: str, ctx: click.Context, only: str | None = None
) -> dict[str, Any]:
    """A click `default_map` that makes `path` the default -C of every command under `group` (or of the one
    named `only`): so the config named before a command counts for it, and a -C the command is given itself
    still wins. Commands are looked up as click does (`pymta`'s group loads them lazily)."""
    defaults: dict[str, Any] = {}
    for name in group.list_commands(ctx) if only is None else [only]:
        command = group.get_command(ctx, name)
        if command is None:
            continue
        entry: dict[str, Any] = {}
        if any(parameter.name == CONFIG_PARAMETER for parameter in command.params):
            entry[CONFIG_PARAMETER] = path
        if isinstance(command, click.Group):
            entry.update(config_defaults(command, path, ctx))
        defaults[name] = entry
    return defaults


def name_config_for_subcommands(ctx: click.Context, config_file: str | None) -> None:
    """The callback of a group with its own -C: the subcommand that runs defaults to the config it names
    (only that one is looked up: the others' modules stay unloaded)."""
    if config_file is not None and isinstance(ctx.command, click.Group) and ctx.invoked_subcommand:
        defaults = config_defaults(ctx.command, config_file, ctx, only=ctx.invoked_subcommand)
        ctx.default_map = {**(ctx.default_map or {}), **defaults}


def _config_named(ctx: click.Context) -> str | None:
    """The -C of the command line being completed: the nearest one, the command's own first. (While the
    shell completes, click invokes no group callback, so `name_config_for_subcommands` has not run.)"""
    context: click.Context | None = ctx
    while context is not None:
        named = context.params.get(CONFIG_PARAMETER)
        if named:
            return str(named)
        context = context.parent
    return None


def complete_queue_ids(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """The ids in this user's queue (their own view in system mode) that start with what was typed, each
    with its recipients as the help that zsh and fish show. Anything that goes wrong completes nothing."""
    # lazy: cli/main imports this module, and `pymta --version` loads neither YAML nor the delivery stage
    from pymta.config.load import load  # lazy: see above
    from pymta.delivery.privsep import become_spool_owner  # lazy: see above
    from pymta.queue.listing import load_visible, printable  # lazy: see above

    try:
        spool = load(_config_named(ctx)).spool
        become_spool_owner(spool)  # as root, read the spool as its owner (pymta(1), PRIVILEGES)
        entries = load_visible(spool).reported(lambda problem: None)  # an unreadable entry completes nothing
        return [
            CompletionItem(
                entry.id, help=printable(", ".join(r.address for r in entry.recipients))[:COMPLETION_HELP]
            )
            for entry in entries
            if entry.id.startswith(incomplete)
        ]
    except Exception:  # noqa: BLE001 - a completion must never print a traceback into the command line
        return []


def complete_smarthosts(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """The smarthosts of the config by the name the commands take (`name:`, else `host:`)."""
    from pymta.config.load import load  # lazy: see complete_queue_ids

    try:
        hosts = load(_config_named(ctx)).smarthosts
        return [
            CompletionItem(host.label, help=host.host if host.label != host.host else None)
            for host in hosts
            if host.label.lower().startswith(incomplete.lower())
        ]
    except Exception:  # noqa: BLE001 - as above
        return []
