"""A cross-encoder learned from feedback: the embedder's own transformer, given a question and a passage
together, scores how well the passage answers it. The embedder reads them apart (one vector each), so it
cannot see whether the question's words meet in one sentence of the passage or what the question asks of
them; reading both at once can. No second model is downloaded: write-back copies the embedder's weights
and fine-tunes them on the feedback's questions (each relevant passage against passages the hybrid ranker
put near it), within a bounded number of questions, so a night's cost grows with feedback, not with the
corpus. Hybrid search scores its ranker's top TOP candidates with it, and the ranker weighs that score
beside its other features (ranking.py). Measured: eval/results/probe-cross-encoder.md and
cross-encoder/eval-squad.md.

Only the weights that training changes are stored (the word embeddings stay the embedder's), in bfloat16:
about 22 MB for MiniLM, in the tuning's row, so a rollback brings back the one before."""

import copy
import io
import random

import numpy as np

TOP = 20         # candidates a search scores with it (its ranker's best; 20 over 10: probe-cross-encoder.md)
MAX_TOKENS = 224  # question + passage, truncated from the passage's end
NEGATIVES = 3     # non-relevant passages each training question is contrasted with
POOL = 15         # ... drawn from the ranker's best POOL candidates
FROZEN = "embeddings.word_embeddings."  # not trained, not stored


def transformer_of(embedder):
    """(transformer, tokenizer) of a sentence-transformers embedder (possibly wrapped in a cache), or None
    for an embedder without one (the hashing embedder): such a KB learns no cross-encoder."""
    inner = getattr(embedder, "inner", embedder)
    model = getattr(inner, "model", None)
    try:
        first = model[0]
        return first.auto_model, first.tokenizer
    except (TypeError, IndexError, KeyError, AttributeError):
        return None


class CrossEncoder:
    """A copy of the embedder's transformer with a linear score on its first token."""

    def __init__(self, embedder, state=None):
        import torch

        found = transformer_of(embedder)
        if found is None:
            raise ValueError("this embedder has no transformer to make a cross-encoder of")
        model, self.tokenizer = found
        self.model = copy.deepcopy(model).float().eval()
        gen = torch.Generator().manual_seed(0)
        self.head = torch.nn.Linear(self.model.config.hidden_size, 1)
        with torch.no_grad():  # a fixed start: the same feedback trains the same model
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=gen) * 0.02)
            self.head.bias.zero_()
        from .backends import cpu_has_bf16

        self.bf16 = cpu_has_bf16()
        if state is not None:
            self.load_bytes(state)

    def _forward(self, query, passages):
        import torch

        x = self.tokenizer([query] * len(passages), [_text(p) for p in passages], truncation="only_second",
                           max_length=MAX_TOKENS, padding=True, return_tensors="pt")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self.head(self.model(**x).last_hidden_state[:, 0]).squeeze(-1).float()

    def scores(self, query, passages):
        """Scores of (title, text) passages for the question, higher is better (float64 array)."""
        import torch

        if not passages:
            return np.zeros(0)
        from .backends import _batch_threads

        threads = _batch_threads()
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        with torch.inference_mode():
            return self._forward(query, passages).numpy().astype(np.float64)

    def train(self, examples, lr=3e-5, accumulate=4, seed=0):
        """One pass over [(question, relevant passage, [non-relevant passages])]: a softmax over each
        question's passages puts the relevant one first (AdamW; word embeddings kept as they are)."""
        import torch

        torch.manual_seed(seed)
        for name, p in self.model.named_parameters():
            p.requires_grad_(not name.startswith(FROZEN))
        params = [p for p in self.model.parameters() if p.requires_grad] + list(self.head.parameters())
        opt = torch.optim.AdamW(params, lr=lr)
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        self.model.train()
        try:
            for n, j in enumerate(order):
                query, pos, negs = examples[j]
                s = self._forward(query, [pos] + list(negs))
                (-torch.log_softmax(s, 0)[0] / accumulate).backward()
                if n % accumulate == accumulate - 1 or n == len(order) - 1:
                    opt.step()
                    opt.zero_grad()
        finally:
            self.model.eval()
        return self

    def to_bytes(self):
        """The trained weights (all but the word embeddings) and the head, bfloat16, as torch.save bytes."""
        import torch

        state = {k: v.to(torch.bfloat16) for k, v in self.model.state_dict().items() if not k.startswith(FROZEN)}
        state.update({"head." + k: v.to(torch.bfloat16) for k, v in self.head.state_dict().items()})
        buf = io.BytesIO()
        torch.save(state, buf)
        return buf.getvalue()

    def load_bytes(self, blob):
        import torch

        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        head = {k[len("head."):]: v.float() for k, v in state.items() if k.startswith("head.")}
        body = {k: v.float() for k, v in state.items() if not k.startswith("head.")}
        missing, unexpected = self.model.load_state_dict(body, strict=False)
        if unexpected or any(not k.startswith(FROZEN) for k in missing):
            raise ValueError("stored cross-encoder weights do not fit this embedder's transformer")
        self.head.load_state_dict(head)


def scorer(model, records, query):
    """score(chunk ids) -> the model's scores of those chunks' passages (read from `records`) for `query`."""
    def score(ids):
        texts = records.passages(ids)
        return model.scores(query, [texts.get(c, ("", "")) for c in ids])
    return score


def _text(passage):
    title, text = passage
    return f"{title}. {text}" if title else text


class Stored:
    """A tuning's cross-encoder: as stored (bytes), made into a model on first use with the KB's embedder
    (kept: a search must not rebuild it); or a model just trained, made into bytes when stored."""

    def __init__(self, blob=None, model=None):
        self._blob, self._model = blob, model
        self._unusable = False  # tried and failed: not tried again on every search

    @property
    def blob(self):
        if self._blob is None:
            self._blob = self._model.to_bytes()
        return self._blob

    def get(self, embedder):
        """The model, or None where the embedder has no transformer or the bytes do not load into it (the
        ranker then ranks without it: a search never fails for its reranker's sake)."""
        if self._model is None and not self._unusable:
            try:
                self._model = CrossEncoder(embedder, self.blob) if transformer_of(embedder) is not None else None
            except Exception:  # torch.load and load_state_dict raise several kinds for bytes that do not fit
                self._model = None
            self._unusable = self._model is None
        return self._model
