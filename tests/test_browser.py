"""`lmlab serve` in a real browser: headless Debian chromium driven by Playwright opens the dashboard and the
playground, and what the page shows is checked against the run's files and lmlab.predict. Skipped, with the
reason, where chromium or Playwright is missing."""

from __future__ import annotations

import os
import json
import shutil

import pytest

from helpers import HANG_S, read_jsonl
from lmlab.run import load_run
from lmlab.predict import next_token_distribution
from lmlab.sample import text_banned

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # every test here

PROMPT = "the cat "
ROWS = 20  # bars the playground shows


def BANNED(run):  # noqa: N802
    return text_banned(run.tokenizer)  # what the playground never draws


def chromium_path() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        pytest.skip("chromium is not installed: no real browser to test the web app in (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="Playwright is not installed (pip install -e '.[test]')")
    with sync_api.sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=path)
        except Exception as e:  # a chromium that cannot start here (missing libraries, no sandbox support)
            pytest.skip(f"chromium at {path} does not start under Playwright: {str(e).splitlines()[0]}")
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from test_serve import LIMITS, ServerThread, tiny_runs

    from lmlab.serve.app import create_app
    from lmlab.serve.runs import RunSet

    root = tiny_runs(tmp_path_factory)
    with ServerThread(create_app(RunSet([root / "alpha", root / "beta"]), LIMITS)) as url:
        yield url, root


def bars(page) -> list[dict]:
    return page.eval_on_selector_all("#bars .bar-row", """rows => rows.map(r => ({
        token: r.dataset.token, renormalized: Number(r.dataset.renormalized),
        probability: Number(r.dataset.probability), kept: !r.classList.contains("dropped")}))""")


def wait_for_bars(page, rows) -> None:
    """Until the bars show these rows of lmlab.predict.next_token_distribution (slider moves send several requests;
    the page keeps only the newest answer)."""
    page.wait_for_function("""expected => {
        const shown = [...document.querySelectorAll('#bars .bar-row')];
        return shown.length === expected.length && shown.every((r, i) => r.dataset.token === expected[i][0]
            && Math.abs(Number(r.dataset.renormalized) - expected[i][1]) < 1e-6);
    }""", arg=[[r.token, r.renormalized] for r in rows])


