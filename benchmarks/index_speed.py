"""How long indexing a large video set takes (frames are listed, never opened): VSPW and Cityscapes
trees of empty files with the real naming, generated in a temporary folder.

    python benchmarks/index_speed.py --frames 250000        # VSPW: videos of 100 frames, masks on every frame
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def _touch_all(paths: list[Path]) -> None:
    for d in sorted({p.parent for p in paths}):
        d.mkdir(parents=True, exist_ok=True)
    for p in paths:
        p.touch()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--frames", type=int, default=250_000, help="frames of each generated set")
    p.add_argument("--per-video", type=int, default=100, help="VSPW frames per video")
    args = p.parse_args(argv)
    from semivss.data.formats import load_cityscapes, load_vspw
    from semivss.results import machine_info

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "vspw"
        n_videos = max(1, args.frames // args.per_video)
        names = [f"{i}_vid{i:05d}" for i in range(n_videos)]
        files = []
        for name in names:
            for f in range(args.per_video):
                files.append(root / "data" / name / "origin" / f"{f:08d}.jpg")
                files.append(root / "data" / name / "mask" / f"{f:08d}.png")
        t0 = time.perf_counter()
        _touch_all(files)
        (root / "train.txt").write_text("\n".join(names) + "\n")
        made = time.perf_counter() - t0
        t0 = time.perf_counter()
        vs = load_vspw(root, "train")
        took = time.perf_counter() - t0
        print(f"VSPW: {len(vs)} frames in {len(vs.videos)} videos indexed in {took:.2f} s "
              f"(tree of {len(files)} files made in {made:.1f} s)")

        root = Path(tmp) / "cityscapes"
        snippets = max(1, args.frames // 30)
        files = []
        for s in range(snippets):
            city = f"city{s % 20:02d}"
            for f in range(30):
                files.append(root / "leftImg8bit_sequence" / "train" / city / f"{city}_{s:06d}_{f:06d}_leftImg8bit.png")
            files.append(root / "gtFine" / "train" / city / f"{city}_{s:06d}_{19:06d}_gtFine_labelIds.png")
        _touch_all(files)
        t0 = time.perf_counter()
        cs = load_cityscapes(root, "train")
        took = time.perf_counter() - t0
        print(f"Cityscapes: {len(cs)} frames in {len(cs.videos)} snippets ({len(cs.annotated())} labeled) "
              f"indexed in {took:.2f} s")
    print(f"machine: {machine_info().get('cpu')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
