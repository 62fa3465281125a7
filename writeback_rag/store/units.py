"""Knowledge units and their provenance: the `units` table beside the unit rows of `documents`.

A unit is a document of kind 'unit' with a `units` row recording what it was made from (questions,
feedback, source documents and chunks, the run and distiller) and its history: `ended_by` names the run
that superseded or retired it, `revived` what a run that made it current again found it as. Write-back
(writeback.py) reads and changes them only through these functions, inside its own transactions."""

import json

from . import documents


def _marks(n):
    return ",".join("?" * n)


# ---- listing --------------------------------------------------------------------------------


def listing(conn, include_inactive=True, ids=None):
    """Unit rows (document columns, then every units column), oldest first; `ids`: only those."""
    where, args = [] if include_inactive else ["d.status='active'"], []
    if ids is not None:
        ids = list(ids)
        where.append(f"d.id IN ({','.join('?' * len(ids))})")
        args += ids
    return conn.execute("SELECT d.id, d.title, d.text, d.status, u.* FROM units u JOIN documents d ON d.id=u.id "
                        + (f"WHERE {' AND '.join(where)} " if where else "") + "ORDER BY u.created",
                        args).fetchall()


def state(conn, unit_id):
    """A unit's document status and the run that ended it (row with status, ended_by), or None."""
    return conn.execute("SELECT d.status, u.ended_by FROM units u JOIN documents d ON d.id=u.id WHERE u.id=?",
                        (unit_id,)).fetchone()


def current_for(conn, anchor):
    """The active units of a source passage (rows with id, query_ids), oldest first."""
    return conn.execute("SELECT u.id, u.query_ids FROM units u JOIN documents d ON d.id=u.id "
                        "WHERE u.anchor=? AND d.status='active' ORDER BY u.created, u.id", (anchor,)).fetchall()


def passage_has_current(conn, anchor, other_than):
    """Whether the passage has an active unit other than `other_than`."""
    return conn.execute("SELECT 1 FROM units o JOIN documents d ON d.id=o.id WHERE o.anchor=? AND o.id<>? "
                        "AND d.status='active'", (anchor, other_than)).fetchone() is not None


def active_anchors(conn):
    """The passages (anchors) that have an active unit."""
    return [r[0] for r in conn.execute("SELECT DISTINCT u.anchor FROM units u JOIN documents d ON d.id=u.id "
                                       "WHERE d.status='active' AND u.anchor IS NOT NULL")]


def source_chunk_ids(conn, doc_ids):
    """The chunk ids of the given documents, document by document, each in id order (a unit's provenance)."""
    return [c for d in doc_ids for c in documents.chunk_ids(conn, d)]


def orphans(conn):
    """How many unit documents have no provenance record (a state only a damaged KB is in)."""
    return conn.execute("SELECT COUNT(*) FROM documents d WHERE d.kind='unit' AND NOT EXISTS "
                        "(SELECT 1 FROM units u WHERE u.id=d.id)").fetchone()[0]


def unit_status(conn, unit_id):
    """The status of the unit with this id, or None when there is no such unit."""
    row = conn.execute("SELECT status FROM documents WHERE id=? AND kind='unit'", (unit_id,)).fetchone()
    return None if row is None else row[0]


def current_sibling(conn, unit_id):
    """Another active unit of the same source passage as `unit_id`, or None."""
    row = conn.execute("SELECT o.id FROM units u JOIN units o ON o.anchor=u.anchor AND o.id<>u.id "
                       "JOIN documents d ON d.id=o.id WHERE u.id=? AND d.status='active'", (unit_id,)).fetchone()
    return None if row is None else row[0]


# ---- staleness ------------------------------------------------------------------------------


def drawn_from(conn, doc_id):
    """Ids of the current units, and of the versions a rollback could make current again (ended by a run),
    drawn from the source `doc_id`."""
    needle = json.dumps(doc_id)  # instr, not LIKE: ids of any length, and '%' or '_' in an id match only itself
    rows = conn.execute("SELECT u.id, u.source_doc_ids FROM units u JOIN documents d ON d.id=u.id "
                        "WHERE (d.status='active' OR u.ended_by IS NOT NULL) "
                        "AND instr(u.source_doc_ids, ?) > 0", (needle,)).fetchall()
    return [unit_id for unit_id, sources in rows if doc_id in json.loads(sources)]  # instr narrows; JSON decides


