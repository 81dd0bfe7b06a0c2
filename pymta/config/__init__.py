"""Where the files are, the YAML config, who may send as whom, aliases and routing.

Kept empty on purpose: sendmail imports single modules, never a whole package. See ARCHITECTURE.md."""
