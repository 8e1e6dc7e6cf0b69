"""`python -m services.state_builder` is `qrec state-builder`."""

import sys

from services.cli import main

sys.exit(main(["state-builder", *sys.argv[1:]]))
