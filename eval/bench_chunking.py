"""Chunking time per KB as the document grows: linear means the per-KB cost stays flat.

    .venv/bin/python eval/bench_chunking.py [--out eval/results/chunking.md]

Two kinds of text, each at 25, 51, 102 and 206 KB in one paragraph: abbreviation-heavy (initials and
titles, where sentence splitting once went quadratic: 0.7/2.5/9.9/39.2 s) and ordinary prose. Sizes
are measured in interleaved rounds (the machine is shared); the figure of merit is the per-KB time at
206 KB over the per-KB time at 25 KB, in the same run."""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_result  # noqa: E402
from writeback_rag.text import chunk_text  # noqa: E402

ABBREV = ("Dr. J. R. Penhallow and Capt. A. B. Marr of St. Ives met Prof. C. D. Hale, Mr. E. F. Tull and "
          "Mrs. G. H. Vane at Mt. Kerr, i.e. the old No. 4 light, vs. the new one, etc. ")
PROSE = ("The keeper climbed the tower at dusk and lit the lamp. Fog rolled in from the west before midnight. "
         "By morning the siren had sounded four hundred times. ")


def text_of(unit, kb):
    n = int(kb * 1000 / len(unit)) + 1
    return (unit * n)[: kb * 1000]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    sizes = [25, 51, 102, 206]
    times = {(k, s): [] for k in ("abbreviations", "prose") for s in sizes}
    for _ in range(args.rounds):
        for kind, unit in (("abbreviations", ABBREV), ("prose", PROSE)):
            for s in sizes:
                t = text_of(unit, s)
                t0 = time.perf_counter()
                chunks = chunk_text(t, 200, 40)
                times[(kind, s)].append(time.perf_counter() - t0)
                assert chunks
    lines = ["# Chunking time vs document size", "",
             f"Command: `.venv/bin/python eval/bench_chunking.py{' --out ' + args.out if args.out else ''}` "
             f"({args.rounds} interleaved rounds, median).", "",
             "| text | KB | seconds | ms per KB | per-KB time vs 25 KB |", "|---|---|---|---|---|"]
    verdict = []
    for kind in ("abbreviations", "prose"):
        base = statistics.median(times[(kind, sizes[0])]) / sizes[0]
        for s in sizes:
            med = statistics.median(times[(kind, s)])
            lines.append(f"| {kind} | {s} | {med:.3f} | {1000 * med / s:.2f} | {med / s / base:.2f}x |")
        ratio = statistics.median(times[(kind, sizes[-1])]) / sizes[-1] / base
        verdict.append(f"- {kind}: per-KB time at {sizes[-1]} KB is {ratio:.2f}x that at {sizes[0]} KB "
                       f"({'linear' if ratio < 1.5 else 'NOT linear'}: a quadratic cost would give "
                       f"{sizes[-1] / sizes[0]:.1f}x).")
    write_result("\n".join(lines + [""] + verdict) + "\n", args.out)


if __name__ == "__main__":
    main()
