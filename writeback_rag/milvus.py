"""The derived indexes of a KB on Milvus: one collection holds each live chunk's vector and its BM25 terms,
shared by every process (and machine) that opens the KB.

What runs where: the records (documents, chunks and their vectors, the change log, query log, feedback,
units and their provenance, runs) stay in the KB's SQLite file, which gives them multi-row transactions;
Milvus holds only what a search needs: id, kind, document id, source, BM25 terms and the vector. The
collection follows the change log like the local indexes do: the sequence it reflects is kept in the
records (meta `milvus_seq`), and any process that finds it behind replays the tail under a file lock
(deletes, then inserts of the chunks live at the head that the collection lacks, both idempotent, so a
replay cut short by a crash is simply done again). A collection missing, reset by `reindex` or from another KB is rebuilt from the
records, never re-embedded.

BM25 runs inside Milvus (its BM25 function over a sparse field) on our own tokens, joined by spaces and
split by Milvus's whitespace tokenizer, so both backends score the same terms; k1 and b are set on the
index. Searches use the configured consistency level (default Strong: a chunk deleted or added by any
process is seen by the next search, milvus#50194); the chunk kinds that the unit cap reads are kept in
memory and replayed from the log like any local index."""

import contextlib
import fcntl
import json
import os
import re
import time

import numpy as np


from .errors import WbragError, translating
from .filters import KINDS
from .indexes import Indexes
from .text import bm25_tokens, index_text

BATCH = 2000  # rows per insert or delete
TOP_LIMIT = 16384  # Milvus's largest top-k
MAX_TERMS = 60000  # bytes of joined terms per chunk (Milvus VARCHAR holds 65,535)
INDEX_TYPES = ("AUTOINDEX", "FLAT", "IVF_FLAT", "HNSW")
CONSISTENCY = ("Strong", "Bounded", "Session", "Eventually")
_SIMPLE_GLOB = re.compile(r"^[A-Za-z0-9 ./:@+*-]*$")  # globs that Milvus `like` says the same way (* as %)
_META_KEY = re.compile(r"^[A-Za-z0-9_]{1,64}$")  # metadata keys pushed down as meta["key"]
_META_VALUE = 256  # longer values are neither stored in the collection nor pushed down
_META_BYTES = 60_000  # under Milvus's 64 KiB limit on a JSON field
_OVERFLOW = "__overflow__"  # a document whose metadata did not fit: filters then go as the records' ids
_NUMBER = re.compile(r"^[-+]?(\d|\.\d|inf|nan)", re.I)


def _meta_text(meta_json):
    """A document's metadata as Milvus stores it for filters: each value as the text SQLite's
    CAST(json_extract(...) AS TEXT) gives (a filter compares text). Only strings, booleans and 64-bit
    integers, keys of _META_KEY and values of at most _META_VALUE characters are kept: the text of other
    values differs between the two (floats, big integers, lists), and a filter on them is evaluated by the
    records. Metadata too big for the field becomes the _OVERFLOW marker."""
    meta = json.loads(meta_json) if meta_json else {}
    out = {k: ("1" if v else "0") if isinstance(v, bool) else str(v) for k, v in meta.items()
           if _META_KEY.match(k) and (isinstance(v, str) and len(v) <= _META_VALUE
                                      or isinstance(v, int) and -(1 << 63) <= v < (1 << 63))}
    return {_OVERFLOW: "1"} if len(json.dumps(out)) > _META_BYTES else out


def _pushable(key, value):
    """Whether `meta[key] == value` in Milvus means what the records' comparison means."""
    if not _META_KEY.match(key) or len(value) > _META_VALUE or '"' in value or "\\" in value:
        return False
    if value[:1] in ("[", "{"):
        return False  # SQLite's text of a list or object; the collection keeps no such value
    if _NUMBER.match(value):  # a number's text: pushed down only as an integer Milvus stores the same way
        try:
            return str(int(value)) == value and -(1 << 63) <= int(value) < (1 << 63)
        except ValueError:
            return False
    return True


