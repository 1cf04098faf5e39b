"""`semivss report`: one self-contained HTML file of a tiny synthetic run (train -> evaluate with
offsets and stills -> predict): it parses as HTML5, loads nothing from the network, shows the
figures of metrics.json, colours the differences of several runs, and opens in a real browser
(headless Chromium, skipped without one); bad inputs are one-line errors with exit code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import html5lib
import pytest
from test_cli import _invoke, tiny  # noqa: F401 - the tiny trained run fixture
from test_cli_errors import one_line_error, run_main
from typer.testing import CliRunner

from semivss.cli import app
from semivss.errors import SemivssError

runner = CliRunner()
SVG = "{http://www.w3.org/2000/svg}"
XLINK_HREF = "{http://www.w3.org/1999/xlink}href"


def _parse(path: Path) -> Any:
    """The document as an element tree; strict: any HTML5 parse error fails the test."""
    parser = html5lib.HTMLParser(strict=True, namespaceHTMLElements=False)
    return parser.parse(path.read_bytes())


@pytest.fixture(scope="module")
def reports(tiny: dict[str, Path]) -> dict[str, Path]:  # noqa: F811 - the imported fixture
    """The tiny run evaluated into <run>/eval-val (offsets + 3 stills) with an overlay mp4;
    a variant evaluation (standalone folder, higher mIoU, lower fwIoU, no confusion matrix);
    the reports of the run alone and of run + variant."""
    root, run = tiny["root"] / "report", tiny["run"]
    root.mkdir()
    _invoke(["evaluate", run / "model.safetensors", "--data", tiny["data"], "--format", "synthetic",
             "--split", "val", "--offsets", "--label-position", "4", "--save-stills", "3",
             "--out", run / "eval-val", "--overwrite"])
    video = (tiny["data"] / "val.txt").read_text().split()[0]
    _invoke(["predict", run / "model.safetensors", tiny["data"] / "videos" / video, run / f"predict-{video}",
             "--overwrite"])
    variant = root / "variant-eval"
    variant.mkdir()
    shutil.copy(run / "eval-val" / "offsets.json", variant)
    data = json.loads((run / "eval-val" / "metrics.json").read_text())
    data["metrics"]["mIoU"] += 0.05
    data["metrics"]["fwIoU"] -= 0.03
    data.pop("confusion_matrix")  # as written before evaluate stored it
    (variant / "metrics.json").write_text(json.dumps(data))
    single, double = root / "single.html", root / "double.html"
    _invoke(["report", run, "--out", single])
    _invoke(["report", run, variant, "--name", "base <run> & co", "--name", "variant", "--out", double])
    return {"run": run, "variant": variant, "single": single, "double": double, "root": root}


def _table(doc: Any, table_id: str) -> Any:
    found = [t for t in doc.iter("table") if t.get("id") == table_id]
    assert len(found) == 1, table_id
    return found[0]


def _text(el: Any) -> str:
    return "".join(el.itertext()).strip()


def test_evaluate_stores_confusion_matrix_and_stills(reports) -> None:
    data = json.loads((reports["run"] / "eval-val" / "metrics.json").read_text())
    matrix = data["confusion_matrix"]
    n = len(data["class_names"])
    assert len(matrix) == n and all(len(row) == n for row in matrix)
    assert sum(map(sum, matrix)) == data["metrics"]["n_pixels"]
    index = json.loads((reports["run"] / "eval-val" / "stills" / "stills.json").read_text())["stills"]
    assert [s["index"] for s in index] == [0, 4, 9]  # spread over the 10 frames of the val video
    for s in index:
        assert (reports["run"] / "eval-val" / "stills" / s["file"]).stat().st_size > 0


def test_single_run_report_sections_and_values(reports) -> None:
    path = reports["single"]
    doc = _parse(path)
    ids = {el.get("id") for el in doc.iter() if el.get("id")}
    assert {"metrics", "per-class", "training", "offsets", "run-0"} <= ids
    head = [_text(th) for th in _table(doc, "metrics-table").iter("th")]
    assert head[:7] == ["run", "mIoU", "fwIoU", "pixel acc", "mAcc", "VC8", "frames"]  # VC16: no 16-frame window
    metrics = json.loads((reports["run"] / "eval-val" / "metrics.json").read_text())["metrics"]
    rows = _table(doc, "class-table").find("tbody").findall("tr")
    assert [r.get("data-class") for r in rows] == list(metrics["iou"])
    for row in rows:
        iou_cell = row.findall("td")[1]
        value = metrics["iou"][row.get("data-class")]
        assert float(iou_cell.get("data-value")) == value
        assert _text(iou_cell) == f"{100 * value:.2f}"
    svgs = [el for el in doc.iter(f"{SVG}svg")]
    # per-class bars, training curves, offset curve, confusion matrix
    assert len(svgs) == 4, [s.get("aria-label") for s in svgs]
    assert {"IoU per class", "training curves", "normalised confusion matrix"} <= {s.get("aria-label") for s in svgs}
    training = next(s for s in svgs if s.get("aria-label") == "training curves")
    titles = {_text(t) for t in training.iter(f"{SVG}text")}
    assert {"loss", "loss_sup", "learning rate", "iterations / s", "mIoU (in-run evaluation)"} <= titles
    imgs = [i for i in doc.iter("img") if i.get("src", "").startswith("data:image/png;base64,")]
    assert len(imgs) == 3
    config = next(d for d in doc.iter("details") if "config" in (d.get("class") or ""))
    assert "backbone: mobilenet_v2" in _text(config.find("pre"))
    links = [a.get("href") for a in doc.iter("a")]
    assert any(h.endswith("/overlay.mp4") and not h.startswith("/") for h in links), links
    assert (path.parent / links[0]).resolve().is_file()


def test_report_loads_nothing_from_the_network(reports) -> None:
    for key in ("single", "double"):
        doc = _parse(reports[key])
        assert not list(doc.iter("script")) and not list(doc.iter("link"))
        for el in doc.iter():
            for attr in ("src", "href", XLINK_HREF):
                value = (el.get(attr) or "").strip().lower()
                assert not value.startswith(("http://", "https://", "//")), (el.tag, attr, value[:80])
        assert "url(" not in "".join(_text(s) for s in doc.iter("style"))


def test_multi_run_report_colours_differences_and_escapes(reports) -> None:
    doc = _parse(reports["double"])
    raw = reports["double"].read_text()
    assert "base <run> & co" not in raw and "base &lt;run&gt; &amp; co" in raw
    table = _table(doc, "metrics-table")
    head = [_text(th) for th in table.iter("th")]
    base, variant = table.find("tbody").findall("tr")
    assert base.get("class") == "baseline" and _text(base.find("td")) == "base <run> & co"
    cells = dict(zip(head, variant.findall("td"), strict=True))
    assert cells["mIoU"].get("class") == "better" and "(+5.00)" in _text(cells["mIoU"])
    assert cells["fwIoU"].get("class") == "worse" and "(-3.00)" in _text(cells["fwIoU"])
    assert cells["pixel acc"].get("class") == "same"
    assert not any(c.get("class") in ("better", "worse") for c in base.findall("td"))
    style = "".join(_text(s) for s in doc.iter("style"))
    assert ".better{color:#0a7a2f" in style and ".worse{color:#b3141b" in style
    assert len(_table(doc, "class-table").find("thead").findall(".//th")) == 3  # class + one column per run
    labels = [s.get("aria-label") for s in doc.iter(f"{SVG}svg")]
    assert labels.count("normalised confusion matrix") == 1  # the variant's metrics.json has none
    assert "holds no confusion matrix" in raw and "No stills saved" in raw
    offsets = next(s for s in doc.iter(f"{SVG}svg") if s.get("aria-label", "").startswith("mIoU by offset"))
    legend = {_text(t) for t in offsets.iter(f"{SVG}text")}
    assert any(t.startswith("variant / ") for t in legend) and any(t.startswith("base <run> & co / ") for t in legend)


def test_training_only_run_reports_without_evaluation(reports, tmp_path) -> None:
    run = tmp_path / "training-only"
    run.mkdir()
    for name in ("config.yaml", "metrics.csv"):
        shutil.copy(reports["run"] / name, run)
    out = tmp_path / "r.html"
    _invoke(["report", run, "--out", out])
    raw = out.read_text()
    assert "No evaluation yet" in raw and 'aria-label="training curves"' in raw
    _parse(out)


def _cli_error(args: list[Any], monkeypatch, capsys, *needles: str) -> None:
    """Through typer's CliRunner the command raises a SemivssError; through the entry point
    (`semivss` = cli.main) that is one line `error: ...` and exit code 2."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code != 0
    if result.exit_code == 2:  # the error boundary inside the app itself
        one_line_error(2, result.output, *needles)
    else:
        assert isinstance(result.exception, SemivssError), result.exception
    code, out = run_main(args, monkeypatch, capsys)
    one_line_error(code, _errors_only(out), *needles)


