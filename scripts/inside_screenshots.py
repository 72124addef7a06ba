"""The pictures of docs/inside.md: the dashboard's inside panel with its scrubber mid-way, and the report's inside
section, taken from a run in headless chromium (needs Playwright and chromium, as tests/test_browser.py does).

    python scripts/inside_screenshots.py RUN [--step STEP] [--out docs]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import ServerThread  # noqa: E402 - after the path is set
from lmlab.report.report_page import write_report  # noqa: E402
from lmlab.run import Run  # noqa: E402
from lmlab.serve.app import create_app  # noqa: E402
from lmlab.serve.runs import RunSet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--step", type=int, help="the step to scrub to (default: the middle evaluation)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    steps = [r["step"] for r in Run(args.run).inside()]
    index = steps.index(args.step) if args.step is not None else len(steps) // 2
    with ServerThread(create_app(RunSet([args.run]))) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium")
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url + "/#dashboard")
        page.wait_for_function("document.querySelectorAll('#attention canvas').length > 0")
        page.eval_on_selector("#inside-step", "(e, i) => { e.value = i; e.dispatchEvent(new Event('input')); }",
                              index)
        page.wait_for_function(f"document.getElementById('inside-step-label').textContent === 'step {steps[index]}'")
        page.wait_for_timeout(300)
        top = page.locator("#inside-run").evaluate("e => e.closest('h2').getBoundingClientRect().top + scrollY")
        box = page.locator("#inside").bounding_box()
        page.set_viewport_size({"width": 1400, "height": int(box["y"] + box["height"] + 40)})
        page.screenshot(path=str(args.out / "inside.png"),
                        clip={"x": 0, "y": top - 8, "width": 1400, "height": box["y"] + box["height"] - top + 16})
        with tempfile.TemporaryDirectory() as folder:
            report = write_report([args.run], Path(folder) / "report.html")
            page.set_viewport_size({"width": 1320, "height": 1000})
            page.goto(report.as_uri())
            page.locator("#inside").screenshot(path=str(args.out / "inside-report.png"))
        browser.close()
    print(f"wrote {args.out / 'inside.png'} (step {steps[index]}) and {args.out / 'inside-report.png'}")


if __name__ == "__main__":
    main()
