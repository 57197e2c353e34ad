"""``python -m fedmm.cli ...``: the ``fedmm`` command (deploy/launch.py starts sites this way)."""

import sys

from fedmm.cli import main

sys.exit(main())
