"""Evaluation on BEIR-layout benchmarks: does write-back improve retrieval for held-out queries?

The protocol (`run_protocol`): a fresh KB with the corpus; the test queries measured with log=False
(they never feed write-back); the train queries labelled (`kb.label`) and written back (`kb.writeback`);
the test queries measured again. Metrics are computed with ir_measures on document-level runs built
from chunk hits; a retrieved knowledge unit either earns the credit of the source documents it was
distilled from ("credit") or counts for nothing ("strict"). Deltas come with paired bootstrap 95% CIs.
"""

import json
import math
import os
import random
import shutil
import sys
import time
from collections import defaultdict

import numpy as np

from . import config as cfgmod
from .backends import CachedEmbedder
from .errors import InputError
from .feedback import read_jsonl, read_qrels
from .text import contains_answer, count_tokens

MEASURES = ("nDCG@10", "R@1", "R@5", "R@10", "R@100", "RR@10")
VARIANTS = ("credit", "strict")
MODES = ("bm25", "dense", "hybrid")


def _quiet(msg):
    pass


# ---- data ----------------------------------------------------------------------------------


def load_beir(folder, split, corpus=True):
    """A BEIR folder: {"corpus": [{"id","title","text"}] or None, "examples": [...], "qrels", "answers"}.

    examples are the queries of `split` that have qrels, in queries.jsonl order, as the dicts that
    kb.label takes ({"id","query","answers","relevant"}) plus "qrels" ({doc id: grade})."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: no such dataset folder (expected BEIR layout: corpus.jsonl, queries.jsonl, qrels/)")
    for name in ("corpus.jsonl", "queries.jsonl") if corpus else ("queries.jsonl",):
        if not os.path.isfile(os.path.join(folder, name)):
            raise InputError(f"{folder}: no {name}; not a BEIR-layout folder")
    qpath = os.path.join(folder, "qrels", f"{split}.tsv")
    if not os.path.isfile(qpath):
        have = sorted(f[:-4] for f in os.listdir(os.path.join(folder, "qrels")) if f.endswith(".tsv")) \
            if os.path.isdir(os.path.join(folder, "qrels")) else []
        raise InputError(f"{folder}: no qrels/{split}.tsv (splits here: {', '.join(have) or 'none'})")
    qrels = read_qrels(qpath)
    answers = {}
    apath = os.path.join(folder, "answers.jsonl")
    if os.path.isfile(apath):
        for n, o in enumerate(read_jsonl(apath), 1):
            if not isinstance(o, dict) or "_id" not in o:
                raise InputError(f"{apath}: record {n} has no '_id'")
            a = o.get("answers", [])
            answers[str(o["_id"])] = [str(x) for x in ([a] if isinstance(a, str) else a)]
    examples, seen = [], set()
    qfile = os.path.join(folder, "queries.jsonl")
    for n, q in enumerate(read_jsonl(qfile), 1):
        if not isinstance(q, dict) or "_id" not in q or not isinstance(q.get("text"), str):
            raise InputError(f"{qfile}: record {n} needs '_id' and 'text'")
        qid = str(q["_id"])
        if qid not in qrels or qid in seen or not q["text"].strip():
            continue
        seen.add(qid)
        examples.append({"id": qid, "query": q["text"], "answers": answers.get(qid, []),
                         "relevant": [d for d, s in qrels[qid].items() if s > 0], "qrels": dict(qrels[qid])})
    if not examples:
        raise InputError(f"{folder}: no queries with qrels in split {split!r}")
    docs = None
    if corpus:
        cpath = os.path.join(folder, "corpus.jsonl")
        docs = []
        for n, o in enumerate(read_jsonl(cpath), 1):
            if not isinstance(o, dict) or "_id" not in o or not isinstance(o.get("text"), str):
                raise InputError(f"{cpath}: record {n} needs '_id' and 'text'")
            docs.append({"id": str(o["_id"]), "title": str(o.get("title") or ""), "text": o["text"]})
    return {"folder": folder, "name": os.path.basename(os.path.normpath(folder)), "split": split,
            "corpus": docs, "examples": examples, "qrels": qrels, "answers": answers,
            "missing_queries": len(set(qrels) - seen)}


def subsample(examples, limit, seed=0):
    """A fixed-seed random subset of `limit` examples, kept in their original order (None: all)."""
    if limit is None or limit >= len(examples):
        return list(examples)
    if limit < 1:
        raise InputError("a limit must be at least 1")
    keep = set(random.Random(seed).sample(range(len(examples)), int(limit)))
    return [ex for i, ex in enumerate(examples) if i in keep]


def validation_split(examples, frac=0.2, seed=0):
    """(train part, validation part): a fixed-seed random `frac` of the examples held out."""
    if not 0 < frac < 1:
        raise InputError("the validation fraction must be between 0 and 1")
    n_val = max(1, int(round(len(examples) * frac)))
    val = set(random.Random(seed).sample(range(len(examples)), n_val))
    return ([ex for i, ex in enumerate(examples) if i not in val], [ex for i, ex in enumerate(examples) if i in val])


# ---- runs and metrics ----------------------------------------------------------------------


def _get(h, key):
    return h[key] if isinstance(h, dict) else getattr(h, key)


def doc_ranking(hits, unit_sources=None, credit=True):
    """Document ids in hit order, each at its best (first) rank.

    A knowledge-unit hit (kind "unit") stands for its source documents under `credit` (in the order
    of `unit_sources[unit id]`), and for itself, a document no qrels judge relevant, when strict."""
    out, seen = [], set()
    for h in hits:
        doc = _get(h, "doc_id")
        ids = [doc]
        if _get(h, "kind") == "unit" or doc.startswith("unit:"):
            ids = list((unit_sources or {}).get(doc, [])) if credit else [doc]
        for d in ids:
            if d not in seen:
                seen.add(d)
                out.append(d)
    return out


def run_scores(ranking):
    """{doc: score} with strictly descending rank-based scores, so ir_measures keeps the given order."""
    n = len(ranking)
    return {d: float(n - i) for i, d in enumerate(ranking)}


def per_query_measures(qrels, run, measures=MEASURES):
    """{measure: {qid: value}} via ir_measures; every query of qrels gets a value (0 when nothing retrieved)."""
    import ir_measures

    parsed = [ir_measures.parse_measure(m) for m in measures]
    names = {str(p): m for p, m in zip(parsed, measures)}
    out = {m: {q: 0.0 for q in qrels} for m in measures}
    clean_run = {q: r for q, r in run.items() if r and q in qrels}
    if clean_run:
        for r in ir_measures.iter_calc(parsed, qrels, clean_run):
            out[names[str(r.measure)]][r.query_id] = float(r.value)
    return out


def answer_recall(hits, answers, k):
    """1.0 when a gold answer appears (normalized) in the title + text of one of the top-k hits."""
    return float(any(contains_answer(_get(h, "title") + " " + _get(h, "text"), answers) for h in hits[:k]))


def paired_bootstrap(before, after, n_resamples=1000, seed=0, alpha=0.05):
    """Mean delta (after - before) over paired per-query values with a percentile bootstrap CI."""
    b, a = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if b.shape != a.shape or b.ndim != 1:
        raise ValueError("before and after must be 1-D and paired (same length)")
    n = len(b)
    if n == 0:
        return {"before": float("nan"), "after": float("nan"), "delta": float("nan"), "lo": float("nan"),
                "hi": float("nan"), "n": 0}
    d = a - b
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(int(n_resamples), n))].mean(axis=1)
    lo, hi = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    delta = float(d.mean())
    return {"before": float(b.mean()), "after": float(a.mean()), "delta": delta,
            "lo": float(min(lo, delta)), "hi": float(max(hi, delta)), "n": int(n)}


def compare(before, after, n_resamples=1000, seed=0):
    """{metric: paired_bootstrap(...)} for every metric two `evaluate` results share, paired by query id."""
    out = {}
    for m, pb in before["per_query"].items():
        pa = after["per_query"].get(m)
        if pa is None:
            continue
        qids = [q for q in pb if q in pa]
        out[m] = paired_bootstrap([pb[q] for q in qids], [pa[q] for q in qids], n_resamples, seed)
    return out


def unit_sources(kb):
    """{unit id: [source doc ids]} of the KB's active units."""
    from .writeback import list_units

    return {u["id"]: list(u["source_doc_ids"]) for u in list_units(kb, include_inactive=False)}


