"""Active-learning acquisition: which records of an unlabelled pool to label next, by STAR's dynamic uncertainty
(Zhang, Wu, Zhou, Xu, ACL Findings 2024, arXiv 2403.01165; reference code callanwu/STAR ``src/al_methods.py``,
``src/finetuning.py``). The training half of STAR is the ``star`` method (constraint LoRA).

STAR's loop: label an initial subset; at iteration ``i`` train a LoRA from scratch on the labelled set, score the
rest of the pool, label the top ``n``; repeat. :func:`acquire` is one scoring step. A record is a JSONL object
with string ``prompt`` and ``completion`` (the reference's question and answer); its uncertainty is read with the
completion teacher-forced after the prompt, batched (one forward pass per batch, right padding):

- ``pe`` (predictive entropy, the reference's ``PE_get_value``): the sum over the completion's tokens of
  ``-log p(token)``;
- ``entropy`` (``Entropy_get_value``): the sum over the same positions of the entropy of the next-token
  distribution.

Dynamic (``STAR``, ``*_dynamic_get_value``): ``score = w * mean_k U_k + (1 - w) * norm(U_base)`` with ``w =
weight_step * (iteration + 1)`` (the reference: 0.1, iteration 0 the model trained on the initial subset),
``U_k`` the current model's uncertainty in Monte-Carlo pass ``k`` of ``mc_passes``, ``U_base`` the base model's
(the bare base, no adapter) min-max normalised over the *whole* pool, labelled records included (the reference's
``_value_all`` file). ``U_k`` itself is not normalised, as in the reference. Static (the reference's plain
``PE`` / ``Entropy`` acquisition): ``score = U`` of the current model, one pass, no dropout. Either way the
candidates' scores are min-max normalised (all 0 when they are equal) and the ``n`` highest are taken, ties in
pool order (the reference's stable ``sorted(..., reverse=True)``).

Differences from the reference, on purpose:

- **Monte-Carlo dropout is active.** The reference's three passes run after its evaluation loop left the model
  in ``eval()`` mode, so PEFT's LoRA dropout is off and the passes are identical; the paper says MC dropout.
  Here the adapter is attached with ``attach(dropout=p)`` (``p`` default: the adapter's recorded ``dropout``), so
  each pass drops the LoRA inputs, as in training; the base model's own dropout stays off (eval mode). ``dropout
  0`` gives the reference's score (its passes are identical).
- **Entropy is computed from log-probabilities.** The reference's dynamic entropy clips probabilities at 1e-6
  before ``-p log p`` (a guard against numpy's ``0 * log 0``), which adds up to ``1.4e-5`` nats per clipped
  vocabulary entry; here ``-sum p log p`` is exact and needs no guard (its static entropy has no clip either).
- **Base scores are recomputed** at every call (one forward pass over the pool with the adapter not yet
  attached), not read from a file written at iteration 0; the result is the same for the same base.
- Tokenization: prompt with the tokenizer's special tokens, completion without, no EOS (the reference's
  ``tokenizer(question + answer)`` on a Llama tokenizer: BOS, no EOS); cut to ``max_length``.
- Records are identified by ``(prompt, completion)`` (the reference: by question); every labelled record must be
  in the pool, and its duplicates there are labelled with it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterError, FormatError
from ..format.adapter import Adapter, load
from ..format.atomic import atomic_file, check_output
from .apply import attach
from .trainer import IGNORE, Example, Tokenizer, collate, jsonl_records, load_base, load_tokenizer

MEASURES = ("pe", "entropy")
PathLike = str | os.PathLike[str]
Progress = Callable[[int, int], None]
"""``progress(done, total)``: forward batches done of all this call runs."""


@dataclass(frozen=True)
class PoolRecord:
    """One JSONL line of a pool: where it is (file and line, for errors), its line number (1-based), its text as
    written, its prompt and completion."""

    where: str
    number: int
    line: str
    prompt: str
    completion: str


@dataclass
class Acquisition:
    """A scoring step's result: ``selected`` pool indices (0-based, best first) with their normalised
    ``scores``; ``candidates`` the number of unlabelled records scored; ``weight`` the current model's weight ``w``
    (``None`` for static scoring); ``records`` the whole pool, which ``selected`` indexes."""

    selected: list[int]
    scores: list[float]
    candidates: int
    weight: float | None
    records: list[PoolRecord]


def read_pool(path: Path, what: str = "pool file") -> list[PoolRecord]:
    """The records of a JSONL file, each an object with string ``prompt`` and ``completion`` (one
    ``FormatError`` naming the line otherwise; ``what`` names the file when it is missing)."""
    out = []
    for where, n, line, rec in jsonl_records(path, what):
        if not all(isinstance(rec.get(k), str) for k in ("prompt", "completion")):
            raise FormatError("a record needs string 'prompt' and 'completion' fields", path=where)
        out.append(PoolRecord(where, n, line, rec["prompt"], rec["completion"]))
    if not out:
        raise FormatError("no records", path=path)
    return out


def encode(records: Sequence[PoolRecord], tokenizer: Tokenizer, max_length: int) -> list[Example]:
    """Token ids (prompt, then completion) with the loss from the completion's first token."""
    out = []
    for r in records:
        prompt = tokenizer.encode(r.prompt, first=True, where=r.where)
        ids = (prompt + tokenizer.encode(r.completion, first=False, where=r.where))[:max_length]
        if len(ids) <= max(len(prompt), 1):
            raise FormatError(f"no completion token within max_length {max_length} (an empty completion, or the "
                              "prompt fills it)", path=r.where)
        out.append(Example(tuple(ids), max(len(prompt), 1)))
    return out


