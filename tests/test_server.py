"""`wbrag serve`: a real uvicorn on loopback, the whole API over HTTP, Dify's contract, the token, limits;
and `wbrag mcp` through the MCP SDK's own client over stdio."""

import json
import os
import socket
import sys
import threading
import time

import pytest

from conftest import QUESTIONS
from writeback_rag import KnowledgeBase
from writeback_rag.errors import InputError

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(corpus_kb):
    """(base url, kb) with a uvicorn server on 127.0.0.1 in this process; token 's3cret' when asked."""
    import uvicorn

    from writeback_rag.server import create_app

    servers = []

    def start(token=None, **kw):
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(corpus_kb, token=token, **kw), host="127.0.0.1",
                                               port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        deadline = time.time() + 20
        while not server.started and time.time() < deadline:
            time.sleep(0.02)
        servers.append(server)
        return f"http://127.0.0.1:{port}"

    yield start, corpus_kb
    for s in servers:
        s.should_exit = True


def test_search_feedback_writeback_job_units_and_reports(served):
    start, kb = served
    url = start()
    c = httpx.Client(base_url=url, timeout=30)
    q = "When was the fog siren at Corran Head installed?"
    r = c.post("/search", json={"query": q, "k": 3, "mode": "hybrid"})
    assert r.status_code == 200
    body = r.json()
    want = kb.search(q, k=3, mode="hybrid", log=False).to_dict()
    assert [h["chunk_id"] for h in body["hits"]] == [h["chunk_id"] for h in want["hits"]]
    assert set(body) == set(want) and body["query_id"] and body["hits"][0]["source"]
    kb.label(QUESTIONS, split="train")
    doc = body["hits"][0]["doc_id"]
    assert c.post("/feedback", json={"query_id": body["query_id"], "correct": True, "docs": [doc]}).json()["feedback_id"]
    job = c.post("/writeback", json={}).json()
    assert job["status"] == "running"
    for _ in range(300):
        job = c.get(f"/writeback/{job['job_id']}").json()
        if job["status"] != "running":
            break
        time.sleep(0.1)
    assert job["status"] == "done" and job["result"]["written"] > 0
    units = c.get("/units").json()
    uid = units[0]["id"]
    assert c.get(f"/units/{uid}").json()["id"] == uid
    assert c.post(f"/units/{uid}/retire").json() == {"unit_id": uid, "was": "active", "status": "retired"}
    assert c.post(f"/units/{uid}/restore").json()["was"] == "retired"
    assert c.get("/runs").json()[0]["status"] == "done"
    assert c.get("/tunings").json() == kb.tunings()
    assert c.get("/log", params={"last": 2}).json()[0]["id"]
    assert c.get("/stats").json()["units_active"] > 0 and c.get("/check").json()["ok"]
    r = c.post("/ingest", json={"records": [{"id": "new-note", "text": "The Skerrow bell rang at noon."}]})
    assert r.json()["added"] == 1 and c.post("/search", json={"query": "Skerrow bell noon", "k": 1,
                                                                "mode": "bm25"}).json()["hits"][0]["doc_id"] == "new-note"
    folder = kb.path + "-files"
    os.makedirs(folder)
    with open(os.path.join(folder, "tide.md"), "w") as f:
        f.write("# Tides\n\nThe tide gauge reads in fathoms.\n")
    assert c.post("/sync", json={"folder": folder, "dry_run": True}).json()["added"] == 1
    assert c.post("/sync", json={"folder": folder}).json()["added"] == 1
    os.remove(os.path.join(folder, "tide.md"))
    assert c.post("/sync", json={"folder": folder}).json()["deleted"] == 1
    run = c.get("/runs").json()[0]["id"]
    assert c.post(f"/runs/{run}/rollback").json()["units_removed"] == len(units)
    spec = c.get("/openapi.json").json()
    assert {"/search", "/feedback", "/answer", "/ingest", "/sync", "/writeback", "/retrieval"} <= set(spec["paths"])


