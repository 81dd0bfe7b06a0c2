"""The click commands and the sendmail/mailq/newaliases front doors: parse, one library call, map errors.

Kept empty on purpose: sendmail imports single modules, never a whole package. See ARCHITECTURE.md."""
