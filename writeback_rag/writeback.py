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
from .store import runs, units
from .errors import LLMError, LockBusy
from .loaders import IngestReport, Record
from .progress import progress as _progress
from .text import bm25_tokens, chunk_text, contains_answer, content_hash, count_tokens, sentences

from .backends import DISTILLERS, register_distiller  # noqa: F401  (the one registry; re-exported)


# ---- distillers: (kb, asks, docs) -> (title, text, model) -------------------------------------


@register_distiller("extractive")
def extractive(kb, asks, docs):
    """Sentences of the documents most relevant to each question (and to its answer when known), the
    questions taking turns (every question's best sentence, then every second best, ...), within a token
    budget, in document order, de-duplicated. Deterministic; no LLM."""
    w = kb.config["writeback"]
    budget = int(w["budget_tokens"])
    idf = _RUN_IDF.get() or _source_idf(kb.conn)
    sents, seen = [], set()
    for di, d in enumerate(docs):
        for si, s in enumerate(sentences(d["text"])):
            toks = bm25_tokens(s)
            key = " ".join(toks)
            if not key or key in seen:
                continue
            seen.add(key)
            sents.append((di, si, s, set(toks)))
    ranked = []
    for a in asks:
        qtok, answers = set(bm25_tokens(a["query"])), a.get("answers") or []
        scored = [((100.0 if answers and contains_answer(s, answers) else 0.0) + sum(idf(t) for t in qtok & toks),
                   di, si, s) for di, si, s, toks in sents]
        ranked.append(sorted(scored, key=lambda x: (-x[0], x[1], x[2])))
    chosen, used = {}, 0
    for turn in range(len(sents)):
        for r in ranked:
            score, di, si, s = r[turn]
            n = count_tokens(s)
            if (di, si) in chosen or (score <= 0 and chosen) or (used + n > budget and chosen):
                continue
            chosen[(di, si)] = s
            used += n
            if used >= budget or len(chosen) >= int(w["max_evidence"]):
                break
        else:
            continue
        break
    text = " ".join(chosen[key] for key in sorted(chosen))
    return _unit_title(kb, asks, docs), text, None


_RUN_IDF = contextvars.ContextVar("writeback_source_idf", default=None)


class _source_idf:
    """BM25's IDF over the active source chunks only: knowledge units (this night's included) never shift
    which sentences a distiller picks, so a run resumed after a crash distils what an uninterrupted one
    would. Terms in more than half of the chunks get a small positive weight instead of a negative one."""

    def __init__(self, conn):
        self.records, self.cache = store.Records(conn), {}
        self.n = runs.source_chunk_count(conn)

    def __call__(self, term):
        if term not in self.cache:
            # the store keeps each term's frequency over the active source chunks (store/changes.py)
            df = self.records.df([term]).get(term, 0)
            # another process may have added sources since n was counted: n is never below a term's df
            raw = math.log(max(self.n, df) - df + 0.5) - math.log(df + 0.5) if df else 1.0
            self.cache[term] = max(raw, 0.01)
        return self.cache[term]


def _unit_title(kb, asks, docs):
    """With include_query the unit's title is the questions it answers (at most unit_questions of them):
    later paraphrases match it."""
    if kb.config["writeback"].get("include_query", True):
        questions = list(dict.fromkeys(a["query"].strip() for a in asks))
        return " / ".join(questions[: int(kb.config["writeback"]["unit_questions"])])
    return docs[0]["title"] or docs[0]["id"]


STEP1 = ("Copy, word for word, the sentences from the numbered list that help answer the question. "
         "Reply with their numbers only, comma-separated, at most {n}.")
STEP2 = ("Rewrite the evidence into one short encyclopedia-style document: a title line, then one paragraph "
         "of about 70-90 tokens. Use only facts stated in the evidence. Do not add anything.")