def test_errors_and_limits(served):
    start, kb = served
    c = httpx.Client(base_url=start(max_k=20, max_body=5000), timeout=30)
    r = c.post("/search", json={"query": "fog", "k": 21})
    assert r.status_code == 400 and "between 1 and 20" in r.json()["error"]
    r = c.post("/search", json={"query": "fog", "mode": "sideways"})
    assert r.status_code == 400 and "unknown mode" in r.json()["error"]
    assert c.post("/feedback", json={"query_id": 99999, "correct": True}).status_code == 404
    r = c.post("/ingest", json={"records": [{"id": "big", "text": "x " * 5000}]})
    assert r.status_code == 413
    assert c.post("/search", json={"k": 3}).status_code == 422  # no query
    r = c.post("/answer", json={"question": "Who designed Fenwick Point?"})
    assert r.status_code == 400 and "no LLM configured" in r.json()["error"] and r.json()["hint"]


def test_token_is_required_and_compared(served):
    start, kb = served
    c = httpx.Client(base_url=start(token="s3cret"), timeout=30)
    assert c.post("/search", json={"query": "fog"}).status_code == 401
    assert c.post("/search", json={"query": "fog"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = c.post("/search", json={"query": "fog"}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["hits"]
    r = c.post("/retrieval", json={"knowledge_id": "kb", "query": "fog"}, headers={"Authorization": "Bearer no"})
    assert r.status_code == 403 and r.json()["error_code"] == 1002


def test_other_binds_need_a_token():
    from writeback_rag.server import check_bind

    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    with pytest.raises(InputError, match="token"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "t")


def test_cors_is_off_unless_configured(served):
    start, kb = served
    pre = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in httpx.options(start() + "/search", headers=pre).headers
    r = httpx.options(start(cors_origins=("http://app.example",)) + "/search", headers=pre)
    assert r.headers["access-control-allow-origin"] == "http://app.example"


def test_dify_external_knowledge_contract(served):
    start, kb = served
    c = httpx.Client(base_url=start(token="s3cret"), timeout=30, headers={"Authorization": "Bearer s3cret"})
    r = c.post("/retrieval", json={"knowledge_id": "lighthouses", "query": "Who designed Fenwick Point?",
                                   "retrieval_setting": {"top_k": 4, "score_threshold": 0.0}})
    records = r.json()["records"]
    assert r.status_code == 200 and 0 < len(records) <= 4
    assert all(0.0 <= x["score"] <= 1.0 and isinstance(x["metadata"], dict) and x["title"] for x in records)
    assert records[0]["score"] == max(x["score"] for x in records)
    high = c.post("/retrieval", json={"knowledge_id": "lighthouses", "query": "Who designed Fenwick Point?",
                                      "retrieval_setting": {"top_k": 4, "score_threshold": 0.99}}).json()["records"]
    assert all(x["score"] >= 0.99 for x in high) and len(high) < len(records)


MCP_CALLS = """
import asyncio, json, sys
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

async def main(kb):
    params = StdioServerParameters(command=sys.executable, args=["-m", "writeback_rag.cli", "mcp", "--kb", kb])
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as s:
            await s.initialize()
            names = sorted(t.name for t in (await s.list_tools()).tools)
            found = await s.call_tool("search", {"query": "Who designed Fenwick Point?", "k": 2})
            hits = json.loads(found.content[0].text)
            fb = await s.call_tool("feedback", {"query_id": hits["query_id"], "correct": True,
                                                 "docs": [hits["hits"][0]["doc_id"]]})
            units = await s.call_tool("units", {})
            print(json.dumps({"tools": names, "hits": hits, "feedback": json.loads(fb.content[0].text),
                              "units": units.content[0].text if units.content else "[]"}))

asyncio.run(main(sys.argv[1]))
"""


def test_mcp_server_over_stdio_with_the_sdk_client(corpus_kb, tmp_path):
    pytest.importorskip("mcp")
    import subprocess

    kb_path = corpus_kb.path
    corpus_kb.close()
    script = tmp_path / "client.py"
    script.write_text(MCP_CALLS)
    r = subprocess.run([sys.executable, str(script), kb_path], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["tools"] == ["answer", "feedback", "search", "units"]
    assert out["hits"]["hits"][0]["doc_id"] == "fenwick-point-light.md" and out["feedback"]["feedback_id"]
    kb = KnowledgeBase.open(kb_path)
    assert kb.query_record(out["hits"]["query_id"])["feedback"][0]["source"] == "mcp"
    kb.close()
