"""LangChain, LlamaIndex and Haystack adapters, each against the real package: results equal `kb.search`,
the async path, and the whole loop through the adapter (retrieve -> the app decides -> feedback ->
write-back -> better retrieval)."""

import asyncio

import pytest

from writeback_rag.text import contains_answer

BACKENDS = ["embedded", "milvus"]  # tests that build a KB run on both (conftest.pytest_generate_tests)

LOOP = [("Who designed the tower at Fenwick Point?", "Fenwick Point tower designer", ["Aldous Penhallow"]),
        ("When was the fog siren at Corran Head installed?", "Corran Head fog siren installation year", ["1902"])]
Q = "Which engineer designed the tower at Fenwick Point?"


def _langchain(kb):
    pytest.importorskip("langchain_core")
    from writeback_rag.integrations.langchain import WritebackRetriever

    r = WritebackRetriever(kb=kb, k=5)
    return (lambda q: r.invoke(q)), (lambda q: asyncio.run(r.ainvoke(q))), r.feedback, \
        (lambda d: (d.page_content, d.metadata))


def _llamaindex(kb):
    pytest.importorskip("llama_index.core")
    from writeback_rag.integrations.llamaindex import WritebackRetriever

    r = WritebackRetriever(kb, k=5)
    return r.retrieve, (lambda q: asyncio.run(r.aretrieve(q))), r.feedback, (lambda n: (n.node.text, n.node.metadata))


def _haystack(kb):
    pytest.importorskip("haystack")
    from haystack import Pipeline

    from writeback_rag.integrations.haystack import WritebackFeedback, WritebackRetriever

    pipe = Pipeline()
    pipe.add_component("retriever", WritebackRetriever(kb_path=kb.path, top_k=5, kb=kb))
    retrieve = lambda q: pipe.run({"retriever": {"query": q}})["retriever"]["documents"]  # noqa: E731
    fb = WritebackFeedback(kb_path=kb.path, kb=kb)
    feedback = lambda docs, correct, used=None, answer=None: fb.run(docs, correct, used, answer)["feedback_id"]  # noqa
    return retrieve, None, feedback, (lambda d: (d.content, d.meta))


ADAPTERS = {"langchain": _langchain, "llamaindex": _llamaindex, "haystack": _haystack}


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapter_results_equal_kb_search(corpus_kb, name):
    retrieve, aretrieve, _, unpack = ADAPTERS[name](corpus_kb)
    want = corpus_kb.search(Q, k=5, log=False).hits
    for fetch in filter(None, (retrieve, aretrieve)):
        got = [unpack(d) for d in fetch(Q)]
        assert [(m["chunk_id"], m["doc_id"], m["rank"], round(m["score"], 9), text) for text, m in got] == \
            [(h.chunk_id, h.doc_id, h.rank, round(h.score, 9), h.text) for h in want]
        assert all(m["query_id"] is not None and m["source"] for _, m in got)


@pytest.mark.parametrize("name", ADAPTERS)
def test_the_whole_loop_through_the_adapter(corpus_kb, name):
    kb = corpus_kb
    kb.config["writeback"]["earn_slot"] = False  # a unit even where the passage already ranks first
    retrieve, _, feedback, unpack = ADAPTERS[name](kb)

    def best(q, answers):  # rank and kind of the first hit that holds the answer
        return next(((h.rank, h.kind) for h in kb.search(q, k=10, log=False).hits
                     if contains_answer(h.title + " " + h.text, answers)), (None, None))

    assert [best(p, a)[1] for _, p, a in LOOP] == ["source", "source"]
    for q, _, answers in LOOP:
        docs = retrieve(q)
        used = [d for d in docs if contains_answer(unpack(d)[0], answers)]  # the app decides
        assert used and feedback(docs, True, used=used, answer=answers[0]) > 0
    out = kb.writeback()
    assert out["written"] == 2
    for q, para, answers in LOOP:  # the question and a paraphrase now find a unit holding the answer first
        assert best(q, answers) == (1, "unit") and best(para, answers) == (1, "unit")


def test_feedback_needs_documents_of_one_logged_search(corpus_kb):
    pytest.importorskip("langchain_core")
    from writeback_rag.errors import InputError
    from writeback_rag.integrations.langchain import WritebackRetriever

    r = WritebackRetriever(kb=corpus_kb, k=3)
    a, b = r.invoke("Fenwick Point"), r.invoke("Corran Head")
    with pytest.raises(InputError, match="2 logged queries"):
        r.feedback(a + b, correct=True)


def test_haystack_components_round_trip_through_to_dict(corpus_kb):
    pytest.importorskip("haystack")
    from haystack import Pipeline

    from writeback_rag.integrations.haystack import WritebackFeedback, WritebackRetriever

    pipe = Pipeline()
    pipe.add_component("retriever", WritebackRetriever(kb_path=corpus_kb.path, top_k=3, mode="bm25"))
    pipe.add_component("feedback", WritebackFeedback(kb_path=corpus_kb.path))
    again = Pipeline.from_dict(pipe.to_dict(), allowed_modules=["writeback_rag.integrations.haystack"])
    r = again.get_component("retriever")
    assert (r.kb_path, r.top_k, r.mode) == (corpus_kb.path, 3, "bm25")
    docs = r.run(query=Q)["documents"]
    assert again.get_component("feedback").kb_path == corpus_kb.path
    assert [d.meta["chunk_id"] for d in docs] == [h.chunk_id for h in corpus_kb.search(Q, k=3, mode="bm25",
                                                                                      log=False).hits]
