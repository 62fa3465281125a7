"""Evaluation: metrics checked against hand-computed values, unit credit, bootstrap, BEIR loading, protocol."""

import json
import math
import os

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from writeback_rag import KnowledgeBase
from writeback_rag.cli import _Group
from writeback_rag.errors import InputError
from writeback_rag.eval import (
    answer_recall, compare, doc_ranking, evaluate, learning_curve, load_beir, markdown_report, paired_bootstrap,
    per_query_measures, plot_learning_curve, register_cli, run_protocol, run_scores, subsample, validation_split,
)

L2_3, L2_4, L2_5 = math.log2(3), math.log2(4), math.log2(5)

CORPUS = [
    {"_id": "calder", "title": "Calder Foundry",
     "text": "The Calder foundry stood in the town of Marrowick. It cast bells and railings."},
    {"_id": "heron", "title": "Grey Heron Light",
     "text": "Grey Heron Light was completed in 1861. The tower is painted white with one black band."},
    {"_id": "gale", "title": "The Great Gale", "text": "The great gale of 1894 wrecked eleven ships. The supply boat was lost."},
    {"_id": "kelp", "title": "Kelp Harvest",
     "text": "Kelp was gathered on the northern shore every autumn. It was burned to make soda ash."},
    {"_id": "chapel", "title": "Saint Ebba Chapel", "text": "The chapel on the headland was rebuilt in 1720 after a storm."},
    {"_id": "mill", "title": "Tidal Mill", "text": "The tidal mill ground oats for the village until 1902."},
]
# train questions feed write-back; the test questions are held out. t1 shares words only with tr1's
# question ("lens", "makers", "housed"), so only the unit titled with tr1 can retrieve it under BM25.
QUERIES = [
    ("tr1", "Which town housed the lens makers Calder?", ["Marrowick"], "calder", "train"),
    ("tr2", "What is painted on the Grey Heron tower?", ["one black band"], "heron", "train"),
    ("tr3", "What did the tidal mill grind?", ["oats"], "mill", "train"),
    ("t1", "lens makers housed where?", ["Marrowick"], "calder", "test"),
    ("t2", "When did the great gale wreck ships?", ["1894"], "gale", "test"),
]


def _jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def write_tiny_beir(d):
    """The tiny BEIR-layout dataset above, written to folder `d`; returns its path as a string."""
    os.makedirs(d / "qrels")
    _jsonl(d / "corpus.jsonl", CORPUS)
    _jsonl(d / "queries.jsonl", [{"_id": q, "text": t} for q, t, _, _, _ in QUERIES])
    _jsonl(d / "answers.jsonl", [{"_id": q, "answers": a} for q, _, a, _, _ in QUERIES])
    for split in ("train", "test"):
        with open(d / "qrels" / f"{split}.tsv", "w") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            f.writelines(f"{q}\t{doc}\t1\n" for q, _, _, doc, s in QUERIES if s == split)
    return str(d)


@pytest.fixture
def beir(tmp_path):
    return write_tiny_beir(tmp_path / "tiny")


# ---- metrics ---------------------------------------------------------------------------------

QRELS = {"q1": {"d1": 1}, "q2": {"d2": 1, "d3": 1}, "q3": {"d5": 1}}
RUNS = {"q1": ["d1", "d2", "d3"], "q2": ["d1", "d2", "d4", "d3"], "q3": ["d1", "d2"]}


def test_ir_measures_agree_with_hand_computed_values():
    run = {q: run_scores(r) for q, r in RUNS.items()}
    got = per_query_measures(QRELS, run)
    ndcg_q2 = (1 / L2_3 + 1 / L2_5) / (1 + 1 / L2_3)  # relevant at ranks 2 and 4; ideal ranks 1 and 2
    assert got["nDCG@10"] == pytest.approx({"q1": 1.0, "q2": ndcg_q2, "q3": 0.0})
    assert got["R@1"] == {"q1": 1.0, "q2": 0.0, "q3": 0.0}
    assert got["R@5"] == {"q1": 1.0, "q2": 1.0, "q3": 0.0}
    assert got["R@100"] == got["R@5"]
    assert got["RR@10"] == pytest.approx({"q1": 1.0, "q2": 0.5, "q3": 0.0})
    assert np.mean(list(got["nDCG@10"].values())) == pytest.approx((1 + 0.650921) / 3, abs=1e-6)
    # R@10 of a query with 2 relevant, only one retrieved, is 1/2
    half = per_query_measures({"q": {"a": 1, "b": 1}}, {"q": run_scores(["x", "a"])})
    assert half["R@10"]["q"] == 0.5 and half["R@1"]["q"] == 0.0


