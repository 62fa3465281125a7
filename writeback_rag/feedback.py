"""Feedback events, LLM answers and labelled runs: the evidence that write-back learns from."""

import json
import os
import re
import time
from collections import Counter

from . import store
from .store import feedback as feedback_records
from .store import runs
from .store import units as unit_records
from .progress import progress as _progress
from .errors import InputError, LLMError, UnknownQuery
from .text import contains_answer, normalize_answer, normalize_id

ANSWER_SYSTEM = "Answer the question with a short phrase. Use the context when it is given."


def add_feedback(kb, query_id, correct, docs=(), answer=None, source="user", gold=()):
    """Record one event; docs must be among that query's logged hits (a unit may only draw on what was retrieved)."""
    conn = kb.conn
    try:
        qid = int(query_id)
    except (TypeError, ValueError):
        raise UnknownQuery(f"query id must be a number, got {query_id!r}") from None
    if not feedback_records.query_exists(conn, qid):
        raise UnknownQuery(f"unknown query id {qid}", cli=f"list logged queries with: wbrag log --kb {kb.path}",
                           api="list logged queries with kb.queries()")
    hit_docs = feedback_records.hit_doc_ids(conn, qid)
    docs = list(dict.fromkeys(normalize_id(d) for d in ([docs] if isinstance(docs, str) else (docs or []))))
    for d in docs:
        if d not in hit_docs:
            raise InputError(f"document {d!r} was not among the hits of query {qid} ({', '.join(hit_docs) or 'none'}); "
                             "feedback can only name retrieved documents")
    with kb.corpus.changing(conn) as change:
        fid = feedback_records.record(conn, qid, 1 if correct else 0, docs, answer, list(gold or []), source)
        if not (correct or source == "label"):
            _count_against(kb, conn, docs, hit_docs, change)
    return fid


def _count_against(kb, conn, docs, hit_docs, change):
    """Wrong feedback counts against the units that answer used; enough of it retires a unit."""
    units = [d for d in (docs or hit_docs) if d.startswith("unit:")]
    limit = int(kb.config["writeback"]["retire_after_wrong"])
    for u in units:
        against = unit_records.count_against(conn, u)
        if against is not None and against >= limit:
            kb.corpus.set_status(conn, u, "retired", change)
            unit_records.clear_end(conn, u)  # no rollback brings it back


def _context(hits, limit_chars=1500):
    return "\n\n".join(f"[{i}] {h.title}\n{h.text}"[:limit_chars] for i, h in enumerate(hits, 1))


def generate(llm, question, passages=None, max_tokens=48):
    """G(q) or G(q, docs): the reader prompt shared by `answer` and the LLM gates."""
    user = f"Question: {question}\nAnswer:" if not passages else \
        f"Context:\n{passages}\n\nQuestion: {question}\nAnswer:"
    return llm.complete([{"role": "system", "content": ANSWER_SYSTEM}, {"role": "user", "content": user}],
                        max_tokens=max_tokens, temperature=0.0).strip()


def answer(kb, question, k=5, mode=None, source="api"):
    """Retrieve then generate with the configured LLM; the answer is logged with the query."""
    llm = kb.llm
    if llm is None:
        raise LLMError("no LLM configured (setting llm.backend)",
                       cli=f"set one with: wbrag config --kb {kb.path} llm.backend=openai "
                           "llm.base_url=http://127.0.0.1:8080/v1 llm.model=NAME",
                       api="create or open the KB with config={'llm': {'backend': 'openai', 'base_url': ..., "
                           "'model': ...}}")
    result = kb.search(question, k=k, mode=mode, source=source)
    text = generate(llm, question, _context(result.hits))
    with store.transaction(kb.conn):
        feedback_records.set_answer(kb.conn, result.query_id, text)
    return {"query_id": result.query_id, "answer": text, "hits": result.hits}


# ---- scoring -------------------------------------------------------------------------------


def f1(pred, gold):
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if not p or not g or not same:
        return float(p == g)
    prec, rec = same / len(p), same / len(g)
    return 2 * prec * rec / (prec + rec)