@register_distiller("llm")
def llm_distill(kb, asks, docs):
    """The paper's two steps: select evidence sentences verbatim, then rewrite them (gold answers not shown)."""
    llm = kb.llm
    if llm is None:
        raise LLMError("the llm distiller needs an LLM (setting llm.backend)",
                       cli=f"set one with: wbrag config --kb {kb.path} llm.backend=openai llm.base_url=URL")
    w = kb.config["writeback"]
    query = " / ".join(dict.fromkeys(a["query"].strip() for a in asks))
    sents = [s for d in docs for s in sentences(d["text"])]
    listing = "\n".join(f"{i}. {s}" for i, s in enumerate(sents, 1))
    out1 = llm.complete([{"role": "system", "content": STEP1.format(n=w["max_evidence"])},
                         {"role": "user", "content": f"Question: {query}\n\nSentences:\n{listing}"}],
                        max_tokens=48, temperature=0.0)
    picks = [int(x) for x in re.findall(r"\d+", out1) if 1 <= int(x) <= len(sents)]
    evidence = [sents[i - 1] for i in dict.fromkeys(picks)][: int(w["max_evidence"])]
    if not evidence:  # the model named no sentence: fall back to query-relevant sentences
        _, text, _ = extractive(kb, [{"query": a["query"]} for a in asks], docs)
        evidence = sentences(text)
    out2 = llm.complete([{"role": "system", "content": STEP2},
                         {"role": "user", "content": f"Topic: {query}\n\nEvidence:\n" + "\n".join(evidence)}],
                        max_tokens=160, temperature=0.0).strip()
    lines = [ln.strip() for ln in out2.splitlines() if ln.strip()]
    if not lines:
        return _unit_title(kb, asks, docs), "", llm.model_id
    title = re.sub(r"^(#+\s*|title:\s*)", "", lines[0], flags=re.I).strip("* ")
    body = " ".join(lines[1:]) if len(lines) > 1 else lines[0]
    if kb.config["writeback"].get("include_query", True):
        title = _unit_title(kb, asks, docs)
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
    # current units, and the versions a rollback could make current again (ended by a run)
    for unit_id in units.drawn_from(conn, doc_id):
        corpus.set_status(conn, unit_id, "stale", change)
        units.clear_end(conn, unit_id)


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
    """Remove a run's units from the database and every index, bring back the units it superseded or
    retired, and stop using what it learned (the tuning adopted before it is used again, and the modes the
    run before it left units out of); its feedback stays consumed."""
    conn = kb.conn
    # under the write-back lock: a night running in another process works from the units it planned on,
    # so a rollback waits for it (LockBusy, try again later) instead of removing them under it
    with Lock(kb), kb.corpus.lock:
        if runs.status(conn, run_id) is None:
            from .errors import InputError
            raise InputError(f"unknown run {run_id!r}", cli=f"list runs with: wbrag runs --kb {kb.path}",
                             api="list runs with writeback.list_runs(kb)")
        with kb.corpus.changing(conn) as change:
            n = _undo_units(kb, conn, [run_id], change)
            runs.mark_rolled_back(conn, run_id)
            tuning.rollback(conn, run_id)
            tuning.restore_units_off(conn)  # the units verdict of the run before it
    return n


def _undo_units(kb, conn, run_ids, change):
    """Remove the runs' units and make the versions they superseded or retired current again; returns how
    many units were removed."""
    removed = units.of_runs(conn, run_ids)
    for u in removed:
        kb.corpus.remove(conn, u, change)
    for u, revived in units.revived_by(conn, run_ids):
        was = json.loads(revived)  # an earlier version it made current again goes back to what it was
        kb.corpus.set_status(conn, u, was["status"], change)
        units.restore(conn, u, was["ended_by"])
    for u, anchor in units.ended_by_runs(conn, run_ids):
        # current again, unless its passage has a current unit of a later run (rolled back out of order)
        if not units.passage_has_current(conn, anchor, u):
            kb.corpus.set_status(conn, u, "active", change)
    units.clear_ends(conn, run_ids)
    return len(removed)


# ---- the job --------------------------------------------------------------------------------