def test_run_scores_keep_hit_order_and_missing_queries_score_zero():
    ranking = ["zeta", "alpha", "mid"]  # ir_measures breaks score ties by doc id: scores must be distinct
    s = run_scores(ranking)
    assert sorted(s, key=lambda d: -s[d]) == ranking
    got = per_query_measures({"q": {"alpha": 1}, "empty": {"a": 1}}, {"q": s, "empty": {}})
    assert got["RR@10"] == {"q": 0.5, "empty": 0.0}


def test_unit_credit_versus_strict():
    hits = [{"doc_id": "unit:u1", "kind": "unit"}, {"doc_id": "d1", "kind": "source"},
            {"doc_id": "d3", "kind": "source"}, {"doc_id": "d1", "kind": "source"}]
    units = {"unit:u1": ["d3", "d2"]}
    assert doc_ranking(hits, units, credit=False) == ["unit:u1", "d1", "d3"]
    assert doc_ranking(hits, units, credit=True) == ["d3", "d2", "d1"]
    qrels = {"q2": {"d2": 1, "d3": 1}}
    strict = per_query_measures(qrels, {"q2": run_scores(doc_ranking(hits, units, credit=False))})
    credit = per_query_measures(qrels, {"q2": run_scores(doc_ranking(hits, units, credit=True))})
    assert credit["nDCG@10"]["q2"] == pytest.approx(1.0) and credit["R@1"]["q2"] == 0.5
    assert strict["nDCG@10"]["q2"] == pytest.approx((1 / L2_4) / (1 + 1 / L2_3))  # d3 at rank 3 only
    assert strict["RR@10"]["q2"] == pytest.approx(1 / 3) and strict["R@5"]["q2"] == 0.5
    # a unit whose provenance is unknown (e.g. retired) earns nothing even with credit
    assert doc_ranking([{"doc_id": "unit:gone", "kind": "unit"}], units, credit=True) == []


def test_answer_recall_uses_title_and_text_normalized():
    hits = [{"title": "A", "text": "nothing here"}, {"title": "The Calder Foundry", "text": "stood in MARROWICK."}]
    assert answer_recall(hits, ["marrowick"], 1) == 0.0
    assert answer_recall(hits, ["marrowick"], 5) == 1.0
    assert answer_recall(hits, ["the calder foundry"], 2) == 1.0
    assert answer_recall(hits, ["marrow"], 5) == 0.0  # whole words only


def test_paired_bootstrap():
    rng = np.random.default_rng(1)
    before = rng.random(200)
    after = before + rng.normal(0.05, 0.1, 200)
    c = paired_bootstrap(before, after)
    assert set(c) == {"before", "after", "delta", "lo", "hi", "n"} and c["n"] == 200
    assert c["lo"] <= c["delta"] <= c["hi"] and c["lo"] < c["hi"]
    assert c["delta"] == pytest.approx(np.mean(after - before))
    assert c["lo"] > 0  # a clear gain: the CI excludes 0
    assert paired_bootstrap(before, after) == c  # fixed seed: reproducible
    assert paired_bootstrap(before, after, seed=7)["lo"] != c["lo"]
    same = paired_bootstrap([0.2, 0.4, 0.6], [0.3, 0.5, 0.7])
    assert same["lo"] == pytest.approx(0.1) and same["hi"] == pytest.approx(0.1)
    zero = paired_bootstrap([1, 0, 1, 0], [1, 0, 1, 0])
    assert zero["delta"] == zero["lo"] == zero["hi"] == 0
    with pytest.raises(ValueError):
        paired_bootstrap([1, 2], [1])
    cmp = compare({"per_query": {"m": {"a": 0.0, "b": 1.0}}}, {"per_query": {"m": {"b": 1.0, "a": 1.0}}})
    assert cmp["m"]["delta"] == 0.5 and cmp["m"]["lo"] <= 0.5 <= cmp["m"]["hi"]


# ---- data --------------------------------------------------------------------------------------


