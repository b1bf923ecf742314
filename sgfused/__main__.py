"""``python -m sgfused`` is the ``sgfused`` command."""

import sys

from .cli import main

sys.exit(main())
