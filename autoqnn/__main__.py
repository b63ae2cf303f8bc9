# SPDX-License-Identifier: MIT
"""``python -m autoqnn``: the autoqnn command (see autoqnn.cli)."""
from .cli import main

raise SystemExit(main())