def test_load_beir(beir):
    d = load_beir(beir, "test")
    assert [e["id"] for e in d["examples"]] == ["t1", "t2"]
    assert d["examples"][0] == {"id": "t1", "query": "lens makers housed where?", "answers": ["Marrowick"],
                                "relevant": ["calder"], "qrels": {"calder": 1}}
    assert len(d["corpus"]) == 6 and d["corpus"][0] == {"id": "calder", "title": "Calder Foundry",
                                                        "text": CORPUS[0]["text"]}
    assert load_beir(beir, "train", corpus=False)["corpus"] is None
    with pytest.raises(InputError, match="no qrels/dev.tsv .*splits here: test, train"):
        load_beir(beir, "dev")
    with pytest.raises(InputError, match="no such dataset folder"):
        load_beir(beir + "-missing", "test")


def test_malformed_qrels_line_names_file_and_line(beir):
    path = os.path.join(beir, "qrels", "test.tsv")
    with open(path, "w") as f:
        f.write("query-id\tcorpus-id\tscore\nt1\tcalder\t1\nt2 gale 1\n")
    with pytest.raises(InputError, match=r"qrels/test\.tsv:3: expected"):
        load_beir(beir, "test")
    with open(path, "w") as f:
        f.write("query-id\tcorpus-id\tscore\nt1\tcalder\tyes\n")
    with pytest.raises(InputError, match=r"test\.tsv:2"):
        run_protocol(beir, os.path.join(os.path.dirname(beir), "kb"), embedder="hash")


def test_subsample_and_validation_split_are_fixed_and_disjoint():
    exs = [{"id": str(i)} for i in range(50)]
    a = subsample(exs, 10)
    assert a == subsample(exs, 10) and len(a) == 10 and [e["id"] for e in a] == sorted((e["id"] for e in a), key=int)
    assert subsample(exs, None) == exs and subsample(exs, 99) == exs
    tr, va = validation_split(exs, 0.2)
    assert len(va) == 10 and len(tr) == 40 and not {e["id"] for e in tr} & {e["id"] for e in va}


# ---- the protocol ------------------------------------------------------------------------------


def test_run_protocol_end_to_end(beir, tmp_path):
    # every train question gets a unit (in this tiny corpus the sources already rank each one's evidence first)
    res = run_protocol(beir, str(tmp_path / "kb"), modes=("bm25", "hybrid"), embedder="hash", keep_per_query=True,
                       config={"writeback": {"earn_slot": False}})
    assert res["n_train"] == 3 and res["n_test"] == 2 and res["units"]["count"] == 3
    assert res["label"]["useful"] == 3 and res["writeback"]["written"] == 3
    b, a = res["before"]["bm25"], res["after"]["bm25"]
    # t1 matches nothing before; after write-back the unit titled with tr1's question is its top hit
    assert b["credit/nDCG@10"] == 0.5 and b["strict/nDCG@10"] == 0.5 and b["answer_recall@1"] == 0.5
    assert a["credit/nDCG@10"] == pytest.approx(1.0) and a["credit/RR@10"] == pytest.approx(1.0)
    assert a["strict/nDCG@10"] == 0.5 and a["strict/R@100"] == 0.5
    assert a["answer_recall@1"] == 1.0 and a["unit@5"] == 0.5 and b["unit@5"] == 0.0
    d = res["deltas"]["bm25"]["credit/nDCG@10"]
    assert d["delta"] == pytest.approx(0.5) and d["lo"] <= d["delta"] <= d["hi"] and d["n"] == 2
    pq = res["per_query"]["bm25"]
    assert pq["after"]["credit/R@1"] == {"t1": 1.0, "t2": 1.0} and pq["after"]["strict/R@1"] == {"t1": 0.0, "t2": 1.0}
    for m in ("bm25", "hybrid"):
        for key, c in res["deltas"][m].items():
            assert c["lo"] <= c["delta"] <= c["hi"], key
        assert res["after"][m]["credit/R@100"] >= res["after"][m]["strict/R@100"]
    assert 0 < res["units"]["compression_mean"] < 1 and res["units"]["avg_tokens"] > 0
    assert res["ingest"]["documents"] == 6 and res["timings"]["total_s"] >= 0
    # test queries were searched with log=False: only the three train queries are in the log
    with KnowledgeBase.open(str(tmp_path / "kb")) as kb:
        assert [q["source"] for q in kb.queries(last=100)] == ["label"] * 3
    with pytest.raises(InputError, match="already exists"):
        run_protocol(beir, str(tmp_path / "kb"), embedder="hash")
    with pytest.raises(InputError, match="unknown mode 'sparse'"):
        run_protocol(beir, str(tmp_path / "kb2"), modes=("sparse",), embedder="hash")
    report = markdown_report(res, command="python eval/run_eval.py --x")
    assert "python eval/run_eval.py --x" in report and "## bm25" in report
    assert "| nDCG@10 (credit) | 0.500 | 1.000 | +50.00 |" in report