def connect(uri, token=None, timeout=30.0):
    """A MilvusClient for `uri` (http://host:19530, a Zilliz endpoint), or WbragError saying what to do."""
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise WbragError("the milvus backend needs pymilvus: pip install 'writeback-rag[milvus]'") from None
    if not uri:
        raise WbragError("the milvus backend needs milvus.uri (e.g. http://127.0.0.1:19530): "
                         "wbrag config milvus.uri=URI")
    token = token if token is not None else os.environ.get("MILVUS_TOKEN", "")
    try:
        # no keep-alive pings on an idle channel: a server answers too many with GOAWAY, failing the next call
        client = MilvusClient(uri=uri, token=token, timeout=timeout, grpc_options={
            "grpc.keepalive_permit_without_calls": 0, "grpc.keepalive_time_ms": 60000})
        client.list_collections()
    except Exception as e:  # pymilvus raises its own errors and grpc ones
        raise WbragError(f"cannot reach Milvus at {uri} ({str(e).splitlines()[0][:200]}); "
                         "start it or fix milvus.uri") from None
    return client


def serve_local(db_path, port=None, wait=60.0):
    """milvus-lite's C++ Milvus (pin 2.5.1: 3.x is a pure-Python rewrite) serving `db_path` on loopback, for
    tests, benchmarks and a laptop; returns (server, uri) once it answers. Stop it with server.stop()."""
    import socket

    from milvus_lite.server import Server

    if port is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    server = Server(str(db_path), address=f"127.0.0.1:{port}")
    if not server.start():
        raise WbragError(f"milvus-lite did not start on 127.0.0.1:{port} for {db_path}")
    uri, deadline = f"http://127.0.0.1:{port}", time.time() + wait
    while True:
        try:
            connect(uri, timeout=2).close()
            return server, uri
        except WbragError:
            if time.time() > deadline:
                server.stop()
                raise
            time.sleep(0.2)


def _engine_error(collection, e):
    """A failure inside Milvus (server gone, timeout, a refused request) as one line that names the server's
    collection; the records are untouched, and the next catch-up replays what is missing."""
    if type(e).__module__.split(".")[0] not in ("pymilvus", "grpc"):
        return None
    first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    return WbragError(f"Milvus collection {collection.name!r}: the request failed ({first}); "
                      "check the server (milvus.uri), then retry")


_engine_errors = translating(_engine_error)


def collection_name(created):
    """The default collection of a KB: named after its creation time, so two KBs never share one."""
    return "wbrag_" + re.sub(r"[^0-9]", "_", f"{float(created):.6f}")


