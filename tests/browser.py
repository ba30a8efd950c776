"""Pages checked in headless Chromium (when the machine has it): do their images load."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def images_loaded(page: Path) -> str:
    """Load `page` in headless Chromium; `images=N broken=K alt,...` as a script in a copy of
    the page beside it (same relative links) finds them once the page has loaded."""
    check = page.with_name("check.html")
    script = (
        "<script>window.addEventListener('load', () => {"
        "const imgs = [...document.images];"
        "const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);"
        "const out = document.createElement('pre'); out.id = 'result';"
        "out.textContent = `images=${imgs.length} broken=${bad.length} ${bad.join(',')}`;"
        "document.body.appendChild(out);});</script>"
    )
    check.write_text(page.read_text().replace("</body>", script + "</body>"))
    command = [chromium(), "--headless", "--disable-gpu", "--no-sandbox"]
    command += ["--virtual-time-budget=5000", "--dump-dom", check.as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=60).stdout
    check.unlink()
    result = re.search(r'<pre id="result">([^<]*)</pre>', dom)
    assert result, dom[-2000:]
    return html.unescape(result.group(1)).strip()
