"""An echo agent whose module takes CONTINUUM_TEST_IMPORT_S seconds to import: a replica that is
slow to start, silent on its status pipe until the import is done (like a cold start on a busy
host)."""

from __future__ import annotations

import os
import time

from fixtures_agents.basic import Echo

# Deliberately blocking, at import: before the replica's event loop (and its status lines) start.
time.sleep(float(os.environ.get("CONTINUUM_TEST_IMPORT_S", "0")))


class SlowStart(Echo):
    """Echo, after a slow import."""

    name = "slow-start"
    tags = ()
