"""``python -m oftjax.cli``: the ``oftjax`` command."""

import sys

from oftjax.cli import main

sys.exit(main())
