"""The system's headless Chromium, driven by Playwright: for the console's browser tests and its
bench figures. Never a downloaded browser: Debian's `chromium` package at /usr/bin/chromium (or
CONTINUUM_CHROMIUM), launched with a fresh profile and nothing reaching the network by itself.

    with browser_or_reason() as (launch, reason):   # reason: why no browser is available
        context = launch(profile_dir)                # a Playwright BrowserContext (sync API)
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

CHROMIUM = Path(os.environ.get("CONTINUUM_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)
VIEWPORT = {"width": 1400, "height": 900}


def missing_browser() -> str | None:
    """Why the console cannot be driven in a browser here (None when it can)."""
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (pip install -e '.[test]')"
    if not CHROMIUM.is_file() or not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set CONTINUUM_CHROMIUM)"
    return None


def launch_kwargs(profile_dir: Path) -> dict[str, object]:
    """Arguments for Playwright's `chromium.launch_persistent_context`: the system browser,
    headless, a fresh profile in `profile_dir`."""
    profile_dir.mkdir(parents=True, exist_ok=True)
    return {
        "user_data_dir": str(profile_dir),
        "executable_path": str(CHROMIUM),
        "args": list(CHROMIUM_ARGS),
        "headless": True,
        "viewport": VIEWPORT,
    }
