"""``alignkit report``: one self-contained HTML page for the tracked run (sft, rm, dpo, ppo,
compare; the ``tracked_run`` fixture), checked as HTML and, where a Chromium can be had, as
rendered in headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from alignkit.errors import UserError
from alignkit.eval.run_page import write_run_report

STAGES = ("sft", "rm", "dpo", "ppo", "compare")
CHROMIUM = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
#: Added to a copy of the page for the browser test: an image that did not decode is an error
CHECK_IMAGES = (
    "<script>window.addEventListener('load', () => { for (const i of document.images) "
    "if (!i.complete || i.naturalWidth === 0) console.error('broken image: ' + i.alt); "
    "document.body.dataset.images = document.images.length; });</script>"
)


class Page(HTMLParser):
    """What the checks need from the page: ids, image sources, links, scripts, text."""

    def __init__(self, html: str):
        super().__init__()
        self.ids, self.images, self.links, self.tags = [], [], [], []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if "href" in attrs:
            self.links.append(attrs["href"])

    def handle_data(self, data):
        self.text.append(data)


def alignkit(*args):
    return subprocess.run([sys.executable, "-m", "alignkit", *map(str, args)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def page(tracked_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("page") / "run.html"
    proc = alignkit("report", tracked_run, "-o", out)
    assert proc.returncode == 0, proc.stderr
    return out


def test_report_is_one_self_contained_page_with_every_stage(page):
    html = page.read_text()
    parsed = Page(html)
    assert [i for i in parsed.ids if i.startswith("stage-")] == [f"stage-{s}" for s in STAGES]
    assert "script" not in parsed.tags and "link" not in parsed.tags  # no JS, no stylesheet
    assert all(link.startswith("#stage-") for link in parsed.links)  # nothing outside the page
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", html)
    assert len(parsed.images) >= 8  # curves, health charts, the comparison's plots
    for src in parsed.images:  # every picture is inline and a real PNG
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    text = " ".join(parsed.text)
    svg = html[html.index("<svg") : html.index("</svg>")]
    for stage in STAGES:  # the graph: one box per stage, with its status
        assert f">{stage}</text>" in svg
    assert svg.count(">complete") == len(STAGES)
    assert svg.count('stroke-dasharray="5,4"') >= 2  # rm -> ppo, rm -> compare: read, not parent
    assert "Held-out evaluation" in text and "gain 95% CI" in text
    assert "<b>kl_limit</b> at step 1" in html  # the tripped health check, where it tripped
    assert "Probe samples" in text and "Win rates" in text


def test_sample_browser_shows_each_prompt_with_every_model(page, tracked_run):
    html = page.read_text()
    samples = [json.loads(x) for x in (tracked_run / "compare" / "samples.jsonl").open()]
    prompts = {r["prompt"] for r in samples}
    assert len(prompts) == 4
    for prompt in prompts:  # each prompt is a <details>, its summary the prompt text
        assert f"<summary>{prompt}</summary>" in html
    for r in samples:
        assert r["completion"].replace("&", "&amp;").replace("<", "&lt;") in html
    assert {r["model"] for r in samples} == {"sft", "dpo", "ppo", "base"}


def test_alignkit_run_writes_the_page_and_the_comparison_links_to_it(tracked_run):
    assert (tracked_run / "report.html").exists()
    assert "](../report.html)" in (tracked_run / "compare" / "report.md").read_text()


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(UserError, match="no manifest.json here"):
        write_run_report(tmp_path)


def chromium() -> str | None:
    """A headless Chromium: on PATH, or installed from the distribution's packages on CI (as
    root, with apt)."""
    found = next((shutil.which(b) for b in CHROMIUM if shutil.which(b)), None)
    if found or not os.environ.get("CI") or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    quick = ["-o", "Acquire::http::Timeout=20", "-o", "Acquire::Retries=0"]  # no mirror: move on
    for cmd in (["apt-get", *quick, "update", "-qq"],
                ["apt-get", *quick, "install", "-y", "-qq", "chromium-headless-shell"]):  # fmt: skip
        try:
            if subprocess.run(cmd, capture_output=True, env=env, timeout=240).returncode:
                break
        except subprocess.TimeoutExpired:
            break
    return shutil.which("chromium-headless-shell")


def render(browser: str, html_path: Path, tmp: Path) -> tuple[str, list[str]]:
    """(the DOM after load, the console messages) of a copy of the page with the image check."""
    copy = tmp / "checked.html"
    copy.write_text(html_path.read_text().replace("</body>", CHECK_IMAGES + "</body>"))
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
         "--v=0", "--virtual-time-budget=5000", "--dump-dom", copy.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


def test_page_renders_in_headless_chromium_without_console_errors(page, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("no Chromium on PATH (apt-get install chromium-headless-shell)")
    broken = tmp_path / "broken.html"  # the check itself: a bad image is reported
    broken.write_text('<html><body><img alt="x" src="data:image/png;base64,AAAA"></body></html>')
    assert any("broken image: x" in m for m in render(browser, broken, tmp_path)[1])
    dom, console = render(browser, page, tmp_path)
    assert console == []
    assert int(re.search(r'data-images="(\d+)"', dom).group(1)) >= 8
    for stage in STAGES:
        assert f'id="stage-{stage}"' in dom