def evaluate(kb, examples, mode, k=100, units=None, reader=None, reader_k=5, progress=_quiet, include_units=True):
    """Search every example (log=False) and score it; returns per-query values and their means.
    include_units=False ranks source documents only (what learned retrieval changes for them).

    Metric keys: "credit/<measure>", "strict/<measure>" (ir_measures), "answer_recall@1|5" (when the
    examples have answers), "unit@5" (a unit among the top 5), "reader_em|f1" (with an LLM reader)."""
    units = unit_sources(kb) if units is None else units
    llm = kb.llm if reader or reader is None else None
    has_answers = any(ex.get("answers") for ex in examples)
    qrels, runs = {}, {v: {} for v in VARIANTS}
    per = defaultdict(dict)
    latency = []
    t0 = time.time()
    for i, ex in enumerate(examples, 1):
        qid = ex["id"]
        res = kb.search(ex["query"], k=k, mode=mode, log=False, include_units=include_units)
        hits = res.hits
        latency.append(res.latency_ms)
        qrels[qid] = {str(d): int(s) for d, s in (ex.get("qrels") or {d: 1 for d in ex["relevant"]}).items()}
        for v in VARIANTS:
            runs[v][qid] = run_scores(doc_ranking(hits, units, credit=v == "credit"))
        if has_answers and ex.get("answers"):
            per["answer_recall@1"][qid] = answer_recall(hits, ex["answers"], 1)
            per["answer_recall@5"][qid] = answer_recall(hits, ex["answers"], 5)
        per["unit@5"][qid] = float(any(_get(h, "kind") == "unit" for h in hits[:5]))
        if llm is not None and ex.get("answers"):
            from .feedback import _context, generate, metric

            pred = generate(llm, ex["query"], _context(hits[:reader_k]))
            per["reader_em"][qid] = metric("em", pred, ex["answers"])
            per["reader_f1"][qid] = metric("f1", pred, ex["answers"])
        if i % 500 == 0:
            progress(f"  {mode}: {i}/{len(examples)} queries ({time.time() - t0:.0f}s)")
    for v in VARIANTS:
        for m, vals in per_query_measures(qrels, runs[v]).items():
            per[f"{v}/{m}"] = vals
    per = dict(per)
    return {"mode": mode, "n": len(examples), "per_query": per,
            "mean": {m: float(np.mean(list(vals.values()))) if vals else float("nan") for m, vals in per.items()},
            "latency_ms": float(np.mean(latency)) if latency else float("nan"), "seconds": time.time() - t0}


