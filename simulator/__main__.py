"""``python -m simulator``: same as ``upbit-sim``."""

from simulator.cli import main

raise SystemExit(main())
