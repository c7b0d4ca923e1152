"""`python -m mbconvert` is the `mbconvert` command."""

import sys

from .cli import main

sys.exit(main())
