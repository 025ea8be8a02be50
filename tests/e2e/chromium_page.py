"""Debian's headless Chromium driven by playwright (never `playwright install`: no browser is
downloaded here). A missing browser fails the test with how to install it, never a skip."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def require_chromium() -> None:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's browser with "
            "`apt-get update && apt-get install -y chromium` (.ci/run does this)"
        )


@contextlib.asynccontextmanager
async def chromium_page(profile_dir: Path, console_errors: list[str]) -> AsyncIterator:
    """A page in a fresh profile; console errors and uncaught page errors land in the list."""
    require_chromium()
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        context = await p.chromium.launch_persistent_context(
            str(profile_dir), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1280, "height": 900},
        )  # fmt: skip
        try:
            page = await context.new_page()
            page.on("console", lambda m: m.type == "error" and console_errors.append(m.text))
            page.on("pageerror", lambda exc: console_errors.append(f"uncaught: {exc}"))
            yield page
        finally:
            await context.close()
