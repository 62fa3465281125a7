"""Write eval/results/eval-<name>.md again from its .json (after a change to the report's layout only; the
figures are the JSON's, from the run whose command heads the file).

    .venv/bin/python eval/rewrite_reports.py eval/results/eval-squad.json eval/results/eval-scifact.json
"""
import json
import os
import sys

from writeback_rag import eval as ev

for path in sys.argv[1:]:
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    name = d["protocol"]["name"]
    png = f"learning-curve-{name}.png" if d.get("learning_curve") else None
    md = ev.markdown_report(d["protocol"], command=d["command"], curve=d.get("learning_curve"), curve_png=png,
                            validation=None if d.get("validation") is None else d["validation"].get("text"),
                            targets=d.get("targets"))
    md += f"\nWall time for this dataset (validation, protocol, learning curve): {d['minutes']} minutes.\n"
    out = os.path.splitext(path)[0] + ".md"
    with open(out, "w", encoding="utf-8") as f:
        f.write(md)
    print(f"wrote {out}")
