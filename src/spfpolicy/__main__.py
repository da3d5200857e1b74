"""``python -m spfpolicy`` runs the command-line interface."""

import sys

from spfpolicy.cli import main

sys.exit(main())