COUNTS = ("examples", "passed_utility", "docs_kept", "covered", "held_out", "written", "merged", "revived", "retired",
          "rejected")


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
        if kb.config["retrieval"]["mode"] == "bm25" and not kb.config["learning"]["enabled"]:
            return _run_with_idf(kb, conn, distiller, dry_run, show_progress)  # nothing to embed
        # the slot checks search each question with feedback and the fit embeds them all: embedded once
        questions = runs.questions_with_feedback(conn)
        with kb.primed(questions):
            return _run_with_idf(kb, conn, distiller, dry_run, show_progress)
    finally:
        _RUN_IDF.reset(token)


def _run_with_idf(kb, conn, distiller, dry_run, show_progress):
    run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    counts = defaultdict(int)
    done_before = {}
    if not dry_run:
        with kb.corpus.changing(conn) as change:
            # a run that died (kill -9) left status 'running': the lock proves it is not running now. What it
            # wrote is undone and decided again from the same state, so the night ends as if never
            # interrupted; its distilled texts are kept for reuse (an LLM is not asked twice)
            dead = runs.running(conn)
            if dead:
                for r in units.distilled_by(conn, dead):
                    done_before[(r["anchor"], r["query_ids"], r["distiller"])] = (r["title"], r["text"], r["model"])
                _undo_units(kb, conn, dead, change)
                for d in dead:
                    tuning.rollback(conn, d)  # a tuning it recorded before it died is fitted again
                runs.delete_gates(conn, dead)
                runs.mark_interrupted(conn, dead)
            runs.start(conn, run_id, distiller)
    watermark = runs.watermark(conn)
    top = runs.last_feedback_id(conn)
    qids = runs.queries_with_feedback(conn, watermark, top)
    # stale units: re-distil if their feedback still supports it
    qids += units.stale_query_ids(conn)
    qids = list(dict.fromkeys(qids))
    counts["examples"] = len(qids)
    # the feedback learning draws on, read once: the held-out slice, the fit and the units canary share it
    exs = tuning.examples(conn) if kb.config["learning"]["enabled"] else []
    night = _Night(kb, conn, run_id, counts, dry_run, done_before, tuning.held_out(kb, exs))
    groups = defaultdict(list)
    for qid in _progress(qids, show_progress, "write-back: gates", unit="q"):
        plan = _plan(kb, conn, qid, run_id, counts, dry_run)
        if plan and night.learns_from(plan, record=True) and night.earns(plan, record=True):
            groups[plan["anchor"]].append(plan)
    # every passage with new questions, and (earn_slot) every passage whose unit may no longer earn its slot;
    # all of it decided before anything is written, so what this night writes never changes its decisions
    anchors = set(groups)
    if kb.config["writeback"]["earn_slot"]:
        anchors |= set(units.active_anchors(conn))
    work = {a: night.prepare(a, groups.get(a, [])) for a in sorted(anchors)}
    moved = sorted((p for item in work.values() for p in item["moved"]), key=lambda p: p["query_id"])
    for p in moved:
        if all(p["query_id"] != q["query_id"] for q in groups[p["anchor"]]):
            groups[p["anchor"]].append(p)
    for a in sorted({p["anchor"] for p in moved}):
        work[a] = night.prepare(a, groups[a])
    work = [work[a] for a in sorted(work)]
    written = []
    try:
        for item in _progress(work, show_progress, "write-back: units", unit="unit"):
            res = night.unit_for(item, distiller)
            if res:
                written.append(res)
        night.flush()
    except Exception as e:
        if not dry_run:
            _fail(conn, run_id, counts, e)
        raise
    # retrieval learns from all the feedback so far (its cost grows with feedback, not with the corpus)
    learned, row = tuning.fit(kb, run_id, exs)
    if not dry_run and row is not None:
        with store.transaction(conn):  # (a run killed after this has its tuning undone when it is resumed)
            tuning.record(conn, learned, row)
    # the canary for units: the units as they now are, with the retrieval tonight adopted, per mode
    try:
        judged = tuning.judge_units(kb, exs)
    except BaseException as e:  # the night's tuning is not left in use by a run that did not end
        if not dry_run:
            _fail(conn, run_id, counts, e)
        raise
    if not dry_run:
        with store.transaction(conn):
            if judged["status"] == "judged":
                tuning.set_units_off(conn, judged["off"])
            elif judged["status"] == "off":  # learning turned off: no verdict of an earlier night stays
                tuning.set_units_off(conn, ())
            runs.finish(conn, run_id, top, {**counts, "tuning": learned["status"], "unit_use": judged})
        kb.corpus.indexes.save_if_due(store.Records(conn))
    return {"run_id": None if dry_run else run_id, "dry_run": dry_run, "distiller": distiller,
            "units": written, **{k: counts.get(k, 0) for k in COUNTS}, "tuning": learned, "unit_use": judged}


