"""pymta: a small, trustworthy mail relay.

`sendmail` spools messages durably; `pymta flush` hands them to a smarthost. See ARCHITECTURE.md at the top of
the project. This package is imported by `sendmail` on every cron job: keep this file free of imports.
"""

__version__ = "0.1.0"
