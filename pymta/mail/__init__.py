"""Pure bytes and addresses: RFC 5322 addresses, message normalising and fitting, DSN text. No I/O.

Kept empty on purpose: sendmail imports single modules, never a whole package. See ARCHITECTURE.md."""
