"""Decoding-time composition of models (EFT, proxy-tuning): next-token scores ``sum_i c_i log p_i``.

A :class:`Composition` holds terms, each a causal LM folder (``config.json``, safetensors weights, a tokenizer)
with an optional adapter attached unmerged and a coefficient ``c_i``. Its scores for a batch are
``sum_i c_i * log_softmax(logits_i)`` at the last position, in float32; proxy-tuning / EFT is
``log p_large + beta * (log p_small_tuned - log p_small_base)`` (:func:`eft_terms`).

The proxy-tuning authors' code (``modeling/dexperts.py``) adds raw logits instead,
``l_large + alpha * (l_tuned - l_base)``. Each ``log_softmax`` differs from its logits by a constant per row
(its logsumexp), so the two scores differ by ``sum_i c_i logsumexp_i``, a constant per row: softmax, greedy
choice, temperature and top-p give the same tokens; only processors that act on raw values (a repetition
penalty) could tell them apart. Like that code, the composition keeps the first ``V`` logits of each model, ``V`` the
tokenizer's size (a model may pad its output layer), and refuses models whose tokenizers differ.

:class:`CompositionProcessor` plugs a composition into ``transformers``' ``generate`` as a ``LogitsProcessor``:
the generating model's own scores are replaced by the composition's (each term runs with its own KV cache).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BaseMismatchError, MissingFileError, UnsupportedError
from ..format.adapter import load
from ..format.fingerprint import fingerprint_checkpoint
from .apply import attach

try:
    from transformers import LogitsProcessor
except ImportError:  # the 'transformers' extra is missing: Composition refuses to load
    LogitsProcessor = object


@dataclass(frozen=True)
class Term:
    """One term of a composition: a causal LM folder, an optional adapter applied to it, a coefficient."""

    model: str | os.PathLike[str]
    coefficient: float = 1.0
    adapter: str | os.PathLike[str] | None = None


def eft_terms(large: str | os.PathLike[str], small_base: str | os.PathLike[str], *, beta: float,
              small_tuned: str | os.PathLike[str] | None = None,
              adapter: str | os.PathLike[str] | None = None) -> list[Term]:
    """EFT / proxy-tuning: ``log p_large + beta * (log p_small_tuned - log p_small_base)``; the tuned small model
    is a folder (``small_tuned``) or the small base with ``adapter``."""
    if (small_tuned is None) == (adapter is None):
        raise ValueError("give exactly one of small_tuned and adapter")
    tuned = Term(small_tuned or small_base, beta, adapter)
    return [Term(large, 1.0), tuned, Term(small_base, -beta)]


def _vocab_digest(tokenizer: Any) -> str:
    specials = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}
    text = json.dumps([sorted(tokenizer.get_vocab().items()), specials])
    return hashlib.sha256(text.encode()).hexdigest()


def _first_difference(a: Any, b: Any) -> str:
    va, vb = a.get_vocab(), b.get_vocab()
    for tok in sorted(set(va) | set(vb)):
        if va.get(tok) != vb.get(tok):
            return f"token {tok!r} has id {va.get(tok)} there and {vb.get(tok)} in the first term's"
    for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        if getattr(a, k, None) != getattr(b, k, None):
            return f"{k} is {getattr(a, k, None)} there and {getattr(b, k, None)} in the first term's"
    return "the vocabularies differ"


@dataclass(frozen=True)
class Sampling:
    """How ``Composition.generate`` samples: temperature > 0, top_k (0 = all tokens), top_p in (0, 1], and the
    seed of the random draws (the same seed gives the same tokens)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Run with torch's global generators seeded (``generate`` draws from the one of the model's device),
    restoring their states (CPU and every CUDA device) after."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        torch.manual_seed(seed)
        yield