@torch.no_grad()
def answer_uncertainty(model: nn.Module, examples: Sequence[Example], *, measure: str, pad_id: int = 0,
                       batch_size: int = 8, progress: Callable[[], None] | None = None) -> torch.Tensor:
    """Per example (float64 ``[N]``), the sum over its completion's positions of ``-log p(token)`` (``pe``) or
    of the next-token distribution's entropy (``entropy``), teacher-forced, ``batch_size`` examples per forward
    pass. ``progress()`` is called after each pass."""
    if measure not in MEASURES:
        raise AdapterError(f"measure {measure!r} is not one of {', '.join(MEASURES)}")
    if batch_size < 1:
        raise AdapterError(f"batch_size {batch_size} must be at least 1")
    device = next(model.parameters()).device
    out = [torch.zeros(0, dtype=torch.float64)]  # no examples: no scores
    for i in range(0, len(examples), batch_size):
        ids, labels = (t.to(device) for t in collate(examples[i:i + batch_size], pad_id))
        logits = model(ids)
        logits = getattr(logits, "logits", logits)[:, -ids.shape[1]:-1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        target = labels[:, 1:]
        keep = target != IGNORE
        if measure == "pe":
            u = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        else:
            u = -(logp.exp() * logp).sum(-1)
        out.append((u.double() * keep).sum(1).cpu())
        if progress is not None:
            progress()
    return torch.cat(out)


def minmax(x: torch.Tensor) -> torch.Tensor:
    """``(x - min) / (max - min)``; all zeros when ``x`` is constant (the reference divides by zero there)."""
    if not x.numel():
        return x
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


def star_scores(current: torch.Tensor, base: torch.Tensor | None = None, weight: float = 1.0) -> torch.Tensor:
    """Normalised acquisition scores of the candidates: ``current`` ``[passes, M]`` the current model's
    uncertainty per pass, ``base`` ``[M]`` the base model's normalised over the pool (``None``: static, the mean
    of ``current`` alone); see the module docstring."""
    mean = current.mean(0)
    return minmax(mean if base is None else weight * mean + (1 - weight) * base)


def top(scores: torch.Tensor, n: int) -> list[int]:
    """Indices of the ``n`` highest scores, best first, ties in index order."""
    return torch.argsort(-scores, stable=True)[:n].tolist()


def acquire(pool: PathLike, *, n: int, base: PathLike | None = None, adapter: PathLike | Adapter | None = None,
            labelled: PathLike | None = None, iteration: int = 0, measure: str = "pe", dynamic: bool = True,
            mc_passes: int = 3, dropout: float | None = None, weight_step: float = 0.1, batch_size: int = 8,
            max_length: int = 512, seed: int = 0, out: PathLike | None = None, overwrite: bool = False,
            device: str | torch.device | None = None, progress: Progress | None = None) -> Acquisition:
    """Score the pool's records not in ``labelled`` with ``base`` (a model folder, or the tiny model) and
    ``adapter`` attached (the model trained at ``iteration``; ``None``: the bare base), pick the ``n`` most
    uncertain, and write them (their JSONL lines as given, best first) atomically to ``out``. See the module
    docstring for the measures, ``dynamic`` and Monte-Carlo dropout (``mc_passes``, ``dropout``). ``device``: where
    the forward passes run (default: CUDA when available, else the CPU)."""
    if measure not in MEASURES:
        raise AdapterError(f"measure {measure!r} is not one of {', '.join(MEASURES)}")
    if n < 1 or mc_passes < 1 or iteration < 0 or batch_size < 1:
        raise AdapterError("n, mc_passes and batch_size must be at least 1 and iteration at least 0")
    weight = weight_step * (iteration + 1) if dynamic else None
    if weight is not None and not 0 < weight <= 1:
        raise AdapterError(f"iteration {iteration}: the current model's weight {weight_step} * ({iteration} + 1) = "
                           f"{weight:g} is outside (0, 1]; pass a weight_step in (0, {1 / (iteration + 1):g}]")
    if dropout is not None and not 0 <= dropout < 1:
        raise AdapterError(f"dropout {dropout} is outside [0, 1)")
    if out is not None:
        check_output(out, overwrite)
    records = read_pool(Path(pool))
    index: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(records):
        index.setdefault((r.prompt, r.completion), []).append(i)
    done: set[int] = set()
    for r in read_pool(Path(labelled), "labelled file") if labelled is not None else []:
        if (r.prompt, r.completion) not in index:
            raise FormatError(f"this labelled record is not in the pool {pool}", path=r.where)
        done.update(index[(r.prompt, r.completion)])
    candidates = [i for i in range(len(records)) if i not in done]
    if n > len(candidates):
        raise FormatError(f"n {n} exceeds the {len(candidates)} unlabelled records of the pool", path=pool)
    if adapter is not None and not isinstance(adapter, Adapter):
        adapter = load(adapter)
    passes = mc_passes if dynamic else 1
    p = 0.0 if not dynamic or adapter is None else dropout if dropout is not None else float(
        ((adapter.manifest.get("method") or {}).get("config") or {}).get("dropout", 0.0))

    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise AdapterError(f"device {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AdapterError(f"device {device!r}: no CUDA device is available here")
    folder = Path(base) if base is not None else None
    model, _ = load_base(folder)
    model.to(dev).eval()
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else model.model.embed_tokens
    tokenizer = load_tokenizer(folder, emb.num_embeddings)
    examples = encode(records, tokenizer, max_length)
    mine = [examples[i] for i in candidates]
    steps = -(-len(mine) // batch_size) * passes + (-(-len(examples) // batch_size) if dynamic else 0)
    count = 0

    def tick() -> None:
        nonlocal count
        count += 1
        if progress is not None:
            progress(count, steps)

    kw = {"measure": measure, "pad_id": tokenizer.pad_id, "batch_size": batch_size, "progress": tick}
    base_u = minmax(answer_uncertainty(model, examples, **kw))[candidates] if dynamic else None
    if adapter is not None:
        attach(model, adapter, dropout=p)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        current = torch.stack([answer_uncertainty(model, mine, **kw) for _ in range(passes)])
    scores = star_scores(current, base_u, weight or 1.0)
    best = top(scores, n)
    result = Acquisition([candidates[i] for i in best], [float(scores[i]) for i in best], len(candidates), weight,
                         records)
    if out is not None:
        with atomic_file(out, overwrite=overwrite) as f:
            f.write("".join(records[i].line + "\n" for i in result.selected).encode("utf-8"))
    return result
