"""``python -m gradwatch.cli``: the ``gradwatch`` command."""

import sys

from .command import main

sys.exit(main())