def _fail(conn, run_id, counts, error):
    """A run that stopped on an error: marked failed with it, and the tuning it stored (if any) not used."""
    with store.transaction(conn):
        tuning.rollback(conn, run_id)
        runs.fail(conn, run_id, counts, error)


def _plan(kb, conn, qid, run_id, counts, dry_run):
    """Gates for one query from all its feedback: support, utility and document evidence. Its anchor is
    the source passage its unit consolidates on: the first kept document a labelled set or user named
    relevant, else the best-ranked kept one."""
    w = kb.config["writeback"]
    q = runs.query(conn, qid)
    events = runs.feedback_for(conn, qid)
    good = [e for e in events if e["correct"]]
    bad = [e for e in events if not e["correct"] and e["source"] != "label"]
    support = len(good) - len(bad)

    def decide(gate, passed, reason, doc=None):
        if not dry_run:
            with store.transaction(conn):
                runs.record_gate(conn, run_id, qid, gate, passed, reason, doc_id=doc)

    if support < int(w["min_support"]):
        decide("utility", False, f"support {support} < min_support {w['min_support']} (correct {len(good)}, wrong {len(bad)})")
        return None
    counts["passed_utility"] += 1
    hits = runs.hits_for(conn, qid)
    retrieved = [h["doc_id"] for h in hits if h["kind"] == "source"]
    docs = [d for e in good for d in json.loads(e["docs"])]
    relevant = {d for e in good for d in json.loads(e["relevant"])}
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
    anchor = next((d["id"] for d in kept if d["id"] in relevant), kept[0]["id"])
    return {"query_id": qid, "query": q["text"], "answers": list(dict.fromkeys(answers)), "docs": kept,
            "feedback_ids": [e["id"] for e in good], "anchor": anchor}


