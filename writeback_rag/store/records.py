"""What the derived indexes and a search read from the record store: the one interface between them.

The indexes (FAISS, BM25, the chunk kinds, a Milvus collection) and the ranking features never hold a
database connection; they are handed a `Records` and read through it: the change log's head and tail, the
live chunks' fields, the term dictionary, and the chunk ids that a Filter's document predicates allow (the
Filter itself is pushed down and translated here). A second record store is a second class with these
methods; tests/test_contract.py runs the same contract against each.

Fields a chunk row can carry, by name: kind (its document's kind), text, title, vector (float32 bytes),
doc (its document's id), source (its document's source), meta (its document's metadata, JSON text)."""

import contextlib

import numpy as np

from .. import store
from . import changes

_COLUMNS = {"kind": "d.kind", "text": "c.text", "title": "d.title", "vector": "c.embedding", "doc": "d.id",
            "source": "d.source", "meta": "d.meta"}
_LIVE = "FROM chunks c JOIN documents d ON d.id=c.doc_id WHERE d.status='active'"
_HITS = ("SELECT c.id, c.doc_id, c.text, d.title, d.kind, d.source, d.meta FROM chunks c "
         "JOIN documents d INDEXED BY documents_header ON d.id=c.doc_id WHERE c.id IN ({})")
_BATCH = 500  # ids per IN (...) list: under SQLite's host-parameter limit


def _in(n):
    return "(" + ",".join("?" * n) + ")"


class Records:
    """The SQLite record store as the indexes see it (one per connection: one per thread)."""

    def __init__(self, conn):
        self.conn = conn

    def _rows_in(self, sql, keys, args=()):
        """Rows of `sql`, whose last clause is `IN {}`, for `keys` in batches under SQLite's parameter limit."""
        for start in range(0, len(keys), _BATCH):
            part = keys[start:start + _BATCH]
            yield from self.conn.execute(sql.format(_in(len(part))), [*args, *part])

    # -- the change log

    def head(self):
        """The sequence number of the newest committed change (0 for a new KB)."""
        return changes.head(self.conn)

    @contextlib.contextmanager
    def snapshot(self):
        """Reads inside the block see one committed state (a read transaction): the log's head and the rows
        it describes agree."""
        self.conn.execute("BEGIN")
        try:
            yield self
        finally:
            self.conn.execute("COMMIT")

    def changes(self, seq, upto):
        """Changes after `seq` up to `upto`, oldest first: (seq, added ids, removed ids, removed postings, reset)."""
        return changes.since(self.conn, seq, upto)

    def pending(self, seq, upto):
        """(number of changes, chunks they touch, whether one resets every index) after `seq`."""
        return changes.pending(self.conn, seq, upto)

    def removes(self, seq, upto):
        """Whether a change after `seq` up to `upto` removes chunks."""
        return self.conn.execute("SELECT 1 FROM changes WHERE seq>? AND seq<=? AND length(removed) > 0 LIMIT 1",
                                 (int(seq), int(upto))).fetchone() is not None

    def position(self, name):
        """Where an index kept outside this process (a Milvus collection) has reached, as it recorded it; -1
        when it has not."""
        try:
            return int(store.get_meta(self.conn, name, -1))
        except (TypeError, ValueError):
            return -1

    def set_position(self, name, seq):
        """Record that index `name` reflects the log up to `seq` (in its own short transaction)."""
        with store.transaction(self.conn):
            store.set_meta(self.conn, name, int(seq))

    # -- chunks

    def chunks(self, fields, ids=None, kind=None):
        """(chunk id, *fields) of live chunks (of active documents): those among `ids`, or every one in id
        order; `kind` keeps one document kind."""
        sql = f"SELECT c.id{''.join(', ' + _COLUMNS[f] for f in fields)} {_LIVE}" + \
            (" AND d.kind=?" if kind else "")
        args = [kind] if kind else []
        if ids is None:
            return self.conn.execute(sql + " ORDER BY c.id", args).fetchall()
        return list(self._rows_in(sql + " AND c.id IN {}", [int(i) for i in ids], args))

    def scan(self, fields, batch):
        """Every live chunk's (chunk id, *fields), in id order, `batch` rows at a time (a rebuild that does not
        hold a whole corpus in memory)."""
        cur = self.conn.execute(f"SELECT c.id{''.join(', ' + _COLUMNS[f] for f in fields)} {_LIVE} ORDER BY c.id")
        while True:
            rows = cur.fetchmany(batch)
            if not rows:
                return
            yield rows

    def vector(self, chunk_id):
        """A stored chunk's vector (float32), or None."""
        row = self.conn.execute("SELECT embedding FROM chunks WHERE id=?", (int(chunk_id),)).fetchone()
        return None if row is None else np.frombuffer(row[0], dtype=np.float32)

    def passages(self, ids):
        """{chunk id: (title, text)} of these chunks (live or not)."""
        return {r[0]: (r[1] or "", r[2]) for r in self._rows_in(
            "SELECT c.id, d.title, c.text FROM chunks c JOIN documents d ON d.id=c.doc_id WHERE c.id IN {}",
            [int(i) for i in ids])}

    def hits(self, ids):
        """(chunk id, doc id, text, title, kind, source, meta JSON) per chunk id, as plain tuples in one
        statement (it runs for every search; the plan uses the covering index of document headers)."""
        if not ids:
            return []
        cur = self.conn.cursor()
        cur.row_factory = None
        return cur.execute(_HITS.format(",".join("?" * len(ids))), list(ids)).fetchall()

    def ids(self, where):
        """Live chunk ids, in id order, whose documents pass the Filter's document predicates (not its kinds:
        every index knows those itself)."""
        clauses, args = [], []
        for g in where.doc_globs:
            clauses.append("d.id GLOB ?")
            args.append(g)
        for g in where.source_globs:
            clauses.append("d.source GLOB ?")
            args.append(g)
        for key, value in where.meta:
            clauses.append("CAST(json_extract(d.meta, ?) AS TEXT)=?")
            args += ["$." + key, value]
        cond = " AND ".join(clauses) or "1"
        return np.array([r[0] for r in self.conn.execute(f"SELECT c.id {_LIVE} AND {cond} ORDER BY c.id", args)],
                        dtype=np.int64)

    # -- terms

    def terms(self):
        """{term: id}: the whole dictionary (ids are shared by every process and never reused)."""
        return {t: i for i, t in self.conn.execute("SELECT id, term FROM terms")}

    def term_ids(self, cache, terms):
        """{term: id} for those of `terms` the dictionary has, filling `cache` (a writer registered them)."""
        return changes.term_ids(self.conn, cache, terms)

    def df(self, terms):
        """{term: document frequency over the active source chunks} for those of `terms` the dictionary has."""
        return {r[0]: r[1] for r in self._rows_in("SELECT term, df FROM terms WHERE term IN {}", sorted(set(terms)))}

    def sample_terms(self, n):
        """Up to `n` random (term id, term, stored document frequency) rows (for check())."""
        return [tuple(r) for r in self.conn.execute("SELECT id, term, df FROM terms ORDER BY random() LIMIT ?",
                                                    (int(n),))]
