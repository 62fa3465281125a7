"""A probe for issue 14, not a feature: does one epoch of fine-tuning MiniLM on SQuAD train (question,
paragraph) pairs move dense retrieval of held-out *train* questions (20% by a hash of the question; the test
split is not read)? In-batch negatives (batch 16, scale 20, AdamW lr 2e-5), a batch's other questions of the
same paragraph masked out; whole paragraphs embedded (title + text), cut at the model's 256 word pieces.
Its answer column is a lower-cased substring match, not the evaluation's answer-recall (text.contains_answer,
normalised and word-bounded), and its slice is its own hash, not tuning.in_holdout: call those two when it
is next run, so its figures compare with the report's.

    .venv/bin/python eval/probe_finetune.py [--out eval/results/finetune-probe.md]    (~25 min on 2 cores)"""
import argparse, hashlib, os, sys, time, random, numpy as np, torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DATA, command_line, write_result
ap = argparse.ArgumentParser(); ap.add_argument("--out", default=None); a = ap.parse_args()
lines = []
from writeback_rag.backends import get_embedder
from writeback_rag.eval import load_beir
from writeback_rag.text import index_text
data = load_beir(os.path.join(DATA, "squad"), "train")
docs = data["corpus"]; ids = [d["id"] for d in docs]; pos = {d: i for i, d in enumerate(ids)}
texts = [index_text(d["title"], d["text"]) for d in docs]
exs = [e for e in data["examples"] if e["relevant"] and e["relevant"][0] in pos]
held = lambda q: int(hashlib.sha1(q.encode()).hexdigest(), 16) % 5 == 0
fit = [e for e in exs if not held(e["query"])]; ev = [e for e in exs if held(e["query"])]
print("fit", len(fit), "eval", len(ev), flush=True)
e = get_embedder({"name": "minilm"}); m = e.model
torch.set_num_threads(2)
torch.manual_seed(0)  # dropout: the same run twice gives the same figures
def evaluate(tag):
    m.eval()
    with torch.no_grad():
        D = m.encode(texts, batch_size=16, normalize_embeddings=True)
        Q = m.encode([x["query"] for x in ev], batch_size=64, normalize_embeddings=True)
    S = Q @ D.T
    top = np.argsort(-S, axis=1)[:, :10]
    gold = np.array([pos[x["relevant"][0]] for x in ev])
    r1 = (top[:, 0] == gold).mean(); r5 = (top[:, :5] == gold[:, None]).any(1).mean()
    rr = [(1 / (list(t).index(g) + 1)) if g in t else 0 for t, g in zip(top, gold)]
    ar5 = np.mean([any(any(a.lower() in texts[j].lower() for a in x["answers"]) for j in t[:5]) for t, x in zip(top, ev)])
    print(f"{tag}: R@1 {r1:.4f} R@5 {r5:.4f} MRR@10 {np.mean(rr):.4f} answer-recall@5 {ar5:.4f}", flush=True)
    lines.append(f"| {tag} | {r1:.4f} | {r5:.4f} | {np.mean(rr):.4f} | {ar5:.4f} |")
def vectors(batch):
    """Normalised embeddings with gradients (sentence-transformers 6 names its tokenizer call preprocess)."""
    features = (m.preprocess if hasattr(m, "preprocess") else m.tokenize)(batch)
    return torch.nn.functional.normalize(m(features)["sentence_embedding"], dim=-1)
evaluate("base")
m.train()
opt = torch.optim.AdamW(m.parameters(), lr=2e-5)
rng = random.Random(0); order = fit[:]; rng.shuffle(order)
bs = 16; t0 = time.time()
for s in range(0, len(order) - bs + 1, bs):
    batch = order[s:s + bs]
    q = vectors([b["query"] for b in batch])
    p = vectors([texts[pos[b["relevant"][0]]] for b in batch])
    same = torch.tensor([[a["relevant"][0] == b["relevant"][0] for b in batch] for a in batch])
    logits = (q @ p.T * 20).masked_fill(same & ~torch.eye(len(batch), dtype=torch.bool), -1e4)  # no false negatives
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(batch)))
    opt.zero_grad(); loss.backward(); opt.step()
    if (s // bs) % 50 == 0:
        print(f"step {s // bs} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
epoch_s = time.time() - t0
print(f"epoch {epoch_s:.0f}s", flush=True)
evaluate("fine-tuned 1 epoch")
write_result("\n".join(["# Probe: fine-tuning the embedder on SQuAD train pairs (dense, held-out train questions)", "",
                        f"Command: `{command_line()}`", "",
                        f"{len(fit)} pairs to fit, {len(ev)} held-out train questions, {len(docs)} paragraphs; one "
                        f"epoch took {epoch_s:.0f} s on this machine's 2 cores.", "",
                        "| model | R@1 | R@5 | MRR@10 | answer-recall@5 |", "|---|---|---|---|---|"] + lines) + "\n", a.out)
