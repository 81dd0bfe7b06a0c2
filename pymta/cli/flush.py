"""What `pymta flush` does once its options are read, without click: the config, the log, the run, the
summary. Both ways into it call `flush`: the click command (`pymta.cli.main`) and the short path that the
timer, `deliver: immediate` and `sendmail -q` take (`pymta.cli.entry`), so that the commonest command
does not pay for click (a third of an idle flush) and both behave alike. `failure` is the one mapping of
an error that stops the run to its line on stderr and its sysexits code.
"""

from __future__ import annotations

import sys

from pymta.errors import PymtaError
from pymta.queue.directory import write_error
from pymta.queue.selection import Selection

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TextIO


def flush(
    *,
    verbose: bool = False,
    force: bool = False,
    background: bool = False,
    selection: Selection | None = None,
    config_file: str | None = None,
) -> None:
    """Load the config, set up the log and deliver the queue (pymta(1), `pymta flush`). Raises PymtaError
    (and OSError for a spool file that cannot be written) when the run cannot go on."""
    from pymta import log  # lazy: logging, once the run is sure to happen
    from pymta.config.load import load  # lazy: YAML, not for --version or --help
    from pymta.delivery.privsep import run_flush  # lazy: the delivery stage, for this command only

    config = load(config_file)
    logger = log.setup(verbose=verbose and not background, target=config.log)
    show_progress = not (verbose or background) and sys.stderr.isatty()
    progress = _progress_line if show_progress else None
    report = run_flush(config, logger, force=force, progress=progress, selection=selection or Selection())
    if show_progress:
        _write(sys.stderr, "\n")
    if verbose or (not background and sys.stdout.isatty()):
        _write(sys.stdout, report.summary() + "\n")


def _progress_line(done: int, total: int) -> None:
    """A one-line progress display on the terminal: messages done of the total, and the percentage."""
    if total >= 10:
        _write(sys.stderr, f"\rdelivering {done}/{total} ({100 * done // total}%)")


def _write(stream: TextIO | None, text: str) -> None:
    if stream is not None:  # None when Python was started without it
        stream.write(text)
        stream.flush()


def failure(exc: PymtaError | OSError) -> int:
    """Say why a command stopped, in one line on stderr, and return its exit code: a PymtaError as it is,
    an OSError as the spool file that could not be written, a broken pipe (the reader went away) as 0."""
    if isinstance(exc, PymtaError):
        error: PymtaError = exc
    elif isinstance(exc, BrokenPipeError):
        return 0
    else:  # a file of the spool that could not be written: say which, why and what to do
        error = write_error("cannot use", exc.filename or "a file of the spool", exc, "run it again")
    _say(f"pymta: {error}")
    return error.exit_code


def _say(line: str) -> None:
    try:
        _write(sys.stderr, line + "\n")
    except OSError:
        pass