def stale_query_ids(conn):
    """The query ids of every stale unit, unit by unit (a night distils them again if still supported)."""
    return [q for row in conn.execute("SELECT u.query_ids FROM units u JOIN documents d ON d.id=u.id "
                                      "WHERE d.status='stale'") for q in json.loads(row[0])]


# ---- ending, reviving, merging ----------------------------------------------------------------


def end(conn, unit_id, run_id):
    """Record that `run_id` ended (superseded or retired) the unit."""
    conn.execute("UPDATE units SET ended_by=? WHERE id=?", (run_id, unit_id))


def count_against(conn, unit_id):
    """Count one more wrong answer against a unit; returns its new count, or None when no such unit."""
    conn.execute("UPDATE units SET against=against+1 WHERE id=?", (unit_id,))
    row = conn.execute("SELECT against FROM units WHERE id=?", (unit_id,)).fetchone()
    return None if row is None else row[0]


def reset_against(conn, unit_id):
    """A restored unit's count of wrong answers starts again."""
    conn.execute("UPDATE units SET against=0 WHERE id=?", (unit_id,))


def clear_end(conn, unit_id):
    """The unit is no longer ended by a run (a rollback must not make it current again)."""
    conn.execute("UPDATE units SET ended_by=NULL WHERE id=?", (unit_id,))


def mark_revived(conn, unit_id, run_id, status, ended_by):
    """Record that `run_id` made the unit current again, and what it was (status, ended_by) before."""
    conn.execute("UPDATE units SET revived=?, ended_by=NULL WHERE id=?",
                 (json.dumps({"run": run_id, "status": status, "ended_by": ended_by}), unit_id))


def merge(conn, unit_id, query_ids, feedback_ids):
    """Add questions and feedback to what a unit stands for (nothing when the unit is gone)."""
    row = conn.execute("SELECT query_ids, feedback_ids FROM units WHERE id=?", (unit_id,)).fetchone()
    if row is None:  # removed since (a unit is deleted with its record)
        return
    qs = sorted(set(json.loads(row[0])) | set(query_ids))  # in query order, as a new version lists them
    fs = list(dict.fromkeys(json.loads(row[1]) + list(feedback_ids)))
    conn.execute("UPDATE units SET query_ids=?, feedback_ids=? WHERE id=?", (json.dumps(qs), json.dumps(fs), unit_id))


# ---- what runs wrote (rollback, resuming a dead run) -------------------------------------------


def of_runs(conn, run_ids):
    """Ids of the units the runs wrote."""
    return [r[0] for r in conn.execute(f"SELECT id FROM units WHERE run_id IN ({_marks(len(run_ids))})", run_ids)]


def distilled_by(conn, run_ids):
    """The units the runs wrote, as rows with anchor, query_ids, distiller, model, title, text."""
    return conn.execute(f"SELECT u.anchor, u.query_ids, u.distiller, u.model, d.title, d.text FROM units u "
                        f"JOIN documents d ON d.id=u.id WHERE u.run_id IN ({_marks(len(run_ids))})",
                        run_ids).fetchall()


def revived_by(conn, run_ids):
    """(unit id, revived JSON) of the units the runs made current again."""
    return conn.execute(f"SELECT id, revived FROM units WHERE json_extract(revived, '$.run') "
                        f"IN ({_marks(len(run_ids))})", run_ids).fetchall()


def restore(conn, unit_id, ended_by):
    """Undo a revival: the unit is ended by `ended_by` again and no longer marked revived."""
    conn.execute("UPDATE units SET ended_by=?, revived=NULL WHERE id=?", (ended_by, unit_id))


def ended_by_runs(conn, run_ids):
    """(unit id, anchor) of the units the runs ended."""
    return conn.execute(f"SELECT id, anchor FROM units WHERE ended_by IN ({_marks(len(run_ids))})",
                        run_ids).fetchall()


def clear_ends(conn, run_ids):
    """No unit is ended by the runs any more."""
    conn.execute(f"UPDATE units SET ended_by=NULL WHERE ended_by IN ({_marks(len(run_ids))})", run_ids)
