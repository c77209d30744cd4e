"""The core's one clock: expiry, refresh, cooldown, durations and the readiness cache read it.

Every module calls ``_clock.monotonic()`` through this module, so a test moves time for all of
them by replacing this one attribute (see tests/conftest.py's ``clock`` fixture).
"""

from __future__ import annotations

import time

monotonic = time.monotonic
