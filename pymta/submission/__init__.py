"""How a message gets in: sendmail(8)'s flags, stdin, and the -bs SMTP dialogue.

Kept empty on purpose: sendmail imports single modules, never a whole package. See ARCHITECTURE.md."""
