"""How a message gets out: the flush loop, SMTP to smarthosts, local mailboxes, privilege separation.

Kept empty on purpose: sendmail imports single modules, never a whole package. See ARCHITECTURE.md."""
