"""The exceptions that stop a pymta command, each carrying its sysexits(3) code.

A failure of one delivery is a value (see the delivery outcome types); these are for what stops the whole
command: a bad flag, an unusable message, a spool that cannot be written, a broken config. Every entry
point catches `PymtaError`, prints its message as one line on stderr and exits with `exit_code`.

This module is imported by `sendmail` on every cron job: it imports nothing.
"""

# sysexits.h, the codes sendmail(8) callers understand (mutt prints their names, PHP checks for 0).
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_OSERR = 71
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78


class PymtaError(Exception):
    """A failure that ends the command. The message says what failed, why, and what to do."""

    exit_code = EX_SOFTWARE


class UsageError(PymtaError):
    """Bad flags or arguments."""

    exit_code = EX_USAGE


class MessageError(PymtaError):
    """The message on standard input cannot be used (no recipients in its headers, broken headers)."""

    exit_code = EX_DATAERR


class NoInputError(PymtaError):
    """Standard input is missing or unreadable."""

    exit_code = EX_NOINPUT


class AddressError(PymtaError):
    """An envelope address is malformed or unsafe (control characters, header injection)."""

    exit_code = EX_NOUSER


class SpoolError(PymtaError):
    """The spool cannot be written: missing, not writable, or on a read-only file system."""

    exit_code = EX_CANTCREAT


class SpoolFullError(SpoolError):
    """The spool's disk or the writer's file size limit is exhausted; the caller should try again later."""

    exit_code = EX_TEMPFAIL


class QueueLimitError(SpoolFullError):
    """The user has `max_queued_per_user` messages waiting (system mode); they may send again once some
    are delivered."""

    exit_code = EX_TEMPFAIL


class WriteError(PymtaError):
    """A file the command installs (an imported config, a password file) cannot be written, or is there
    already and was not to be replaced."""

    exit_code = EX_CANTCREAT


class LauncherError(PymtaError):
    """A launcher (`pymta.setup.launcher`) cannot be written: a foreign file is in the way, or the place or
    the install is unsafe."""

    exit_code = EX_CANTCREAT


class PermissionDeniedError(PymtaError):
    """The user may not do this."""

    exit_code = EX_NOPERM


class ConfigError(PymtaError):
    """The configuration file is unreadable or invalid. The message names the file, the key and the fix."""

    exit_code = EX_CONFIG
