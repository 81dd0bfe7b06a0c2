"""The systemd units and the cron line that `pymta setup` writes, from the package's templates/ files.

The templates are package data (pyproject.toml), read with importlib.resources and filled in with
`str.format` (so a template holds no other braces). examples/pymta-flush.timer and .path are what setup
installs for the default spool (a test holds them equal).
"""

from __future__ import annotations

import re
import shlex
from importlib.resources import files

from pymta.setup.install import DEFAULT_USER


def template(name: str) -> str:
    """The text of templates/`name`, as installed with the package."""
    return files("pymta.setup").joinpath("templates").joinpath(name).read_text(encoding="utf-8")


def _systemd_quote(path: str) -> str:
    """`path` as the command of an ExecStart= line: % doubled, quoted when it holds other characters."""
    path = path.replace("%", "%%")
    if re.fullmatch(r"[\w/.+@:%-]+", path):
        return path
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def service_unit(pymta: str, spool: str, user: str = DEFAULT_USER) -> str:
    return template("pymta-flush.service").format(exec_start=_systemd_quote(pymta), spool=spool, user=user)


def timer_unit() -> str:
    return template("pymta-flush.timer")


def path_unit(spool: str) -> str:
    return template("pymta-flush.path").format(spool=spool)


def cron_file(pymta: str) -> str:
    return template("pymta.cron").format(command=shlex.quote(pymta))
