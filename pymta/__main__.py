"""`python -m pymta` is the `pymta` command; sendmail starts its background flush this way."""

import sys

from pymta.cli.entry import main

sys.exit(main())
