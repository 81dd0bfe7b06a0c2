"""One SMTP session with a smarthost, on smtplib (ARCHITECTURE.md, "Where things are"): `session` (the
session and its transactions), `outcome` (what a session returns or raises), `replies` (the bounded reply
reader), `commands` (ESMTP parameters), `tls` (contexts, pinning, the certificate), `auth` (the AUTH
dialogues) and `explain` (a failure in the admin's words, with the fix)."""