def metric(name, pred, answers):
    """Per-example M: accuracy (a gold answer appears in the prediction), em or f1; max over golds."""
    if not answers:
        return 0.0
    if name == "accuracy":
        return float(contains_answer(pred, answers))
    if name == "em":
        return float(any(normalize_answer(pred) == normalize_answer(a) for a in answers))
    if name == "f1":
        return max(f1(pred, a) for a in answers)
    raise InputError(f"unknown metric {name!r}; use accuracy, em or f1")


# ---- labelled sets -------------------------------------------------------------------------


def open_text(path):
    """Open a UTF-8 input file, or fail with a one-line InputError naming it."""
    try:
        return open(path, encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None


def read_labels(path, split="train"):
    """Examples from a JSONL file or a BEIR folder; raises InputError naming file and line."""
    if os.path.isdir(path):
        return _read_beir(path, split)
    out = []
    with open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise InputError(f"{path}:{n}: malformed JSON ({e.msg}); fix the line") from None
            ex = _example(obj, f"{path}:{n}", default_id=n)
            if split and obj.get("split") and obj["split"] != split:
                continue
            out.append({k: ex[k] for k in ("id", "query", "answers", "relevant")})
    if not out:
        raise InputError(f"{path}: no labelled examples" + (f" in split {split!r}" if split else ""))
    return out


def read_qrels(path):
    qrels = {}
    with open_text(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if n == 1 and parts[0] in ("query-id", "qid", "query_id"):
                continue
            if not line.strip():
                continue
            if len(parts) < 3 or not re.fullmatch(r"-?\d+", parts[2].strip()):
                raise InputError(f"{path}:{n}: expected 'query-id<TAB>corpus-id<TAB>score', got {line.strip()[:60]!r}")
            qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    return qrels


def read_jsonl(path):
    out = []
    with open_text(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError as e:
                    raise InputError(f"{path}:{n}: malformed JSON ({e.msg})") from None
    return out


def _read_beir(folder, split):
    qpath = os.path.join(folder, "qrels", f"{split}.tsv")
    if not os.path.exists(qpath):
        raise InputError(f"{folder}: no qrels/{split}.tsv; pick another split")
    qrels = read_qrels(qpath)
    answers = {}
    apath = os.path.join(folder, "answers.jsonl")
    if os.path.exists(apath):
        answers = {str(o.get("_id")): o.get("answers", []) for o in read_jsonl(apath)}
    out = []
    qfile = os.path.join(folder, "queries.jsonl")
    for n, q in enumerate(read_jsonl(qfile), 1):
        if not isinstance(q, dict) or "_id" not in q or not isinstance(q.get("text"), str):
            raise InputError(f"{qfile}: record {n}: needs '_id' and 'text'")
        qid = str(q.get("_id"))
        if qid in qrels:
            out.append({"id": qid, "query": q["text"], "answers": answers.get(qid, []),
                        "relevant": [d for d, s in qrels[qid].items() if s > 0]})
    if not out:
        raise InputError(f"{folder}: no queries with qrels in split {split!r}")
    return out


def _per_document(docs):
    """(doc id, score, passed) per chunk hit -> one per document, in rank order: its best score, and passed
    when any of its chunks passed (the gate keeps documents, so it counts documents, not chunk hits)."""
    merged = {}
    for d, s, p in docs:
        s0, p0 = merged.get(d, (s, p))
        merged[d] = (max(s0, s), p0 or p)
    return [(d, s, p) for d, (s, p) in merged.items()]


def judge(kb, ex, hits, llm=None):
    """The paper's gates. With an LLM: s_nr=M(G(q)), s_rag=M(G(q,top-K)), s_doc=M(G(q,d)).
    Without: retrieval-level, s_rag=1 when a top-K hit holds a gold answer or is labelled relevant."""
    w = kb.config["writeback"]
    sources = [h for h in hits if h.kind == "source"]
    use_llm = llm is not None and ex["answers"]
    if use_llm:
        m = w["metric"]
        s_nr = metric(m, generate(llm, ex["query"]), ex["answers"])
        pred = generate(llm, ex["query"], _context(hits))
        s_rag = metric(m, pred, ex["answers"])
    else:
        pred = None
        s_nr = 0.0
        s_rag = float(any(_holds(h, ex) for h in hits))
    useful = s_rag - s_nr > w["utility_margin"] and s_rag > w["utility_min"]
    docs = []
    if useful:
        for h in sources:
            if use_llm:
                s_doc = metric(m, generate(llm, ex["query"], _context([h])), ex["answers"])
            else:
                s_doc = float(_holds(h, ex))
            passed = s_doc - s_nr > w["doc_margin"]
            docs.append((h.doc_id, s_doc, passed))
        docs = _per_document(docs)
        if not any(p for _, _, p in docs):  # the paper's fallback: the top 2 by rank
            keep = {h.doc_id for h in sources[: int(w["fallback_docs"])]}
            docs = [(d, s, d in keep) for d, s, _ in docs]
    return {"s_nr": s_nr, "s_rag": s_rag, "useful": useful, "docs": docs, "pred": pred,
            "judge": "llm" if use_llm else "retrieval"}


def _example(obj, where, default_id=None):
    """One labelled example (a JSONL line or a dict given to the API), checked, with defaults."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected an object with 'query' and 'answers' or 'relevant'")
    query = obj.get("query") or obj.get("question") or obj.get("text")
    if not isinstance(query, str) or not query.strip():
        raise InputError(f"{where}: no 'query' text")
    answers, relevant = obj.get("answers", []), obj.get("relevant", [])
    answers = [answers] if isinstance(answers, str) else answers
    if not isinstance(answers, (list, tuple)) or not isinstance(relevant, (list, tuple)):
        raise InputError(f"{where}: 'answers' and 'relevant' must be lists")
    if not answers and not relevant:
        raise InputError(f"{where}: needs 'answers' or 'relevant' to judge retrieval")
    return {**obj, "id": str(obj.get("id", where if default_id is None else default_id)), "query": query,
            "answers": [str(a) for a in answers],
            "relevant": [str(r) for r in relevant]}


def _holds(hit, ex):
    if hit.doc_id in ex["relevant"]:
        return True
    return bool(ex["answers"]) and contains_answer(hit.title + " " + hit.text, ex["answers"])


def run_labelled(kb, path_or_examples, split="train", k=None, mode=None, show_progress=False):
    """Retrieve and judge every example; gate decisions and a feedback event (source 'label') are stored."""
    if isinstance(path_or_examples, (str, os.PathLike)):
        examples = read_labels(path_or_examples, split)
    else:
        examples = [_example(e, f"example {n}") for n, e in enumerate(path_or_examples, 1)]
    if not examples:
        raise InputError("empty labelled set: nothing to judge")
    k = int(k or kb.config["writeback"]["k"])
    llm = kb.llm
    batch = f"label-{int(time.time() * 1000)}"
    report = {"batch": batch, "examples": 0, "useful": 0, "docs_kept": 0, "judge": "llm" if llm else "retrieval",
              "query_ids": []}
    conn = kb.conn
    for ex in _progress(examples, show_progress, "labelling", unit="q"):
        res = kb.search(ex["query"], k=k, mode=mode, source="label")
        j = judge(kb, ex, res.hits, llm)
        kept = [d for d, _, p in j["docs"] if p]
        with kb.corpus.lock, store.transaction(conn):
            runs.record_gate(conn, batch, res.query_id, "utility", j["useful"],
                             f"{j['judge']} judge: s_rag-s_nr={j['s_rag'] - j['s_nr']:.2f}"
                             + ("" if j["useful"] else " (retrieval did not help)"),
                             scores=(j["s_nr"], j["s_rag"], None))
            for d, s, p in j["docs"]:
                runs.record_gate(conn, batch, res.query_id, "document", p,
                                 "carries the answer" if s - j["s_nr"] > kb.config["writeback"]["doc_margin"]
                                 else ("top-rank fallback" if p else "no gain alone"),
                                 doc_id=d, scores=(j["s_nr"], j["s_rag"], s))
            feedback_records.record_label(conn, res.query_id, int(j["useful"]), kept, j["pred"], ex["answers"],
                                          "label", ex["relevant"])
        report["examples"] += 1
        report["useful"] += int(j["useful"])
        report["docs_kept"] += len(kept)
        report["query_ids"].append(res.query_id)
    return report
