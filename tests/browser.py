"""Open a page in headless Chromium (Debian's `chromium` package) once: a screenshot, the DOM after load with what a
small script measured in it, and every request the page made (Chromium's net log, with every host name resolving
nowhere, so nothing can leave the machine even if the page asked)."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--run-all-compositor-stages-before-draw",
         "--virtual-time-budget=10000", "--hide-scrollbars"]

# Runs at load and leaves its findings on <body data-rendered="...">, which --dump-dom prints: each image's natural
# width and whether it finished loading, and each SVG's drawn size and number of lines.
MEASURE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth}));
  const svgs = [...document.querySelectorAll("svg")].map(s => {
    const box = s.getBoundingClientRect();
    return {width: box.width, height: box.height, lines: s.querySelectorAll("polyline").length};
  });
  document.body.setAttribute("data-rendered", JSON.stringify({images, svgs}));
});
</script>"""


@dataclass(frozen=True)
class Opened:
    dom: str
    rendered: dict  # {"images": [{alt, complete, width}], "svgs": [{width, height, lines}]}
    screenshot: Path
    page_requests: list[str]  # URLs the page itself asked the network for (none for an offline page)
    net_events: int


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise AssertionError("chromium is not installed: `make test` installs it "
                             "(GMPIPE_SETUP_BROWSER=yes bash .ci/setup.sh)")
    return found


def page_requests(net_log: Path) -> tuple[list[str], int]:
    """URLs of the network requests started on behalf of a file:// page, from a Chromium net log, and the number of
    events read. The browser's own background requests carry another network isolation key and are left out."""
    log = json.loads(net_log.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = [event["params"]["url"] for event in log["events"]
            if event["type"] == start_job and "url" in event.get("params", {})
            and "file://" in event["params"].get("network_isolation_key", "")]
    return urls, len(log["events"])


def open_page(page: Path, work: Path, width: int = 1280, height: int = 2400) -> Opened:
    """``page`` opened once in a fresh profile under ``work``, with MEASURE injected into a copy of it."""
    work.mkdir(parents=True, exist_ok=True)
    probe = work / page.name
    probe.write_text(page.read_text().replace("</body>", MEASURE + "</body>"))
    screenshot, net_log = work / "screenshot.png", work / "net-log.json"
    result = subprocess.run(
        [chromium(), *FLAGS, f"--user-data-dir={work / 'profile'}", f"--window-size={width},{height}",
         f"--log-net-log={net_log}", f"--screenshot={screenshot}", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    dom = result.stdout
    marker = 'data-rendered="'
    assert marker in dom, f"the page's load event never ran: {result.stderr[-2000:]}"
    encoded = dom.split(marker, 1)[1].split('"', 1)[0]
    rendered = json.loads(encoded.replace("&quot;", '"').replace("&amp;", "&"))
    requests, events = page_requests(net_log)
    return Opened(dom, rendered, screenshot, requests, events)
