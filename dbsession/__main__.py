"""``python -m dbsession``: the migration command line."""

import sys

from .cli import main

sys.exit(main())
