"""Log lines an admin can grep: to syslog (facility mail, tag `pymta`) when there is one, to stderr with
--verbose. Delivery lines follow Postfix's shape, so the usual habits work:

    id=6b0ae6... to=<bob@example.org> relay=smtp.web.de[212.227.15.167]:587 delay=2.1 tries=1 status=sent

Passwords never reach this module (DESIGN.md invariant 7): callers pass replies and reasons, never secrets.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

LOGGER_NAME = "pymta"
SYSLOG_SOCKET = "/dev/log"


def setup(verbose: bool = False, *, syslog: bool = True) -> logging.Logger:
    """The `pymta` logger with syslog (when /dev/log exists) and, under --verbose, stderr attached."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if syslog and os.path.exists(SYSLOG_SOCKET):
        try:
            to_syslog = logging.handlers.SysLogHandler(
                address=SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_MAIL
            )
        except OSError:
            pass  # a syslog socket nobody listens on: stderr (if asked for) is all we have
        else:
            to_syslog.setFormatter(logging.Formatter(f"pymta[{os.getpid()}]: %(message)s"))
            logger.addHandler(to_syslog)
    if verbose:
        to_stderr = logging.StreamHandler(sys.stderr)
        to_stderr.setFormatter(logging.Formatter("pymta: %(message)s"))
        logger.addHandler(to_stderr)
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    return logger


def delivery_line(
    queue_id: str, recipient: str, relay: str, delay: float, tries: int, status: str, reply: str
) -> str:
    """One delivery attempt of one recipient, Postfix style."""
    return (
        f"id={queue_id} to=<{recipient}> relay={relay} delay={delay:.1f} tries={tries} "
        f"status={status} ({' '.join(reply.split())})"
    )


def one_line(text: str) -> str:
    """`text` fit for one log line: every character that is not printable (a line break, a control) as a
    space, so a text a user or a message wrote cannot forge a line."""
    return "".join(char if char.isprintable() else " " for char in text)
