"""What the `pymta` commands share beyond one command: the config named before the command
(`pymta -C FILE COMMAND`), and what the shell completes (queue ids, smarthost names).
"""

from __future__ import annotations

from typing import Any

import click

CONFIG_PARAMETER = "config_file"  # the name every command's -C/--config option stores its value under


def config_defaults(group: click.Group, path: str) -> dict[str, Any]:
    """A click `default_map` that makes `path` the default -C of every command under `group`: so the
    config named before a command counts for it, and a -C the command is given itself still wins."""
    defaults: dict[str, Any] = {}
    for name, command in group.commands.items():
        entry: dict[str, Any] = {}
        if any(parameter.name == CONFIG_PARAMETER for parameter in command.params):
            entry[CONFIG_PARAMETER] = path
        if isinstance(command, click.Group):
            entry.update(config_defaults(command, path))
        defaults[name] = entry
    return defaults


def name_config_for_subcommands(ctx: click.Context, config_file: str | None) -> None:
    """The callback of a group with its own -C: its subcommands default to the config it names."""
    if config_file is not None and isinstance(ctx.command, click.Group):
        ctx.default_map = {**(ctx.default_map or {}), **config_defaults(ctx.command, config_file)}