def _errors_only(out: str) -> str:
    """The output minus the progress lines (``report: ...``) printed before the failure."""
    return "\n".join(ln for ln in out.splitlines() if not ln.startswith("report: "))


def test_bad_inputs_are_one_line_errors(reports, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "r.html"
    _cli_error(["report", tmp_path / "missing", "--out", out], monkeypatch, capsys, "missing", "no such folder")
    (tmp_path / "empty").mkdir()
    _cli_error(["report", tmp_path / "empty", "--out", out], monkeypatch, capsys, "empty", "nothing to report")
    _cli_error(["report", reports["run"], "--name", "a", "--name", "b", "--out", out], monkeypatch, capsys,
               "--name given 2 times for 1")
    _cli_error(["report", reports["run"], reports["run"], "--out", out], monkeypatch, capsys, "same name")
    out.write_text("keep me")
    _cli_error(["report", reports["run"], "--out", out], monkeypatch, capsys, str(out), "--overwrite")
    assert out.read_text() == "keep me"
    _invoke(["report", reports["run"], "--out", out, "--overwrite"])
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic write: no leftovers


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(_chromium() is None, reason="no chromium / chromium-browser / google-chrome on PATH "
                    "(apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(reports, tmp_path) -> None:
    import numpy as np
    from PIL import Image

    browser = str(_chromium())
    url = reports["double"].resolve().as_uri()
    flags = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1280,4000"]
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert pixels.shape[:2] == (4000, 1280) and pixels.var() > 0
    t0 = time.perf_counter()
    dom = subprocess.run([*flags, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120).stdout
    print(f"chromium --dump-dom of {reports['double'].stat().st_size / 1e3:.0f} kB: {time.perf_counter() - t0:.2f} s")
    doc = html5lib.parse(dom, namespaceHTMLElements=False)
    assert {t.get("id") for t in doc.iter("table")} == {"metrics-table", "class-table"}
    assert len([i for i in doc.iter("img") if i.get("src", "").startswith("data:image/png")]) == 3
    assert len(list(doc.iter(f"{SVG}svg"))) == 4  # bars, training, offsets, the run's confusion matrix
    assert len(list(doc.iter(f"{SVG}path"))) > 20