def test_base_kb_copy_gives_the_same_numbers(beir, tmp_path):
    base = str(tmp_path / "base")
    one = run_protocol(beir, str(tmp_path / "a"), modes=("bm25",), embedder="hash", base_kb=base,
                       config={"writeback": {"include_query": False}})
    two = run_protocol(beir, str(tmp_path / "b"), modes=("bm25",), embedder="hash", base_kb=base,
                       config={"writeback": {"include_query": False}})
    assert one["before"] == two["before"] and one["after"] == two["after"]
    assert one["writeback_config"]["include_query"] is False
    # unit titles are document titles now: t1's words are in no unit, it stays unfound
    assert one["after"]["bm25"]["credit/nDCG@10"] == 0.5
    with KnowledgeBase.open(base) as kb:
        assert kb.stats()["units_active"] == 0 and kb.stats()["queries"] == 0


def test_learning_curve_and_plot(beir, tmp_path):
    curve = learning_curve(beir, str(tmp_path / "kb"), nights=2, modes=("bm25",), embedder="hash",
                           config={"writeback": {"earn_slot": False}})
    rows = curve["rows"]
    assert [r["night"] for r in rows] == [0, 1, 2] and [r["train_seen"] for r in rows] == [0, 2, 3]
    assert rows[0]["units"] == 0 and rows[-1]["units"] == 3
    assert rows[0]["metrics"]["bm25"]["credit/nDCG@10"] == 0.5
    assert rows[-1]["metrics"]["bm25"]["credit/nDCG@10"] == pytest.approx(1.0)
    assert rows[-1]["deltas"]["bm25"]["credit/nDCG@10"]["delta"] == pytest.approx(0.5)
    png = plot_learning_curve(curve, str(tmp_path / "out" / "curve.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_reader_em_f1_with_llm(beir, tmp_path, scripted):
    scripted.rules = [("Marrowick", "Marrowick"), ("1894", "in 1894 I think")]
    kb = KnowledgeBase.create(tmp_path / "kb", embedder="hash", config={"llm": {"backend": "scripted"}},
                              notify=lambda m: None)
    kb.ingest([{"id": d["_id"], "title": d["title"], "text": d["text"]} for d in CORPUS])
    ev = evaluate(kb, load_beir(beir, "test")["examples"], "bm25")
    # t1: nothing retrieved, the model does not know; t2: "in 1894 I think" has F1 2*(1/4*1)/(1/4+1) = 0.4
    assert ev["per_query"]["reader_em"] == {"t1": 0.0, "t2": 0.0}
    assert ev["per_query"]["reader_f1"]["t2"] == pytest.approx(0.4)
    assert "reader_em" not in evaluate(kb, load_beir(beir, "test")["examples"], "bm25", reader=False)["per_query"]
    kb.close()


def test_cli_command(beir, tmp_path):
    app = typer.Typer(cls=_Group)
    register_cli(app)
    app.command("noop")(lambda: None)
    runner = CliRunner()
    out_md = str(tmp_path / "r.md")
    r = runner.invoke(app, ["eval", beir, "--kb", str(tmp_path / "kb"), "--modes", "bm25", "--embedder", "hash",
                            "--json", "--out", out_md, "--set", "writeback.earn_slot=false"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["modes"] == ["bm25"] and res["after"]["bm25"]["answer_recall@1"] == 1.0
    assert res["writeback_config"]["earn_slot"] is False
    r = runner.invoke(app, ["eval", beir, "--kb", str(tmp_path / "kb5"), "--set", "writeback.earn=1"])
    assert r.exit_code != 0 and "writeback.earn_slot" in r.output
    assert "## bm25" in open(out_md).read()
    r = runner.invoke(app, ["eval", beir, "--kb", str(tmp_path / "kb3"), "--modes", "bm25,sparse", "--embedder", "hash"])
    assert r.exit_code == 2 and "unknown mode 'sparse'" in r.output
    r = runner.invoke(app, ["eval", str(tmp_path / "nope"), "--kb", str(tmp_path / "kb4")])
    assert r.exit_code == 2 and "no such dataset folder" in r.output
