"""The write-back job: gates' survivors become knowledge units, with provenance, beside the corpus."""

import contextvars
import fcntl
import json
import math
import os
import re
import time
import uuid
from collections import defaultdict

from . import store, tuning
from .errors import LLMError, LockBusy
from .loaders import IngestReport, Record
from .progress import progress as _progress
from .text import bm25_tokens, chunk_text, contains_answer, content_hash, count_tokens, sentences

from .backends import DISTILLERS, register_distiller  # noqa: F401  (the one registry; re-exported)


# ---- distillers: (kb, query, answers, docs) -> (title, text, model) -------------------------


@register_distiller("extractive")
def extractive(kb, query, answers, docs):
    """Sentences of the kept documents most relevant to the query (and to the answer when known),
    within a token budget, in document order, de-duplicated. Deterministic; no LLM."""
    w = kb.config["writeback"]
    budget = int(w["budget_tokens"])
    qtok = set(bm25_tokens(query))
    idf = _RUN_IDF.get() or _source_idf(kb.conn)

    scored = []
    seen = set()
    for di, d in enumerate(docs):
        for si, s in enumerate(sentences(d["text"])):
            key = " ".join(bm25_tokens(s))
            if not key or key in seen:
                continue
            seen.add(key)
            overlap = sum(idf(t) for t in qtok & set(bm25_tokens(s)))
            bonus = 100.0 if answers and contains_answer(s, answers) else 0.0
            scored.append((bonus + overlap, di, si, s))
    chosen, used = [], 0
    for score, di, si, s in sorted(scored, key=lambda x: (-x[0], x[1], x[2])):
        n = count_tokens(s)
        if score <= 0 and chosen:
            break
        if used + n > budget and chosen:
            continue
        chosen.append((di, si, s))
        used += n
        if used >= budget or len(chosen) >= int(w["max_evidence"]):
            break
    chosen.sort()
    text = " ".join(s for _, _, s in chosen)
    title = _unit_title(kb, query, docs)
    return title, text, None


_RUN_IDF = contextvars.ContextVar("writeback_source_idf", default=None)


class _source_idf:
    """BM25's IDF over the active source chunks only: knowledge units (this night's included) never shift
    which sentences a distiller picks, so a run resumed after a crash distils what an uninterrupted one
    would. Terms in more than half of the chunks get a small positive weight instead of a negative one."""

    def __init__(self, conn):
        self.conn, self.cache = conn, {}
        self.n = conn.execute("SELECT COUNT(*) FROM chunks c JOIN documents d ON d.id=c.doc_id "
                              "WHERE d.kind='source' AND d.status='active'").fetchone()[0]

    def __call__(self, term):
        if term not in self.cache:
            # the store keeps each term's frequency over the active source chunks (changes.py)
            df = self.conn.execute("SELECT df FROM terms WHERE term=?", (term,)).fetchone()
            df = df[0] if df else 0
            raw = math.log(self.n - df + 0.5) - math.log(df + 0.5) if df else 1.0
            self.cache[term] = max(raw, 0.01)
        return self.cache[term]


def _unit_title(kb, query, docs):
    """With include_query the unit's title is the question it answered: later paraphrases match it."""
    if kb.config["writeback"].get("include_query", True):
        return query.strip()
    return docs[0]["title"] or docs[0]["id"]


STEP1 = ("Copy, word for word, the sentences from the numbered list that help answer the question. "
         "Reply with their numbers only, comma-separated, at most {n}.")
STEP2 = ("Rewrite the evidence into one short encyclopedia-style document: a title line, then one paragraph "
         "of about 70-90 tokens. Use only facts stated in the evidence. Do not add anything.")


@register_distiller("llm")
def llm_distill(kb, query, answers, docs):
    """The paper's two steps: select evidence sentences verbatim, then rewrite them (gold answer not shown)."""
    llm = kb.llm
    if llm is None:
        raise LLMError("the llm distiller needs an LLM (setting llm.backend)",
                       cli=f"set one with: wbrag config --kb {kb.path} llm.backend=openai llm.base_url=URL")
    w = kb.config["writeback"]
    sents = [s for d in docs for s in sentences(d["text"])]
    listing = "\n".join(f"{i}. {s}" for i, s in enumerate(sents, 1))
    out1 = llm.complete([{"role": "system", "content": STEP1.format(n=w["max_evidence"])},
                         {"role": "user", "content": f"Question: {query}\n\nSentences:\n{listing}"}],
                        max_tokens=48, temperature=0.0)
    picks = [int(x) for x in re.findall(r"\d+", out1) if 1 <= int(x) <= len(sents)]
    evidence = [sents[i - 1] for i in dict.fromkeys(picks)][: int(w["max_evidence"])]
    if not evidence:  # the model named no sentence: fall back to query-relevant sentences
        _, text, _ = extractive(kb, query, [], docs)
        evidence = sentences(text)
    out2 = llm.complete([{"role": "system", "content": STEP2},
                         {"role": "user", "content": f"Topic: {query}\n\nEvidence:\n" + "\n".join(evidence)}],
                        max_tokens=160, temperature=0.0).strip()
    lines = [ln.strip() for ln in out2.splitlines() if ln.strip()]
    if not lines:
        return _unit_title(kb, query, docs), "", llm.model_id
    title = re.sub(r"^(#+\s*|title:\s*)", "", lines[0], flags=re.I).strip("* ")
    body = " ".join(lines[1:]) if len(lines) > 1 else lines[0]
    if kb.config["writeback"].get("include_query", True):
        title = query.strip()
    return title, body, llm.model_id


