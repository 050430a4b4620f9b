"""The HTML report in a real browser: headless Chromium loads it from disk, decodes every
thumbnail, draws both histograms, logs no error, and leaves a screenshot in test-artifacts/.

CI installs the browser with `apt-get install -y chromium`; without it the test is skipped.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from _report_fixtures import write_scored_dataset

from capfilt.core.layout import Dataset
from capfilt.stages.report import build_report

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--enable-logging=stderr",
    "--v=0",
]

# Added to a copy of the report only: the report itself carries no script. It records load
# errors, CSP violations (which any network request would be) and console errors, then writes
# what the page rendered into the DOM for --dump-dom to return.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  var t = e.target && e.target.outerHTML ? e.target.outerHTML.slice(0, 80) : '';
  window.__errors.push('error: ' + (e.message || t));
}, true);
document.addEventListener('securitypolicyviolation', function (e) {
  window.__errors.push('csp: ' + e.violatedDirective + ' ' + e.blockedURI);
});
var consoleError = console.error;
console.error = function () {
  window.__errors.push('console: ' + Array.prototype.join.call(arguments, ' '));
  consoleError.apply(console, arguments);
};
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var hists = Array.prototype.slice.call(document.querySelectorAll('svg.histogram'));
  var probe = {
    images: imgs.length,
    widths: imgs.map(function (i) { return i.complete ? i.naturalWidth : 0; }),
    histograms: hists.map(function (svg) {
      var bins = Array.prototype.slice.call(svg.querySelectorAll('rect.bin'));
      return {
        source: svg.getAttribute('data-source'),
        column: svg.getAttribute('data-column'),
        bins: bins.length,
        tallest: Math.max.apply(null, bins.map(function (r) { return r.getBBox().height; })),
        width: svg.getBoundingClientRect().width,
        thresholds: svg.querySelectorAll('line.threshold').length
      };
    }),
    height: document.documentElement.scrollHeight,
    errors: window.__errors
  };
  var pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify(probe);
  document.body.appendChild(pre);
});
</script>"""


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def run_browser(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    profile.mkdir(parents=True, exist_ok=False)
    return subprocess.run(
        [browser, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=90,
    )


@pytest.fixture(scope="module")
def browser():
    path = find_browser()
    if path is None:
        pytest.skip("no Chromium here; install it with `apt-get install -y chromium`")
    return path


def test_report_renders_in_chromium(browser, tmp_path):
    ds = write_scored_dataset(tmp_path / "ds")
    report = build_report(Dataset(ds.root))
    page = Path(report.html_path).read_text()
    thumbnails = len(re.findall(r'<img src="data:image/jpeg;base64,', page))
    assert thumbnails > 10

    # Allow inline scripts in the probe copy only; every other rule of the CSP stays.
    probed = page.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';")
    probed = probed.replace("<style>", PROBE + "<style>", 1)
    probe_file = tmp_path / "probe.html"
    probe_file.write_text(probed)
    dumped = run_browser(
        browser,
        tmp_path / "profile-dom",
        "--window-size=1280,900",
        "--virtual-time-budget=10000",
        "--dump-dom",
        probe_file.as_uri(),
    )
    found = re.search(r'<pre id="probe">(.*?)</pre>', dumped.stdout, re.S)
    assert found, f"no probe in the DOM; browser stderr:\n{dumped.stderr[-3000:]}"
    probe = json.loads(html.unescape(found.group(1)))

    assert probe["errors"] == []
    # the page has no script of its own, so the browser should log nothing from it at all
    console_errors = [line for line in dumped.stderr.splitlines() if ":CONSOLE" in line]
    assert console_errors == []
    assert probe["images"] == thumbnails
    assert all(0 < width <= 128 for width in probe["widths"]), probe["widths"]
    itm = [h for h in probe["histograms"] if h["column"] == "itm_score"]
    assert [h["source"] for h in itm] == ["web", "synthetic"]
    for histogram in itm:
        assert histogram["bins"] == 20 and histogram["thresholds"] == 1
    # Every score column with values has its histograms (ITC here), without a threshold.
    assert {h["column"] for h in probe["histograms"]} == {"itm_score", "itc_score"}
    for histogram in probe["histograms"]:
        assert histogram["tallest"] > 50 and histogram["width"] > 300

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "report.png"
    screenshot.unlink(missing_ok=True)
    height = min(max(probe["height"], 800), 8000)
    shot = run_browser(
        browser,
        tmp_path / "profile-shot",
        f"--window-size=1280,{height}",
        f"--screenshot={screenshot}",
        Path(report.html_path).as_uri(),
    )
    assert screenshot.exists(), shot.stderr[-3000:]
    from PIL import Image

    with Image.open(screenshot) as img:
        assert img.size == (1280, height)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 200  # drawn, not a blank page
