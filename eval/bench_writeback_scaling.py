"""Write-back time for the same 300 labelled queries on a 5k- and a 50k-chunk KB (hash embedder), twice
each: write-back cost should grow with the feedback, not with the corpus.

    .venv/bin/python eval/bench_writeback_scaling.py   (KBs under /tmp/wbb; about 2 minutes)"""
import os, sys, time, shutil, random
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT); sys.path.insert(0, os.path.join(ROOT, "eval"))
from bench_changelog import corpus
from writeback_rag import KnowledgeBase
for n in (5000, 50000):
    os.makedirs("/tmp/wbb", exist_ok=True)
    path = f"/tmp/wbb/kb{n}"
    shutil.rmtree(path, ignore_errors=True); shutil.rmtree(path + "-copy", ignore_errors=True)
    texts = corpus(n, seed=3)
    kb = KnowledgeBase.create(path, embedder="hash", config={"chunking": {"size": 400, "overlap": 40}}, notify=lambda m: None)
    kb.ingest([{"id": f"d{i}", "text": t} for i, t in enumerate(texts)])
    rng = random.Random(0)
    ex = []
    for j, i in enumerate(rng.sample(range(n), 300)):
        words = texts[i].split()
        ex.append({"id": str(j), "query": " ".join(words[:6]), "answers": [" ".join(words[6:8])]})
    kb.label(ex, k=5)
    kb.close()
    shutil.copytree(path, path + "-copy")
    for rnd in range(2):
        p = path if rnd == 0 else path + "-copy"
        kb = KnowledgeBase.open(p, notify=lambda m: None)
        t0 = time.perf_counter(); out = kb.writeback(); dt = time.perf_counter() - t0
        kb.close()
        print(f"chunks {n}: writeback of {out['examples']} queries, {out.get('written',0)} written: {dt:.2f} s", flush=True)
