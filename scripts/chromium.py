"""Debian's headless Chromium, driven by Playwright without any browser download.

The console's browser tests (tests/web/browser.py) and its screenshots
(scripts/console_screenshot.py) launch it the same way: the system binary that
`python3 dev.py test` installs (apt-get install chromium), flags that work on a
machine with no display, GPU, sandbox or outside network, and a fresh profile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from playwright.sync_api import BrowserContext, Playwright

CHROMIUM: Final = Path("/usr/bin/chromium")
FLAGS: Final = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


class ChromiumMissing(RuntimeError):
    """/usr/bin/chromium is not installed."""


def launch(
    pw: Playwright, profile: Path, *, width: int = 1600, height: int = 900
) -> BrowserContext:
    """A browser context of Chromium on the fresh profile directory `profile`."""
    if not CHROMIUM.exists():
        raise ChromiumMissing(
            f"{CHROMIUM} is missing: `python3 dev.py test` installs it (apt-get install chromium)"
        )
    return pw.chromium.launch_persistent_context(
        str(profile),
        executable_path=str(CHROMIUM),
        headless=True,
        args=list(FLAGS),
        viewport={"width": width, "height": height},
    )
