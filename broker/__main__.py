"""``python -m broker``: the same as the ``upbit-broker`` command."""

import sys

from broker.cli import main

sys.exit(main())
