"""`python -m re2tal.cli`: the `re2tal` command."""

import sys

from re2tal.cli import main

sys.exit(main())
