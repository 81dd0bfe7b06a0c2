"""The `pymta` command's entry: the calls that run most often go straight to their work, and everything
else to the click group (`pymta.cli.main`).

`pymta flush` runs from the timer every few minutes, after each message with `deliver: immediate` and
for `sendmail -q`; importing click cost about a third of an idle flush. So a command line of `flush` with
only the options those callers give (`-v`/`--verbose`, `--now`, `--background`, `-C`/`--config FILE`) is
read here and runs `pymta.cli.flush` directly, and `--version` is answered here as click would. Any other
command line, or anything here that is not certain (an unknown option, `--help`, a repeated option), goes
to click, which reads it, reports usage errors and runs the same `pymta.cli.flush`.
"""

from __future__ import annotations

import sys

from pymta import __version__
from pymta.errors import EX_TEMPFAIL, PymtaError

# The flags of `pymta flush` read here: option -> keyword of `flush`.
_FLAGS = {"-v": "verbose", "--verbose": "verbose", "--now": "force", "--background": "background"}
_CONFIG = ("-C", "--config")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pymta` console script (and `python -m pymta`)."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["--version"]:
        sys.stdout.write(f"pymta, version {__version__}\n")
        return 0
    options = _flush_options(args)
    if options is None:
        from pymta.cli.main import main as click_main  # lazy: click, for every other command line

        return click_main(args)
    flags, config_file = options
    from pymta.cli.flush import failure, flush  # lazy: the queue's modules, not for --version

    try:
        flush(
            verbose="verbose" in flags,
            force="force" in flags,
            background="background" in flags,
            config_file=config_file,
        )
    except (PymtaError, OSError) as exc:
        return failure(exc)
    except (KeyboardInterrupt, EOFError):  # as click says it: an empty line, then what became of the work
        sys.stderr.write("\npymta: interrupted; what was done before is kept\n")
        return EX_TEMPFAIL
    return 0


def _flush_options(args: list[str]) -> tuple[set[str], str | None] | None:
    """The flags (`verbose`, `force`, `background`) and the config file of `flush ARGS`, or None when `args`
    is not a flush that this reader is sure of."""
    if not args or args[0] != "flush":
        return None
    flags: set[str] = set()
    config_file: str | None = None
    words = iter(args[1:])
    for word in words:
        name, equals, value = word.partition("=") if word.startswith("--") else (word, "", "")
        if word in _FLAGS and _FLAGS[word] not in flags:
            flags.add(_FLAGS[word])
        elif name in _CONFIG and config_file is None:
            if not equals:
                value = next(words, "")
            if not value or value.startswith("-"):
                return None  # missing, or what click might read otherwise: let it say so
            config_file = value
        else:
            return None
    return flags, config_file
