"""The dashboard's "inside the model" panel in a real browser (headless chromium through Playwright, as in
test_browser.py): the time scrubber moves every view to another evaluation step, and what each view draws is checked
against the run's inside.jsonl: heatmaps, head-score lines, loss by position, the logit lens. Skipped, with the
reason, where chromium or Playwright is missing."""

from __future__ import annotations

import pytest

from helpers import ServerThread, http, read_jsonl, tiny_config, write_corpus
from test_browser import browser, open_page  # noqa: F401 - the shared chromium fixture

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # every test here

SCORES = ("previous_token", "induction", "duplicate_token")


@pytest.fixture(scope="module")
def inside_run(tmp_path_factory):
    """A 2-layer, 2-head run with 4 evaluations (steps 0, 10, 20, 30), served."""
    from lmlab.serve.app import create_app
    from lmlab.serve.runs import RunSet
    from lmlab.train import train

    root = tmp_path_factory.mktemp("inside-browser")
    corpus = write_corpus(root / "corpus.txt", 300)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_CACHE", str(root / "cache"))
        train(tiny_config(corpus, root / "deep", max_steps=30, model_n_layer=2, tensorboard=False,
                          trajectory_snapshots=0))
    with ServerThread(create_app(RunSet([root / "deep"]))) as url:
        yield url, root / "deep"


def test_the_log_api_serves_inside_records(inside_run):
    url, run = inside_run
    status, body = http(url + "/api/log?run=deep&file=inside")
    assert status == 200 and body["records"] == read_jsonl(run / "inside.jsonl")


def shown(page) -> dict:
    """What the panel draws: the scrubbed step, each heatmap's cells, each chart's data, the lens."""
    return page.evaluate("""() => ({
        step: document.getElementById('inside-step-label').textContent,
        heatmaps: [...document.querySelectorAll('#attention canvas')].map(c => ({
            layer: Number(c.dataset.layer), head: Number(c.dataset.head), percent: JSON.parse(c.dataset.percent)})),
        charts: Object.fromEntries(Object.entries(inside.charts).map(([id, c]) => [id, {
            data: c.plot.data.map(column => Array.from(column)), labels: c.plot.series.map(s => s.label)}])),
        lens: [...document.querySelectorAll('#lens tbody tr')].map(tr => [...tr.querySelectorAll('.chip')].map(
            chip => [chip.dataset.token, Number(chip.dataset.prob)])),
    })""")


def check_view(view: dict, records: list[dict], index: int, prompt: int) -> None:
    record = records[index]
    assert view["step"] == f"step {record['step']}"
    entry = record["attention"][prompt]
    assert [(h["layer"], h["head"]) for h in view["heatmaps"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for h in view["heatmaps"]:
        assert h["percent"] == entry["percent"][h["layer"]][h["head"]]
    lens = next(lens for lens in record["lens"] if lens["prompt"] == entry["prompt"])
    assert view["lens"] == lens["top"]
    steps = [r["step"] for r in records]
    for name in SCORES:
        chart = view["charts"][name]
        assert chart["data"][0] == steps
        assert chart["data"][1:] == [[r["heads"][name][layer][head] for r in records]
                                     for layer in range(2) for head in range(2)]
        assert chart["labels"][1:] == ["L0 H0", "L0 H1", "L1 H0", "L1 H1"]
    repeat = view["charts"]["repeat_loss"]["data"]
    assert repeat == [steps, [r["repeat_loss"]["first"] for r in records],
                      [r["repeat_loss"]["second"] for r in records]]
    positions = view["charts"]["loss_by_position"]
    curves = {int(label.split()[1]): values for label, values in zip(positions["labels"][1:], positions["data"][1:])}
    assert record["step"] in curves  # the scrubbed step is always among the curves
    for r in records:
        if r["step"] in curves:
            assert curves[r["step"]] == r["loss_by_position"]["loss"]


def test_the_inside_panel_follows_the_scrubber(browser, inside_run, tmp_path):  # noqa: F811 - the fixture
    url, run = inside_run
    records = read_jsonl(run / "inside.jsonl")
    assert [r["step"] for r in records] == [0, 10, 20, 30]
    page, errors = open_page(browser)
    page.goto(url + "/#dashboard")
    page.wait_for_function("document.querySelectorAll('#attention canvas').length === 4")
    page.wait_for_function("document.getElementById('inside-step-label').textContent === 'step 30'")
    check_view(shown(page), records, 3, 0)  # it opens at the newest evaluation

    page.focus("#inside-step")
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")  # the scrubber mid-way: step 10
    page.wait_for_function("document.getElementById('inside-step-label').textContent === 'step 10'")
    check_view(shown(page), records, 1, 0)
    assert page.get_attribute("figure[data-inside=induction]", "data-points") == str(4 * len(records))

    page.select_option("#inside-prompt", "1")
    first_head = records[1]["attention"][1]["percent"][0][0]
    page.wait_for_function("""expected => JSON.parse(document.querySelector('#attention canvas').dataset.percent)
        .flat().join() === expected""", arg=",".join(str(v) for row in first_head for v in row))
    check_view(shown(page), records, 1, 1)

    page.locator("#inside").screenshot(path=str(tmp_path / "inside.png"))
    assert (tmp_path / "inside.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert errors == []
    page.close()
