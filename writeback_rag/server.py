"""`wbrag serve`: the knowledge base over HTTP (FastAPI + uvicorn; `pip install writeback-rag[serve]`).

One long-lived KnowledgeBase per process: the model and the indexes load once, and writes from other
processes reach it through the change log. It binds 127.0.0.1 by default; any other address needs a
token, sent as `Authorization: Bearer TOKEN` and compared in constant time. CORS is off unless origins are
given. Requests over `max_body` bytes and searches over `max_k` hits are refused. Besides its own API it
serves Dify's external-knowledge contract (`POST /retrieval`), which Dify and Open WebUI can point at."""

import hmac
import ipaddress
import threading
import time
import uuid
from typing import Any

from fastapi import Body, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from .errors import InputError, UnknownQuery, WbragError
from .kb import KnowledgeBase


class SearchIn(BaseModel):
    query: str
    k: int = 5
    mode: str | None = None
    filters: dict[str, Any] | None = None
    include_units: bool = True
    log: bool = True


class FeedbackIn(BaseModel):
    query_id: int
    correct: bool
    docs: list[str] = Field(default_factory=list)
    answer: str | None = None
    source: str = "http"


class AnswerIn(BaseModel):
    question: str
    k: int = 5
    mode: str | None = None


class IngestIn(BaseModel):
    records: list[dict[str, Any]]


class SyncIn(BaseModel):
    folder: str
    dry_run: bool = False


class WritebackIn(BaseModel):
    distiller: str | None = None
    dry_run: bool = False


class RetrievalSetting(BaseModel):
    top_k: int = 5
    score_threshold: float = 0.0