class MilvusCollection:
    """Dense and sparse search over one collection; `seq` is the change it reflects (read from the records)."""

    def __init__(self, client, name, dim, config, identity):
        self.client, self.name, self.dim = client, name, dim
        self.config, self.identity = config, identity
        self.seq = -1

    @property
    def consistency(self):
        return self.config["milvus"]["consistency"]

    SCHEMA = 2  # 2: a JSON field of document metadata, so metadata filters are pushed down

    @property
    def description(self):
        return "writeback-rag " + json.dumps(dict(self.identity, schema=self.SCHEMA), sort_keys=True)

    @property
    @_engine_errors
    def count(self):
        if not self.client.has_collection(self.name):
            return 0
        r = self.client.query(self.name, filter="", output_fields=["count(*)"], consistency_level="Strong")
        return int(r[0]["count(*)"])

    @_engine_errors
    def state(self):
        """'missing', 'ours', 'outdated' (ours, made by an older version: rebuilt), 'newer' (ours, made by a
        newer version: refused) or 'foreign' (another KB's or someone else's collection: never dropped)."""
        if not self.client.has_collection(self.name):
            return "missing"
        desc = self.client.describe_collection(self.name).get("description", "")
        if desc == self.description:
            return "ours"
        try:  # this KB's collection in an older layout (before schema 2: no schema number)
            found = json.loads(desc.removeprefix("writeback-rag ")) if desc.startswith("writeback-rag ") else None
            schema = int(found.pop("schema", 1)) if isinstance(found, dict) else None
        except (ValueError, TypeError):
            found = schema = None
        if schema is not None and found == self.identity:
            return "outdated" if schema < self.SCHEMA else "newer"
        return "foreign"

    @_engine_errors
    def create(self):
        from pymilvus import DataType, Function, FunctionType

        c = self.client
        schema = c.create_schema(auto_id=False, description=self.description)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("kind", DataType.VARCHAR, max_length=16)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=2048)
        schema.add_field("source", DataType.VARCHAR, max_length=4096)
        schema.add_field("meta", DataType.JSON)
        schema.add_field("terms", DataType.VARCHAR, max_length=65535, enable_analyzer=True,
                         analyzer_params={"tokenizer": "whitespace"})
        schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(self.dim))
        schema.add_function(Function(name="bm25", function_type=FunctionType.BM25, input_field_names=["terms"],
                                     output_field_names=["sparse"]))
        params = c.prepare_index_params()
        m = self.config["milvus"]
        params.add_index("vector", index_type=m["index_type"], metric_type="IP",
                         params={"M": int(self.config["dense"]["hnsw_m"]), "efConstruction": 200}
                         if m["index_type"] == "HNSW" else {})
        b = self.config["bm25"]
        params.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25",
                         params={"bm25_k1": float(b["k1"]), "bm25_b": float(b["b"])})
        params.add_index("kind", index_type="INVERTED")
        c.create_collection(self.name, schema=schema, consistency_level="Strong")
        # the collection is empty, so its indexes have nothing to build: not waiting for them (pymilvus polls
        # every 0.5 s, 1.5 s a collection) is safe, and loading it needs them defined, not built
        c.create_index(self.name, params, sync=False)
        c.load_collection(self.name)

    @_engine_errors
    def drop(self):
        if self.state() in ("ours", "outdated"):
            self.client.drop_collection(self.name)

    @_engine_errors
    def insert(self, rows, missing_only=True):
        """(chunk id, kind, doc id, source, text, title, vector bytes, meta JSON) rows. A chunk id always names the same
        content, so a row already there is left alone: a replay done twice adds nothing (an insert costs a few
        ms where an upsert, a delete and an insert, cost about 170 ms on milvus-lite)."""
        for start in range(0, len(rows), BATCH):
            part = rows[start:start + BATCH]
            if missing_only:
                there = {int(r["id"]) for r in self.client.query(
                    self.name, ids=[int(r[0]) for r in part], output_fields=["id"], consistency_level="Strong")}
                part = [r for r in part if int(r[0]) not in there]
            if part:
                self.client.insert(self.name, [
                    {"id": int(r[0]), "kind": r[1], "doc_id": r[2][:2048], "source": (r[3] or "")[:4096],
                     "terms": _terms(index_text(r[5], r[4])),
                     "vector": np.frombuffer(r[6], dtype=np.float32).tolist(), "meta": _meta_text(r[7])}
                    for r in part])

    @_engine_errors
    def delete(self, ids):
        ids = [int(i) for i in ids]
        if not ids:
            return
        for start in range(0, len(ids), BATCH):
            self.client.delete(self.name, ids=ids[start:start + BATCH])

    @_engine_errors
    def search(self, data, field, metric, n, expr):
        n = min(int(n), TOP_LIMIT)
        if n <= 0 or expr is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        params = {"metric_type": metric}
        if field == "vector" and self.config["milvus"]["index_type"] == "HNSW":
            params["params"] = {"ef": max(128, n)}
        res = self.client.search(self.name, data=[data], anns_field=field, limit=n, filter=expr,
                                 search_params=params, output_fields=[], consistency_level=self.consistency)[0]
        return (np.array([h["id"] for h in res], dtype=np.int64),
                np.array([h["distance"] for h in res], dtype=np.float32))

    @_engine_errors
    def has_overflow(self):
        """Whether a chunk of the collection carries the metadata-overflow marker."""
        return bool(self.client.query(self.name, filter=f'meta["{_OVERFLOW}"] == "1"', output_fields=["id"],
                                      limit=1, consistency_level=self.consistency))

    @_engine_errors
    def vectors(self, ids):
        """{chunk id: vector} for those of `ids` the collection holds."""
        out = {}
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), 1000):
            for r in self.client.query(self.name, ids=ids[start:start + 1000], output_fields=["id", "vector"],
                                       consistency_level="Strong"):
                out[int(r["id"])] = np.asarray(r["vector"], dtype=np.float32)
        return out

    @_engine_errors
    def ids(self):
        """Every chunk id in the collection, sorted, repeats kept (for `check`)."""
        import logging

        logging.getLogger("pymilvus").setLevel(logging.ERROR)  # its iterator warns about milvus-lite's timestamps
        out = []
        it = self.client.query_iterator(self.name, batch_size=10000, filter="id >= 0", output_fields=["id"],
                                        consistency_level="Strong")
        try:
            while True:
                page = it.next()
                if not page:
                    break
                out += [int(r["id"]) for r in page]
        finally:
            it.close()
        return np.sort(np.array(out, dtype=np.int64))


