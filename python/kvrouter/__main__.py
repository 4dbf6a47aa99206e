"""`python -m kvrouter ...`: the `kvrouter` command with a chosen interpreter."""

import sys

from kvrouter.cli import main

sys.exit(main())
