"""`python -m forgather` is the `forgather` command."""

import sys

from forgather.cli.main import main

sys.exit(main())