# ---- KBs ----------------------------------------------------------------------------------


def _use_cache(kb, texts, modes):
    """The train and test queries embedded once, in batches, for the whole protocol."""
    if not any(m in ("dense", "hybrid") for m in modes):
        return
    if not isinstance(kb._embedder, CachedEmbedder):
        kb._embedder = CachedEmbedder(kb.embedder)
    kb._embedder.prime(texts)


def build_kb(kb_path, data, embedder="minilm", config=None, progress=_quiet):
    """A new KB holding the dataset's corpus; returns (kb, ingest info)."""
    from .kb import KnowledgeBase

    cfg = {s: dict(v) for s, v in (config or {}).items() if s != "embedder"}
    kb = KnowledgeBase.create(kb_path, embedder=embedder, config=cfg, notify=progress)
    t0 = time.time()
    progress(f"ingesting {len(data['corpus'])} documents from {data['folder']} into {kb.path}")
    rep = kb.ingest(data["corpus"])
    info = {"documents": rep.added + rep.updated + rep.unchanged, "chunks": rep.chunks, "skipped": len(rep.skipped),
            "seconds": round(time.time() - t0, 1)}
    for p in rep.skipped[:5]:
        progress(f"  skipped: {p}")
    with open(os.path.join(kb.path, "eval-ingest.json"), "w", encoding="utf-8") as f:
        json.dump(info, f)
    progress(f"  ingested {info['documents']} documents, {info['chunks']} chunks in {info['seconds']}s")
    return kb, info


def copy_kb(base_path, kb_path, embedder="minilm", config=None, progress=_quiet):
    """A fresh KB as a copy of a corpus-only base KB (no re-ingest); config overrides are applied."""
    from . import config as cfgmod
    from .kb import CONFIG_NAME, DB_NAME, KnowledgeBase

    if os.path.exists(os.path.join(kb_path, DB_NAME)):
        raise InputError(f"{kb_path}: a knowledge base already exists here; give a new folder")
    shutil.copytree(base_path, kb_path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("writeback.lock"))
    kb = KnowledgeBase.open(kb_path, embedder=embedder, notify=progress)
    s = kb.stats()
    if s["units_active"] or s["units_inactive"] or s["queries"] or s["feedback"]:
        kb.close()
        raise InputError(f"{base_path}: the base KB is not fresh (it has units, queries or feedback)")
    moves = {}
    for section, values in (config or {}).items():
        if section == "embedder":
            continue
        if section in ("chunking", "dense") and any(kb.config[section].get(k) != v for k, v in values.items()):
            kb.close()
            raise InputError(f"{base_path}: built with other [{section}] settings; build a new base KB")
        if section in ("index", "milvus"):  # where the indexes live: moved there, from the stored vectors
            moves[section] = values
            continue
        kb.config.update(cfgmod.validate({section: values}, base=kb.config))  # in place: the indexes share it
    cfgmod.dump(kb.config, os.path.join(kb.path, CONFIG_NAME))
    if moves:
        kb.config["milvus"].update({k: v for k, v in moves.get("milvus", {}).items() if k != "uri"})
        kb.reindex(backend=moves.get("index", {}).get("backend"), milvus_uri=moves.get("milvus", {}).get("uri"))
    info = {}
    ipath = os.path.join(base_path, "eval-ingest.json")
    if os.path.exists(ipath):
        with open(ipath, encoding="utf-8") as f:
            info = dict(json.load(f), copied_from=os.path.abspath(base_path))
    return kb, info