def faithful(text, docs, threshold):
    """Every sentence must be supported: at least `threshold` of its content words occur in the sources."""
    source = set(bm25_tokens(" ".join(d["title"] + " " + d["text"] for d in docs)))
    worst = 1.0
    for s in sentences(text) or [text]:
        toks = bm25_tokens(s)
        if not toks:
            continue
        worst = min(worst, sum(t in source for t in toks) / len(toks))
    return worst >= threshold, worst


# ---- staleness, lock, rollback --------------------------------------------------------------


def mark_stale_units(corpus, conn, doc_id, change):
    """Units drawn from a changed or deleted source stop being returned (recorded in `change`)."""
    needle = json.dumps(doc_id)  # instr, not LIKE: ids of any length, and '%' or '_' in an id match only itself
    for unit_id, sources in conn.execute("SELECT u.id, u.source_doc_ids FROM units u JOIN documents d ON d.id=u.id "
                                         "WHERE d.status='active' AND instr(u.source_doc_ids, ?) > 0",
                                         (needle,)).fetchall():
        if doc_id in json.loads(sources):  # instr narrows; the JSON list decides
            corpus.set_status(conn, unit_id, "stale", change)


class Lock:
    """An exclusive flock on KB/writeback.lock: a second concurrent run fails at once (cron-safe)."""

    def __init__(self, kb):
        self.path = os.path.join(kb.path, "writeback.lock")

    def __enter__(self):
        self.f = open(self.path, "a+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.seek(0)
            holder = self.f.read().strip()
            self.f.close()
            raise LockBusy(f"another write-back run holds {self.path} ({holder or 'pid unknown'}); try again later") from None
        self.f.seek(0)
        self.f.truncate()
        self.f.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self.f.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def rollback(kb, run_id):
    """Remove a run's units from the database and every index, and stop using what it learned (the tuning
    adopted before it is used again); its feedback stays consumed."""
    conn = kb.conn
    with kb.corpus.lock:
        run = conn.execute("SELECT status FROM runs WHERE id=?", (run_id,)).fetchone()
        if run is None:
            from .errors import InputError
            raise InputError(f"unknown run {run_id!r}", cli=f"list runs with: wbrag runs --kb {kb.path}",
                             api="list runs with writeback.list_runs(kb)")
        units = [r[0] for r in conn.execute("SELECT id FROM units WHERE run_id=?", (run_id,))]
        with kb.corpus.changing(conn) as change:
            for u in units:
                kb.corpus.remove(conn, u, change)
            conn.execute("UPDATE runs SET status='rolled-back' WHERE id=?", (run_id,))
            tuning.rollback(conn, run_id)
    return len(units)


# ---- the job --------------------------------------------------------------------------------


COUNTS = ("examples", "passed_utility", "docs_kept", "written", "merged", "revived", "rejected")


def run_writeback(kb, distiller=None, dry_run=False, show_progress=False, log=None):
    """Process feedback since the last successful run: gates' survivors -> units. Resumable, idempotent."""
    w = kb.config["writeback"]
    distiller = distiller or w["distiller"]
    if distiller not in DISTILLERS:
        from .errors import InputError
        raise InputError(f"unknown distiller {distiller!r}; use one of {', '.join(sorted(DISTILLERS))}")
    if distiller == "llm" and kb.llm is None:
        raise LLMError("the llm distiller needs an LLM (setting llm.backend)",
                       cli=f"set one with: wbrag config --kb {kb.path} llm.backend=openai "
                           "llm.base_url=http://127.0.0.1:8080/v1")
    with Lock(kb):
        return _run(kb, distiller, dry_run, show_progress)


def _run(kb, distiller, dry_run, show_progress):
    conn = kb.conn
    token = _RUN_IDF.set(_source_idf(conn))  # one source count and one term cache for the whole run
    try:
        return _run_with_idf(kb, conn, distiller, dry_run, show_progress)
    finally:
        _RUN_IDF.reset(token)


def _run_with_idf(kb, conn, distiller, dry_run, show_progress):
    run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    counts = defaultdict(int)
    with store.transaction(conn):
        # a run that died (kill -9) left status 'running': the lock proves it is not running now. This run
        # takes over its units (so rolling it back removes the whole night's) and decides its gates again
        dead = [r[0] for r in conn.execute("SELECT id FROM runs WHERE status='running'")]
        conn.execute("UPDATE runs SET status='interrupted' WHERE status='running'")
        if not dry_run:
            conn.execute("INSERT INTO runs(id, started, status, distiller) VALUES (?,?,?,?)",
                         (run_id, time.time(), "running", distiller))
            if dead:
                marks = ",".join("?" * len(dead))
                conn.execute(f"UPDATE units SET run_id=? WHERE run_id IN ({marks})", [run_id] + dead)
                conn.execute(f"DELETE FROM gate_decisions WHERE run_id IN ({marks})", dead)
    watermark = conn.execute("SELECT COALESCE(MAX(watermark), 0) FROM runs WHERE status IN ('done','rolled-back')").fetchone()[0]
    top = conn.execute("SELECT COALESCE(MAX(id), 0) FROM feedback").fetchone()[0]
    qids = [r[0] for r in conn.execute("SELECT DISTINCT query_id FROM feedback WHERE id>? AND id<=? ORDER BY query_id",
                                       (watermark, top))]
    # stale units: re-distil if their feedback still supports it
    for row in conn.execute("SELECT u.query_ids FROM units u JOIN documents d ON d.id=u.id WHERE d.status='stale'"):
        qids += json.loads(row[0])
    qids = list(dict.fromkeys(qids))
    counts["examples"] = len(qids)
    plans = []
    for qid in _progress(qids, show_progress, "write-back: gates", unit="q"):
        plan = _plan(kb, conn, qid, run_id, counts, dry_run)
        if plan:
            plans.append(plan)
    written, pending = [], []
    try:
        for plan in _progress(plans, show_progress, "write-back: distilling", unit="q"):
            res = _distil(kb, plan, distiller, run_id, counts, dry_run, pending)
            if res:
                written.append(res)
            if len(pending) >= int(kb.config["writeback"]["batch"]):
                _flush(kb, pending)
        _flush(kb, pending)
    except Exception as e:
        if not dry_run:
            with store.transaction(conn):
                conn.execute("UPDATE runs SET status='failed', finished=?, counts=?, error=? WHERE id=?",
                             (time.time(), json.dumps(counts), str(e)[:500], run_id))
        raise
    # retrieval learns from all the feedback so far (its cost grows with feedback, not with the corpus)
    learned, row = tuning.fit(kb, run_id)
    if not dry_run:
        with store.transaction(conn):
            if row is not None:
                tuning.record(conn, learned, row)
            conn.execute("UPDATE runs SET status='done', finished=?, watermark=?, counts=? WHERE id=?",
                         (time.time(), top, json.dumps({**counts, "tuning": learned["status"]}), run_id))
        kb.corpus.indexes.save_if_due(conn)
    return {"run_id": None if dry_run else run_id, "dry_run": dry_run, "distiller": distiller,
            "units": written, **{k: counts.get(k, 0) for k in COUNTS}, "tuning": learned}


def _plan(kb, conn, qid, run_id, counts, dry_run):
    """Gates for one query from all its feedback: support, utility and document evidence."""
    w = kb.config["writeback"]
    q = conn.execute("SELECT id, text FROM queries WHERE id=?", (qid,)).fetchone()
    events = conn.execute("SELECT * FROM feedback WHERE query_id=? ORDER BY id", (qid,)).fetchall()
    good = [e for e in events if e["correct"]]
    bad = [e for e in events if not e["correct"] and e["source"] != "label"]
    support = len(good) - len(bad)

    def decide(gate, passed, reason, doc=None):
        if not dry_run:
            with store.transaction(conn):
                conn.execute("INSERT INTO gate_decisions(run_id, query_id, gate, doc_id, passed, reason) VALUES (?,?,?,?,?,?)",
                             (run_id, qid, gate, doc, int(passed), reason))

    if support < int(w["min_support"]):
        decide("utility", False, f"support {support} < min_support {w['min_support']} (correct {len(good)}, wrong {len(bad)})")
        return None
    counts["passed_utility"] += 1
    hits = conn.execute("SELECT h.doc_id, h.kind, h.rank FROM hits h WHERE h.query_id=? ORDER BY h.rank", (qid,)).fetchall()
    retrieved = [h["doc_id"] for h in hits if h["kind"] == "source"]
    docs = [d for e in good for d in json.loads(e["docs"])]
    answers = [a for e in good for a in json.loads(e["gold"])] + [e["answer"] for e in good if e["answer"] and e["source"] != "label"]
    if not docs:  # user said "correct" without naming docs: keep hits holding the answer, else the top 2
        for d in retrieved:
            doc = kb.document(d)
            if doc and answers and contains_answer(doc["title"] + " " + doc["text"], answers):
                docs.append(d)
        if not docs:
            docs = retrieved[: int(w["fallback_docs"])]
        if not dry_run:
            for d in docs:
                decide("document", True, "holds the answer" if answers else "top-rank fallback", d)
    # poisoning bound: only documents retrieved for this query, only source documents, only live ones
    kept = []
    for d in dict.fromkeys(docs):
        doc = kb.document(d)
        if d not in retrieved or doc is None or doc["kind"] != "source":
            decide("document", False, "not a retrieved, live source document", d)
            continue
        kept.append(doc)
    if not kept:
        return None
    counts["docs_kept"] += len(kept)
    return {"query_id": qid, "query": q["text"], "answers": list(dict.fromkeys(answers)), "docs": kept,
            "feedback_ids": [e["id"] for e in good]}


def _flush(kb, pending):
    """Units (rows, chunks, term statistics, provenance) commit together, a batch at a time."""
    if pending:
        kb.corpus.write(pending, IngestReport(), kind="unit")
        pending.clear()


def _distil(kb, plan, distiller, run_id, counts, dry_run, pending):
    conn, w = kb.conn, kb.config["writeback"]
    title, text, model = DISTILLERS[distiller](kb, plan["query"], plan["answers"] if distiller == "extractive" else [],
                                               plan["docs"])
    qid = plan["query_id"]
    if not text.strip():
        counts["rejected"] += 1
        _gate(conn, run_id, qid, "faithfulness", False, "distiller produced no text", dry_run)
        return None
    ok, support = faithful(text, plan["docs"], float(w["faithfulness"]))
    if not ok:
        counts["rejected"] += 1
        _gate(conn, run_id, qid, "faithfulness", False, f"unsupported sentence (word support {support:.2f})", dry_run)
        return None
    carried = carried_sentences(text, plan["docs"])
    if not carried:
        counts["rejected"] += 1
        _gate(conn, run_id, qid, "faithfulness", False, "the unit carries no sentence of a kept document", dry_run)
        return None
    src_ids = sorted(carried)  # credit goes only to the documents whose sentences the unit carries
    unit_id = "unit:" + content_hash(title, text, *src_ids)[:16]
    def same(p):  # the same unit, or a near-duplicate from the same sources, written earlier in this run:
        # merged whether or not its batch has been committed yet, so batch size never changes the result
        return p[0].id == unit_id or (p[4][3] == json.dumps(src_ids) and _similar(p[0].text, text))

    if any(same(p) for p in pending):
        for p in pending:
            if same(p):
                prov = list(p[4])
                prov[1] = json.dumps(list(dict.fromkeys(json.loads(prov[1]) + [qid])))
                prov[2] = json.dumps(list(dict.fromkeys(json.loads(prov[2]) + plan["feedback_ids"])))
                pending[pending.index(p)] = (*p[:4], tuple(prov))
                break
        counts["merged"] += 1
        return {"unit_id": p[0].id, "merged": True}
    existing = conn.execute("SELECT u.id, d.status FROM units u JOIN documents d ON d.id=u.id WHERE u.id=?", (unit_id,)).fetchone()
    if existing is None:
        # near-duplicate: an active unit with the same sources and the same evidence text
        for row in conn.execute("SELECT d.id, d.text FROM units u JOIN documents d ON d.id=u.id "
                                "WHERE d.status='active' AND u.source_doc_ids=?", (json.dumps(src_ids),)):
            if _similar(row["text"], text):
                existing = {"id": row["id"], "status": "active"}
                break
    if existing is not None and existing["status"] in ("active",):
        if not dry_run:
            _merge(conn, existing["id"], qid, plan["feedback_ids"])
        counts["merged"] += 1
        return {"unit_id": existing["id"], "merged": True}
    if existing is not None and existing["status"] == "stale":
        # its sources changed, yet the same text is still distilled from them: it is current again
        counts["revived"] += 1
        if not dry_run:
            with kb.corpus.changing(conn) as change:
                kb.corpus.set_status(conn, existing["id"], "active", change)
            _merge(conn, existing["id"], qid, plan["feedback_ids"])
        return {"unit_id": existing["id"], "revived": True}
    if existing is not None:  # a retired unit is not resurrected by the same evidence
        counts["rejected"] += 1
        _gate(conn, run_id, qid, "unit", False, f"same as {existing['status']} unit {existing['id']}", dry_run)
        return None
    counts["written"] += 1
    if dry_run:
        return {"unit_id": unit_id, "title": title, "text": text, "sources": src_ids}
    rec = Record(id=unit_id, title=title, text=text, source=f"writeback:{run_id}",
                 meta={"query": plan["query"], "run": run_id, "sentences": {d: carried[d] for d in src_ids}})
    chunks = chunk_text(text, kb.config["chunking"]["size"], kb.config["chunking"]["overlap"]) or [text]
    src_chunks = [r[0] for d in src_ids for r in conn.execute("SELECT id FROM chunks WHERE doc_id=?", (d,))]
    # unit row, chunks, term statistics and provenance commit together
    provenance = (unit_id, json.dumps([qid]), json.dumps(plan["feedback_ids"]), json.dumps(src_ids),
                  json.dumps(src_chunks), distiller, model, run_id, time.time())
    pending.append((rec, content_hash(title, text), chunks, False, provenance))
    return {"unit_id": unit_id, "title": title, "text": text, "sources": src_ids}


def carried_sentences(text, docs, overlap=0.6):
    """{doc id: [indexes of its sentences the unit carries]}: a sentence is carried when the unit holds it
    word for word (extractive), or when a unit sentence holds at least `overlap` of its words and nothing
    else matches better (an LLM's rewrite). Documents the unit does not draw on get no credit."""
    unit_text = " " + " ".join(bm25_tokens(text)) + " "
    unit_sents = [set(bm25_tokens(s)) for s in sentences(text)] or [set(bm25_tokens(text))]
    out, loose = {}, {}
    for d in docs:
        for si, s in enumerate(sentences(d["text"])):
            toks = bm25_tokens(s)
            if not toks:
                continue
            if " " + " ".join(toks) + " " in unit_text:
                out.setdefault(d["id"], []).append(si)
                continue
            share = max(len(set(toks) & u) / len(set(toks)) for u in unit_sents)
            if share >= overlap:
                loose.setdefault(d["id"], []).append(si)
    return out or loose


def _similar(a, b, threshold=0.9):
    ta, tb = set(bm25_tokens(a)), set(bm25_tokens(b))
    return bool(ta and tb) and len(ta & tb) / len(ta | tb) >= threshold


def _merge(conn, unit_id, qid, feedback_ids):
    row = conn.execute("SELECT query_ids, feedback_ids FROM units WHERE id=?", (unit_id,)).fetchone()
    qs = list(dict.fromkeys(json.loads(row[0]) + [qid]))
    fs = list(dict.fromkeys(json.loads(row[1]) + list(feedback_ids)))
    with store.transaction(conn):
        conn.execute("UPDATE units SET query_ids=?, feedback_ids=? WHERE id=?", (json.dumps(qs), json.dumps(fs), unit_id))


def _gate(conn, run_id, qid, gate, passed, reason, dry_run):
    if not dry_run:
        with store.transaction(conn):
            conn.execute("INSERT INTO gate_decisions(run_id, query_id, gate, passed, reason) VALUES (?,?,?,?,?)",
                         (run_id, qid, gate, int(passed), reason))


def list_units(kb, include_inactive=True, ids=None):
    """Units with their provenance, oldest first; `ids`: only those (a lookup, not a scan of every unit)."""
    where, args = [] if include_inactive else ["d.status='active'"], []
    if ids is not None:
        ids = list(ids)
        where.append(f"d.id IN ({','.join('?' * len(ids))})")
        args += ids
    rows = kb.conn.execute("SELECT d.id, d.title, d.text, d.status, u.* FROM units u JOIN documents d ON d.id=u.id "
                           + (f"WHERE {' AND '.join(where)} " if where else "") + "ORDER BY u.created",
                           args).fetchall()
    out = []
    for r in rows:
        r = dict(r)
        for key in ("query_ids", "feedback_ids", "source_doc_ids", "source_chunk_ids"):
            r[key] = json.loads(r[key])
        r["tokens"] = count_tokens(r["text"])
        out.append(r)
    return out


def list_runs(kb):
    import sqlite_utils

    return [dict(r, counts=json.loads(r["counts"]))
            for r in sqlite_utils.Database(kb.conn)["runs"].rows_where(order_by="started")]
