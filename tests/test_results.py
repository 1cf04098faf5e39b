"""Result records (semivss.results): made from an evaluated run, written once, tabulated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from semivss.cli import app
from semivss.errors import SemivssError
from semivss.results import load_records, make_record, results_markdown, write_record


def fake_run(root: Path, name: str, miou: float, it_s: list[float], method: str = "supervised") -> Path:
    run = root / name
    (run / "eval-val").mkdir(parents=True)
    cfg = {"name": name, "method": {"name": method}, "schedule": {"iters": 1000},
           "data": {"format": "camvid", "root": "../shared/data/camvid", "split": {"mode": "every_kth", "k": 8}},
           "eval": {"size": [240, 320]}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = ["step,loss,it_s"] + [f"{20 * (i + 1)},0.5,{v}" for i, v in enumerate(it_s)]
    (run / "metrics.csv").write_text("\n".join(rows) + "\n")
    metrics = {"mIoU": miou, "fwIoU": 0.8, "pixel_acc": 0.9, "mAcc": 0.7, "VC8": 0.91, "VC16": None,
               "n_frames": 101, "iou": {"Sky": 0.9, "Pole": 0.05}}
    (run / "eval-val" / "metrics.json").write_text(json.dumps({"metrics": metrics}))
    return run


def test_record_holds_metrics_speed_config_and_machine(tmp_path: Path) -> None:
    run = fake_run(tmp_path, "control", 0.6, [0.5, 0.25, 0.5])
    rec = make_record(run, name="control", protocol="camvid-ssvs-1-8-ssl")
    assert rec["name"] == "control" and rec["method"] == "supervised"
    assert rec["metrics"]["mIoU"] == 0.6 and rec["metrics"]["VC8"] == 0.91
    assert rec["iou"] == {"Sky": 0.9, "Pole": 0.05}
    assert rec["s_per_it"] == pytest.approx(2.0)  # 1 / median(0.5, 0.25, 0.5)
    assert rec["iterations"] == 1000 and rec["logged_steps"] == 60
    assert rec["resolution"] == [240, 320] and rec["dataset"]["format"] == "camvid"
    assert len(rec["config_hash"]) == 16 and rec["machine"]["cores"] >= 1
    # the hash follows the config
    other = fake_run(tmp_path, "other", 0.6, [0.5], method="u2pl")
    assert make_record(other)["config_hash"] != rec["config_hash"]


def test_records_are_never_overwritten_silently_and_tabulate(tmp_path: Path) -> None:
    a = write_record(make_record(fake_run(tmp_path, "control", 0.60, [0.5])), tmp_path / "res" / "a.json")
    write_record(make_record(fake_run(tmp_path, "u2pl", 0.6325, [0.125])), tmp_path / "res" / "b.json")
    with pytest.raises(SemivssError, match="exists"):
        write_record(make_record(tmp_path / "control"), a)
    recs = load_records([tmp_path / "res"])
    assert [r["name"] for r in recs] == ["control", "u2pl"]
    text = results_markdown(recs, baseline="control")
    lines = text.splitlines()
    assert lines[0] == "| row | mIoU | vs control | fwIoU | VC8 | VC16 | iterations | s/it | time/it vs control |"
    assert lines[2] == "| control | 60.00 | +0.00 | 80.00 | 91.00 | - | 1000 | 2.00 | 1.00x |"
    assert lines[3] == "| u2pl | 63.25 | +3.25 | 80.00 | 91.00 | - | 1000 | 8.00 | 4.00x |"
    assert "| Pole | 5.00 | 5.00 |" in text
    with pytest.raises(SemivssError, match="baseline"):
        results_markdown(recs, baseline="nope")


def test_cli_results_add_and_table(tmp_path: Path) -> None:
    run = fake_run(tmp_path, "control", 0.6, [0.5])
    runner = CliRunner()
    out = tmp_path / "results" / "control.json"
    res = runner.invoke(app, ["results", "add", str(run), "--out", str(out), "--protocol", "p"])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["protocol"] == "p"
    res = runner.invoke(app, ["results", "table", str(tmp_path / "results"), "--no-per-class"])
    assert res.exit_code == 0 and "| control | 60.00 |" in res.output and "Pole" not in res.output
    res = runner.invoke(app, ["results", "add", str(run), "--out", str(out)])
    assert isinstance(res.exception, SemivssError) and "exists" in str(res.exception)  # main(): exit 2


def test_update_tables_rewrites_marked_blocks(tmp_path: Path, monkeypatch) -> None:
    from semivss.results import update_tables

    write_record(make_record(fake_run(tmp_path, "control", 0.6, [0.5])), tmp_path / "res" / "a.json")
    monkeypatch.chdir(tmp_path)
    text = "intro\n<!-- results: res --no-per-class -->\nold table\n<!-- /results -->\nend\n"
    new = update_tables(text)
    assert new.startswith("intro\n<!-- results: res --no-per-class -->\n| row | mIoU |")
    assert "old table" not in new and new.endswith("<!-- /results -->\nend\n")
    assert update_tables(new) == new


def test_published_tables_are_generated_from_the_records(monkeypatch) -> None:
    """Every <!-- results: ... --> table of README.md and docs/results.md equals what
    `semivss results update` would write from results/ (run it after adding a record)."""
    from semivss.results import update_tables

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    for name in ("README.md", "docs/results.md"):
        text = (root / name).read_text()
        assert update_tables(text) == text, f"{name}: run `semivss results update {name}`"


def test_table_refuses_rows_from_different_starting_weights(tmp_path: Path) -> None:
    base = tmp_path / "base.safetensors"
    base.write_bytes(b"weights of the base")
    recs = []
    for name in ("control", "u2pl"):
        run = fake_run(tmp_path, name, 0.6, [0.5])
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["model"] = {"init_from": str(base)}
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        recs.append(make_record(run))
    import hashlib

    assert recs[0]["init_from_sha256"] == hashlib.sha256(b"weights of the base").hexdigest()
    results_markdown(recs, baseline="control")  # same start: fine
    recs[1]["init_from_sha256"] = "0" * 64
    with pytest.raises(SemivssError, match="different weights"):
        results_markdown(recs, baseline="control")


def test_rows_started_from_reexported_weights_compare_by_tensors(tmp_path: Path) -> None:
    """Two exports of the same tensors whose headers differ (e.g. a config field added since)
    have different file hashes but one tensor hash, so their rows share a table; other values
    do not."""
    import torch
    from safetensors.torch import save_file

    from semivss.results import tensors_sha256

    w = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.tensor(3), "h": torch.ones(2, dtype=torch.bfloat16)}
    old, new, other = tmp_path / "old.safetensors", tmp_path / "new.safetensors", tmp_path / "other.safetensors"
    save_file(w, str(old), metadata={"semivss_meta": "{}"})
    save_file(w, str(new), metadata={"semivss_meta": '{"model": {"rep_stride": 4}}'})
    save_file({**w, "a": torch.tensor(4)}, str(other))
    assert old.read_bytes() != new.read_bytes()
    assert tensors_sha256(old) == tensors_sha256(new) != tensors_sha256(other)
    assert tensors_sha256(tmp_path / "missing.safetensors") is None
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert tensors_sha256(tmp_path / "junk.safetensors") is None
    recs = []
    for name, start in (("control", old), ("ifr", new), ("cps", other)):
        run = fake_run(tmp_path, name, 0.6, [0.5])
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["model"] = {"init_from": str(start)}
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        recs.append(make_record(run))
    assert recs[0]["init_from_sha256"] != recs[1]["init_from_sha256"]
    results_markdown(recs[:2], baseline="control")
    with pytest.raises(SemivssError, match="different weights"):
        results_markdown(recs, baseline="control")


def test_step_cost_table_has_time_and_flop_ratios() -> None:
    from semivss.results import step_cost_markdown

    rec = {"benchmark": "benchmarks/method_step_cost.py --flops", "precision": "fp32 + channels_last",
           "threads": 2, "machine": {"cpu": "CPU X"}, "commit": "abcdef1234", "notes": "random batches",
           "rows": [{"config": "sup", "method": "supervised", "images": 8, "median_s_per_step": 2.0,
                     "vs_first": 1.0, "gflop_per_step": 600.0, "flops_vs_first": 1.0},
                    {"config": "u2pl", "method": "u2pl", "images": 16, "median_s_per_step": 9.0,
                     "vs_first": 4.5, "gflop_per_step": 2400.0, "flops_vs_first": 4.0}]}
    lines = step_cost_markdown(rec).splitlines()
    assert lines[0].startswith("| config | method | images | s/step | time vs first | GFLOP/step")
    assert lines[3] == "| u2pl | u2pl | 16 | 9.00 | 4.50x | 2400 | 4.00x | 1.12 |"  # 4.5 / 4.0
    assert "CPU X" in lines[-1] and "abcdef12" in lines[-1]
    for r in rec["rows"]:  # a record without --flops: time columns only
        del r["gflop_per_step"], r["flops_vs_first"]
    assert step_cost_markdown(rec).splitlines()[3] == "| u2pl | u2pl | 16 | 9.00 | 4.50x |"


def test_pseudo_quality_table_puts_rules_side_by_side() -> None:
    from semivss.results import pseudo_quality_markdown

    def part(miou: float, iou: list[float]) -> dict:
        return {"mIoU": miou, "pixel_acc": 0.9, "mAcc": 0.8, "fwIoU": 0.85, "iou": iou}

    old = {"frames": 3, "gamma": 0.5, "reliable_share": 0.8, "all": part(0.5, [0.9, 0.1]),
           "reliable": part(0.6, [1.0, 0.2])}  # written before records named their rule and classes
    new = {"frames": 3, "gamma": None, "reliable_share": 0.75, "class_names": ["Road", "Pole"],
           "reliable_rule": {"mode": "percentile", "keep": 0.8, "classwise": True},
           "all": part(0.5, [0.9, 0.1]), "reliable": part(0.7, [0.95, 0.45])}
    lines = pseudo_quality_markdown([old, new]).splitlines()
    assert lines[0] == "| | all pixels | entropy < 0.5 nats | lowest-entropy 80 % of each class |"
    assert lines[2] == "| share of annotated pixels | 100.0 % | 80.0 % | 75.0 % |"
    assert lines[3] == "| mIoU | 50.00 | 60.00 | 70.00 |"
    assert lines[5] == "| Pole | 10.00 | 20.00 | 45.00 |"
    with pytest.raises(SemivssError):
        pseudo_quality_markdown([])


def test_pseudo_sets_table_has_one_row_per_set() -> None:
    from semivss.results import pseudo_sets_markdown

    def part(miou: float, iou: list[float]) -> dict:
        return {"mIoU": miou, "iou": iou}

    a = {"frames": 3, "gamma": 0.5, "reliable_share": 0.8, "class_names": ["Road", "Pole"],
         "all": part(0.5, [0.9, 0.1]), "reliable": part(0.6, [1.0, 0.25])}
    b = {"frames": 3, "reliable_share": 0.812, "class_names": ["Road", "Pole"],
         "reliable_rule": {"mode": "percentile", "keep": 0.8, "classwise": True},
         "all": part(0.55, [0.9, 0.2]), "reliable": part(0.7, [0.95, 0.45])}
    lines = pseudo_sets_markdown([("one model", a), ("ensemble", b)]).splitlines()
    assert lines[2] == "| one model | entropy < 0.5 nats | 50.00 | 80.0 % | 60.00 | 25.00 | - | - | - |"
    assert lines[3] == "| ensemble | lowest-entropy 80 % of each class | 55.00 | 81.2 % | 70.00 | 45.00 | - | - | - |"
    with pytest.raises(SemivssError):
        pseudo_sets_markdown([])


def test_propagation_by_age_table_has_ages_then_intervals() -> None:
    from semivss.results import propagation_by_age_markdown

    rec = {"format": "camvid", "split": "val", "input_size": [240, 320], "precision": "bf16", "flow": "dis-fast",
           "propagation": "composed", "warp_at": "input", "frames_by_age": 92, "frames_by_k": 101,
           "machine": {"cpu": "CPU X"}, "commit": "abcdef1234",
           "rows": [{"row": "reference + flow", "age": 0, "mIoU": 0.62, "VC8": 0.93, "iou": {"Pole": 0.09}},
                    {"row": "Accel", "age": 0, "mIoU": 0.6, "VC8": 0.935, "iou": {"Pole": 0.06}},
                    {"row": "reference + flow", "age": 1, "mIoU": 0.611, "VC8": 0.934, "iou": {"Pole": 0.055}},
                    {"row": "reference + flow, causal", "K": 5, "mIoU": 0.5956, "VC8": 0.9444},
                    {"row": "reference + flow, both sides", "K": 5, "mIoU": 0.6032, "VC8": 0.951}]}
    lines = propagation_by_age_markdown(rec).splitlines()
    assert lines[0] == ("| age (frames) | reference + flow: mIoU | reference + flow: VC8 | Accel: mIoU | Accel: VC8 "
                        "| reference + flow: Pole |")
    assert lines[2] == "| 0 | 62.00 | 93.00 | 60.00 | 93.50 | 9.00 |"
    assert lines[3] == "| 1 | 61.10 | 93.40 | - | - | 5.50 |"  # Accel not measured at that age
    assert lines[7] == "| 5 | 59.56 | 94.44 | 60.32 | 95.10 |"
    assert "92 frames scored by age, 101 by K" in lines[-1] and "abcdef12" in lines[-1]


def test_offsets_table_side_by_side_with_the_train_gap() -> None:
    from semivss.results import offsets_markdown

    def rows(train: dict[int, tuple[float, int]], held: dict[int, float]) -> list[dict]:
        out = [{"subset": "train videos (train)", "offset": o, "mIoU": m, "n_frames": n} for o, (m, n) in train.items()]
        return out + [{"subset": "held-out videos (val)", "offset": o, "mIoU": m, "n_frames": 1} for o, m in held.items()]

    a = rows({-1: (0.5, 1), 0: (0.8, 2), 1: (0.6, 3)}, {0: 0.55, 1: 0.5})
    b = rows({0: (0.7, 1), 2: (0.65, 1)}, {})
    text = offsets_markdown([("A", a), ("B", b)])
    lines = text.splitlines()
    assert lines[0] == "| offset | A (train) | A (held-out) | B (train) | B (held-out) |"
    assert lines[2] == "| -1 | 50.00 | - | - | - |"
    assert lines[3] == "| 0 (labeled) | 80.00 | 55.00 | 70.00 | - |"
    # gap A: 0.8 - (0.5 * 1 + 0.6 * 3) / 4 = 0.225; gap B: 0.7 - 0.65 = 0.05
    assert lines[-1] == "| train gap: 0 - others | +22.50 |  | +5.00 |  |"