def _fresh_kb(kb_path, data, embedder, config, base_kb, progress):
    if base_kb:
        from .kb import DB_NAME

        if not os.path.exists(os.path.join(base_kb, DB_NAME)):
            kb, _ = build_kb(base_kb, data, embedder, config, progress)
            kb.close()
        return copy_kb(base_kb, kb_path, embedder, config, progress)
    return build_kb(kb_path, data, embedder, config, progress)


def unit_stats(kb):
    """Count, average tokens and compression (unit tokens / tokens of its source documents' text)."""
    from .writeback import list_units

    units = list_units(kb, include_inactive=False)
    if not units:
        return {"count": 0, "avg_tokens": 0.0, "compression_mean": float("nan"), "compression_total": float("nan"),
                "avg_sources": 0.0}
    src_tokens, ratios, tot_u, tot_s = {}, [], 0, 0
    for u in units:
        st = 0
        for d in u["source_doc_ids"]:
            if d not in src_tokens:
                doc = kb.document(d)
                src_tokens[d] = count_tokens(doc["text"]) if doc else 0
            st += src_tokens[d]
        tot_u += u["tokens"]
        tot_s += st
        if st:
            ratios.append(u["tokens"] / st)
    return {"count": len(units), "avg_tokens": float(np.mean([u["tokens"] for u in units])),
            "compression_mean": float(np.mean(ratios)) if ratios else float("nan"),
            "compression_total": tot_u / tot_s if tot_s else float("nan"),
            "avg_sources": float(np.mean([len(u["source_doc_ids"]) for u in units]))}


def _label(kb, examples, progress, chunk=1000):
    """kb.label in chunks (progress lines); returns the summed report."""
    rep = {"examples": 0, "useful": 0, "docs_kept": 0, "judge": None}
    t0 = time.time()
    for s in range(0, len(examples), chunk):
        r = kb.label(examples[s:s + chunk])
        for key in ("examples", "useful", "docs_kept"):
            rep[key] += r[key]
        rep["judge"] = r["judge"]
        progress(f"  labelled {rep['examples']}/{len(examples)} train queries ({time.time() - t0:.0f}s)")
    return rep


def _wb_counts(rep):
    return {k: v for k, v in rep.items() if k not in ("units", "tuning", "unit_use")}


# ---- the protocol -------------------------------------------------------------------------


