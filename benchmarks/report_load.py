"""How long headless Chromium takes to open a `semivss report` HTML file from disk and build its DOM
(browser start included: `chromium --headless --dump-dom file://...`), over several runs; the
report's size and what its DOM holds. Optionally written as a record.

    python benchmarks/report_load.py /tmp/camvid-report.html --runs 5 --out results/benchmarks/report_load.json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("report", type=Path)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        print("no chromium on PATH (apt-get install chromium)", file=sys.stderr)
        return 2
    url = args.report.resolve().as_uri()
    seconds, dom = [], ""
    for _ in range(args.runs):
        t0 = time.perf_counter()
        res = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--dump-dom", url],
                             capture_output=True, text=True, timeout=120)
        seconds.append(time.perf_counter() - t0)
        dom = res.stdout
    counts = {tag: dom.count(f"<{tag}") for tag in ("table", "img", "svg", "details", "a ")}
    from semivss.results import git_commit, machine_info, write_record

    record = {"benchmark": "report_load", "report": str(args.report), "bytes": args.report.stat().st_size,
              "runs": args.runs, "seconds": [round(s, 3) for s in seconds], "min": round(min(seconds), 3),
              "median": round(statistics.median(seconds), 3), "max": round(max(seconds), 3), "dom": counts,
              "browser": subprocess.run([browser, "--version"], capture_output=True, text=True).stdout.strip(),
              "commit": git_commit(Path.cwd()), "machine": machine_info()}
    print(f"{args.report} ({record['bytes'] / 1e6:.2f} MB): load + DOM in headless Chromium, min "
          f"{record['min']:.2f} s, median {record['median']:.2f} s, max {record['max']:.2f} s over {args.runs} "
          f"runs (browser start included); DOM: {counts}")
    if args.out is not None:
        write_record(record, args.out, overwrite=True)
        print(f"record -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