def open_page(browser):
    """A 1280x900 page with a ceiling against hangs, and the list its JavaScript errors land in."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(HANG_S * 1000)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    return page, errors


def test_dashboard_and_playground(browser, served, tmp_path):
    url, root = served
    page, errors = open_page(browser)

    # (1, 2) the dashboard lists both runs and draws their losses: every train and val loss in their logs
    page.goto(url + "/#dashboard")
    page.wait_for_selector('#runs tr[data-run="beta"]')
    assert page.inner_text('#runs tr[data-run="alpha"]').split("\t")[2] == "finished"
    # how the val loss was measured, on the val loss cell: training evaluates in non-overlapping windows
    val_cell = page.locator('#runs tr[data-run="alpha"] td').nth(6)
    assert val_cell.get_attribute("title") == "windows of 16 tokens, no overlap"
    logged = sum(1 for run in ("alpha", "beta") for r in read_jsonl(root / run / "metrics.jsonl")
                 if "train_loss" in r or "val_loss" in r)
    page.wait_for_function(f"document.querySelector('figure[data-chart=loss]').dataset.points == {logged}")
    assert int(page.get_attribute('figure[data-chart="lr"]', "data-points")) > 0
    assert page.locator("figure[data-chart=loss] canvas").count() == 1
    assert not page.locator("figure[data-chart=answers]").is_visible()  # no SFT run: no held-out answers
    probes = read_jsonl(root / "alpha" / "probes.jsonl")
    page.wait_for_selector("#probes .probe")
    assert page.locator("#probes .probe tbody tr").count() == sum(len(r["probes"]) for r in probes)
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)

    # (3) the playground: bars for the prompt, and the temperature slider changes them as lmlab.predict says
    alpha = load_run(root / "alpha")
    page.goto(url + "/#playground")
    page.select_option("#model", "alpha")
    page.fill("#prompt", PROMPT)
    expected = next_token_distribution(alpha.model, alpha.tokenizer, PROMPT, ROWS, banned=BANNED(alpha))
    wait_for_bars(page, expected)
    before = bars(page)
    assert [b["token"] for b in before] == [r.token for r in expected]
    assert [b["renormalized"] for b in before] == pytest.approx([r.renormalized for r in expected], abs=1e-6)
    page.focus("#temperature")
    for _ in range(10):  # 1.0 -> 0.5 in steps of 0.05, as a user with the keyboard
        page.keyboard.press("ArrowLeft")
    assert page.input_value("#temperature") == "0.5"
    cooler = next_token_distribution(alpha.model, alpha.tokenizer, PROMPT, ROWS, temperature=0.5,
                                    banned=BANNED(alpha))
    wait_for_bars(page, cooler)
    after = bars(page)
    assert [b["renormalized"] for b in after] == pytest.approx([r.renormalized for r in cooler], abs=1e-6)
    assert after[0]["renormalized"] > before[0]["renormalized"]  # a cooler distribution is sharper

    # top-k 3: only three tokens can be drawn
    page.fill("#top-k", "3")
    page.wait_for_function("document.querySelectorAll('#bars .bar-row.dropped').length === %d" % (ROWS - 3))
    kept = [b["token"] for b in bars(page) if b["kept"]]
    assert kept == [r.token for r in cooler[:3]]

    # (4) "Next token" appends one token, one of the three that can be drawn, and says its probability
    text = page.input_value("#prompt")
    page.click("#next-token")
    page.wait_for_function(f"document.getElementById('prompt').value.length > {len(text)}")
    grown = page.input_value("#prompt")
    token = grown[len(text):]
    assert grown.startswith(text) and len(token) == 1
    assert token.replace(" ", "␣").replace("\n", "\\n") in kept
    assert "probability" in page.inner_text("#sampled")

    # streamed generation grows the text by the number of tokens asked for (one character each here)
    page.fill("#max-tokens", "15")
    page.click("#generate")
    page.wait_for_function("document.getElementById('sampled').textContent.startsWith('generated')")
    assert len(page.input_value("#prompt")) == len(grown) + 15

    # the prompt coloured by surprisal: one coloured span per predicted token
    page.check("#color-surprisal")
    page.wait_for_selector("#surprisal .tok")
    assert page.locator("#surprisal .tok").count() == len(page.input_value("#prompt")) - 1

    # (5) screenshots
    page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    for name in ("dashboard.png", "playground.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert errors == []
    page.close()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    from test_serve import KEY, LIMITS, ServerThread, tiny_runs

    from lmlab.serve.app import create_app
    from lmlab.serve.runs import RunSet

    root = tiny_runs(tmp_path_factory)
    with ServerThread(create_app(RunSet([root / "alpha", root / "beta"]), LIMITS, api_key=KEY)) as url:
        yield url, KEY


def test_the_page_asks_once_for_the_api_key(browser, keyed):
    url, key = keyed
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(HANG_S * 1000)
    errors, refused = [], []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("response", lambda r: refused.append(r.url) if r.status == 401 else None)

    page.goto(url + "/#dashboard")
    page.wait_for_selector("#key-dialog[open]")
    assert page.locator('#runs tr[data-run="alpha"]').count() == 0  # nothing was shown without the key
    page.fill("#api-key", key)
    page.click("#key-submit")
    page.wait_for_selector('#runs tr[data-run="beta"]')
    page.wait_for_function("Number(document.querySelector('figure[data-chart=loss]').dataset.points) > 0")
    page.wait_for_timeout(2500)  # another poll of the dashboard, with the key
    assert page.get_attribute("#key-dialog", "data-asked") == "1"
    assert not page.locator("#key-dialog").evaluate("d => d.open")

    # a reload keeps the key (sessionStorage), and the playground's POSTs and its stream send it too
    page.goto(url + "/#playground")
    page.reload()
    page.select_option("#model", "alpha")
    page.fill("#prompt", PROMPT)
    page.wait_for_selector("#bars .bar-row")
    page.fill("#max-tokens", "5")
    page.click("#generate")
    page.wait_for_function("document.getElementById('sampled').textContent.startsWith('generated')")
    assert len(page.input_value("#prompt")) == len(PROMPT) + 5
    assert page.get_attribute("#key-dialog", "data-asked") is None  # not asked again after the reload
    assert len(refused) >= 1 and errors == []
    context.close()


def test_a_wrong_key_is_asked_for_again(browser, keyed):
    url, key = keyed
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(HANG_S * 1000)
    page.goto(url + "/")
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#api-key", "not-the-key")
    page.click("#key-submit")
    page.wait_for_function("document.getElementById('key-error').textContent.includes('refused')")
    assert page.locator("#key-dialog").evaluate("d => d.open")
    page.fill("#api-key", key)
    page.click("#key-submit")
    page.wait_for_selector('#runs tr[data-run="beta"]')
    assert page.get_attribute("#key-dialog", "data-asked") == "2"
    context.close()


def test_an_sft_run_shows_its_held_out_answers(browser, tmp_path):
    """The held-out answers chart: hidden for pretraining runs, and for an SFT run one line per skill plus the share
    that ended their turn, every logged value drawn; its val loss is labelled as the masked loss."""
    from test_serve import LIMITS, ServerThread
    from test_serve_sft import sft_run

    from lmlab.serve.app import create_app
    from lmlab.serve.runs import RunSet

    run = sft_run(tmp_path / "runs")
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "exact_match" in r]
    with ServerThread(create_app(RunSet([run]), LIMITS)) as url:
        page, errors = open_page(browser)
        page.goto(url + "/#dashboard")
        expected = sum(len(r["exact_match"]) + 1 for r in evals)
        page.wait_for_function(f"document.querySelector('figure[data-chart=answers]').dataset.points == {expected}")
        figure = page.locator("figure[data-chart=answers]")
        assert figure.is_visible() and figure.locator("canvas").count() == 1
        legend = figure.locator(".u-legend").inner_text()
        assert all(f"chat {skill} exact match" in legend for skill in evals[0]["exact_match"])
        assert "chat ended turn" in legend
        assert "chat masked val" in page.locator("figure[data-chart=loss] .u-legend").inner_text()
        page.close()
    assert errors == []


def test_an_rl_run_shows_its_rewards_and_its_completions_by_step(browser, served, tmp_path):
    """--stage rl on the dashboard: the rewards chart appears with every logged value drawn, and the completions of
    each evaluation, newest first shown, scrubbed back to an earlier step with the slider."""
    from test_serve import LIMITS, ServerThread

    from lmlab.serve.app import create_app
    from lmlab.serve.runs import RunSet

    run = tmp_path / "rl"
    shutil.copytree(served[1] / "alpha", run)
    with open(run / "metrics.jsonl", "a") as f:  # what an rl run logs besides a text run's fields
        for step in (21, 22):
            f.write(json.dumps({"step": step, "train_loss": 0.1, "reward": 0.25 * step - 5, "pass_at_g": 0.5}) + "\n")
        f.write(json.dumps({"step": 22, "val_loss": 1.0, "heldout_reward": 0.75}) + "\n")
    records = [{"step": s, "held_out": [{"prompt": "3 plus 4 is ", "completion": answer, "reward": reward}],
                "train": [{"prompt": "1 plus 1 is ", "completion": "2.", "reward": 1.0}]}
               for s, answer, reward in ((10, "8.", 0.0), (22, "7.", 1.0))]
    (run / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with ServerThread(create_app(RunSet([run]), LIMITS)) as url:
        page, errors = open_page(browser)
        page.goto(url + "/#dashboard")
        page.wait_for_function("document.querySelector('figure[data-chart=rewards]').dataset.points == 5")
        assert page.locator("figure[data-chart=rewards]").is_visible()
        page.wait_for_selector("#completions table")
        assert page.inner_text("#completions-at").startswith("step 22 (2 of 2)")
        assert "7." in page.inner_text("#completions") and "8." not in page.inner_text("#completions")
        page.locator("#completions-step").fill("0")
        page.wait_for_function("document.getElementById('completions-at').textContent.startsWith('step 10')")
        assert "8." in page.inner_text("#completions")
        page.close()
    assert errors == []
    page, errors = open_page(browser)  # a text run: no rewards chart, and the completions panel says why
    page.goto(served[0] + "/#dashboard")
    page.wait_for_function("Number(document.querySelector('figure[data-chart=loss]').dataset.points) > 0")
    assert not page.locator("figure[data-chart=rewards]").is_visible()
    page.close()
    assert errors == []