def run_protocol(dataset_folder, kb_path, modes=MODES, train_split="train", test_split="test", embedder="minilm",
                 distiller="extractive", limit_train=None, limit_test=None, k=100, config=None,
                 train_examples=None, test_examples=None, base_kb=None, seed=0, n_resamples=1000, reader=None,
                 keep_per_query=False, progress=_quiet):
    """Static baseline vs after one write-back of the train queries, on held-out test queries.

    1) a fresh KB (`kb_path` must be new; with `base_kb`, a copy of that corpus-only KB, built there
    first if missing), 2) every mode on the test queries with log=False, 3) kb.label(train),
    4) kb.writeback(distiller), 5) every mode on the test queries again. train_examples/test_examples
    replace the splits (e.g. a validation part of train)."""
    modes = _check_modes(modes)
    t_start = time.time()
    timings = {}
    data = load_beir(dataset_folder, test_split, corpus=not (base_kb and os.path.exists(os.path.join(base_kb, "kb.sqlite"))))
    if test_examples is None:
        test_examples = subsample(data["examples"], limit_test, seed)
    if train_examples is None:
        train_examples = subsample(load_beir(dataset_folder, train_split, corpus=False)["examples"], limit_train, seed)
    test_ids = {ex["id"] for ex in test_examples}
    if any(ex["id"] in test_ids for ex in train_examples):
        raise InputError("train and test examples share query ids; test queries must not feed write-back")
    t0 = time.time()
    kb, ingest = _fresh_kb(kb_path, data, embedder, config, base_kb, progress)
    timings["ingest_s"] = round(time.time() - t0, 1)
    try:
        t0 = time.time()
        label_mode = kb.config["retrieval"]["mode"]
        _use_cache(kb, [ex["query"] for ex in train_examples + test_examples], list(modes) + [label_mode])
        timings["embed_queries_s"] = round(time.time() - t0, 1)
        before, after = {}, {}
        for m in modes:
            progress(f"{data['name']}: static baseline, {m}, {len(test_examples)} test queries")
            before[m] = evaluate(kb, test_examples, m, k, units={}, reader=reader, progress=progress)
            timings[f"before_{m}_s"] = round(before[m]["seconds"], 1)
        progress(f"{data['name']}: labelling {len(train_examples)} train queries ({label_mode})")
        t0 = time.time()
        label = _label(kb, train_examples, progress)
        timings["label_s"] = round(time.time() - t0, 1)
        t0 = time.time()
        wb = kb.writeback(distiller=distiller)
        timings["writeback_s"] = round(time.time() - t0, 1)
        progress(f"  write-back: written {wb.get('written', 0)}, merged {wb.get('merged', 0)}, "
                 f"rejected {wb.get('rejected', 0)} ({timings['writeback_s']}s)")
        units = unit_sources(kb)
        sources = {}
        for m in modes:
            progress(f"{data['name']}: after write-back, {m}")
            after[m] = evaluate(kb, test_examples, m, k, units=units, reader=reader, progress=progress)
            timings[f"after_{m}_s"] = round(after[m]["seconds"], 1)
            # the source documents alone (include_units=False): what the learned retrieval does by itself
            sources[m] = evaluate(kb, test_examples, m, k, units={}, reader=False, progress=progress,
                                  include_units=False)
        stats = unit_stats(kb)
        test_texts = {ex["query"].strip().lower() for ex in test_examples}
        result = {
            "dataset": os.path.abspath(dataset_folder), "name": data["name"], "train_split": train_split,
            "test_split": test_split, "n_train": len(train_examples), "n_test": len(test_examples),
            "n_train_text_in_test": sum(ex["query"].strip().lower() in test_texts for ex in train_examples),
            "embedder": kb.model_id, "distiller": distiller, "modes": list(modes), "k": k,
            "label_mode": label_mode, "writeback_config": dict(kb.config["writeback"]),
            "ingest": ingest, "label": label, "writeback": _wb_counts(wb), "units": stats,
            "before": {m: before[m]["mean"] for m in modes}, "after": {m: after[m]["mean"] for m in modes},
            "deltas": {m: compare(before[m], after[m], n_resamples, seed) for m in modes},
            "sources": {m: compare(before[m], sources[m], n_resamples, seed) for m in modes},
            "tuning": wb.get("tuning"), "unit_use": wb.get("unit_use"),
            "latency_ms": {m: {"before": before[m]["latency_ms"], "after": after[m]["latency_ms"]} for m in modes},
            "timings": timings,
        }
        if keep_per_query:
            result["per_query"] = {m: {"before": before[m]["per_query"], "after": after[m]["per_query"]} for m in modes}
    finally:
        kb.close()
    timings["total_s"] = round(time.time() - t_start, 1)
    return result


def learning_curve(dataset_folder, kb_path, nights=5, modes=("hybrid",), train_split="train", test_split="test",
                   embedder="minilm", distiller="extractive", limit_train=None, limit_test=None, k=100, config=None,
                   base_kb=None, seed=0, n_resamples=1000, progress=_quiet):
    """Replay the train queries (shuffled with `seed`) in `nights` chunks; after each night's label +
    write-back, measure the test queries. Row 0 is the static KB."""
    modes = _check_modes(modes)
    if int(nights) < 1:
        raise InputError("nights must be at least 1")
    data = load_beir(dataset_folder, test_split, corpus=not (base_kb and os.path.exists(os.path.join(base_kb, "kb.sqlite"))))
    test = subsample(data["examples"], limit_test, seed)
    train = subsample(load_beir(dataset_folder, train_split, corpus=False)["examples"], limit_train, seed)
    random.Random(seed).shuffle(train)
    size = math.ceil(len(train) / int(nights))
    parts = [train[i:i + size] for i in range(0, len(train), size)]
    kb, _ = _fresh_kb(kb_path, data, embedder, config, base_kb, progress)
    rows, first = [], {}
    try:
        _use_cache(kb, [ex["query"] for ex in train + test], list(modes) + [kb.config["retrieval"]["mode"]])
        seen = 0
        for night in range(len(parts) + 1):
            t0 = time.time()
            row = {"night": night, "train_seen": seen}
            if night:
                part = parts[night - 1]
                progress(f"{data['name']} learning curve: night {night}/{len(parts)}, {len(part)} train queries")
                lab = _label(kb, part, progress)
                wb = kb.writeback(distiller=distiller)
                seen += len(part)
                row.update(train_seen=seen, useful=lab["useful"], written=wb.get("written", 0),
                           merged=wb.get("merged", 0), rejected=wb.get("rejected", 0),
                           tuning=wb["tuning"]["status"],
                           units_off=",".join(wb["unit_use"].get("off", [])) or "-")
            units = unit_sources(kb)
            row["units"] = len(units)
            row["metrics"], row["deltas"] = {}, {}
            for m in modes:
                ev = evaluate(kb, test, m, k, units=units, progress=progress)
                # and the source documents alone (units excluded): what the learned retrieval does by itself
                src = evaluate(kb, test, m, k, units={}, reader=False, progress=progress, include_units=False)
                for x in CURVE_SOURCE_METRICS:
                    if x in src["per_query"]:
                        ev["per_query"][f"sources/{x}"] = src["per_query"][x]
                        ev["mean"][f"sources/{x}"] = src["mean"][x]
                row["metrics"][m] = ev["mean"]
                if night == 0:
                    first[m] = ev
                else:
                    row["deltas"][m] = compare(first[m], ev, n_resamples, seed)
            row["seconds"] = round(time.time() - t0, 1)
            rows.append(row)
    finally:
        kb.close()
    return {"dataset": os.path.abspath(dataset_folder), "name": data["name"], "nights": len(parts),
            "modes": list(modes), "n_train": len(train), "n_test": len(test), "rows": rows}


