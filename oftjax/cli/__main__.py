"""``python -m oftjax.cli``: the ``oftjax`` command."""

import sys

from oftjax.cli import console

sys.exit(console())
