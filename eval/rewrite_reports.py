"""Write eval/results/eval-<name>.md again from its .json (after a change to the report's layout only; the
figures are the JSON's, from the run whose command heads the file).

    .venv/bin/python eval/rewrite_reports.py eval/results/eval-squad.json eval/results/eval-scifact.json
"""
import json
import os
import sys

from run_eval import report_markdown

for path in sys.argv[1:]:
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    out = os.path.splitext(path)[0] + ".md"
    with open(out, "w", encoding="utf-8") as f:
        f.write(report_markdown(result))
    print(f"wrote {out}")
