"""`python -m services.learner` is `qrec learner`."""

import sys

from services.cli import main

sys.exit(main(["learner", *sys.argv[1:]]))