def _check_modes(modes):
    if isinstance(modes, str):
        modes = [modes]
    out = []
    for m in modes:
        for part in str(m).split(","):
            part = part.strip()
            if not part:
                continue
            if part not in MODES:
                raise InputError(f"unknown mode {part!r}; use bm25, dense or hybrid")
            if part not in out:
                out.append(part)
    if not out:
        raise InputError("no retrieval mode given; use bm25, dense or hybrid")
    return tuple(out)


# ---- reports ------------------------------------------------------------------------------

LABELS = {"answer_recall@1": "answer-recall@1", "answer_recall@5": "answer-recall@5", "unit@5": "unit in top-5",
          "reader_em": "reader EM", "reader_f1": "reader F1"}


def _metric_order(keys):
    order = [f"credit/{m}" for m in MEASURES] + [f"strict/{m}" for m in MEASURES] + \
        ["answer_recall@1", "answer_recall@5", "reader_em", "reader_f1", "unit@5"]
    return [m for m in order if m in keys] + sorted(k for k in keys if k not in order)


CURVE_SOURCE_METRICS = ("answer_recall@5", "credit/nDCG@10")


def _label_of(m):
    if m.startswith("sources/"):
        return _label_of(m.split("/", 1)[1]).replace(" (credit)", "") + " (sources only)"
    if m.startswith(("credit/", "strict/")):
        v, name = m.split("/", 1)
        return f"{name} ({v})"
    return LABELS.get(m, m)


def _pts(x):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:+.2f}"


def _f(x, nd=3):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def protocol_table(result, mode, key="deltas"):
    """Markdown rows: metric | before | after | delta (points) | 95% CI (points)."""
    d = result[key][mode]
    lines = ["| metric | static | after write-back | delta (points) | 95% CI (points) |",
             "|---|---:|---:|---:|---|"]
    for m in _metric_order(d):
        if m.startswith("strict/") and m.split("/", 1)[1] not in ("nDCG@10", "R@5", "R@100"):
            continue
        c = d[m]
        lines.append(f"| {_label_of(m)} | {_f(c['before'])} | {_f(c['after'])} | {_pts(c['delta'])} | "
                     f"[{_pts(c['lo'])}, {_pts(c['hi'])}] |")
    return "\n".join(lines)


