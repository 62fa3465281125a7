"""The KB's config.toml: read with tomllib, written by a tiny writer for flat tables."""

import copy
import os
import tomllib

from .errors import InputError

DEFAULTS = {
    "embedder": {"name": "minilm"},
    "chunking": {"size": 200, "overlap": 40},
    "bm25": {"k1": 1.2, "b": 0.75},
    "dense": {"index": "flat", "hnsw_m": 32},
    "retrieval": {"mode": "hybrid", "fusion": "rrf", "rrf_k": 60, "dense_weight": 0.5, "candidates": 100,
                  # how units compete with documents, chosen on train data: eval/results/choose-unit-use.md
                  "max_units": 1, "unit_fusion": "joint"},
    "ingest": {"id_field": "id", "title_field": "title", "text_field": "text", "max_doc_mb": 50.0},
    "llm": {"backend": ""},
    "writeback": {
        "k": 5, "utility_margin": 0.01, "utility_min": 0.10, "doc_margin": 0.01, "fallback_docs": 2,
        "distiller": "extractive", "budget_tokens": 128, "include_query": True, "min_support": 1,
        "retire_after_wrong": 1, "faithfulness": 0.6, "max_evidence": 8, "batch": 64,
    },
}


def merged(overrides=None):
    cfg = copy.deepcopy(DEFAULTS)
    for section, values in (overrides or {}).items():
        if not isinstance(values, dict):
            raise InputError(f"config section [{section}] must be a table")
        cfg.setdefault(section, {}).update(values)
    return cfg


def load(path):
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: invalid TOML ({e}); fix or delete the line") from None
    return merged(data)


def _value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def dump(cfg, path):
    """Write atomically: a crash never leaves a half-written config."""
    lines = ["# writeback-rag knowledge base settings; see README for each key."]
    for section, values in cfg.items():
        lines.append(f"\n[{section}]")
        lines += [f"{k} = {_value(v)}" for k, v in values.items()]
    tmp = str(path) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
