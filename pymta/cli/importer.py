"""`pymta import`: turn nullmailer's, msmtp's or ssmtp's configuration into pymta.yaml.

A thin layer over `pymta.setup.migrate`: read the other relay's files, print the config (or, with
--write, check and install it), and turn a library error into one line on stderr and its sysexits code.
"""

import click

from pymta.setup import foreign, migrate


@click.command("import", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("relay", type=click.Choice(foreign.RELAYS))
@click.argument("path", required=False)
@click.option("--write", is_flag=True, help="Install the config (and password files) instead of printing it.")
@click.option("--force", is_flag=True, help="With --write: replace a config or password file that exists.")
@click.option(
    "-C",
    "--config",
    "config_file",
    metavar="FILE",
    help="With --write: install here, not in the usual place.",
)
def import_command(relay: str, path: str | None, write: bool, force: bool, config_file: str | None) -> None:
    """Print the pymta.yaml that does what RELAY's configuration did.

    \b
    RELAY is nullmailer (PATH: its directory, /etc/nullmailer),
    msmtp (PATH: its file, ~/.msmtprc, else ~/.config/msmtp/config, else /etc/msmtprc)
    or ssmtp (PATH: /etc/ssmtp/ssmtp.conf; revaliases beside it is read too).

    What cannot be carried over is listed in comments at the top, with the reason. A password is never
    printed: one written in the file goes, with --write, to a file only its owner can read
    (secrets/NAME beside the config, 0600) and the config names it with {file: ...}; msmtp's
    passwordeval becomes {command: ...}.

    With --write the config is checked as `pymta config check` does, then installed: at -C FILE, else
    $PYMTA_CONFIG, else /etc/pymta/pymta.yaml as root, else ~/.config/pymta/pymta.yaml. An existing file
    is replaced only with --force.

    \b
    Exit status: 0 done; 66 the relay's file is missing; 78 it is unreadable
    or invalid, or the config made from it is; 73 a file exists (see --force)
    or cannot be written.
    """
    target = migrate.target_path(config_file)
    imported = migrate.read(relay, path, target)
    text = migrate.render(imported)
    if not write:
        migrate.check(text, "the imported config")
        click.echo(text, nl=False)
        return
    written = migrate.install(imported, text, target, force=force)
    for secret in written.secrets:
        click.echo(f"wrote {secret} (0600): a password found in {', '.join(imported.sources)}")
    click.echo(f"wrote {written.config}; check it with: pymta config check -C {written.config}")
    if imported.notes:
        click.echo(
            f"{len(imported.notes)} settings did not carry over as they were: see the comments at its top"
        )