class RetrievalIn(BaseModel):
    """Dify's external knowledge API request."""
    knowledge_id: str = ""
    query: str
    retrieval_setting: RetrievalSetting = Field(default_factory=RetrievalSetting)
    metadata_condition: dict[str, Any] | None = None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve beyond this machine without a token."""
    if not is_loopback(host) and not token:
        raise InputError(f"binding {host} exposes the knowledge base beyond this machine; give a token "
                         "(--token or WBRAG_TOKEN) that clients send as 'Authorization: Bearer TOKEN'")


def create_app(kb: KnowledgeBase, token: str | None = None, cors_origins: tuple[str, ...] = (),
               max_k: int = 100, max_body: int = 10_000_000) -> FastAPI:
    """The HTTP API over one open KnowledgeBase (the caller keeps it open while the app serves)."""
    app = FastAPI(title="writeback-rag", description=__doc__.split("\n\n")[0],
                  version=__import__("writeback_rag").__version__)
    jobs: dict[str, dict] = {}
    jobs_lock = threading.Lock()

    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body:
            return JSONResponse({"error": f"request body over {max_body} bytes"}, status_code=413)
        if size is None and request.method == "POST":
            body = await request.body()  # chunked: read it (bounded by what arrives) and measure
            if len(body) > max_body:
                return JSONResponse({"error": f"request body over {max_body} bytes"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(WbragError)
    async def wbrag_error(request: Request, exc: WbragError):
        status = 404 if isinstance(exc, UnknownQuery) else 400
        if request.url.path == "/retrieval":
            return JSONResponse({"error_code": 2001 if status == 404 else 1001, "error_msg": str(exc)},
                                status_code=status)
        return JSONResponse({"error": exc.message, "hint": exc.hint.get("api")}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if request.url.path == "/retrieval" and isinstance(exc.detail, dict):  # Dify's error shape
            return JSONResponse(exc.detail, status_code=exc.status_code)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    def authorized(request: Request) -> None:
        if not token:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            if request.url.path == "/retrieval":  # Dify's error shape
                raise HTTPException(403, detail={"error_code": 1002, "error_msg": "authorization failed"})
            raise HTTPException(401, detail="missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(authorized)]

    def check_k(k: int) -> int:
        if not 1 <= k <= max_k:
            raise InputError(f"k must be between 1 and {max_k}")
        return k

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    @app.post("/search", dependencies=auth)
    def search(req: SearchIn) -> dict:
        """The same JSON as `wbrag query --json`: query_id, query, mode, latency_ms, hits."""
        return kb.search(req.query, k=check_k(req.k), mode=req.mode, filters=req.filters,
                         include_units=req.include_units, log=req.log, source="http").to_dict()

    @app.post("/feedback", dependencies=auth)
    def feedback(req: FeedbackIn) -> dict:
        return {"feedback_id": kb.feedback(req.query_id, req.correct, docs=req.docs, answer=req.answer,
                                           source=req.source)}

    @app.post("/answer", dependencies=auth)
    def answer(req: AnswerIn) -> dict:
        out = kb.answer(req.question, k=check_k(req.k), mode=req.mode, source="http")
        return {"query_id": out["query_id"], "answer": out["answer"], "hits": [h.to_dict() for h in out["hits"]]}

    @app.post("/ingest", dependencies=auth)
    def ingest(req: IngestIn) -> dict:
        """Records ({id, text, title?, ...metadata}); files on the server are ingested with the CLI."""
        return kb.ingest(req.records).to_dict()

    @app.post("/sync", dependencies=auth)
    def sync(req: SyncIn) -> dict:
        """Make the KB match a folder on the server (new and changed files in, deleted files' documents out)."""
        return kb.sync(req.folder, dry_run=req.dry_run).to_dict()

    @app.post("/writeback", dependencies=auth, status_code=202)
    def writeback(req: WritebackIn = Body(default_factory=WritebackIn)) -> dict:
        """Starts a write-back run in the background; poll GET /writeback/{job_id}."""
        job_id = uuid.uuid4().hex[:12]
        job = {"job_id": job_id, "status": "running", "started": time.time(), "result": None, "error": None}
        with jobs_lock:
            jobs[job_id] = job

        def work():
            try:
                job["result"] = kb.writeback(distiller=req.distiller, dry_run=req.dry_run)
                job["status"] = "done"
            except Exception as e:  # reported through the job, not lost in a thread
                job["status"], job["error"] = "failed", str(e)
            job["finished"] = time.time()

        threading.Thread(target=work, name=f"writeback-{job_id}", daemon=True).start()
        return dict(job)

    @app.get("/writeback/{job_id}", dependencies=auth)
    def writeback_status(job_id: str) -> dict:
        job = jobs.get(job_id)
        if job is None:
            raise HTTPException(404, detail=f"no write-back job {job_id}")
        return dict(job)

    @app.get("/units", dependencies=auth)
    def units(include_inactive: bool = True) -> list[dict]:
        return kb.units(include_inactive=include_inactive)

    @app.get("/units/{unit_id}", dependencies=auth)
    def unit(unit_id: str) -> dict:
        for u in kb.units(ids=[unit_id]):
            return u
        raise HTTPException(404, detail=f"no knowledge unit {unit_id}")

    @app.post("/units/{unit_id}/retire", dependencies=auth)
    def retire(unit_id: str) -> dict:
        return {"unit_id": unit_id, "was": kb.retire(unit_id), "status": "retired"}

    @app.post("/units/{unit_id}/restore", dependencies=auth)
    def restore(unit_id: str) -> dict:
        return {"unit_id": unit_id, "was": kb.restore(unit_id), "status": "active"}

    @app.get("/runs", dependencies=auth)
    def runs() -> list[dict]:
        return kb.runs()

    @app.get("/tunings", dependencies=auth)
    def tunings() -> list[dict]:
        return kb.tunings()

    @app.post("/runs/{run_id}/rollback", dependencies=auth)
    def rollback(run_id: str) -> dict:
        return {"run_id": run_id, "units_removed": kb.rollback(run_id)}

    @app.get("/log", dependencies=auth)
    def log(last: int = 20, source: str | None = None) -> list[dict]:
        return kb.queries(last=min(max(1, last), 1000), source=source)

    @app.get("/stats", dependencies=auth)
    def stats() -> dict:
        return kb.stats()

    @app.get("/check", dependencies=auth)
    def check() -> dict:
        return kb.check()

    @app.post("/retrieval", dependencies=auth)
    def retrieval(req: RetrievalIn) -> dict:
        """Dify's external knowledge API: records of {content, score (0-1), title, metadata}."""
        res = kb.search(req.query, k=check_k(req.retrieval_setting.top_k), source="dify")
        records = []
        for h, score in zip(res.hits, relevance(kb, res)):
            if score >= req.retrieval_setting.score_threshold:
                records.append({"content": h.text, "score": score, "title": h.title or h.doc_id,
                                "metadata": {"doc_id": h.doc_id, "chunk_id": h.chunk_id, "kind": h.kind,
                                             "source": h.source, "query_id": res.query_id, **(h.meta or {})}})
        return {"records": records}

    return app


def relevance(kb: KnowledgeBase, res) -> list[float]:
    """Scores rescaled to 0-1 for clients that threshold them: hybrid RRF by its maximum (first in both
    lists = 1), dense cosines clipped at 0, bm25 relative to the top hit."""
    scores = [h.score for h in res.hits]
    if not scores:
        return []
    r = kb.config["retrieval"]
    if res.mode == "hybrid" and r["fusion"] == "rrf":
        top = 2.0 / (int(r["rrf_k"]) + 1)
    elif res.mode == "dense" or (res.mode == "hybrid" and r["fusion"] == "weighted"):
        return [round(min(1.0, max(0.0, s)), 6) for s in scores]
    else:
        top = max(scores) or 1.0
    return [round(min(1.0, max(0.0, s / top)), 6) for s in scores]


def serve(kb_path: str, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
          cors_origins: tuple[str, ...] = (), max_k: int = 100) -> None:
    """Open the KB once and serve it until interrupted."""
    import uvicorn

    check_bind(host, token)
    kb = KnowledgeBase.open(kb_path)
    try:
        uvicorn.run(create_app(kb, token=token, cors_origins=cors_origins, max_k=max_k), host=host, port=port,
                    log_level="warning")
    finally:
        kb.close()
