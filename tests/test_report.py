"""`lmlab report`: one self-contained HTML page from what training wrote, checked against the run's own files
(metrics.jsonl, probes.jsonl, config.json), the PNG format, the figures' data, and a real browser when one is here."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from helpers import HANG_S, read_jsonl, tiny_config, write_corpus
from lmlab.cli import main
from lmlab.report.chart import PNG_SIGNATURE, png_bytes, smooth
from lmlab.report.curves import grad_norm_figure, loss_figure
from lmlab.report.logs import load_run_logs
from lmlab.report.report_page import write_report
from lmlab.tokenizer import visible

SECTION_IDS = ["loss", "accuracy", "schedule", "gradients", "throughput", "probes", "samples", "landscape", "config"]
PROMPT = "the cat "
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


class Reports:
    def __init__(self, root: Path):
        self.root = root
        self.alpha, self.beta = root / "alpha", root / "beta"
        self.page_path = root / "out" / "report.html"
        self.files = root / "out" / "report_files"
        self.landscape_png = b""

    @property
    def page(self) -> str:
        return self.page_path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> Reports:
    """Two tiny runs (different learning rates, one with a landscape PNG) and one report of both."""
    r = Reports(tmp_path_factory.mktemp("report"))
    corpus = write_corpus(r.root / "corpus.txt", 200, seed=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_CACHE", str(tmp_path_factory.mktemp("report-cache")))
        from lmlab.train import train

        for run, lr in ((r.alpha, 3e-3), (r.beta, 1e-2)):
            train(tiny_config(corpus, run, max_steps=24, eval_interval=6, telemetry_interval=2, sample_tokens=20,
                              probe_prompts=(PROMPT,), tensorboard=False, trajectory_snapshots=0, optim_lr=lr,
                              optim_grad_clip=0.5))
    # what `lmlab landscape` would leave behind, for alpha only
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 2))
    FigureCanvasAgg(fig)
    fig.add_subplot().contourf(np.random.default_rng(0).random((8, 8)))
    (r.alpha / "landscape").mkdir()
    r.landscape_png = png_bytes(fig)
    (r.alpha / "landscape" / "surface_2d.png").write_bytes(r.landscape_png)
    (r.alpha / "landscape" / "landscape.json").write_text("{}")
    write_report([r.alpha, r.beta], r.page_path)
    return r


def section(page: str, section_id: str) -> str:
    m = re.search(rf'<section id="{section_id}">(.*?)</section>', page, re.S)
    assert m, f"no section {section_id}"
    return m.group(1)


def embedded_pngs(text: str) -> list[bytes]:
    return [base64.b64decode(b64) for b64 in DATA_URI.findall(text)]


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_section_is_there_with_a_heading(reports):
    page = reports.page
    for sid in SECTION_IDS:
        assert page.count(f'id="{sid}"') == 1, sid
    for sid in SECTION_IDS:
        if sid != "accuracy":
            assert re.search(r"<h2>[^<]+</h2>", section(page, sid)), sid
    assert re.search(r'<section id="loss">.*id="accuracy".*</section>\s*<section id="schedule">', page, re.S)


@pytest.mark.slow
def test_images_are_embedded_pngs_and_saved_beside_the_page(reports):
    import matplotlib.image

    pngs = embedded_pngs(reports.page)
    assert len(pngs) >= 11
    for data in pngs:
        assert data.startswith(PNG_SIGNATURE)
        image = matplotlib.image.imread(io.BytesIO(data), format="png")
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and np.ptp(image) > 0
    saved = {p.name: p.read_bytes() for p in reports.files.iterdir() if p.name != ".lmlab-report.json"}
    for name in ("loss_steps.png", "loss_tokens.png", "accuracy.png", "lr.png", "grad_norm.png", "throughput.png",
                 "alpha_layer_grad_norm.png", "alpha_update_ratio.png", "beta_layer_grad_norm.png",
                 "beta_update_ratio.png", "alpha_landscape_surface_2d.png"):
        assert name in saved, name
    assert sorted(saved.values()) == sorted(pngs)  # the same images, no more, no fewer
    assert 'id="accuracy"><img src="data:image/png;base64,' in reports.page


@pytest.mark.slow
def test_page_needs_nothing_from_outside(reports):
    page = reports.page
    refs = re.findall(r'(?:src|href)\s*=\s*["\']?([^"\'\s>]*)', page, re.I)
    assert refs
    for ref in refs:
        assert ref.startswith(("data:image/png;base64,", "#")), ref[:60]
        assert not re.match(r"(?i)(https?:|file:|//)", ref)
    assert not re.search(r"(?i)<script|<link|<iframe|@import|url\(", page)


@pytest.mark.slow
def test_probe_tables_follow_every_eval_with_visible_tokens(reports):
    probes = section(reports.page, "probes")
    for run in (reports.alpha, reports.beta):
        evals = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "val_loss" in r]
        assert evals == [0, 6, 12, 18, 24]
        m = re.search(rf"<h3>{run.name}, prompt 1: <code>{re.escape(html.escape(visible(PROMPT)))}</code></h3>"
                      r"(.*?)</table>", probes, re.S)
        assert m, f"no probe table for {run.name}"
        table = m.group(1)
        assert [int(s) for s in re.findall(r'<tr><td class="num">(\d+)</td>', table)] == evals
        for record, row in zip(read_jsonl(run / "probes.jsonl"), table.split("<tr>")[2:]):
            (p,) = record["probes"]
            assert p["prompt"] == PROMPT and len(p["top"]) == 5
            for token, prob in p["top"]:
                assert f"<code>{html.escape(visible(token))}</code> {100 * prob:.1f}%" in row
            assert html.escape(p["continuation"]) in row and html.escape(PROMPT) in row


@pytest.mark.slow
def test_config_section_shows_each_config_and_a_summary(reports):
    config = section(reports.page, "config")
    text = html.unescape(config)
    for run, lr in ((reports.alpha, "0.003"), (reports.beta, "0.01")):
        cfg = json.loads((run / "config.json").read_text())
        assert html.escape(json.dumps(cfg, indent=2)) in config
        fingerprint = cfg["tokenizer_fingerprint"]
        assert f'"lr": {lr}' in text and f'"tokenizer_fingerprint": "{fingerprint}"' in text
        evals = [r for r in read_jsonl(run / "metrics.jsonl") if "val_loss" in r]
        last_train = [r for r in read_jsonl(run / "metrics.jsonl") if "train_loss" in r][-1]
        row = re.search(rf"<tr><td>{run.name}</td>(.*?)</tr>", config, re.S).group(1)
        cells = re.findall(r"<td class=num>([^<]*)</td>", row)
        assert cells[0] == "24" and cells[1] == "1.54k"  # 24 steps x 4 x 16 tokens
        assert cells[2] == f"{min(r['val_loss'] for r in evals):.4f}" and cells[3] == f"{evals[-1]['val_loss']:.4f}"
        assert cells[4] == f"{evals[-1]['val_bits_per_byte']:.4f}"
        assert cells[6] == "windows of 16, no overlap"  # how val loss was measured (training: stride = block)
        assert cells[7] == f"{last_train['elapsed_s']:.1f}"


@pytest.mark.slow
def test_samples_and_landscape_sections(reports):
    samples = section(reports.page, "samples")
    for run in (reports.alpha, reports.beta):
        (sample,) = read_jsonl(run / "samples.jsonl")
        assert html.escape(sample["text"]) in samples
    landscape = section(reports.page, "landscape")
    assert embedded_pngs(landscape) == [reports.landscape_png]
    assert "alpha: no loss landscape" not in landscape
    assert re.search(rf"beta: no loss landscape was computed.*<code>lmlab landscape {re.escape(str(reports.beta))} "
                     r"--2d</code>", landscape)


@pytest.mark.slow
def test_several_runs_share_charts_and_log_puts_axes_on_log_scale(reports):
    runs = [load_run_logs(reports.alpha), load_run_logs(reports.beta)]
    for x in ("step", "tokens"):
        for log in (False, True):
            ax = loss_figure(runs, x, log).axes[0]
            labels = [line.get_label() for line in ax.get_lines()]
            for name in ("alpha", "beta"):
                assert f"{name} train" in labels and f"{name} val" in labels
            assert ax.get_yscale() == ("log" if log else "linear")
            assert ax.get_xscale() == ("log" if log and x == "tokens" else "linear")
    val = {line.get_label(): line for line in loss_figure(runs).axes[0].get_lines()}["beta val"]
    evals = [r for r in read_jsonl(reports.beta / "metrics.jsonl") if "val_loss" in r]
    assert list(val.get_xdata()) == [r["step"] for r in evals]
    assert list(val.get_ydata()) == [r["val_loss"] for r in evals]
    ax = grad_norm_figure(runs).axes[0]
    clipped = [c for c in ax.collections if "clipped" in str(c.get_label())]
    train = [r for r in read_jsonl(reports.alpha / "metrics.jsonl") if r.get("clipped")]
    assert len(clipped) == 2 and len(clipped[0].get_offsets()) == len(train) > 0


def test_smoothing_is_light_and_unbiased():
    assert smooth([2.0, 1.0, 3.0]) == [2.0, 1.0, 3.0]  # too short to smooth
    assert np.allclose(smooth([5.0] * 300), 5.0)  # bias-corrected from the first point
    noisy = [1.0 + (-1) ** i for i in range(300)]
    assert np.std(smooth(noisy)[50:]) < 0.2 * np.std(noisy)


@pytest.mark.slow
def test_cli_log_report_and_a_run_with_no_metrics_yet(reports, tmp_path, capsys):
    assert main(["report", str(reports.alpha), "--out", str(tmp_path / "log.html"), "--log"]) == 0
    page = (tmp_path / "log.html").read_text(encoding="utf-8")
    assert all(f'id="{sid}"' in page for sid in SECTION_IDS)
    assert "loss against steps (log scale)" in page and "loss against tokens (log scale)" in page
    assert (tmp_path / "log_files" / "loss_steps.png").read_bytes().startswith(PNG_SIGNATURE)

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(reports.alpha / "config.json", fresh / "config.json")
    (fresh / "samples.txt").write_text("--- step 9 ---\nan old sample <b>\n")
    assert main(["report", str(fresh), "--out", str(tmp_path / "fresh.html")]) == 0
    page = (tmp_path / "fresh.html").read_text(encoding="utf-8")
    assert all(f'id="{sid}"' in page for sid in SECTION_IDS)
    assert "no training or validation loss logged yet" in section(page, "loss")
    for sid in ("schedule", "gradients", "throughput"):
        assert "no training steps logged yet" in section(page, sid)
    assert "fresh: no probes yet" in section(page, "probes")
    assert "an old sample &lt;b&gt;" in section(page, "samples")
    assert "<img" not in page and not list((tmp_path / "fresh_files").glob("*.png"))
    assert '"lr": 0.003' in html.unescape(section(page, "config"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["missing", "not a run"])
def test_bad_run_is_one_line_and_exit_2(reports, tmp_path, capsys, kind):
    bad = tmp_path / "nope"
    if kind == "not a run":
        bad.mkdir()
        (bad / "notes.txt").write_text("hello")
    capsys.readouterr()
    assert main(["report", str(reports.alpha), str(bad), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("lmlab report: error: ") and str(bad) in err
    assert "Traceback" not in err and not (tmp_path / "r.html").exists()


def _chromium() -> str | None:
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


@pytest.mark.slow
def test_report_renders_in_a_real_browser(reports, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed: no real browser to render the report in (apt-get install chromium)")
    import matplotlib.image

    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2400",
         reports.page_path.resolve().as_uri()],
        capture_output=True, text=True, timeout=HANG_S)
    assert shot.is_file(), f"no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    assert shot.stat().st_size > 20_000
    image = matplotlib.image.imread(str(shot))[..., :3]
    assert image.shape[:2] == (2400, 1280)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # not a blank or single-colour page
    # the charts were drawn: the first run's colour (#1f77b4, the loss lines) shows up in the picture
    blue = np.all(np.abs(image * 255 - np.array([31, 119, 180])) < 25, axis=-1)
    assert blue.sum() > 200


def test_runs_with_the_same_folder_name_get_distinct_labels():
    from lmlab.rundir import run_names

    assert run_names([Path("/a/x/run"), Path("/b/x/run"), Path("/c/other")]) == ["a/x/run", "b/x/run", "other"]


@pytest.mark.slow  # several seconds: trains, or starts processes
def test_an_rl_runs_completions_have_a_section_and_a_link_and_a_text_run_has_neither(reports, tmp_path):
    from lmlab.report.report_page import build_page

    run = tmp_path / "rl"
    shutil.copytree(reports.alpha, run)
    record = {"step": 20, "held_out": [{"prompt": "3 plus 4 is ", "completion": "7.<b>", "reward": 1.0}],
              "train": [{"prompt": "1 plus 1 is ", "completion": "3.", "reward": 0.0}]}
    (run / "completions.jsonl").write_text(json.dumps(record) + "\n")
    page, _ = build_page([load_run_logs(run)])
    assert page.count('id="completions"') == 1 and 'href="#completions"' in page
    assert "7.&lt;b&gt;" in section(page, "completions")  # the model's text, escaped
    plain, _ = build_page([load_run_logs(reports.alpha)])
    assert 'id="completions"' not in plain and 'href="#completions"' not in plain
