"""Feedback events and the answers logged with queries: the rows that feedback.py writes and looks up (gate
decisions are in runs.py, a unit's count of wrong answers in units.py).

Every function runs inside the caller's connection and transaction; none commits."""

import json
import time


def query_exists(conn, query_id):
    """Whether a query with this id is logged."""
    return conn.execute("SELECT 1 FROM queries WHERE id=?", (query_id,)).fetchone() is not None


def hit_doc_ids(conn, query_id):
    """The document ids of a logged query's hits, in rank order (one per hit)."""
    return [r[0] for r in conn.execute("SELECT doc_id FROM hits WHERE query_id=? ORDER BY rank", (query_id,))]


def record(conn, query_id, correct, docs, answer, gold, source):
    """Insert a feedback event (`docs`, `gold`: lists, stored as JSON); returns its id."""
    cur = conn.execute("INSERT INTO feedback(query_id, correct, docs, answer, gold, source, ts) VALUES (?,?,?,?,?,?,?)",
                       (query_id, correct, json.dumps(docs), answer, json.dumps(gold), source, time.time()))
    return cur.lastrowid


def record_label(conn, query_id, correct, docs, answer, gold, source, relevant):
    """Insert a labelled example's feedback event, with its relevant document ids (lists stored as JSON)."""
    conn.execute("INSERT INTO feedback(query_id, correct, docs, answer, gold, source, ts, relevant) "
                 "VALUES (?,?,?,?,?,?,?,?)",
                 (query_id, correct, json.dumps(docs), answer, json.dumps(gold), source, time.time(),
                  json.dumps(relevant)))


def set_answer(conn, query_id, text):
    """Store the generated answer on a logged query."""
    conn.execute("UPDATE queries SET answer=? WHERE id=?", (text, query_id))
