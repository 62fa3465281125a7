"""Documents and their chunks: the rows that the corpus (corpus.py) writes and looks up.

Every function runs inside the caller's connection and transaction; none commits."""

import json
import time


def sources_under(conn, root, under):
    """The source documents (id, source) read from folder `root` (`under`: root with a trailing separator)."""
    return conn.execute("SELECT id, source FROM documents WHERE kind='source' AND (source=? OR "
                        "substr(source, 1, ?)=?)", (root, len(under), under)).fetchall()


def hashes(conn):
    """Every document's content hash, by document id."""
    return {r["id"]: r["hash"] for r in conn.execute("SELECT id, hash FROM documents")}


def stored_hash(conn, doc_id):
    """A document's content hash, or None when no such document is stored."""
    row = conn.execute("SELECT hash FROM documents WHERE id=?", (doc_id,)).fetchone()
    return None if row is None else row[0]


def get(conn, doc_id):
    """One document's row (every column), or None."""
    return conn.execute("SELECT * FROM documents WHERE id=?", (doc_id,)).fetchone()


def exists(conn, doc_id):
    """Whether a document with this id is stored."""
    return conn.execute("SELECT 1 FROM documents WHERE id=?", (doc_id,)).fetchone() is not None


def chunk_ids(conn, doc_id):
    """The ids of a document's chunks, in id order (the order they were written in)."""
    return [r[0] for r in conn.execute("SELECT id FROM chunks WHERE doc_id=? ORDER BY id", (doc_id,))]


def delete_chunks(conn, doc_id):
    """Delete a document's chunks (the document row stays)."""
    conn.execute("DELETE FROM chunks WHERE doc_id=?", (doc_id,))


def put(conn, doc_id, kind, title, text, source, meta, content_hash, t):
    """Insert a document, or replace an existing one's content (it becomes active); `t`: the write time."""
    conn.execute(
        "INSERT INTO documents(id, kind, title, text, source, meta, hash, status, created, updated) "
        "VALUES (?,?,?,?,?,?,?, 'active', ?, ?) ON CONFLICT(id) DO UPDATE SET title=excluded.title, "
        "text=excluded.text, source=excluded.source, meta=excluded.meta, hash=excluded.hash, "
        "status='active', updated=excluded.updated",
        (doc_id, kind, title, text, source, json.dumps(meta), content_hash, t, t))


def add_chunk(conn, doc_id, seq, text, n_tokens, embedding, model):
    """Insert one chunk of a document (`embedding`: float32 bytes); returns its id."""
    cur = conn.execute("INSERT INTO chunks(doc_id, seq, text, n_tokens, bm25_len, embedding, model) "
                       "VALUES (?,?,?,?,0,?,?)",
                       (doc_id, seq, text, n_tokens, embedding, model))
    return cur.lastrowid


def add_provenance(conn, provenance):
    """Insert a knowledge unit's provenance row: (id, query_ids, feedback_ids, source_doc_ids,
    source_chunk_ids, distiller, model, run_id, created, anchor)."""
    conn.execute("INSERT INTO units(id, query_ids, feedback_ids, source_doc_ids, source_chunk_ids, "
                 "distiller, model, run_id, created, anchor) VALUES (?,?,?,?,?,?,?,?,?,?)", provenance)


def delete(conn, doc_id):
    """Delete a document with its chunks and its unit provenance row (if it is a unit)."""
    conn.execute("DELETE FROM units WHERE id=?", (doc_id,))
    delete_chunks(conn, doc_id)
    conn.execute("DELETE FROM documents WHERE id=?", (doc_id,))


def status_and_title(conn, doc_id):
    """A document's row (status, title), or None when no such document is stored."""
    return conn.execute("SELECT status, title FROM documents WHERE id=?", (doc_id,)).fetchone()


def chunks(conn, doc_id):
    """A document's chunks as rows (id, text, kind: the document's kind)."""
    return conn.execute("SELECT c.id, c.text, d.kind FROM chunks c JOIN documents d ON d.id=c.doc_id "
                        "WHERE c.doc_id=?", (doc_id,)).fetchall()


def set_status(conn, doc_id, status):
    """Set a document's status ('active', 'retired', ...) and its update time to now."""
    conn.execute("UPDATE documents SET status=?, updated=? WHERE id=?", (status, time.time(), doc_id))


def chunks_to_embed(conn):
    """Every chunk as rows (id, text, title: its document's title), in id order: what a re-embed encodes."""
    return conn.execute("SELECT c.id, c.text, d.title FROM chunks c JOIN documents d ON d.id=c.doc_id "
                        "ORDER BY c.id").fetchall()


def set_embeddings(conn, updates):
    """Store new chunk vectors: `updates` holds (embedding bytes, model id, chunk id) each."""
    conn.executemany("UPDATE chunks SET embedding=?, model=? WHERE id=?", updates)
