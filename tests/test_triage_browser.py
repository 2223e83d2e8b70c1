"""The triage's HTML report in a real browser: headless Chromium from the system's packages.

Opt-in (slow, and needs ``/usr/bin/chromium``): ``ICSE_BROWSER_TESTS=1``. The
browser is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``,
JSON messages ended by NUL on its fds 3 and 4, mapped by ``bash``: no Python runs
between fork and exec). A screenshot is written to ``$ICSE_TEST_ARTIFACTS``
(default: the test's temporary directory).
"""

from __future__ import annotations

import base64
import json
import os
import random
import select
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import filehash, triage
from gateway.config import NodeEntry
from gateway.results import HitInfo, NodeAnswer, NodeStatus
from gateway.triage import report, report_html
from tests import media as draw

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(os.environ.get("ICSE_BROWSER_TESTS") != "1" or not CHROMIUM.exists(),
                                reason="browser tests are opt-in: ICSE_BROWSER_TESTS=1 and /usr/bin/chromium")
# A guard against a browser that hangs, not a measurement.
GUARD = 60.0


class Browser:
    """One headless Chromium and the DevTools protocol on a pipe."""

    def __init__(self, profile: Path):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # No network of its own: a local page only, no update, sync, QUIC or background fetches.
        command = (f"exec {CHROMIUM} --headless=new --no-sandbox --disable-gpu --no-first-run "
                   "--disable-background-networking --disable-component-update --disable-sync --disable-quic "
                   "--disable-domain-reliability --no-pings "
                   f"--user-data-dir={profile} --remote-debugging-pipe about:blank "
                   f"3<&{to_browser_r} 4>&{from_browser_w}")
        self.process = subprocess.Popen(["bash", "-c", command], pass_fds=(to_browser_r, from_browser_w),
                                        stdout=subprocess.DEVNULL, stderr=(profile.parent / "chromium.log").open("wb"))
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next = 0
        self.events: list[dict[str, Any]] = []

    def _message(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_browser], [], [], GUARD)
            assert ready, "the browser did not answer"
            chunk = os.read(self._from_browser, 1 << 20)
            assert chunk, "the browser closed its pipe"
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._next += 1
        command: dict[str, Any] = {"id": self._next, "method": method, "params": params}
        if session:
            command["sessionId"] = session
        os.write(self._to_browser, json.dumps(command).encode() + b"\0")
        while True:
            message = self._message()
            if message.get("id") == self._next:
                assert "error" not in message, message
                return message["result"]
            self.events.append(message)

    def wait_event(self, method: str) -> dict[str, Any]:
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._message())

    def close(self) -> None:
        os.close(self._to_browser)
        os.close(self._from_browser)
        self.process.kill()
        self.process.wait()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    running = Browser(tmp_path / "profile")
    try:
        yield running
    finally:
        running.close()


class Knowing:
    """Knows the MD5 of some files (exact copies) and answers every PDQ at distance 9 (near-duplicates)."""

    def __init__(self, exact: set[bytes]):
        self.exact = exact

    async def match(self, items, case, timeout=None, deadline=None):
        def hits(item):
            if item.algorithm == "md5" and item.digest in self.exact:
                return (HitInfo("FR", "FR", "FR-" + item.digest.hex()[:6], series="S-1"),)
            if item.algorithm == "pdq":
                return (HitInfo("ES", "ES", "ES-IMG-5", distance=9),)
            return ()
        return [NodeAnswer("FR", "FR", NodeStatus.HIT, hits=tuple(hits(i) for i in items),
                           truncated=(False,) * len(items))]


async def test_the_report_loads_shows_what_matters_first_and_filters_known_files(tmp_path: Path,
                                                                                browser: Browser) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    rng = random.Random(14)
    exact = set()
    for i in range(40):
        path = tree / f"f{i:02d}.bin"
        path.write_bytes(rng.randbytes(100))
        if i % 10 == 0:
            exact.add(filehash.exact_digests(path)["md5"])
    draw.save_jpeg(draw.drawing(30, (128, 96)), tree / "edited.jpg")
    (tree / "dangling").symlink_to("nowhere")
    run = triage.Triage(str(tree), "BROWSER", [NodeEntry("FR", "FR", "127.0.0.1:1", "fr")], jobs=1)
    result = await run.run(Knowing(exact))
    page = tmp_path / "report.html"
    try:
        report_html.write_html(result, page, {"csv": tmp_path / "files.csv"})
        report.write_csv(result, tmp_path / "files.csv")
        known, files = result.files_known, result.files
    finally:
        result.store.close()
    assert known == 5

    target = browser.send("Target.createTarget", url="about:blank")["targetId"]
    session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    browser.send("Page.enable", session)
    browser.send("Emulation.setDeviceMetricsOverride", session, width=1280, height=1600, deviceScaleFactor=1,
                 mobile=False)
    browser.send("Page.navigate", session, url=page.as_uri())
    browser.wait_event("Page.loadEventFired")

    def evaluate(expression: str) -> Any:
        answer = browser.send("Runtime.evaluate", session, expression=expression, returnByValue=True)
        assert "exceptionDetails" not in answer, answer
        return answer["result"].get("value")

    sections = evaluate("Array.from(document.querySelectorAll('section')).map(s => s.id)")
    assert sections[:4] == ["summary", "countries", "known-by-reference", "near-duplicates"]
    assert {"unreadable", "nodes", "files-section"} <= set(sections)
    assert evaluate("document.querySelectorAll('#known-by-reference details.reference').length") == 5
    assert "edited.jpg" in evaluate("document.getElementById('near-duplicates').innerText")
    visible = "Array.from(document.querySelectorAll('#files tbody tr')).filter(r => !r.hidden).length"
    assert evaluate(visible) == files
    evaluate("document.getElementById('known-only').click()")
    assert evaluate(visible) == known, "the known-only filter hides every other file"
    assert evaluate("document.querySelector('#files td.digest details').open") is False, "digests folded"

    shot = base64.b64decode(browser.send("Page.captureScreenshot", session, format="png")["data"])
    _artifact(tmp_path, "triage-report.png", shot)
    assert shot.startswith(b"\x89PNG")


def _artifact(tmp_path: Path, name: str, data: bytes) -> None:
    """Kept after the run in ``$ICSE_TEST_ARTIFACTS`` when set."""
    artifacts = Path(os.environ.get("ICSE_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / name).write_bytes(data)
