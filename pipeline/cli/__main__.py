"""`python -m pipeline.cli ...` is `tst ...` (for environments without the console script on PATH)."""

import sys

from pipeline.cli import main

sys.exit(main())
