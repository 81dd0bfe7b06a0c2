"""The spool: commit, pick-up, state, listings, per-user views, admin operations.

Kept empty on purpose: sendmail imports single modules, never a whole package. See ARCHITECTURE.md."""
