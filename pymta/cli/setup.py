"""`pymta setup`: install system mode on this machine (or under --root DIR), check it, or undo it.

A thin layer over `pymta.setup`: it turns the options into an Install and a plan, runs the plan and exits
with its status. Every step prints one line: `[ok] ...` when there is nothing to do, else one line per
change (`[create]`, `[fix]`, `[backup]`, `[run]`, `[remove]`, `[restore]`; `[would ...]` with --dry-run,
`[problem] ...; fix: ...` with --check).
"""

from __future__ import annotations

import click

from pymta.errors import UsageError
from pymta.setup import plan
from pymta.setup.install import Install, require_root
from pymta.setup.steps import bin_launchers_step, install_plan
from pymta.setup.uninstall import uninstall_plan


@click.command("setup", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dry-run", is_flag=True, help="Print each step and what it would change; change nothing.")
@click.option(
    "--check",
    is_flag=True,
    help="Report what is wrong with the install (modes, owners, links, units, config), each with its fix; "
    "exit 0 when nothing is, 1 when something is.",
)
@click.option(
    "--uninstall",
    is_flag=True,
    help="Remove the units or cron file and the links, putting back what was there before; leave the "
    "spool and the config.",
)
@click.option(
    "--purge", is_flag=True, help="With --uninstall: also remove the spool, the config and the user."
)
@click.option(
    "--root",
    metavar="DIR",
    type=click.Path(exists=True, file_okay=False),
    help="Install under DIR (like DESTDIR): create no user, run no systemctl, change nothing outside DIR.",
)
@click.option(
    "--user", default="pymta", show_default=True, metavar="NAME", help="The system user that owns the spool."
)
@click.option("--no-systemd", is_flag=True, help="Install a cron file instead of the systemd units.")
@click.option(
    "--launchers",
    is_flag=True,
    help="Only make this environment's sendmail, mailq and newaliases pymta's launchers (Python isolated and "
    "without site: they start faster than pip's scripts); no root needed. With --check: only check them.",
)
@click.option(
    "-C",
    "--config",
    "config_file",
    metavar="FILE",
    help="Install this config as /etc/pymta/pymta.yaml (when there is none) instead of the example.",
)
@click.pass_context
def setup_command(
    ctx: click.Context,
    dry_run: bool,
    check: bool,
    uninstall: bool,
    purge: bool,
    root: str | None,
    user: str,
    no_systemd: bool,
    launchers: bool,
    config_file: str | None,
) -> None:
    """Set up system mode: one spool for the whole machine, owned by a system user.

    \b
    In order, each step checked first, so a second run changes nothing:
    1. the system user pymta (useradd --system), unless it exists;
    2. the spool /var/spool/pymta: 0755; tmp/ and new/ 1733, where every user
       drops mail; queue/ state/ done/ corrupt/ 0700; flush.lock 0600; owner pymta;
    3. /etc/pymta/pymta.yaml (0644; the example with its smarthost lines
       commented out, never overwritten) and /etc/pymta/secrets (0700 pymta);
    4. /usr/sbin/sendmail, /usr/lib/sendmail, /usr/bin/mailq and
       /usr/bin/newaliases: pymta's launchers for this environment (Python
       isolated and without site); whatever else was there is moved to
       NAME.pre-pymta;
    5. pymta-flush.service, .timer (every 5 minutes) and .path (when mail is
       dropped) in /etc/systemd/system, enabled and started; or, with
       --no-systemd or without a running systemd, /etc/cron.d/pymta.

    Run it as root; --root DIR, --check and --dry-run do not need root.
    --launchers does step 4 only, for this environment's own bin directory
    (a user's install: see the README's quickstart).
    """
    if sum((dry_run, check, uninstall)) > 1 and not (dry_run and uninstall):
        raise UsageError("pymta setup: --check goes with neither --dry-run nor --uninstall")
    if purge and not uninstall:
        raise UsageError("pymta setup: --purge goes with --uninstall only")
    if launchers and uninstall:
        raise UsageError("pymta setup: --launchers does not go with --uninstall")
    install = Install(root=root, user=user, template=config_file, systemd=False if no_systemd else None)
    mode = plan.CHECK if check else plan.DRY_RUN if dry_run else plan.APPLY
    if launchers:
        ctx.exit(plan.run([bin_launchers_step(install)], mode, click.echo))
    require_root(install, mode)
    steps = uninstall_plan(install, purge) if uninstall else install_plan(install)
    status = plan.run(steps, mode, click.echo)
    if mode == plan.CHECK and status:
        click.echo("pymta setup --check: problems found; `pymta setup` fixes what it can", err=True)
    ctx.exit(status)
