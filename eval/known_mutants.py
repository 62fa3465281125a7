"""The seven one-line changes that once left the whole fast suite green (issue: `make test` catches real
regressions). Each is applied in turn, the fast suite runs, and the change is undone; every one must fail
the suite. Run from the repository root: `.venv/bin/python eval/known_mutants.py`."""

import subprocess
import sys

MUTANTS = [
    ("RRF rank off by one", "writeback_rag/kb.py",
     "for rank, cid in enumerate(sorted(scores, key=lambda c: (-scores[c], c)), 1):",
     "for rank, cid in enumerate(sorted(scores, key=lambda c: (-scores[c], c)), 2):"),
    ("weighted-fusion weights swapped", "writeback_rag/kb.py",
     "for scores, w in ((bm, 1 - dense_weight), (dn, dense_weight)):",
     "for scores, w in ((bm, dense_weight), (dn, 1 - dense_weight)):"),
    ("doc filter ignored", "writeback_rag/kb.py",
     '                clauses.append("d.id GLOB ?")\n                args.append(value)', "                pass"),
    ("kind filter ignored", "writeback_rag/kb.py",
     '                clauses.append("d.kind=?")\n                args.append(value)', "                pass"),
    ("near-duplicate merge never fires", "writeback_rag/writeback.py",
     "    return bool(ta and tb) and len(ta & tb) / len(ta | tb) >= threshold", "    return False"),
    ("label feedback counted against units", "writeback_rag/feedback.py",
     'if not (correct or source == "label"):', "if not correct:"),
    ("BM25 IDF epsilon floor removed", "writeback_rag/index.py",
     "        return self.epsilon * self._mean_idf", "        return float(raw)"),
]


def main():
    survived = []
    for name, path, old, new in MUTANTS:
        src = open(path, encoding="utf-8").read()
        assert src.count(old) == 1, f"{name}: the line to change is not in {path} exactly once; update this list"
        open(path, "w", encoding="utf-8").write(src.replace(old, new))
        try:
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider"],
                               capture_output=True, text=True)
        finally:
            open(path, "w", encoding="utf-8").write(src)
        verdict = "killed" if r.returncode else "SURVIVED"
        print(f"{verdict:8} {name}: {r.stdout.strip().splitlines()[-1]}")
        if not r.returncode:
            survived.append(name)
    print(f"{len(MUTANTS) - len(survived)} of {len(MUTANTS)} killed")
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()
