"""`pymta setup`: the plan of steps that installs pymta in system or user mode, and `--check`.

Kept empty on purpose: sendmail imports single modules, never a whole package. See ARCHITECTURE.md."""
