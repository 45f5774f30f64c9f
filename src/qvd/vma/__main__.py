"""``python3 -m qvd.vma``: how the desktop image starts the agent."""

from __future__ import annotations

import sys

from qvd.vma.main import main

sys.exit(main())