class _Night:
    """One run's units: one per source passage (its anchor), built from every question that draws on the
    passage and still needs a unit; a new version supersedes the old one in the transaction that writes it."""

    def __init__(self, kb, conn, run_id, counts, dry_run, done_before, held=frozenset()):
        self.kb, self.conn, self.run_id, self.counts, self.dry_run = kb, conn, run_id, counts, dry_run
        self.w, self.done_before, self.held = kb.config["writeback"], done_before, held
        self.pending, self.ends, self.tops = [], [], {}

    def learns_from(self, plan, record=False):
        """Not a question of the held-out slice, which judges the units and the tuning (tuning.held_out)."""
        if not tuning.is_held_out(plan["query"], self.held):
            return True
        if record:
            self.counts["held_out"] += 1
            _gate(self.conn, self.run_id, plan["query_id"], "holdout", False,
                  "held out: it judges what write-back learns, so no unit is made from it", self.dry_run)
        return False

    def earns(self, plan, record=False):
        """Does this question need a unit? Not when the source documents alone (the current retrieval, units
        left out) already put its evidence first: a passage of a kept document, holding the answer when one
        is known. A unit would only take that passage's slot."""
        if not self.w["earn_slot"]:
            return True
        q = plan["query"]
        if q not in self.tops:
            hits = self.kb.search(q, k=1, include_units=False, log=False).hits
            self.tops[q] = hits[0] if hits else None
        top = self.tops[q]
        if (top is not None and top.doc_id in {d["id"] for d in plan["docs"]}
                and (not plan["answers"] or contains_answer(top.title + " " + top.text, plan["answers"]))):
            if record:
                self.counts["covered"] += 1
                _gate(self.conn, self.run_id, plan["query_id"], "slot", False,
                      f"the source documents alone rank {top.doc_id} first"
                      + (", with the answer" if plan["answers"] else ""), self.dry_run)
            return False
        return True

    def prepare(self, anchor, new):
        """The passage's current units and every question its next version stands for (its current units'
        questions, planned again, that still need it, then the new ones), in query order."""
        base = units.current_for(self.conn, anchor)
        known = {q for b in base for q in json.loads(b["query_ids"])}
        new = [p for p in new if p["query_id"] not in known]  # e.g. a stale unit's questions, already here
        plans = {p["query_id"]: p for p in new}
        moved = []
        for b in base:
            for qid in json.loads(b["query_ids"]):
                if qid not in plans:
                    p = _plan(self.kb, self.conn, qid, self.run_id, defaultdict(int), True)  # again, silently
                    if p and self.learns_from(p) and self.earns(p):
                        if p["anchor"] == anchor:
                            plans[qid] = p
                        else:  # its evidence is another passage now: it joins that passage's unit
                            moved.append(p)
        return {"anchor": anchor, "base": [b["id"] for b in base], "new": new,
                "plans": [plans[q] for q in sorted(plans)], "moved": moved}

    def unit_for(self, item, distiller):
        conn, counts = self.conn, self.counts
        anchor, base, new, plans = item["anchor"], item["base"], item["new"], item["plans"]
        if not plans:  # no question needs this passage's unit any more
            if base:
                counts["retired"] += len(base)
                if not self.dry_run:
                    with self.kb.corpus.changing(conn) as change:
                        self._end(conn, change, base, "retired")
            return None
        doc = self.kb.document(anchor)
        target = self._distil(doc, plans, distiller) if doc is not None else None
        if target is None:  # rejected: what was there stays
            return None
        unit_id, rec, chunks, provenance = target
        if base == [unit_id]:  # the same text: the questions and feedback it stands for grow
            counts["merged"] += len(new)
            if new and not self.dry_run:
                _merge(conn, unit_id, [p["query_id"] for p in plans], [f for p in plans for f in p["feedback_ids"]])
            return None
        old = units.state(conn, unit_id)
        if old is not None and old["status"] == "retired" and old["ended_by"] is None:
            counts["rejected"] += 1  # retired for wrong answers: the same evidence does not bring it back
            for p in new:
                _gate(conn, self.run_id, p["query_id"], "unit", False, f"same as retired unit {unit_id}", self.dry_run)
            return None
        counts["merged"] += len(new) - (1 if len(new) == len(plans) else 0)  # new questions sharing a unit
        if old is not None:  # an earlier version of this passage's unit (stale or superseded) is current again
            if unit_id not in base:  # (in base: it is current already, and only the others end)
                counts["revived"] += 1
            if not self.dry_run:
                with self.kb.corpus.changing(conn) as change:
                    self._end(conn, change, [b for b in base if b != unit_id])
                    if unit_id not in base:  # what it was is kept, so rolling this run back restores it
                        units.mark_revived(conn, unit_id, self.run_id, old["status"], old["ended_by"])
                        self.kb.corpus.set_status(conn, unit_id, "active", change)
                    units.merge(conn, unit_id, [p["query_id"] for p in plans],
                                [f for p in plans for f in p["feedback_ids"]])
            return None if unit_id in base else {"unit_id": unit_id, "revived": True}
        counts["written"] += 1
        out = {"unit_id": unit_id, "title": rec.title, "text": rec.text, "sources": json.loads(provenance[3]),
               "questions": len(plans), "supersedes": base}
        if not self.dry_run:
            self.pending.append((rec, content_hash(rec.title, rec.text), chunks, False, provenance))
            self.ends.extend(base)
            if len(self.pending) >= int(self.w["batch"]):
                self.flush()
        return out

    def _distil(self, anchor_doc, plans, distiller):
        """The passage's unit: one digest of the evidence all its questions need (each question's best
        sentences first), titled with those questions (its match text), from the passage and the other
        documents its questions kept (a question may need two passages)."""
        conn, w = self.conn, self.w
        anchor = anchor_doc["id"]
        docs = {anchor: anchor_doc}
        for p in plans:
            docs.update((d["id"], d) for d in p["docs"] if d["id"] not in docs)
        docs = list(docs.values())
        qids = [p["query_id"] for p in plans]
        again = self.done_before.get((anchor, json.dumps(qids), distiller))
        if again is not None:  # distilled already by the run this one resumes (an LLM is not asked twice)
            title, text, model = again
        else:
            asks = [{"query": p["query"], "answers": p["answers"] if distiller == "extractive" else []} for p in plans]
            title, text, model = DISTILLERS[distiller](self.kb, asks, docs)

        def reject(reason):
            self.counts["rejected"] += 1
            for p in plans:
                _gate(conn, self.run_id, p["query_id"], "faithfulness", False, reason, self.dry_run)

        if not text.strip():
            return reject("distiller produced no text")
        ok, support = faithful(text, docs, float(w["faithfulness"]))
        if not ok:
            return reject(f"unsupported sentence (word support {support:.2f})")
        carried = carried_sentences(text, docs)
        if not carried:
            return reject("the unit carries no sentence of a kept document")
        src_ids = sorted(carried)  # credit goes only to the documents whose sentences the unit carries
        unit_id = "unit:" + content_hash(title, text, anchor)[:16]
        rec = Record(id=unit_id, title=title, text=text, source=f"writeback:{self.run_id}",
                     meta={"questions": [p["query"] for p in plans], "run": self.run_id, "sentences": carried})
        chunks = chunk_text(text, self.kb.config["chunking"]["size"], self.kb.config["chunking"]["overlap"]) or [text]
        src_chunks = units.source_chunk_ids(conn, src_ids)
        provenance = (unit_id, json.dumps(qids), json.dumps([f for p in plans for f in p["feedback_ids"]]),
                      json.dumps(src_ids), json.dumps(src_chunks), distiller, model, self.run_id, time.time(), anchor)
        return unit_id, rec, chunks, provenance

    def _end(self, conn, change, ids, status="superseded"):
        for u in ids:
            # only a unit still current: one retired for wrong answers or gone stale since stays as it is
            if units.unit_status(conn, u) == "active":
                self.kb.corpus.set_status(conn, u, status, change)
                units.end(conn, u, self.run_id)

    def flush(self):
        """New unit versions (rows, chunks, term statistics, provenance) commit together with the ending of
        the versions they supersede, a batch at a time."""
        if not self.pending:
            return
        ends = list(self.ends)
        self.kb.corpus.write(self.pending, IngestReport(), kind="unit",
                             also=lambda conn, change: self._end(conn, change, ends))
        self.pending.clear()
        self.ends.clear()


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


def _merge(conn, unit_id, qids, feedback_ids):
    """The unit's text is unchanged; the questions and feedback it stands for grow."""
    with store.transaction(conn):
        units.merge(conn, unit_id, qids, feedback_ids)


def _gate(conn, run_id, qid, gate, passed, reason, dry_run):
    if not dry_run:
        with store.transaction(conn):
            runs.record_gate(conn, run_id, qid, gate, passed, reason)


def list_units(kb, include_inactive=True, ids=None):
    """Units with their provenance, oldest first; `ids`: only those (a lookup, not a scan of every unit)."""
    out = []
    for r in units.listing(kb.conn, include_inactive, ids):
        r = dict(r)
        for key in ("query_ids", "feedback_ids", "source_doc_ids", "source_chunk_ids"):
            r[key] = json.loads(r[key])
        r["tokens"] = count_tokens(r["text"])
        out.append(r)
    return out


def list_runs(kb):
    """Every run, oldest first, its counts decoded."""
    return [dict(r, counts=json.loads(r["counts"])) for r in runs.listing(kb.conn)]
