"""`python -m services.actor` is `qrec actor`."""

import sys

from services.cli import main

sys.exit(main(["actor", *sys.argv[1:]]))
