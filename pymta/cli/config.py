"""`pymta config ...`: check the configuration file and show the settings pymta will use.

A thin layer over `pymta.config.load`: a command parses its options, makes one library call and turns a
ConfigError into one line on stderr and exit code 78 (EX_CONFIG).
"""

from typing import IO, Any

import click
import yaml

from pymta.config.load import load
from pymta.config.model import Config
from pymta.config.routing import Router
from pymta.errors import EX_CONFIG, ConfigError


class ConfigInvalid(click.ClickException):
    """A ConfigError as click reports it: its one line on stderr, then exit status 78 (EX_CONFIG)."""

    exit_code = EX_CONFIG

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"pymta: {self.message}", file=file, err=file is None)


@click.group("config", context_settings={"help_option_names": ["-h", "--help"]})
def config_group() -> None:
    """Check pymta's configuration file.

    The file is -C FILE, else $PYMTA_CONFIG, else /etc/pymta/pymta.yaml, else
    $XDG_CONFIG_HOME/pymta/pymta.yaml (~/.config/pymta/pymta.yaml). No file at all is valid: the
    defaults apply. Every key is described in pymta.yaml(5).
    """


@config_group.command("check")
@click.option(
    "-C", "--config", "config_file", metavar="FILE", help="Check this file instead of the usual one."
)
def check(config_file: str | None) -> None:
    """Validate the config and print the effective settings.

    Prints every setting as YAML, defaults filled in, after a comment naming the file. Passwords are
    shown only as their source ({keyring: SERVICE}, {command: ...}, {env: VAR}, {file: PATH}); the
    config file never holds a password itself.

    A valid config that will not do what it says gets a warning on stderr: an admin address on this
    machine that leads to no mailbox (its mail then goes to root's).

    With direct: true, or a route to direct, it also asks DNS (the servers under dns:, else
    /etc/resolv.conf's) what a receiving MX will check, and prints one line per finding on stderr,
    [problem], [warn], [unknown] (DNS did not answer), [note] or [ok], each with its fix: the hostname
    is fully qualified and resolves; each of its public addresses has a PTR naming a host that
    resolves back to it (FCrDNS), the hostname itself; no address is private or loopback; each sender
    domain (domain:, and a route's *@DOMAIN sender to direct) has one SPF record that does not
    refuse those addresses (SPF is read, not evaluated: include: and redirect= are not followed), and
    so does the hostname (for bounces); and a DMARC record.

    \b
    Exit status: 0 when the config is valid, whatever DNS says; 78 (EX_CONFIG)
    when it is not, with one line on stderr naming the file, the key, what is
    wrong and the fix.
    """
    try:
        settings = load(config_file)
    except ConfigError as error:
        raise ConfigInvalid(str(error)) from None
    click.echo(render(settings), nl=False)
    warning = Router(settings).admin_warning()
    if warning:
        click.echo(f"pymta: warning: {warning}", err=True)
    if settings.sends_direct:
        from pymta.delivery.readiness import check_config  # lazy: DNS, only for a config that sends directly

        readiness = check_config(settings)
        if readiness is not None:
            click.echo(f"pymta: {readiness.heading()}", err=True)
            for line in readiness.lines():
                click.echo(line, err=True)
            click.echo(f"pymta: {readiness.summary()}", err=True)


def render(settings: Config) -> str:
    """The settings as YAML that `pymta config check -C` would accept, after comment lines saying whence."""
    if settings.source:
        header = f"# {settings.source}: valid; effective settings, defaults filled in, passwords masked\n"
    else:
        header = "# no config file; using defaults\n"
    if not settings.smarthosts and not settings.direct:
        header += "# no smarthosts: local mail is delivered locally, other mail waits in the queue\n"
    return header + yaml.dump(settings.masked(), Dumper=_SettingsDumper, sort_keys=False, allow_unicode=True)


class _SettingsDumper(yaml.SafeDumper):
    """Block style, except that short lists and one-entry mappings of scalars (schedules, password sources)
    stay on one line, as they are written in the config file."""

    def represent_list(self, data: Any) -> yaml.SequenceNode:
        node = super().represent_list(data)
        node.flow_style = all(isinstance(item, str | int | float) for item in data)
        return node

    def represent_dict(self, data: Any) -> yaml.MappingNode:
        node = super().represent_dict(data)
        node.flow_style = len(data) == 1 and all(isinstance(v, str) for v in data.values())
        return node


_SettingsDumper.add_representer(list, _SettingsDumper.represent_list)
_SettingsDumper.add_representer(dict, _SettingsDumper.represent_dict)
