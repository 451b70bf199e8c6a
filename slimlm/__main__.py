"""`python -m slimlm` runs the CLI."""

import sys

from slimlm.cli import main

sys.exit(main())