def curve_table(curve, metrics=None):
    modes = curve["modes"]
    metrics = metrics or _curve_metrics(curve)
    head = "| night | train queries seen | units | tuning | units left out of | " + " | ".join(
        f"{m} {_label_of(x)}" for m in modes for x in metrics) + " |"
    lines = [head, "|" + "---:|" * 3 + "---|---|" + "---:|" * (len(modes) * len(metrics))]
    for r in curve["rows"]:
        cells = []
        for m in modes:
            for x in metrics:
                v = r["metrics"][m].get(x)
                c = r["deltas"].get(m, {}).get(x)
                cells.append(_f(v) + (f" ({_pts(c['delta'])} [{_pts(c['lo'])}, {_pts(c['hi'])}])" if c else ""))
        lines.append(f"| {r['night']} | {r['train_seen']} | {r['units']} | {r.get('tuning', '')} | "
                     f"{r.get('units_off', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _curve_metrics(curve):
    keys = curve["rows"][0]["metrics"][curve["modes"][0]].keys()
    return [m for m in ("answer_recall@5", "credit/nDCG@10", "strict/nDCG@10", "sources/answer_recall@5",
                        "sources/credit/nDCG@10") if m in keys]


def plot_learning_curve(curve, path, metrics=None):
    """PNG: each metric against train queries seen, one line per mode (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = metrics or _curve_metrics(curve)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics), 3.6), squeeze=False)
    xs = [r["train_seen"] for r in curve["rows"]]
    for ax, metric in zip(axes[0], metrics):
        for m in curve["modes"]:
            ax.plot(xs, [r["metrics"][m].get(metric, float("nan")) for r in curve["rows"]], marker="o", label=m)
        ax.set_title(_label_of(metric))
        ax.set_xlabel("train queries written back")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{curve['name']}: held-out test queries (n={curve['n_test']}) over {curve['nights']} nights")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_report(result, command=None, curve=None, curve_png=None, validation=None, targets=None):
    """The report for one dataset: setup, per-mode tables with CIs, units, timings, learning curve."""
    r = result
    out = [f"# Write-back evaluation: {r['name']}", ""]
    if command:
        out += ["Command:", "", "```sh", command, "```", ""]
    out += [f"Dataset `{r['dataset']}`: corpus {r['ingest'].get('documents', '?')} documents "
            f"({r['ingest'].get('chunks', '?')} chunks), {r['n_train']} train queries ({r['train_split']}) written back, "
            f"{r['n_test']} held-out test queries ({r['test_split']}), searched with log=False so they never feed write-back. "
            f"Embedder `{r['embedder']}`, distiller `{r['distiller']}`, labelling retrieval `{r['label_mode']}` "
            f"(top-{r['writeback_config'].get('k')}), evaluation depth k={r['k']} chunks. "
            f"include_query = {r['writeback_config'].get('include_query')}.", "",
            "Metrics: ir_measures on document-level runs (chunk hits -> documents, first occurrence keeps the best "
            "rank). **credit**: a retrieved knowledge unit counts as the source documents it was distilled from; "
            "**strict**: a unit counts for nothing (it still takes its rank). answer-recall@k: a gold answer (SQuAD "
            "normalization) appears in the title + text of a top-k hit, units included. Deltas are after - static "
            "in points (x100), with paired bootstrap 95% CIs over test queries (1000 resamples, seed 0).", ""]
    if targets:
        out += ["## Targets", ""] + [f"- {t}" for t in targets] + [""]
    for m in r["modes"]:
        out += [f"## {m}", "", protocol_table(r, m), "",
                f"Mean query latency: {r['latency_ms'][m]['before']:.1f} ms static, {r['latency_ms'][m]['after']:.1f} ms "
                "after write-back.", ""]
    if r.get("sources"):
        t = r.get("tuning") or {}
        out += ["## Source documents only (units excluded)", "",
                "The same test queries searched with include_units=False after write-back: only the learned retrieval "
                f"(query adapter, fusion weights, rerankers; `wbrag tunings`) changes this ranking. Tuning: "
                f"**{t.get('status')}**"
                + (f", fitted on {t['examples']} train questions, judged on {t['holdout']} held out (hybrid nDCG@10 "
                   f"{t['metrics']['current']['hybrid']:.3f} -> {t['metrics']['candidate']['hybrid']:.3f}, dense "
                   f"{t['metrics']['current']['dense']:.3f} -> {t['metrics']['candidate']['dense']:.3f}); "
                   f"bm25_weight {t['bm25_weight']}, rrf_k {t['rrf_k']}, rerankers: {', '.join(t.get('ranker') or []) or 'none'}"
                   if t.get("metrics") else f": {t.get('reason')}")
                + ". Strict and credit are the same here.", ""]
        for m in r["modes"]:
            out += [f"### {m}, source documents only", "", protocol_table(r, m, "sources"), ""]
    uu = r.get("unit_use")
    if uu:
        out += ["## The canary's verdict on the units", "",
                f"**{uu['status']}**: {uu['reason']}"
                + (f" ({uu['holdout']} held-out questions; units are left out of a mode only when the 95% interval "
                   "of the paired difference is below zero)." if uu.get("metrics") else "."), ""]
        if uu.get("metrics"):
            out += ["| mode | without units | with units | delta (points) | 95% CI (points) |", "|---|---:|---:|---:|---|"]
            out += [f"| {m} | {v['without']:.3f} | {v['with']:.3f} | {100 * v['delta']:+.2f} | "
                    f"[{100 * v['ci95'][0]:+.2f}, {100 * v['ci95'][1]:+.2f}] |" for m, v in uu["metrics"].items()]
            out += ["", "Each held-out question scores the reciprocal rank of the first hit holding its answer where "
                    "the answer is known (MRR@10), else credit nDCG@10.", ""]
    u, lab, wb = r["units"], r["label"], r["writeback"]
    out += ["## Write-back and knowledge units", "",
            "| | value |", "|---|---:|",
            f"| train queries labelled ({lab.get('judge')} judge) | {lab['examples']} |",
            f"| passed the utility gate | {lab['useful']} |",
            f"| documents kept by the document gate | {lab['docs_kept']} |",
            f"| questions whose evidence the documents alone already ranked first (no unit) | {wb.get('covered', 0)} |",
            f"| held-out questions (they judge the units and the tuning; no unit is made from them) | "
            f"{wb.get('held_out', 0)} |",
            f"| units written (one per source passage) | {wb.get('written', 0)} |",
            f"| questions that joined another question's unit | {wb.get('merged', 0)} |",
            f"| rejected (faithfulness / empty) | {wb.get('rejected', 0)} |",
            f"| active units | {u['count']} |",
            f"| active units per corpus document | "
            f"{_f(u['count'] / r['ingest']['documents'], 2) if r['ingest'].get('documents') else '?'} |",
            f"| average unit tokens | {_f(u['avg_tokens'], 1)} |",
            f"| average source documents per unit | {_f(u['avg_sources'], 2)} |",
            f"| compression (unit tokens / source tokens), mean over units | {_f(u['compression_mean'])} |",
            f"| compression, total unit tokens / total source tokens | {_f(u['compression_total'])} |"]
    for m in r["modes"]:
        out.append(f"| test queries with a unit in the top 5 ({m}) | {_f(r['after'][m].get('unit@5'))} |")
    out += [f"| train queries whose text equals a test query's | {r.get('n_train_text_in_test', 0)} |", ""]
    out += ["## Timings", "", "| step | seconds |", "|---|---:|"] + \
        [f"| {k.removesuffix('_s')} | {v} |" for k, v in r["timings"].items()]
    if r["ingest"].get("copied_from"):
        out.append(f"| (corpus ingest, done once for the base KB) | {r['ingest'].get('seconds', '?')} |")
    out.append("")
    if validation:
        out += ["## include_query, chosen on validation (a held-out part of train)", "", validation, ""]
    if curve:
        out += [f"## Learning curve ({curve['nights']} nights)", "",
                f"The {curve['n_train']} train queries, shuffled (seed 0), replayed in {curve['nights']} nightly batches "
                f"(label + write-back each night); after each night the {curve['n_test']} test queries are measured. "
                "Night 0 is the static KB; in brackets the delta vs night 0 in points with its 95% CI.", "",
                curve_table(curve), ""]
        if curve_png:
            out += [f"![learning curve]({curve_png})", ""]
    return "\n".join(out)


def write_json(obj, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str, allow_nan=True)
    return path


# ---- CLI ----------------------------------------------------------------------------------


def register_cli(app):
    """Add `wbrag eval DATASET_FOLDER --kb PATH ...` to a Typer app (errors stay WbragError subclasses)."""
    from typing import List, Optional

    import typer

    @app.command("eval")
    def eval_cmd(dataset: str = typer.Argument(..., help="BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels/)."),
                 kb: str = typer.Option(..., "--kb", help="A new folder for the evaluation KB (must not exist)."),
                 modes: Optional[List[str]] = typer.Option(None, "--modes", help="bm25, dense, hybrid; repeat or comma-separate (default: all three)."),
                 limit_train: Optional[int] = typer.Option(None, "--limit-train", help="Fixed-seed random subset of train queries."),
                 limit_test: Optional[int] = typer.Option(None, "--limit-test", help="Fixed-seed random subset of test queries."),
                 train_split: str = typer.Option("train", help="qrels split written back."),
                 test_split: str = typer.Option("test", help="qrels split measured (held out)."),
                 embedder: str = typer.Option("minilm", help="Embedder for the new KB."),
                 distiller: str = typer.Option("extractive", help="extractive or llm."),
                 k: int = typer.Option(100, "-k", help="Chunks retrieved per test query."),
                 settings: Optional[List[str]] = typer.Option(None, "--set", help="SECTION.NAME=VALUE for the evaluation KB (repeat), e.g. writeback.earn_slot=false."),
                 as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
                 out: Optional[str] = typer.Option(None, "--out", help="Also write a Markdown report here.")):
        """Static KB vs after write-back of the train queries, on held-out test queries (with 95% CIs)."""
        if limit_train is not None and limit_train < 1 or limit_test is not None and limit_test < 1:
            raise InputError("--limit-train and --limit-test must be at least 1")
        if k < 1:
            raise InputError("-k must be at least 1")
        progress = (lambda msg: None) if as_json else (lambda msg: typer.echo(f"wbrag: {msg}", err=True))
        res = run_protocol(dataset, kb, modes=modes or MODES, train_split=train_split, test_split=test_split,
                           embedder=embedder, distiller=distiller, limit_train=limit_train, limit_test=limit_test,
                           k=k, config=cfgmod.parse_settings(settings or []), progress=progress)
        if out:
            with open(out, "w", encoding="utf-8") as f:
                f.write(markdown_report(res, command="wbrag " + " ".join(sys.argv[1:]) if sys.argv else None) + "\n")
        if as_json:
            typer.echo(json.dumps(res, indent=2, default=str))
            return
        for m in res["modes"]:
            typer.echo(f"\n{m}\n" + protocol_table(res, m))
        u = res["units"]
        typer.echo(f"\nunits {u['count']}, average {u['avg_tokens']:.1f} tokens, compression {_f(u['compression_mean'])}; "
                   f"total {res['timings']['total_s']}s")

    return eval_cmd
