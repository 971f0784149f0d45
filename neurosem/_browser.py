"""Open an HTML report in a real headless Chromium: console errors, loaded images, a screenshot.

Used by the tests and by ``benchmarks/html_check.py``; needs Chromium (Debian: ``apt-get install
chromium``). Nothing here goes to the network: the page is a local file and Chromium's background
networking is switched off.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

_PROBE = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.title = 'neurosem-probe images ' + ok + '/' + imgs.length;
});
</script>
"""

_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--disable-default-apps", "--disable-extensions", "--hide-scrollbars"]


@dataclass
class BrowserCheck:
    """What Chromium saw: images decoded out of all ``<img>``, console errors, screenshot path."""

    images_loaded: int
    images_total: int
    console_errors: list[str] = field(default_factory=list)
    screenshot: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.console_errors and self.images_total > 0 and self.images_loaded == self.images_total


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(binary: str, args: list[str], profile: str, timeout: float) -> subprocess.CompletedProcess:
    cmd = [binary, *_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def check_html(page: str | Path, screenshot: str | Path | None = None, window: tuple[int, int] = (1280, 1600),
               timeout: float = 120.0) -> BrowserCheck:
    """Load ``page`` offline in headless Chromium and report what it showed.

    A copy of the page with a small probe script appended is loaded (the original is untouched);
    the probe writes the number of decoded images into the title, read back with ``--dump-dom``.

    Example:
        >>> check_html("runs/quickstart/dissect/index.html").ok  # doctest: +SKIP
        True
    """
    binary = find_chromium()
    if binary is None:
        raise RuntimeError("Chromium not found: install it (Debian: apt-get install chromium)")
    page = Path(page).resolve()
    html = page.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        probe = page.parent / f".probe-{os.getpid()}-{page.name}"
        probe.write_text(html + _PROBE, encoding="utf-8")
        try:
            dom = _run(binary, ["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], tmp, timeout)
        finally:
            probe.unlink(missing_ok=True)
        m = re.search(r"neurosem-probe images (\d+)/(\d+)", dom.stdout)
        if m is None:
            raise RuntimeError(f"Chromium did not render {page} (exit {dom.returncode}): {dom.stderr.strip()[-300:]}")
        errors = [line for line in dom.stderr.splitlines()
                  if "CONSOLE" in line and ("ERROR" in line.upper() or "Uncaught" in line)]
        shot = None
        if screenshot is not None:
            shot = Path(screenshot).resolve()
            shot.parent.mkdir(parents=True, exist_ok=True)
            _run(binary, [f"--window-size={window[0]},{window[1]}", f"--screenshot={shot}",
                          "--virtual-time-budget=10000", page.as_uri()], tmp, timeout)
            if not shot.exists():
                raise RuntimeError(f"Chromium wrote no screenshot of {page}")
    return BrowserCheck(int(m.group(1)), int(m.group(2)), errors, shot)
