"""`semivss compare`: the comparison table reads evaluations and training logs and prints the
figures a hand computation gives; bad inputs name the file or option."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from semivss.cli import app
from semivss.errors import SemivssError
from semivss.metrics.report import comparison_markdown, load_summary, training_speed

runner = CliRunner()


def _run(root: Path, name: str, miou: float, vc8: float | None, iou: dict[str, float], it_s: list[float] | None) -> Path:
    """A fake training run with <run>/eval-val/metrics.json and, optionally, <run>/metrics.csv."""
    run = root / name
    (run / "eval-val").mkdir(parents=True)
    metrics = {"mIoU": miou, "VC16": float("nan"), "iou": iou}
    if vc8 is not None:
        metrics["VC8"] = vc8
    (run / "eval-val" / "metrics.json").write_text(json.dumps({"metrics": metrics}))
    if it_s is not None:
        lines = ["step,loss,lr,it_s"] + [f"{20 * (i + 1)},1.0,0.01,{v}" for i, v in enumerate(it_s)]
        (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    return run / "eval-val"


def test_table_matches_hand_values(tmp_path: Path) -> None:
    sup = _run(tmp_path, "sup", 0.5, 0.9, {"road": 0.9, "car": 0.1}, [1.0, 0.5, 0.25])  # median 0.5 -> 2 s/it
    u2pl = _run(tmp_path, "u2pl", 0.61234, None, {"car": 0.3, "sky": 0.7}, [0.1, 0.2, 0.125, 0.4])  # median 0.1625
    text = comparison_markdown([load_summary(sup), load_summary(u2pl / "metrics.json")], per_class=True)
    lines = text.splitlines()
    assert lines[0] == "| model | mIoU | VC8 | VC16 | iterations | s/it (median) | time/it vs sup |"
    assert lines[2] == "| sup | 50.00 | 90.00 | - | 60 | 2.00 | 1.00x |"
    # 1 / 0.1625 = 6.1538 s/it, 3.08x of 2 s/it; no VC8 key and NaN VC16 print '-'
    assert lines[3] == "| u2pl | 61.23 | - | - | 80 | 6.15 | 3.08x |"
    cls = text.split("IoU per class (%):\n\n")[1].splitlines()
    assert cls[0] == "| class | sup | u2pl |"
    assert cls[2:] == ["| road | 90.00 | - |", "| car | 10.00 | 30.00 |", "| sky | - | 70.00 |"]


def test_baseline_names_and_untimed_rows(tmp_path: Path) -> None:
    a = load_summary(_run(tmp_path, "a", 0.5, 0.9, {}, [0.5]), name="A")  # 2 s/it
    b = load_summary(_run(tmp_path, "b", 0.6, 0.9, {}, [0.25]), name="B")  # 4 s/it
    c = load_summary(_run(tmp_path, "c", 0.7, 0.9, {}, None), name="C")  # no training log
    lines = comparison_markdown([c, a, b], baseline="B").splitlines()
    assert lines[0].endswith("| time/it vs B |")
    assert lines[2] == "| C | 70.00 | 90.00 | - | - | - | - |"
    assert lines[3] == "| A | 50.00 | 90.00 | - | 20 | 2.00 | 0.50x |"
    # default baseline: the first timed row; without speed no time columns at all
    assert "time/it vs A" in comparison_markdown([c, a, b])
    untimed = comparison_markdown([load_summary(a.source, "A", speed=False), c])
    assert untimed.splitlines()[0] == "| model | mIoU | VC8 | VC16 |"
    with pytest.raises(SemivssError, match="'Z' is not one of"):
        comparison_markdown([a, b], baseline="Z")
    with pytest.raises(SemivssError, match="has no training log"):
        comparison_markdown([a, c], baseline="C")
    with pytest.raises(SemivssError, match="same name"):
        comparison_markdown([a, a])


def test_bad_inputs_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(SemivssError, match="no metrics.json"):
        load_summary(tmp_path / "missing")
    bad = tmp_path / "run" / "eval" / "metrics.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"metrics": {"VC8": 0.9}}')
    with pytest.raises(SemivssError, match=f"{bad}: not a metrics.json"):
        load_summary(bad)
    bad.write_text("{")
    with pytest.raises(SemivssError, match="JSONDecodeError"):
        load_summary(bad)
    assert training_speed(tmp_path / "none.csv") == (None, None)


def test_cli_compare_writes_once(tmp_path: Path) -> None:
    sup = _run(tmp_path, "sup", 0.5, 0.9, {"road": 0.9}, [0.5])
    ifr = _run(tmp_path, "ifr", 0.55, 0.95, {"road": 0.95}, [0.125])
    out = tmp_path / "table.md"
    res = runner.invoke(app, ["compare", str(sup), str(ifr), "--name", "supervised", "--name", "IFR", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "| IFR | 55.00 | 95.00 | - | 20 | 8.00 | 4.00x |" in res.output
    assert out.read_text().strip() == res.output.split("table ->")[0].strip()
    again = runner.invoke(app, ["compare", str(sup), "--out", str(out)])
    assert again.exit_code != 0 and "exists" in str(again.exception)
    wrong = runner.invoke(app, ["compare", str(sup), str(ifr), "--name", "one"])
    assert wrong.exit_code != 0 and "--name given 1 times for 2 results" in str(wrong.exception)