class Composition:
    """Loaded terms with one shared vocabulary; see the module docstring."""

    def __init__(self, terms: Sequence[Term], *, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> None:
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise UnsupportedError("a composition loads transformers models: install the 'transformers' extra") from None
        if not terms:
            raise ValueError("a composition needs at least one term")
        self.terms = list(terms)
        self.models: list[nn.Module] = []
        self.tokenizer: Any = None
        for term in self.terms:  # every tokenizer is checked before any weights are read
            path = Path(term.model)
            if not (path / "config.json").is_file():
                raise MissingFileError("not a model folder (no config.json)", path=path)
            tok = AutoTokenizer.from_pretrained(path)
            if self.tokenizer is None:
                self.tokenizer, self.digest = tok, _vocab_digest(tok)
            elif _vocab_digest(tok) != self.digest:
                raise BaseMismatchError(f"tokenizer differs from {self.terms[0].model}'s: "
                                        f"{_first_difference(tok, self.tokenizer)}", path=path)
        loaded: dict[str, nn.Module] = {}
        for term in self.terms:
            path = Path(term.model)
            key = str(path.resolve())
            if term.adapter is None and key in loaded:
                model = loaded[key]  # the same plain model in two terms is run once per step
            else:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
                if term.adapter is not None:
                    attach(model, load(term.adapter))
                else:
                    loaded[key] = model
            out = model.get_output_embeddings()
            if out is None or out.weight.shape[0] < len(self.tokenizer):
                raise BaseMismatchError(f"the model's output layer has {None if out is None else out.weight.shape[0]} "
                                        f"rows, fewer than the tokenizer's {len(self.tokenizer)} tokens", path=path)
            self.models.append(model)
        self.vocab = len(self.tokenizer)

    def record(self) -> dict[str, Any]:
        """The composition as data: each term's model path and fingerprint, adapter, coefficient; the vocabulary."""
        return {"terms": [{"model": str(t.model), "fingerprint": fingerprint_checkpoint(t.model, values=False),
                           "adapter": None if t.adapter is None else str(t.adapter), "coefficient": t.coefficient}
                          for t in self.terms],
                "vocabulary": {"size": self.vocab, "sha256": self.digest}}

    def _term_scores(self, model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, past: Any = None,
                     seen: int = 0) -> tuple[torch.Tensor, Any]:
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids[:, seen:], attention_mask=mask, position_ids=positions[:, seen:],
                    cache=past, use_cache=True, logits_to_keep=1)
        return torch.log_softmax(out.logits[:, -1, : self.vocab].float(), dim=-1), out.cache

    def _combine(self, scores: list[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros_like(scores[0])
        for term, s in zip(self.terms, scores, strict=True):
            total += float(term.coefficient) * s
        return total

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[batch, V]`` float32: ``sum_i c_i log p_i(next token | input_ids)`` (left padding masked out)."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        cache: dict[int, torch.Tensor] = {}
        scores = []
        for model in self.models:
            if id(model) not in cache:
                cache[id(model)] = self._term_scores(model, input_ids, mask)[0]
            scores.append(cache[id(model)])
        return self._combine(scores)

    def with_coefficients(self, coefficients: Sequence[float]) -> Composition:
        """The same loaded models with new coefficients (a beta sweep loads each model once)."""
        if len(coefficients) != len(self.terms):
            raise ValueError(f"{len(coefficients)} coefficients for {len(self.terms)} terms")
        out = copy.copy(self)
        out.terms = [replace(t, coefficient=float(c)) for t, c in zip(self.terms, coefficients, strict=True)]
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, *, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                 stop_at_eos: bool = True, sample: Sampling | None = None) -> torch.Tensor:
        """Decoding on the composed scores: the first term's model drives ``generate`` and its own scores are
        replaced by the composition's. Greedy by default; with ``sample``, tokens are drawn from
        softmax(composed / temperature) after top-k and top-p (applied in that order, after the composition),
        from a generator seeded by ``sample.seed``. Returns the prompt and the new tokens."""
        eos = self.tokenizer.eos_token_id if stop_at_eos else None
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        options: dict[str, Any] = {"do_sample": False}
        if sample is not None:  # every warper given explicitly: the driving model's own defaults play no part
            options = {"do_sample": True, "temperature": sample.temperature, "top_k": sample.top_k,
                       "top_p": sample.top_p, "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0,
                       "eta_cutoff": 0.0}
        with _seeded(None if sample is None else sample.seed):
            return self.models[0].generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                           logits_processor=[self.processor(attention_mask)], eos_token_id=eos,
                                           pad_token_id=pad, **options)

    def processor(self, attention_mask: torch.Tensor | None = None,
                  on_step: Callable[[], None] | None = None) -> CompositionProcessor:
        """A ``LogitsProcessor`` for ``generate`` on a prompt with this ``attention_mask`` (None: no padding)."""
        return CompositionProcessor(self, attention_mask, on_step)


class CompositionProcessor(LogitsProcessor):
    """Replaces the generating model's scores by the composition's; columns past the vocabulary get -inf.

    Each term keeps a KV cache across the steps of one ``generate`` call; a call whose sequence does not
    extend the previous one starts the caches afresh."""

    def __init__(self, composition: Composition, attention_mask: torch.Tensor | None = None,
                 on_step: Callable[[], None] | None = None) -> None:
        self.composition, self.prompt_mask, self.on_step = composition, attention_mask, on_step
        self.caches: dict[int, Any] = {}
        self.seen = 0
        self.prefix: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        c = self.composition
        n = input_ids.shape[1]
        if self.prefix is None or n <= self.seen or not torch.equal(input_ids[:, : self.seen], self.prefix):
            self.caches, self.seen = {}, 0
        mask = torch.ones_like(input_ids)
        if self.prompt_mask is not None:
            mask[:, : self.prompt_mask.shape[1]] = self.prompt_mask.to(mask.device)
        done: dict[int, torch.Tensor] = {}
        for model in c.models:
            key = id(model)
            if key not in done:
                done[key], self.caches[key] = c._term_scores(model, input_ids, mask, self.caches.get(key), self.seen)
        self.seen, self.prefix = n, input_ids.clone()
        composed = c._combine([done[id(m)] for m in c.models])
        out = torch.full(scores.shape, float("-inf"), dtype=torch.float32, device=scores.device)
        out[:, : c.vocab] = composed.to(scores.device)
        if self.on_step is not None:
            self.on_step()
        return out


def compose(terms: Sequence[Term] | Composition, input_ids: torch.Tensor,
            attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token scores ``[batch, V]`` of a composition (built from ``terms`` when given a list)."""
    comp = terms if isinstance(terms, Composition) else Composition(terms)
    return comp.logits(input_ids, attention_mask)


__all__ = ["Term", "Sampling", "Composition", "CompositionProcessor", "compose", "eft_terms"]