class MilvusIndexes(Indexes):
    """Indexes whose dense and sparse halves are one Milvus collection; the chunk kinds stay in memory."""

    META = "milvus_seq"

    def __init__(self, dense_path, bm25_path, config, identity, dim, notify, readonly=False, lock_path=None,
                 client=None):
        super().__init__(dense_path, bm25_path, config, identity, dim, notify, readonly)
        self.lock_path = lock_path or os.path.join(os.path.dirname(dense_path), "milvus.lock")
        self._client = client
        self.remote = None
        self._overflow_at = (None, False)  # (head, whether a chunk's metadata overflowed): see _overflow

    @property
    def client(self):
        if self._client is None:
            self._client = connect(self.config["milvus"]["uri"])
        return self._client

    def _collection(self):
        if self.remote is None:
            ident = self._identity()
            name = self.config["milvus"]["collection"] or collection_name(ident["kb_created"])
            self.remote = MilvusCollection(self.client, name, self._dim(), self.config, ident)
        return self.remote

    # -- catching up

    def catch_up(self, records, dense=True, bm25=True, kinds=True):
        with self.lock:
            head = super().catch_up(records, dense=False, bm25=False, kinds=kinds)  # the chunk kinds, in memory
            if dense or bm25:
                remote = self._collection()
                if remote.seq != head or self.dense is None:
                    remote.seq = records.position(self.META)
                    if remote.seq != head or self.dense is None:
                        self._sync(records, remote, head)
                self.dense = self.bm25 = remote
            return head

    def refresh(self, records):
        """After a commit: replay it into the collection now. A write is never failed by Milvus: the records
        have it, and the next search replays what is missing (with the error, if the server is still away)."""
        try:
            super().refresh(records)
        except WbragError as e:
            self._notify(f"{e}; the write is stored and reaches Milvus on the next search")

    def _sync(self, records, remote, head):
        """Replay the tail (or rebuild) under the KB's Milvus lock: one process at a time writes."""
        with _file_lock(self.lock_path, self.readonly):
            seq = records.position(self.META)
            state = remote.state()
            if state == "foreign":
                raise WbragError(f"Milvus collection {remote.name!r} belongs to something else; set another "
                                 "milvus.collection (wbrag config milvus.collection=NAME)")
            if state == "newer":
                raise WbragError(f"Milvus collection {remote.name!r} was made by a newer writeback-rag; upgrade "
                                 "this one (pip install -U writeback-rag)")
            why = None
            if state == "missing":
                why = "missing" if seq < 0 else "missing from Milvus"
            elif state == "outdated":
                why = "was made by an older version"
            elif seq < 0 or seq > records.head():
                why = "from another history"
            else:
                n, touched, reset = records.pending(seq, records.head())
                if reset:
                    why = "reset"
            if why is None:
                remote.seq = self._replay_remote(records, remote, seq)
            else:
                if why not in ("missing", "reset"):
                    self._notify(f"Milvus collection {remote.name} {why}; rebuilding from the store")
                remote.seq = self._rebuild_remote(records, remote)
            if not self.readonly:
                records.set_position(self.META, remote.seq)

    _FIELDS = ["kind", "doc", "source", "text", "title", "vector", "meta"]  # what a row of the collection holds

    def _replay_remote(self, records, remote, seq):
        with records.snapshot():
            head = records.head()
            tail = records.changes(seq, head)
            added = sorted({int(c) for entry in tail for c in entry[1]})
            removed = sorted({int(c) for entry in tail for c in entry[2]})
            rows = records.chunks(self._FIELDS, added)
        remote.delete(removed)  # then the chunks live at the head (a chunk removed and restored comes back)
        remote.insert(rows)
        return head

    def _rebuild_remote(self, records, remote):
        remote.drop()
        remote.create()
        with records.snapshot():
            head = records.head()
            for rows in records.scan(self._FIELDS, BATCH):
                remote.insert(rows, missing_only=False)  # a new, empty collection
        return head

    def reset(self):
        with self.lock:
            super().reset()
            if self.remote is not None:
                self.remote.seq = -1

    def close(self):
        if self._client is not None:
            self._client.close()
            self._client = self.remote = None

    def save_if_due(self, records):
        """Nothing to save: Milvus persists the collection, the records persist the sequence."""

    def drop(self, records):
        """Remove this KB's collection (after the KB moved to another backend) and forget its sequence."""
        with self.lock:
            self._collection().drop()
            records.set_position(self.META, -1)

    # -- searching

    def candidates(self, records, query, qvec, n, where, sparse=True, dense=True):
        expr = self.expression(records, where)
        terms = _terms(query) if sparse else ""
        nothing = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))
        return ((self.remote.search(terms, "sparse", "BM25", n, expr) if terms else nothing) if sparse else None,
                self.remote.search(np.asarray(qvec, dtype=np.float32).tolist(), "vector", "IP", n, expr)
                if dense else None)

    def expression(self, records, where):
        """A Filter in Milvus's filter language: kinds, globs of plain characters and * and metadata values
        pushed down; a predicate Milvus cannot say the same way (? or [] in a glob, _ or %, a value whose text
        could differ: _pushable) as the ids the records allow, and every metadata predicate so when a
        document's metadata overflowed the collection's field; None when no chunk can match."""
        parts = []
        if not where.kinds >= set(KINDS):
            parts.append("kind in [" + ", ".join(json.dumps(k) for k in sorted(where.kinds)) + "]")
        rest = []
        for field, globs in (("doc_id", where.doc_globs), ("source", where.source_globs)):
            for g in globs:
                if _SIMPLE_GLOB.match(g):
                    parts.append(f"{field} like {json.dumps(g.replace('*', '%'))}" if "*" in g
                                 else f"{field} == {json.dumps(g)}")
                else:
                    rest.append(g)
        overflow = where.meta and self._overflow(records)
        for key, value in where.meta:
            if _pushable(key, value) and not overflow:
                parts.append(f"meta[{json.dumps(key)}] == {json.dumps(value, ensure_ascii=False)}")
            else:
                rest.append(key)
        if rest:
            ids = self.record_ids(records, where).tolist()
            if not ids:
                return None  # nothing can match (and Milvus refuses `id in []`)
            parts.append("id in [" + ",".join(str(int(i)) for i in ids) + "]")
        return " and ".join(f"({p})" for p in parts)

    def _overflow(self, records):
        """Whether some chunk's metadata overflowed the collection's field (asked once per change)."""
        head = records.head()
        if self._overflow_at[0] != head:
            self._overflow_at = (head, self.remote.has_overflow())
        return self._overflow_at[1]

    # -- checking

    def verify(self, records, sample=200, seed=0):
        problems, notes = [], []
        with self.lock:
            gen, active = self._active_at_head(records)
            remote = self.remote
            repair = "repair with: reindex (CLI: wbrag reindex)"
            held = remote.ids()
            counts = {"generation": gen, "active_chunks": int(len(active)), "indexed_chunks": int(len(held)),
                      "milvus_seq": int(remote.seq)}
            if remote.seq == gen:
                rows = remote.count  # count(*) sees a chunk stored twice; a query returns it once
                if rows != len(held):
                    problems.append(f"Milvus collection {remote.name} holds {rows - len(held)} chunks twice; "
                                    + repair)
                missing, extra = np.setdiff1d(active, held), np.setdiff1d(held, active)
                if len(missing) or len(extra):
                    problems.append(f"Milvus collection {remote.name} at change {remote.seq} lacks {len(missing)} "
                                    f"active chunks and holds {len(extra)} others (e.g. "
                                    f"{(missing.tolist() + extra.tolist())[:5]}); " + repair)
                rng = np.random.default_rng(seed)
                some = rng.choice(active, size=min(sample, len(active)), replace=False) if len(active) else active
                got = remote.vectors(some.tolist())
                bad = 0
                for cid, vec in got.items():
                    if not np.allclose(vec, records.vector(cid), atol=1e-5):
                        bad += 1
                if bad:
                    problems.append(f"Milvus collection {remote.name}: {bad} of {len(got)} sampled vectors differ "
                                    "from the stored embeddings; " + repair)
            else:
                notes.append(f"Milvus collection at change {remote.seq}, the KB at {gen}: replayed on next search")
            kinds = self.kinds
            if int((kinds.codes > 0).sum()) != len(active):
                problems.append(f"chunk kinds cover {int((kinds.codes > 0).sum())} chunks, not {len(active)}; "
                                + repair)
        return problems, notes, counts


def _terms(text):
    """Our BM25 tokens, joined for Milvus's whitespace tokenizer (within its VARCHAR limit)."""
    out = " ".join(bm25_tokens(text))
    if len(out.encode("utf-8")) > MAX_TERMS:
        out = out.encode("utf-8")[:MAX_TERMS].decode("utf-8", "ignore").rsplit(" ", 1)[0]
    return out


@contextlib.contextmanager
def _file_lock(path, readonly):
    """One process at a time replays into the collection (an exclusive lock on a file in the KB folder)."""
    if readonly:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

