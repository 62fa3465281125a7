"""Many processes on one KB: writers of mixed kinds and readers at once, then `check` must be clean, every
committed document must be found by bm25 and by dense, and no reader may have seen an error.

    .venv/bin/python eval/stress.py [--seconds 300] [--writers 4] [--readers 4] [--out eval/results/stress.md]

Bounded: local files only, a fixed number of processes, each stops by itself after --seconds. Writers
cycle through ingest (new and changed documents), delete, feedback (including wrong answers that retire
units), write-back and rollback; one of them also runs reindex now and then. Each writer keeps the ids it
has committed and not deleted; the union must be exactly the KB's source documents at the end."""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORDS = ("lamp tower keeper fog siren lens gale rock beacon oil wick cottage relief boat storm gallery lantern "
         "shutter ledger signal buoy reef harbour pier chart tide current prism brass clock").split()


def text_for(rng, n=40):
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def writer(path, wid, seconds, out):
    from writeback_rag import KnowledgeBase, LockBusy

    rng = random.Random(wid)
    kb = KnowledgeBase.open(path, notify=lambda m: None)
    mine, ops, n = set(), {}, 0
    deadline = time.time() + seconds
    kinds = ["ingest", "ingest", "update", "delete", "feedback", "writeback", "rollback"] + \
        (["reindex"] if wid == 0 else [])
    while time.time() < deadline:
        kind = rng.choice(kinds)
        if kind == "ingest" or (kind in ("update", "delete") and not mine):
            batch = [{"id": f"w{wid}-{n + i}", "text": text_for(rng)} for i in range(rng.randint(1, 5))]
            n += len(batch)
            kb.ingest(batch)
            mine.update(d["id"] for d in batch)
            kind = "ingest"
        elif kind == "update":
            kb.ingest([{"id": rng.choice(sorted(mine)), "text": text_for(rng)}])
        elif kind == "delete":
            victim = rng.choice(sorted(mine))
            kb.delete([victim])
            mine.discard(victim)
        elif kind == "feedback":
            res = kb.search(text_for(rng, 4), k=5)
            if res.hits:
                kb.feedback(res.query_id, correct=rng.random() < 0.7, docs=[res.hits[0].doc_id])
        elif kind == "writeback":
            try:
                kb.writeback()
            except LockBusy:
                pass
        elif kind == "rollback":
            from writeback_rag.writeback import list_runs

            runs = [r["id"] for r in list_runs(kb) if r["status"] == "done"]
            if runs:
                try:
                    kb.rollback(rng.choice(runs))
                except LockBusy:
                    pass
        elif kind == "reindex":
            kb.reindex()
        ops[kind] = ops.get(kind, 0) + 1
    kb.close()
    with open(out, "w") as f:
        json.dump({"alive": sorted(mine), "ops": ops}, f)


def reader(path, rid, seconds, out):
    from writeback_rag import KnowledgeBase

    rng = random.Random(1000 + rid)
    errors, n = [], 0
    kb = KnowledgeBase.open(path, notify=lambda m: None)
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            kb.search(text_for(rng, 3), k=10, mode=rng.choice(["bm25", "dense", "hybrid"]), log=rng.random() < 0.3)
            n += 1
        except Exception as e:  # noqa: BLE001 - every error is a finding
            errors.append(f"{type(e).__name__}: {e}")
    kb.close()
    with open(out, "w") as f:
        json.dump({"searches": n, "errors": errors[:20], "n_errors": len(errors)}, f)


def run(path, seconds=300, writers=4, readers=4):
    """Set up a KB at `path`, run the processes, verify; returns the report (ok = everything held)."""
    from writeback_rag import KnowledgeBase

    kb = KnowledgeBase.create(path, embedder="hash", notify=lambda m: None)
    kb.ingest([os.path.join(ROOT, "corpora", "lighthouses")])
    kb.label(os.path.join(ROOT, "corpora", "lighthouses-questions.jsonl"), split="train")
    base = {d for d in (r[0] for r in kb.conn.execute("SELECT id FROM documents WHERE kind='source'"))}
    kb.close()
    work = tempfile.mkdtemp(prefix="wbrag-stress-")
    procs = []
    for role, count in (("writer", writers), ("reader", readers)):
        for i in range(count):
            out = os.path.join(work, f"{role}-{i}.json")
            code = f"import sys; sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.dirname(__file__)!r}); " \
                   f"import stress; stress.{role}({path!r}, {i}, {seconds}, {out!r})"
            procs.append((role, i, out, subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE,
                                                         text=True)))
    report = {"seconds": seconds, "writers": writers, "readers": readers, "crashed": [], "ops": {},
              "searches": 0, "reader_errors": []}
    alive = set(base)
    for role, i, out, p in procs:
        _, err = p.communicate(timeout=seconds + 600)
        if p.returncode != 0 or not os.path.exists(out):
            report["crashed"].append(f"{role} {i}: exit {p.returncode}: {err.strip().splitlines()[-1:] if err else ''}")
            continue
        data = json.load(open(out))
        if role == "writer":
            alive |= set(data["alive"])
            for k, v in data["ops"].items():
                report["ops"][k] = report["ops"].get(k, 0) + v
        else:
            report["searches"] += data["searches"]
            report["reader_errors"] += data["errors"]
    kb = KnowledgeBase.open(path, notify=lambda m: None)
    check = kb.check()
    stored = {r[0] for r in kb.conn.execute("SELECT id FROM documents WHERE kind='source'")}
    missing = {"bm25": [], "dense": []}
    for doc in sorted(stored):
        text = kb.document(doc)["text"]
        for mode in ("bm25", "dense"):
            hits = kb.search(text[:200], k=1, mode=mode, filters={"doc": doc}, log=False).hits
            if not hits:
                missing[mode].append(doc)
    kb.close()
    report.update(check_ok=check["ok"], problems=check["problems"], documents=len(stored),
                  lost=sorted(alive - stored)[:20], unexpected=sorted(stored - alive)[:20],
                  not_found_bm25=missing["bm25"][:20], not_found_dense=missing["dense"][:20])
    report["ok"] = (check["ok"] and not report["crashed"] and not report["reader_errors"] and alive == stored
                    and not missing["bm25"] and not missing["dense"])
    return report


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=300)
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--readers", type=int, default=4)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    path = os.path.join(tempfile.mkdtemp(prefix="wbrag-stress-kb-"), "kb")
    rep = run(path, a.seconds, a.writers, a.readers)
    text = "\n".join([
        "# Stress: writers and readers on one KB", "",
        f"Command: `.venv/bin/python eval/stress.py --seconds {a.seconds} --writers {a.writers} --readers {a.readers}"
        + (f" --out {a.out}" if a.out else "") + "`", "",
        f"- result: **{'ok' if rep['ok'] else 'FAILED'}**",
        f"- writer operations: {json.dumps(rep['ops'], sort_keys=True)}; reader searches: {rep['searches']}",
        f"- documents at the end: {rep['documents']}; committed but lost: {rep['lost']}; present but never "
        f"committed by a writer: {rep['unexpected']}",
        f"- `check`: {'clean' if rep['check_ok'] else rep['problems']}",
        f"- not found by bm25: {rep['not_found_bm25']}; by dense: {rep['not_found_dense']}",
        f"- reader errors: {rep['reader_errors'] or 'none'}; crashed processes: {rep['crashed'] or 'none'}", ""])
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    sys.exit(0 if rep["ok"] else 1)


if __name__ == "__main__":
    main()
