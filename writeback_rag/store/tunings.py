"""The tunings table and what retrieval that learns (tuning.py) reads from the store: the feedback it
learns from, the documents and chunks it names, the units the canary judges and the runs' verdicts.

Functions that return a cursor leave it unread: the caller iterates it as it did the statement's own."""


# ---- the tunings table ----------------------------------------------------------------------


def adopted_id(conn):
    """The id of the newest tuning adopted for the KB's embedder, or None."""
    row = conn.execute("SELECT id FROM tunings WHERE status='adopted' AND model=(SELECT value FROM meta WHERE "
                       "key='model_id') ORDER BY created DESC, id DESC LIMIT 1").fetchone()
    return row[0] if row else None


def get(conn, tuning_id):
    """One tuning's row (every column), or None."""
    return conn.execute("SELECT * FROM tunings WHERE id=?", (tuning_id,)).fetchone()


def listing(conn):
    """Every tuning, oldest first, without its adapter's bytes (a cursor of rows)."""
    return conn.execute("SELECT id, run_id, created, status, model, bm25_weight, rrf_k, hybrid_adapter, "
                        "adapter IS NOT NULL AS adapter, ranker, cross_encoder IS NOT NULL AS cross_encoder, "
                        "examples, holdout, "
                        "metrics, reason FROM tunings "
                        "ORDER BY created, id")


def roll_back(conn, run_id):
    """Mark a run's tunings rolled back; the number of rows that changed."""
    return conn.execute("UPDATE tunings SET status='rolled-back' WHERE run_id=? AND status!='rolled-back'",
                        (run_id,)).rowcount


def insert(conn, tuning_id, run_id, created, status, model, dim, bm25_weight, rrf_k, hybrid_adapter, adapter, ranker,
           cross_encoder, examples, holdout, metrics, reason):
    """Store one tuning (replacing one of the same id); values as stored (adapter and cross-encoder bytes,
    JSON text)."""
    conn.execute("INSERT OR REPLACE INTO tunings(id, run_id, created, status, model, dim, bm25_weight, rrf_k, "
                 "hybrid_adapter, adapter, ranker, cross_encoder, examples, holdout, metrics, reason) "
                 "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                 (tuning_id, run_id, created, status, model, dim, bm25_weight, rrf_k, hybrid_adapter, adapter, ranker,
                  cross_encoder, examples, holdout, metrics, reason))


# ---- what feedback teaches ------------------------------------------------------------------


def feedback_evidence(conn):
    """(query text, correct, docs JSON, relevant JSON) per feedback event, oldest first (a cursor)."""
    return conn.execute(
        "SELECT q.text, f.correct, f.docs, f.relevant FROM feedback f JOIN queries q ON q.id=f.query_id "
        "ORDER BY f.id")


def labelled_answers(conn):
    """(query text, gold JSON, answer, source, correct) per feedback event (a cursor)."""
    return conn.execute(
        "SELECT q.text, f.gold, f.answer, f.source, f.correct FROM feedback f JOIN queries q ON q.id=f.query_id")


# ---- the canary for knowledge units ----------------------------------------------------------


def active_units(conn):
    """(unit id, query ids JSON, source doc ids JSON) of every active unit."""
    return conn.execute("SELECT u.id, u.query_ids, u.source_doc_ids FROM units u JOIN documents d ON d.id=u.id "
                        "WHERE d.status='active'").fetchall()


def feedback_query_texts(conn):
    """Query id -> text of every query that has feedback."""
    return dict(conn.execute("SELECT id, text FROM queries WHERE id IN (SELECT DISTINCT query_id FROM feedback)"))


def done_run_counts(conn):
    """(counts JSON,) of each finished run, newest first (a cursor, read as the caller goes)."""
    return conn.execute("SELECT counts FROM runs WHERE status='done' ORDER BY finished DESC, id DESC")
