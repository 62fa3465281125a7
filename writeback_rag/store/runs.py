"""Write-back runs and what a night reads to plan them.

The `runs` table (one row per night: started, status, the watermark of the feedback it covered, its
counts), the gate decisions a night records (`gate_decisions`), the query log and feedback a night plans
from, and the term statistics of the active source chunks its extractive distiller weighs sentences by.
Write-back (writeback.py) reads and changes them only through these functions, inside its own
transactions."""

import json
import time


def _marks(n):
    return ",".join("?" * n)


# ---- runs -----------------------------------------------------------------------------------


def listing(conn):
    """Every run as a dict of its columns (counts still JSON), oldest first."""
    return [dict(r) for r in conn.execute("SELECT * FROM runs ORDER BY started").fetchall()]


def status(conn, run_id):
    """A run's status, or None for an unknown run."""
    row = conn.execute("SELECT status FROM runs WHERE id=?", (run_id,)).fetchone()
    return None if row is None else row[0]


def running(conn):
    """Ids of the runs marked running (under the write-back lock: runs that died)."""
    return [r[0] for r in conn.execute("SELECT id FROM runs WHERE status='running'")]


def start(conn, run_id, distiller):
    """Record a run as started now, running."""
    conn.execute("INSERT INTO runs(id, started, status, distiller) VALUES (?,?,?,?)",
                 (run_id, time.time(), "running", distiller))


def mark_interrupted(conn, run_ids):
    """Mark runs that died as interrupted."""
    conn.execute(f"UPDATE runs SET status='interrupted' WHERE id IN ({_marks(len(run_ids))})", run_ids)


def mark_rolled_back(conn, run_id):
    """Mark a run rolled back."""
    conn.execute("UPDATE runs SET status='rolled-back' WHERE id=?", (run_id,))


def finish(conn, run_id, watermark, counts):
    """Mark a run done now, covering feedback up to `watermark`, with its counts (JSON-encoded here)."""
    conn.execute("UPDATE runs SET status='done', finished=?, watermark=?, counts=? WHERE id=?",
                 (time.time(), watermark, json.dumps(counts), run_id))


def fail(conn, run_id, counts, error):
    """Mark a run failed now, with its counts and the error (its message, else its type; 500 characters)."""
    conn.execute("UPDATE runs SET status='failed', finished=?, counts=?, error=? WHERE id=?",
                 (time.time(), json.dumps(counts), (str(error) or type(error).__name__)[:500], run_id))


def watermark(conn):
    """The last feedback id covered by a run that finished (done or rolled back since); 0 before any."""
    return conn.execute("SELECT COALESCE(MAX(watermark), 0) FROM runs WHERE status IN ('done','rolled-back')").fetchone()[0]


# ---- gate decisions -------------------------------------------------------------------------


def record_gate(conn, run_id, query_id, gate, passed, reason, doc_id=None, scores=(None, None, None)):
    """Record a run's gate decision about a question ('utility'), or about one of its documents ('document':
    `doc_id`); `scores`: (s_nr, s_rag, s_doc) where a judge measured them."""
    conn.execute("INSERT INTO gate_decisions(run_id, query_id, gate, doc_id, passed, s_nr, s_rag, s_doc, reason) "
                 "VALUES (?,?,?,?,?,?,?,?,?)", (run_id, query_id, gate, doc_id, int(passed), *scores, reason))


def delete_gates(conn, run_ids):
    """Delete the gate decisions the runs recorded."""
    conn.execute(f"DELETE FROM gate_decisions WHERE run_id IN ({_marks(len(run_ids))})", run_ids)


# ---- what a night plans from ----------------------------------------------------------------


def last_feedback_id(conn):
    """The newest feedback id; 0 when there is none."""
    return conn.execute("SELECT COALESCE(MAX(id), 0) FROM feedback").fetchone()[0]


def queries_with_feedback(conn, after, upto):
    """Ids of the queries with feedback ids in (after, upto], in query order."""
    return [r[0] for r in conn.execute("SELECT DISTINCT query_id FROM feedback WHERE id>? AND id<=? ORDER BY query_id",
                                       (after, upto))]


def questions_with_feedback(conn):
    """The distinct texts of the queries that have feedback."""
    return [r[0] for r in conn.execute("SELECT DISTINCT q.text FROM feedback f "
                                       "JOIN queries q ON q.id=f.query_id")]


def query(conn, query_id):
    """A logged query's row (id, text), or None."""
    return conn.execute("SELECT id, text FROM queries WHERE id=?", (query_id,)).fetchone()


def feedback_for(conn, query_id):
    """Every feedback row of a query, oldest first."""
    return conn.execute("SELECT * FROM feedback WHERE query_id=? ORDER BY id", (query_id,)).fetchall()


def hits_for(conn, query_id):
    """A logged query's hits (rows with doc_id, kind, rank), in rank order."""
    return conn.execute("SELECT h.doc_id, h.kind, h.rank FROM hits h WHERE h.query_id=? ORDER BY h.rank",
                        (query_id,)).fetchall()


# ---- term statistics for the distiller ------------------------------------------------------


def source_chunk_count(conn):
    """The number of chunks of active source documents."""
    return conn.execute("SELECT COUNT(*) FROM chunks c JOIN documents d ON d.id=c.doc_id "
                        "WHERE d.kind='source' AND d.status='active'").fetchone()[0]

