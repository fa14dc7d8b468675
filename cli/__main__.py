"""`python -m ddsuite.cli` runs the `ddsuite` command."""

import sys

from .main import main

sys.exit(main())
