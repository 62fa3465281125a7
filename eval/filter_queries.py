"""How many times the record store evaluates a search filter's document predicates: 3 hybrid searches with a
source filter on the sample corpus after a write-back, units in a list of their own (unit_fusion=separate).

    .venv/bin/python eval/filter_queries.py [CHECKOUT]    # CHECKOUT: another tree of this repo (default: this one)
"""

import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
sys.path.insert(1, os.path.join(ROOT, "tests"))
from conftest import CORPUS, QUESTIONS  # noqa: E402
from writeback_rag import KnowledgeBase  # noqa: E402

kb = KnowledgeBase.create(tempfile.mkdtemp() + "/kb", embedder="hash", notify=lambda m: None)
kb.ingest([CORPUS])
kb.label(QUESTIONS, split="train")
kb.writeback()
kb.config["retrieval"]["unit_fusion"] = "separate"
n = [0]
kb.conn.set_trace_callback(lambda sql: n.__setitem__(0, n[0] + ("GLOB" in sql)))
for q in ("Who built Fenwick Point Light?", "lighthouse stamps", "fog signal"):
    kb.search(q, k=5, mode="hybrid", filters={"source": "*lighthouses*"}, log=False)
print(f"{os.path.dirname(sys.modules['writeback_rag'].__file__)}: {n[0]} evaluations for 3 hybrid searches")
