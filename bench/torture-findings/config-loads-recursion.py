"""Torture fuzz finding: config.loads raises RecursionError (not ConfigError) on YAML nested a few
thousand deep, so `pymta config check` and `pymta flush` end with a traceback instead of one line that
names the file (sendmail's own reading of the config was fixed: it queues with a warning).

Run: .venv/bin/python bench/torture-findings/config-loads-recursion.py"""

from pymta import config

config.loads("spool: /tmp/spool\nbroken: " + "[" * 3000 + "\n")
