"""The query log: every search with its hits, and what was said about it (feedback, gate decisions)."""

import json
import time


def log(conn, query, mode, k, params, latency, hits, source):
    """Log one search and its hits (Hit objects) in the caller's transaction; returns the query id."""
    cur = conn.execute("INSERT INTO queries(text, ts, mode, k, params, latency_ms, source) VALUES (?,?,?,?,?,?,?)",
                       (query, time.time(), mode, k, json.dumps(params), latency, source))
    qid = cur.lastrowid
    conn.executemany("INSERT INTO hits(query_id, rank, chunk_id, doc_id, kind, bm25, dense, fused) "
                     "VALUES (?,?,?,?,?,?,?,?)",
                     [(qid, h.rank, h.chunk_id, h.doc_id, h.kind, h.bm25, h.dense, h.score) for h in hits])
    return qid


def recent_ids(conn, last, source=None):
    """Ids of the newest `last` logged queries (of one source, if given), newest first."""
    sql = "SELECT id FROM queries" + (" WHERE source=?" if source else "") + " ORDER BY id DESC LIMIT ?"
    return [r[0] for r in conn.execute(sql, ([source] if source else []) + [int(last)])]


def record(conn, query_id):
    """One logged query as a dict with its hits, feedback (docs and gold decoded) and gate decisions; None if
    there is none."""
    q = conn.execute("SELECT * FROM queries WHERE id=?", (int(query_id),)).fetchone()
    if q is None:
        return None
    out = dict(q)
    out["params"] = json.loads(out["params"])
    out["hits"] = [dict(h) for h in conn.execute("SELECT rank, chunk_id, doc_id, kind, bm25, dense, fused FROM hits "
                                                 "WHERE query_id=? ORDER BY rank", (q["id"],))]
    out["feedback"] = [dict(f, docs=json.loads(f["docs"]), gold=json.loads(f["gold"])) for f in
                       conn.execute("SELECT * FROM feedback WHERE query_id=? ORDER BY id", (q["id"],))]
    out["gates"] = [dict(g) for g in conn.execute("SELECT * FROM gate_decisions WHERE query_id=? ORDER BY id",
                                                  (q["id"],))]
    return out
