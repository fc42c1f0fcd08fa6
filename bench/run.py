"""Run every benchmark and write docs/benchmarks.md.

Each bench/bench_*.py has ``run(quick) -> str`` returning a markdown section whose numbers are
ratios against a baseline measured in the same run. ``--quick`` uses smaller sizes.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import ROOT, machine  # noqa: E402

BENCHES = ["bench_ingest", "bench_segments", "bench_kills", "bench_tracking", "bench_coefficients",
           "bench_store", "bench_loader", "bench_bank", "bench_render", "bench_train", "bench_cli",
           "science"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", default=None, help="bench module names")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    head = ("# Benchmarks\n\nWritten by `make bench` (`python bench/run.py`); every number is "
            "measured in one run on the machine below, with its baseline in the same run.\n\n"
            f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}."
            + (" Quick mode (small sizes)." if args.quick else ""))
    sections = []
    for name in args.only or BENCHES:
        if not (HERE / f"{name}.py").exists():
            continue
        t0 = time.perf_counter()
        print(f"running {name} ...", file=sys.stderr, flush=True)
        sections.append(importlib.import_module(name).run(args.quick))
        print(f"  {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        # written after every section: a later failure keeps what was measured
        Path(args.out).write_text(head + "\n\n" + "\n\n".join(sections) + "\n")
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
