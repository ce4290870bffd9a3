"""``adapter train``: train any method that has a ``train`` verb on a text dataset, on Hugging Face Accelerate.

:func:`train_adapter` loads a base (a local transformers causal-LM folder, or the tiny model of
:mod:`adapterfmt.tiny`), reads the data (JSONL lines with ``text``, or ``prompt`` + ``completion`` with the
loss on the completion only; or a folder saved by ``datasets``, when that package is installed), calls the
method's ``train`` verb, and runs the loop. Accelerate supplies the device, mixed precision and the processes of
a data-parallel run: run it under ``accelerate launch`` (or ``adapter train --processes N``).

Data parallelism is Accelerate's process group without DDP's wrapper: after each backward pass the trainable
parameters' gradients are averaged over the processes by hand (:func:`all_reduce_gradients`, in buckets), and the
trainable parameters are broadcast from the main process once at the start. DDP fixes the parameters it reduces,
and their buckets, when it wraps the model, while sessions change them as they train (TriAdaptLoRA's rank growth
adds blocks, DiffoRA's selection drops modules); rewrapping after each change would broadcast the whole base
again. Every process takes the same decisions because they are functions of the averaged gradients, the
parameters and the step, all equal across processes (a schedule that draws random numbers draws them from a
generator of its own, not the dropout stream, which differs per process). Adapter gradients are small, so reducing
them after the backward pass costs little of what DDP's overlap would save.

``fsdp`` (CLI ``--fsdp``) shards the frozen base's weights over the processes with PyTorch's FSDP2
(``fully_shard``: one unit per decoder layer and the rest at the root, :func:`shard_base`), after the method's
``train`` verb has read the whole base (initialisation, calibration): each process holds a ``1/P`` shard and
gathers one unit's weights for its forward and backward passes. The adapter's parameters stay whole on every
process (FSDP's ``ignored_params``), averaged as above, so checkpoints and the final adapter are written from full
tensors and the run computes what an unsharded one does. A delta's forward that reads ``module.weight`` (DoRA,
rotations) runs inside its unit's forward and sees the gathered weight. Sessions whose parameters or trained
modules change while training (an ``on_step`` schedule, skipped gradients: :attr:`TrainSession.static`) and bases
quantised by bitsandbytes are refused. Accelerate's own FSDP plugin is not used: it shards the model it
prepares, adapter included (on a GPU), and on the CPU Accelerate ignores it; an ``accelerate launch --use_fsdp``
run is refused, naming ``--fsdp``. Memory: each process still loads the whole base first, so the peak of loading
is unchanged; sharding then frees half the base (two processes; glibc's heap trimmed, :func:`trim_heap`), and a
step gathers a unit at a time (about three units' size in transient buffers), so the training peak drops only
where the base is large against a few layers (``benchmarks/fsdp_memory.py``).

What makes runs reproducible and comparable:

- ``batch_size`` is the *global* batch: each optimizer step takes the next ``batch_size`` examples of one
  stream (epoch ``e`` is a permutation of the examples seeded by ``(seed, e)``), and process ``p`` of ``P``
  takes the ``p``-th contiguous ``batch_size / P`` of them. The loss is the sum of token losses over the
  global batch divided by its token count (counted across processes first), so one process and ``P``
  processes take the same steps up to float rounding. Dropout draws differ with the process count. The
  method's regularisation term (:meth:`TrainSession.regularization`: KaSA, SORSA ...) is added to what is
  minimised; the loss reported is the task loss alone. A session with :attr:`TrainSession.tasks` (a mixture's
  experts) gets the records' ``task`` labels as per-token ``task_ids`` there (MeteoRA's gate loss).
- A checkpoint (``<checkpoints>/step-NNNNNNNN/``, written atomically by the main process) holds the adapter
  as trained so far (``adapter.safetensors``), the optimizer and scheduler states, the session's schedule
  state (``schedule.pt``: pruned ranks, ``on_step`` hooks' ``state_dict``, e.g. SpIEL's, IST's, DiffoRA's,
  TriAdaptLoRA's, and trained tensors the adapter does not store, e.g. EPT's reparameterisation:
  ``TrainSession.unstored``), every process's RNG
  states and ``state.json`` (the step, which fixes the data position, the options and the eval losses so
  far; ``inputs``: the sha256 of the data, the eval data, the files the method's config names such as source
  adapters (``Method.file_fields``), the base model's fingerprint and the data's tokens). Resuming rebuilds the
  session with the method's ``train`` verb, loads all of that and continues exactly; options given again must
  equal the recorded ones, and a changed input is refused naming it (``force``: continued with a note, the
  checkpoint's state winning where the method derived it from that input). A session whose schedule state
  cannot be saved (``has_schedule``: an ``on_step`` hook without ``state_dict`` / ``load_state_dict``) is
  refused with checkpoints rather than resumed inexactly; step-determined hooks (``freeze_after``, gradient
  masks) resume exactly.
- Each step runs the session's hooks: ``after_backward`` (frozen deltas, pruned ranks, gradient masks)
  between the backward pass and the optimizer step, ``step`` after it.
- The final adapter records the method's config (``method.config``) and, in its ``provenance`` entry, the
  data's sha256, the steps, the loss, the trainer's options and, with eval data, its sha256 and the eval loss
  at every checkpoint and at the end (``evals``).

Quantised bases (QLoRA): ``quantize`` (``nf4``, ``fp4``: bitsandbytes' 4-bit ``Linear4bit`` with double
quantisation, as QLoRA; ``int8``: LLM.int8()'s ``Linear8bitLt``) loads a transformers base through
``BitsAndBytesConfig``, computing in float32 (``mixed_precision`` fp16 / bf16: in that dtype); a base folder that
transformers saved quantised by bitsandbytes (its ``config.json`` ``quantization_config``) is trained over as
saved, with a note. The adapter's ``base.fingerprint`` is then the quantised model's (the same as that of the
folder transformers would save from it) and its provenance entry says how the base was quantised
(``base_quantization``). Only kinds that compute on a module's dequantised weight train there (the method's
``train`` verb refuses the others); a resumed run rebuilds the quantised base the same way. bitsandbytes' CPU
repacking of 4-bit weights for inference (at an eval-mode forward; block scales rounded to bf16) is turned off, so
the eval loss is that of the weights trained on and training after an evaluation goes on over the same weights.

Memory: on the CPU a run makes glibc map logits-sized buffers apart from its heap (:func:`return_freed_memory`).

Tokenizer: the base folder's own (``transformers.AutoTokenizer``); a folder without tokenizer files (the
tiny model) gets the byte-level fallback :class:`ByteTokenizer` (token id = UTF-8 byte), which refuses text
with bytes outside the model's vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._version import __version__
from ..errors import AdapterNote, FormatError, MissingFileError, OutputExistsError, UnsupportedError
from ..format.adapter import Adapter, load, save
from ..format.atomic import atomic_dir, check_output
from ..format.fingerprint import fingerprint_module
from ..format.jsontext import read_json_object
from ..plugin.registry import get_method
from ..tiny import build_tiny
from .compress import load_live_model
from .train import LAYER_ATTR

IGNORE = -100
"""Label of a position without loss (prompt tokens, padding)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("no", "fp16", "bf16")
ACCELERATE_FSDP = "ACCELERATE_USE_FSDP"
"""Set by ``accelerate launch --use_fsdp`` (see :meth:`Run.prepare`)."""
QUANTIZE = ("nf4", "fp4", "int8")
"""The bitsandbytes formats ``quantize`` loads a base in."""
COMPUTE_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""The dtype a 4-bit base's matmuls compute in, per mixed precision."""
INPUT_LABELS = {"base model": "the base model (its weights' fingerprint)",
                "tokenizer": "the data as the base's tokenizer reads it"}
"""How a refused resumption names an input whose name alone does not say it (see ``Run._check_inputs``)."""
DEFAULTS: dict[str, Any] = {
    "max_steps": 100, "lr": 2e-4, "batch_size": 8, "max_length": 512, "warmup_steps": 0, "schedule": "linear",
    "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 0, "mixed_precision": "no", "calibration_batches": 8,
    "quantize": None,
}
"""Defaults of the :class:`TrainOptions` fields that fix the training trajectory (recorded in checkpoints)."""


@dataclass
class TrainOptions:
    """What :func:`train_adapter` does. Fields left ``None`` take :data:`DEFAULTS`, or, when resuming, the
    values the checkpoint recorded (a value given that differs from the recorded one is refused)."""

    method: str | None = None
    data: Path | None = None
    out: Path | None = None
    base: Path | None = None
    """A local transformers causal-LM folder, or ``None`` for the tiny model (``adapterfmt.tiny``, seed 0)."""
    config: dict[str, Any] | None = None
    """The method's config (its ``config_schema``; unknown keys are refused by the method)."""
    config_dir: Path | None = None
    """Where relative file paths in ``config`` resolve (the method's ``resolve_paths``; the run records them
    absolute): the config file's folder; default the working directory."""
    max_steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    """Examples per optimizer step over all processes."""
    max_length: int | None = None
    warmup_steps: int | None = None
    schedule: str | None = None
    weight_decay: float | None = None
    max_grad_norm: float | None = None
    """Clip the trainable parameters' gradient norm to this (0: no clipping)."""
    seed: int | None = None
    mixed_precision: str | None = None
    """``no``, ``fp16`` or ``bf16`` (Accelerate's autocast)."""
    quantize: str | None = None
    """Load the (transformers) base quantised by bitsandbytes: one of :data:`QUANTIZE` (see the module docstring)."""
    calibration_batches: int | None = None
    """The first global batches, handed to the method's ``train`` verb as ``batches=`` with ``loss_fn=`` (for
    methods that choose modules or entries from gradients, e.g. ``sparse_ft``, ``lt_sft``)."""
    eval_data: Path | None = None
    """Held-out data (same formats): its loss at each checkpoint and at the end (a resumed run: the recorded one)."""
    checkpoint_every: int = 0
    """Write a checkpoint every this many steps (0: none)."""
    checkpoints: Path | None = None
    """Where checkpoints go (default ``<out>.checkpoints``)."""
    resume: Path | None = None
    """A checkpoint folder (``step-N``) or the folder of checkpoints (its latest one is taken)."""
    cpu: bool = False
    """Train on the CPU even when an accelerator is available."""
    fsdp: bool = False
    """Shard the base's weights over the processes (FSDP2; see the module docstring); the adapter is the same."""
    force: bool = False
    """Resume although an input changed since the checkpoint (a note names it) instead of refusing."""
    overwrite: bool = False


@dataclass(frozen=True)
class StepReport:
    """What the progress callback gets after each optimizer step: ``loss`` is the global batch's token mean;
    ``tokens`` (all processes) and ``seconds`` count from the start of this run (or of its resumption);
    ``eval_loss`` is the eval data's token-mean loss at a checkpoint step and at the last step (with eval
    data), else ``None``."""

    step: int
    max_steps: int
    loss: float
    lr: float
    tokens: int
    seconds: float
    eval_loss: float | None = None


@dataclass
class TrainResult:
    """A finished run: ``tokens`` trained on in all (before a resumption too), ``tokens_per_second`` in this run;
    ``evals`` the ``(step, eval loss)`` of every checkpoint and of the end (before a resumption too)."""

    out: Path
    steps: int
    loss: float | None
    eval_loss: float | None
    evals: list[tuple[int, float]]
    tokens: int
    tokens_per_second: float
    seconds: float
    processes: int
    resumed_from: int
    checkpoints: list[Path]
    data_sha256: str


# ----- tokenizers ----------------------------------------------------------------------------------------
class Tokenizer(Protocol):
    eos_id: int | None
    pad_id: int

    def encode(self, text: str, *, first: bool, where: str) -> list[int]:
        """Token ids of ``text``; ``first``: the start of a sequence (special tokens added)."""
        ...


class ByteTokenizer:
    """The fallback for a base without tokenizer files: token id = UTF-8 byte, no special tokens; text with
    a byte at or above the model's vocabulary size is refused (the tiny model's 128 tokens fit ASCII)."""

    eos_id = None
    pad_id = 0

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str, *, first: bool, where: str) -> list[int]:
        ids = list(text.encode("utf-8"))
        bad = next((b for b in ids if b >= self.vocab_size), None)
        if bad is not None:
            raise FormatError(f"byte 0x{bad:02x} is outside the byte-level tokenizer's vocabulary of "
                              f"{self.vocab_size} (the base has no tokenizer files)", path=where)
        return ids


class HFTokenizer:
    """A base folder's transformers tokenizer: special tokens at the start of a sequence, EOS after it."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.eos_id = self.tok.eos_token_id
        self.pad_id = next((i for i in (self.tok.pad_token_id, self.eos_id) if i is not None), 0)

    def encode(self, text: str, *, first: bool, where: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=first)["input_ids"])


def load_tokenizer(base: Path | None, vocab_size: int, *, note: bool = True) -> Tokenizer:
    """The base folder's tokenizer, or :class:`ByteTokenizer` (with a note, if ``note``) when it has no
    tokenizer files."""
    if base is not None and any((base / f).is_file() for f in TOKENIZER_FILES):
        return HFTokenizer(base)
    if note:
        warnings.warn(f"{base or 'the tiny model'} has no tokenizer files: using the byte-level tokenizer "
                      "(token id = UTF-8 byte)", AdapterNote, stacklevel=2)
    return ByteTokenizer(vocab_size)


# ----- data ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """One sequence's token ids; positions before ``loss_from`` carry no loss (a prompt); ``task``: the record's
    optional task label (for methods that supervise routing, :attr:`TrainSession.tasks`)."""

    ids: tuple[int, ...]
    loss_from: int
    task: str | None = None


def _records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for each JSONL line, or each row of a folder saved by ``datasets``."""
    if path.is_dir():
        try:
            import datasets
        except ImportError:
            raise UnsupportedError("reading a folder saved by `datasets` needs the datasets package "
                                   "(pip install datasets); or give a JSONL file", path=path) from None
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise FormatError(f"a DatasetDict without a 'train' split (splits: {', '.join(ds)})", path=path)
            ds = ds["train"]
        for i, row in enumerate(ds):
            yield f"{path}: row {i}", row
        return
    for where, _, _, record in jsonl_records(path, "data file"):
        yield where, record


def jsonl_records(path: Path, what: str) -> Iterator[tuple[str, int, str, dict[str, Any]]]:
    """``(where, line number, line text, record)`` for each non-blank line of a JSONL file of objects; one
    :class:`FormatError` naming the line otherwise (``what`` names the file in the missing-file error)."""
    if not path.is_file():
        raise MissingFileError(f"{what} not found", path=path)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}: line {n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise FormatError(f"not JSON ({e.msg})", path=where) from None
            if not isinstance(record, dict):
                raise FormatError("a JSONL record must be an object", path=where)
            yield where, n, line.rstrip("\n"), record


def read_examples(path: Path, tokenizer: Tokenizer, max_length: int) -> list[Example]:
    """Tokenized examples of a data file: ``text`` (loss on every token) or ``prompt`` + ``completion`` (loss
    on the completion and the EOS after it), cut to ``max_length`` tokens; an optional string ``task`` labels
    the record."""
    out = []
    for where, rec in _records(path):
        if "task" in rec and not isinstance(rec["task"], str):
            raise FormatError("a record's 'task' must be a string", path=where)
        if isinstance(rec.get("text"), str) and not {"prompt", "completion"} & set(rec):
            ids = tokenizer.encode(rec["text"], first=True, where=where)
            loss_from = 1
        elif isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str) and "text" not in rec:
            prompt = tokenizer.encode(rec["prompt"], first=True, where=where)
            ids = prompt + tokenizer.encode(rec["completion"], first=False, where=where)
            loss_from = max(len(prompt), 1)
        else:
            raise FormatError("a record needs a string 'text', or string 'prompt' and 'completion' (not both "
                              "forms)", path=where)
        ids = (ids + ([tokenizer.eos_id] if tokenizer.eos_id is not None else []))[:max_length]
        if len(ids) <= loss_from:
            raise FormatError(f"no token to learn within max_length {max_length} (the prompt fills it, or the "
                              "text is shorter than two tokens)", path=where)
        out.append(Example(tuple(ids), loss_from, rec.get("task")))
    if not out:
        raise FormatError("no examples", path=path)
    return out


def task_ids(examples: Sequence[Example], width: int, tasks: Sequence[str]) -> torch.Tensor:
    """``[B, width]``: each example's task as an index into ``tasks`` at its positions, ``IGNORE`` at padding
    and for examples without a task."""
    out = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        if e.task is not None:
            out[i, : len(e.ids)] = tasks.index(e.task)
    return out


def data_sha256(path: Path) -> str:
    """sha256 of a data file, or of a folder's files (relative names and contents, in name order)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def tokens_sha256(examples: Sequence[Example]) -> str:
    """sha256 of the examples' token ids and loss starts (what the tokenizer made of the data)."""
    h = hashlib.sha256()
    for e in examples:
        h.update(np.array([len(e.ids), e.loss_from, *e.ids], dtype=np.int64).tobytes())
    return h.hexdigest()


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` and ``labels`` ``[B, T]`` padded on the right; labels are ``IGNORE`` where there is no loss."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        labels[i, e.loss_from: len(e.ids)] = ids[i, e.loss_from: len(e.ids)]
    return ids, labels


class Stream:
    """The examples in training order: epoch ``e`` is ``randperm(n)`` seeded by ``(seed, e)``; global batch
    ``s`` is stream positions ``[s * B, (s + 1) * B)``."""

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int) -> None:
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.examples), generator=gen).tolist()}
        return self._orders[epoch]

    def batch(self, step: int, part: int = 0, parts: int = 1) -> list[Example]:
        """Global batch ``step``, or its ``part``-th of ``parts`` contiguous pieces."""
        n, size = len(self.examples), self.batch_size // parts
        start = step * self.batch_size + part * size
        return [self.examples[self._order(i // n)[i % n]] for i in range(start, start + size)]


# ----- model and loss ------------------------------------------------------------------------------------
def load_base(base: Path | None, quantize: str | None = None, compute_dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu", *, note: bool = True) -> tuple[nn.Module, dict[str, Any] | None]:
    """The model to train and, for a base held quantised by bitsandbytes, its :func:`bnb_record`. The tiny model
    (``None``, or a folder ``adapter demo`` saved) or a transformers causal LM loaded by ``from_pretrained``
    (streamed: one copy of the weights in memory), in fp32; ``quantize`` (one of :data:`QUANTIZE`) quantises the
    latter's linear layers on loading (``compute_dtype``: their matmuls' dtype), and a folder saved quantised by
    bitsandbytes loads as saved (with a note, if ``note``)."""
    config = base / "config.json" if base is not None else None
    cfg = read_json_object(config) if config is not None and config.is_file() else {}
    if base is None or cfg.get("model_type") in (None, "adapterfmt-tiny"):
        if quantize is not None:
            raise UnsupportedError(f"--quantize {quantize} loads a transformers base through bitsandbytes; "
                                   f"{base or 'the tiny model'} is not one", path=base)
        return (build_tiny(seed=0) if base is None else load_live_model(base)), None
    try:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    except ImportError:
        raise UnsupportedError("a transformers base model needs the 'transformers' extra", path=base) from None
    saved = cfg.get("quantization_config")
    if saved is None and quantize is None:
        return AutoModelForCausalLM.from_pretrained(base, local_files_only=True).float(), None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UnsupportedError("a base quantised by bitsandbytes needs bitsandbytes (pip install bitsandbytes)",
                               path=base) from None
    kwargs: dict[str, Any] = {}
    if saved is not None:
        if not isinstance(saved, dict) or saved.get("quant_method") != "bitsandbytes":
            method = saved.get("quant_method") if isinstance(saved, dict) else None
            raise UnsupportedError(f"quantization_config.quant_method {method!r}: only bases quantised by "
                                   "bitsandbytes train here", path=config)
        held = bnb_record(saved)["format"]
        if quantize not in (None, held):
            raise FormatError(f"quantization_config: the base is saved quantised as {held}, not {quantize}; leave "
                              "--quantize out", path=config)
        if note:
            warnings.warn(f"{base} is saved quantised by bitsandbytes ({held}, config.json quantization_config): "
                          "training over it as saved", AdapterNote, stacklevel=2)
    elif quantize == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    else:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32,
                                                 device_map={"": device}, **kwargs)
    for module in model.modules():  # eval forwards compute on the weights trained on (see the module docstring)
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return model, bnb_record(model.config.quantization_config.to_dict())


def bnb_record(config: dict[str, Any]) -> dict[str, Any]:
    """What the adapter's provenance says of a base quantised by bitsandbytes, from transformers' quantisation
    config (a ``BitsAndBytesConfig`` as a dict): the format (``nf4``, ``fp4`` or ``int8``) and its settings."""
    import bitsandbytes

    if config.get("load_in_8bit"):
        return {"library": "bitsandbytes", "version": bitsandbytes.__version__, "format": "int8",
                "threshold": config.get("llm_int8_threshold")}
    return {"library": "bitsandbytes", "version": bitsandbytes.__version__,
            "format": config.get("bnb_4bit_quant_type"), "double_quant": config.get("bnb_4bit_use_double_quant"),
            "compute_dtype": str(config.get("bnb_4bit_compute_dtype")).removeprefix("torch.")}


def token_loss_sum(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over the labelled positions (extra leading outputs, as a prompt
    adapter adds, are dropped). The labels are shifted, not the logits: a slice of the ``[B, T, vocab]``
    logits would be copied, and its gradient too (two more logits-sized buffers at the peak)."""
    out = model(ids)
    logits = getattr(out, "logits", out)[:, -ids.shape[1]:]
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    return F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), ignore_index=IGNORE, reduction="sum")


def mean_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Token-mean loss of ``(ids, labels)`` on ``model``'s device: the ``loss_fn`` handed to ``train`` verbs."""
    device = next(model.parameters()).device
    ids, labels = (t.to(device) for t in batch)
    return token_loss_sum(model, ids, labels) / (labels[:, 1:] != IGNORE).sum().clamp(min=1)


def lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """The learning-rate multiplier at each step: linear warmup, then constant, linear or cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        done = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - done)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))
        return 1.0

    return factor


MMAP_THRESHOLD = 16 << 20
"""Host blocks of this many bytes and more are mapped and unmapped one by one (see :func:`return_freed_memory`)."""


def return_freed_memory() -> bool:
    """Have glibc's malloc map blocks of :data:`MMAP_THRESHOLD` bytes and more apart from its heap and give them
    back to the OS when freed (a fixed ``M_MMAP_THRESHOLD``), for this process from now on. By default glibc
    raises that threshold to 32 MiB after the first large free, and the few logits-sized buffers of a step
    (``[batch, length, vocab]``) then leave holes in its heap that later steps fragment: 30-40 MiB more resident
    for ``benchmarks/train.py``'s model. Smaller thresholds return more (1 MiB: every activation buffer) but
    fault each buffer in afresh every step (1.5x the step time there). Returns whether it took effect (False off
    glibc)."""
    mallopt = _glibc("mallopt")
    m_mmap_threshold = -3
    return bool(mallopt and mallopt(m_mmap_threshold, MMAP_THRESHOLD))


def trim_heap() -> bool:
    """Give the free pages of glibc's heap back to the OS (``malloc_trim``): the whole weights that sharding the
    base frees lie there (blocks under :data:`MMAP_THRESHOLD`). Returns whether it released any (False off glibc)."""
    malloc_trim = _glibc("malloc_trim")
    return bool(malloc_trim and malloc_trim(0))


def _glibc(function: str) -> Any:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), function) if name else None
    except (OSError, AttributeError):
        return None


# ----- data parallelism ----------------------------------------------------------------------------------
REDUCE_BUCKET = 25 << 20
"""Bytes of gradients flattened into one all-reduce (DDP's default bucket size)."""


def all_reduce_gradients(params: Sequence[nn.Parameter]) -> None:
    """Average ``params``' gradients over the processes of the default group, in place, as DDP does: a parameter
    without a gradient here gets zeros when another process has one (it stays without one where no process
    has), so every process holds the same gradients and steps the same parameters. Gradients of one dtype and
    device go flattened, :data:`REDUCE_BUCKET` bytes per call."""
    dist = torch.distributed
    world = dist.get_world_size()
    device = params[0].device if params else torch.device("cpu")
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    live = [p for p, h in zip(params, has.tolist(), strict=True) if h]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for p in live:
        groups.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in groups.values():
        for bucket in _buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat /= world
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket]), strict=True):
                g.copy_(part.view_as(g))


def _buckets(grads: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """``grads`` in consecutive runs of about :data:`REDUCE_BUCKET` bytes (one larger tensor alone)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads:
        if bucket and size + g.numel() * g.element_size() > REDUCE_BUCKET:
            yield bucket
            bucket, size = [], 0
        bucket.append(g)
        size += g.numel() * g.element_size()
    if bucket:
        yield bucket


def shard_base(model: nn.Module, keep: Iterable[nn.Parameter], device: torch.device) -> int:
    """Shard ``model``'s parameters other than ``keep`` over the processes of the default group with FSDP2
    (``fully_shard`` on ``device``'s type): one unit per decoder layer (the classes ``model._no_split_modules``
    names, as transformers' models declare them, or else each item of the model's ``nn.ModuleList`` s), innermost
    first, one each for the input embedding and the output head unless they share their weight, and the rest at
    the root. ``keep`` (the adapter's) stay whole on every process. Returns the units' number, the root's included."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    ignored = set(keep)
    names = set(getattr(model, "_no_split_modules", None) or ())
    base = [(path, m) for path, m in model.named_modules() if LAYER_ATTR not in path.split(".")]
    units = ([m for _, m in base if type(m).__name__ in names] if names else
             [item for _, m in base if isinstance(m, nn.ModuleList) for item in m])
    ends = [m for m in (getattr(model, f"get_{end}_embeddings", lambda: None)() for end in ("input", "output"))
            if isinstance(m, nn.Module)]
    if len(ends) < 2 or not {id(p) for p in ends[0].parameters()} & {id(p) for p in ends[1].parameters()}:
        units += [m for m in ends if m not in units]
    for unit in [*reversed(units), model]:
        fully_shard(unit, mesh=mesh, ignored_params=ignored)
    return len(units) + 1


# ----- checkpoints ---------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU and CUDA, Python, NumPy; NumPy's uint32 keys as int64, which
    ``all_gather_object`` can send: torch 2.13 cannot unpickle a uint32 tensor's storage there)."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))


def find_checkpoint(path: Path) -> Path:
    """``path`` if it is a checkpoint, else the latest checkpoint in it."""
    if (path / "state.json").is_file():
        return path
    found = sorted(p for p in path.glob("step-*") if (p / "state.json").is_file()) if path.is_dir() else []
    if not found:
        raise MissingFileError("no checkpoint here (a step-N folder with state.json, or a folder of them)", path=path)
    return found[-1]


def _restore(session: Any, ckpt: Path) -> None:
    """Put the checkpoint adapter's tensors, shapes included, into the session's trainable and frozen roles (a
    pattern the rebuilt session chose otherwise, e.g. from a changed input, yields to the checkpoint's), then
    let each delta rebuild what it derives from them (``TrainableDelta.restored``); the method config is the
    checkpoint's too. Trained tensors the adapter does not store come from the schedule state
    (``TrainSession.unstored``)."""
    adapter = load(ckpt / "adapter.safetensors")
    session.config = adapter.manifest["method"]["config"]
    with torch.no_grad():
        for path, layer in session.layers.items():
            unstored = {role for role, _ in session.unstored(layer)}
            for role, p in layer.weights.items():
                if role not in unstored:
                    p.data = adapter.tensor(f"{path}.{role}").to(device=p.device, dtype=p.dtype, copy=True)
            for role in layer.frozen_roles:
                old = getattr(layer, role)
                setattr(layer, role, adapter.tensor(f"{path}.{role}").to(device=old.device, dtype=old.dtype, copy=True))
            for role, name in layer.shared_names.items():  # trained shared factors (S2-LoRA) too
                getattr(layer, role).copy_(adapter.tensor(name))
            layer.restored()


# ----- the run -------------------------------------------------------------------------------------------
class Run:
    """One training run; see the module docstring. Build with :meth:`prepare`, then :meth:`loop`."""

    def __init__(self, opts: TrainOptions) -> None:
        self.opts = opts
        self.ckpt: Path | None = find_checkpoint(opts.resume) if opts.resume is not None else None
        recorded = json.loads((self.ckpt / "state.json").read_text()) if self.ckpt else None
        self.start = recorded["step"] if recorded else 0
        self.tokens = recorded["tokens"] if recorded else 0
        self.evals: list[tuple[int, float]] = [(e["step"], e["loss"]) for e in (recorded or {}).get("evals", [])]
        """``(step, eval loss)`` at each checkpoint and at the end; a resumed run continues the recorded list."""
        old_eval = (recorded or {}).get("eval_data")
        self.eval_data = opts.eval_data.resolve() if opts.eval_data else Path(old_eval) if old_eval else None
        self.settings = self._settings(recorded)
        s = self.settings
        if s["schedule"] not in SCHEDULES:
            raise FormatError(f"schedule {s['schedule']!r} is not one of {', '.join(SCHEDULES)}")
        if s["mixed_precision"] not in PRECISIONS:
            raise FormatError(f"mixed precision {s['mixed_precision']!r} is not one of {', '.join(PRECISIONS)}")
        if s["quantize"] not in (None, *QUANTIZE):
            raise FormatError(f"quantize {s['quantize']!r} is not one of {', '.join(QUANTIZE)}")
        if s["method"] is None or s["data"] is None or self.out is None:
            raise FormatError("a training run needs a method, data and an output (or --resume)")
        self.data = Path(s["data"])
        self.sha256 = data_sha256(self.data)
        files = {**({"eval data": self.eval_data} if self.eval_data else {}),
                 **{f"config {k}": v for k, v in get_method(s["method"]).input_files(s["config"]).items()}}
        self.inputs: dict[str, str] = {}
        """sha256 of what the run reads, by what it is (see :meth:`_check_inputs`)."""
        self.recorded_inputs: dict[str, str] = {}
        if recorded is not None:
            self.recorded_inputs = recorded.get("inputs", {"data": recorded["data_sha256"]})
        self._check_inputs({"data": (self.data, self.sha256),
                            **{k: (path, data_sha256(path)) for k, path in files.items() if path.exists()}})
        self.checkpoints = Path(opts.checkpoints or (self.ckpt.parent if self.ckpt else f"{self.out}.checkpoints"))

    @property
    def out(self) -> Path | None:
        return self.opts.out or (Path(self.settings["out"]) if self.settings.get("out") else None)

    def _settings(self, recorded: dict[str, Any] | None) -> dict[str, Any]:
        config, method = self.opts.config, self.opts.method or (recorded or {}).get("settings", {}).get("method")
        if config is not None and method is not None:
            config = get_method(method).resolve_paths(dict(config), (self.opts.config_dir or Path.cwd()).resolve())
        given = {"method": self.opts.method, "data": self.opts.data and str(self.opts.data.resolve()),
                 "base": self.opts.base and str(self.opts.base.resolve()), "config": config,
                 **{k: getattr(self.opts, k) for k in DEFAULTS}}
        if recorded is None:
            return {**given, "config": given["config"] or {},
                    **{k: DEFAULTS[k] if given[k] is None else given[k] for k in DEFAULTS}}
        old = recorded["settings"]
        for k, v in given.items():
            if v is not None and v != old.get(k):
                raise FormatError(f"{k} {v!r} differs from the checkpoint's {old[k]!r}; a resumed run continues "
                                  "the recorded one", path=self.ckpt)
        return {"quantize": None, **old, "out": recorded.get("out")}

    def prepare(self) -> None:
        """Accelerator, model, tokenizer, data, the method's session, optimizer, scheduler (and the checkpoint)."""
        from accelerate import Accelerator, DistributedType

        s = self.settings
        check_output(self.out, self.opts.overwrite)
        cpu = self.opts.cpu or not torch.cuda.is_available()
        if cpu:
            return_freed_memory()
        self.acc = acc = Accelerator(cpu=cpu, mixed_precision=s["mixed_precision"])
        if acc.distributed_type == DistributedType.FSDP or os.environ.get(ACCELERATE_FSDP, "").lower() == "true":
            raise UnsupportedError("Accelerate's FSDP plugin would shard the adapter with the base (on a GPU; on the "
                                   "CPU it is ignored and nothing is sharded): launch without --use_fsdp and pass "
                                   "--fsdp, which shards the base only")
        if acc.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
            raise UnsupportedError(f"adapter train runs data-parallel (a copy of the model per process, or of the "
                                   f"adapter with --fsdp); {acc.distributed_type.value} is not supported yet")
        if s["batch_size"] % acc.num_processes:
            raise FormatError(f"batch size {s['batch_size']} is not a multiple of the {acc.num_processes} processes")
        if self.start == 0 and acc.is_main_process:
            self._clear_checkpoints()
        torch.manual_seed(s["seed"])
        base = Path(s["base"]) if s["base"] else None
        model, self.base_quantization = load_base(base, s["quantize"], COMPUTE_DTYPES[s["mixed_precision"]],
                                                  acc.device, note=acc.is_main_process)
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else model.model.embed_tokens
        self.tokenizer = load_tokenizer(base, emb.num_embeddings, note=acc.is_main_process)
        self.stream = Stream(read_examples(self.data, self.tokenizer, s["max_length"]), s["batch_size"], s["seed"])
        where = base or Path("adapterfmt-tiny")
        self._check_inputs({"base model": (where, _sha256_json(fingerprint_module(model))),
                            "tokenizer": (where, tokens_sha256(self.stream.examples))})
        self.eval_examples = (read_examples(self.eval_data, self.tokenizer, s["max_length"])
                              if self.eval_data else None)
        model.to(acc.device).train()
        calib = [collate(self.stream.batch(i), self.tokenizer.pad_id) for i in range(s["calibration_batches"])]
        self.session = session = get_method(s["method"]).train(model, config=dict(s["config"]), loss_fn=mean_loss,
                                                                batches=calib)
        self._check_schedule()
        self._check_tasks()
        self._check_fsdp()
        self.optimizer = session.optimizer(lr=s["lr"], weight_decay=s["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(s["schedule"], s["warmup_steps"], s["max_steps"]))
        if self.ckpt is not None:
            session.steps = self.start
            session.load_schedule_state(torch.load(self.ckpt / "schedule.pt", weights_only=True))  # first: drops modules
            _restore(session, self.ckpt)
            self.optimizer.load_state_dict(torch.load(self.ckpt / "optimizer.pt", weights_only=True))
            self.scheduler.load_state_dict(torch.load(self.ckpt / "scheduler.pt", weights_only=True))
            recorded = json.loads((self.ckpt / "state.json").read_text())
            if recorded["processes"] != acc.num_processes:
                raise FormatError(f"the checkpoint was written by {recorded['processes']} process(es), this run has "
                                  f"{acc.num_processes}", path=self.ckpt)
            set_rng_state(torch.load(self.ckpt / f"rng-{acc.process_index}.pt", weights_only=True))
        else:
            torch.manual_seed(s["seed"] + 1 + acc.process_index)  # dropout: a stream per process
        self.model = model  # not wrapped by DDP: see the module docstring
        if acc.num_processes > 1:
            with torch.no_grad():
                for p in session.parameters():
                    torch.distributed.broadcast(p.data, 0)
        self.sharded = self.opts.fsdp and acc.num_processes > 1
        if self.sharded:
            shard_base(model, session.parameters(), acc.device)
            trim_heap()
        self.accel_optimizer = acc.prepare(self.optimizer)

    def _check_inputs(self, current: dict[str, tuple[Path, str]]) -> None:
        """Add ``{what: (path, sha256)}`` to :attr:`inputs`; refuse (unless ``force``: a note) a resumed run where
        one differs from the checkpoint's record: the data, the eval data, the files the method's config names
        (``Method.file_fields``: source adapters), the base model's fingerprint and the data's tokens (the base's
        tokenizer). The method's config and the options are checked against the recorded ones (:meth:`_settings`)."""
        for what, (path, sha) in current.items():
            self.inputs[what] = sha
            old = self.recorded_inputs.get(what)
            if old is None or old == sha or (what == "tokenizer" and self._changed("data")):
                continue  # the data's tokens differ because the data does: that was said
            message = (f"{INPUT_LABELS.get(what, 'the ' + what)} changed since the checkpoint (sha256 {sha[:12]}..., "
                       f"recorded {old[:12]}...)")
            if not self.opts.force:
                raise FormatError(f"{message}; resume with the recorded inputs, or pass force=True (CLI: --force) "
                                  "to continue on these", path=path)
            warnings.warn(f"{path}: {message}; continuing (--force)", AdapterNote, stacklevel=3)

    def _changed(self, what: str) -> bool:
        old = self.recorded_inputs.get(what)
        return old is not None and self.inputs.get(what) not in (None, old)

    def _check_schedule(self) -> None:
        if self.opts.checkpoint_every and self.session.has_schedule:
            raise UnsupportedError(f"method {self.settings['method']!r}: the session has schedule state a checkpoint "
                                   "does not save (an on_step hook without state_dict / load_state_dict); run "
                                   "without checkpoints")

    def _check_fsdp(self) -> None:
        if not self.opts.fsdp:
            return
        if self.base_quantization is not None:
            raise UnsupportedError(f"--fsdp shards float weights; a base quantised by bitsandbytes "
                                   f"({self.base_quantization['format']}) is not sharded: run without --fsdp")
        if not self.session.static:
            raise UnsupportedError(f"method {self.settings['method']!r} changes what trains as it trains (an on_step "
                                   "schedule or skipped gradients), which --fsdp does not support (the adapter's "
                                   "parameters are fixed when the base is sharded): run it without --fsdp")

    def _check_tasks(self) -> None:
        tasks = self.session.tasks
        examples = [*self.stream.examples, *(self.eval_examples or [])]
        given = sorted({e.task for e in examples if e.task is not None})
        if given and tasks is None:
            raise UnsupportedError(f"records carry a 'task' ({given[0]!r}), which method "
                                   f"{self.settings['method']!r} does not train on; remove it", path=self.data)
        unknown = [t for t in given if t not in (tasks or ())]
        if unknown:
            raise FormatError(f"task {unknown[0]!r} is not one of the session's tasks ({', '.join(tasks or ())})",
                              path=self.data)

    def _clear_checkpoints(self) -> None:
        old = [p for p in self.checkpoints.glob("step-*") if (p / "state.json").is_file()]
        if old and not self.opts.overwrite:
            raise OutputExistsError("holds checkpoints of an earlier run: resume it (--resume) or pass --overwrite",
                                    path=self.checkpoints)
        for p in old:
            shutil.rmtree(p)

    def loop(self, progress: Callable[[StepReport], None] | None = None) -> TrainResult:
        """Train from the start (or checkpoint) step to ``max_steps``; save the adapter; return the result."""
        self._check_schedule()  # hooks may have been added since prepare()
        acc, s = self.acc, self.settings
        rank, world = acc.process_index, acc.num_processes
        started, tokens, loss, written = time.perf_counter(), 0, None, []
        for step in range(self.start, s["max_steps"]):
            batch = self.stream.batch(step, rank, world)
            ids, labels = (t.to(acc.device) for t in collate(batch, self.tokenizer.pad_id))
            count = acc.reduce((labels[:, 1:] != IGNORE).sum(), reduction="sum")
            with acc.autocast():
                loss_sum = token_loss_sum(self.model, ids, labels)
            tasks = self.session.tasks
            extra = {} if tasks is None else {"task_ids": task_ids(batch, ids.shape[1], tasks).to(acc.device)}
            acc.backward(loss_sum * world / count + self.session.regularization(**extra))
            if world > 1:
                all_reduce_gradients(list(self.session.parameters()))
            self.session.after_backward()
            if s["max_grad_norm"]:
                acc.clip_grad_norm_(list(self.session.parameters()), s["max_grad_norm"])  # a schedule may add some
            self.accel_optimizer.step()
            if not self.accel_optimizer.step_was_skipped:
                self.scheduler.step()
                self.session.step(self.optimizer)
            self.accel_optimizer.zero_grad(set_to_none=True)
            loss = (acc.reduce(loss_sum.detach(), reduction="sum") / count).item()
            tokens += int(acc.reduce(torch.tensor(sum(len(e.ids) for e in batch), device=acc.device), reduction="sum"))
            every = self.opts.checkpoint_every
            checkpoint = bool(every) and (step + 1) % every == 0 and step + 1 < s["max_steps"]
            eval_loss = self.evaluate() if checkpoint or step + 1 == s["max_steps"] else None
            if eval_loss is not None:
                self.evals.append((step + 1, eval_loss))
            if progress is not None and acc.is_main_process:
                progress(StepReport(step + 1, s["max_steps"], loss, self.scheduler.get_last_lr()[0], tokens,
                                    time.perf_counter() - started, eval_loss))
            if checkpoint:
                written.append(self.save_checkpoint(step + 1, loss, self.tokens + tokens))
        if self.eval_examples is not None and (not self.evals or self.evals[-1][0] != s["max_steps"]):
            self.evals.append((s["max_steps"], self.evaluate()))  # resumed from the last step: nothing ran
        eval_loss = self.evals[-1][1] if self.eval_examples is not None else None
        seconds = time.perf_counter() - started
        acc.wait_for_everyone()
        assert self.out is not None
        if acc.is_main_process:
            adapter = self.final_adapter(loss, eval_loss, self.tokens + tokens)
            save(adapter, self.out, overwrite=self.opts.overwrite)
        acc.wait_for_everyone()
        return TrainResult(self.out, s["max_steps"], loss, eval_loss, list(self.evals), self.tokens + tokens,
                           tokens / max(seconds, 1e-9), seconds, world, self.start, written, self.sha256)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-mean loss over the eval examples (split over the processes), or None without eval data. It
        draws no random numbers (eval mode), so evaluating does not change the training trajectory."""
        if self.eval_examples is None:
            return None
        acc, b = self.acc, self.settings["batch_size"] // self.acc.num_processes
        mine = self.eval_examples[acc.process_index::acc.num_processes]
        total = torch.zeros((), device=acc.device)
        count = torch.zeros((), device=acc.device, dtype=torch.long)
        self.model.eval()
        for i in range(0, len(mine), b):
            ids, labels = (t.to(acc.device) for t in collate(mine[i:i + b], self.tokenizer.pad_id))
            with acc.autocast():
                total += token_loss_sum(self.model, ids, labels)
            count += (labels[:, 1:] != IGNORE).sum()
        self.model.train()
        return (acc.reduce(total, reduction="sum") / acc.reduce(count, reduction="sum")).item()

    def save_checkpoint(self, step: int, loss: float, tokens: int) -> Path:
        """Write ``step-NNNNNNNN`` (main process; every process's RNG state gathered to it)."""
        from accelerate.utils import gather_object

        states = gather_object([rng_state()])
        path = self.checkpoints / f"step-{step:08d}"
        if self.acc.is_main_process:
            with atomic_dir(path, overwrite=True) as tmp:
                save(self.session.extract(base_name=self._base_name()), tmp / "adapter.safetensors")
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
                torch.save(self.session.schedule_state(), tmp / "schedule.pt")
                for rank, state in enumerate(states):
                    torch.save(state, tmp / f"rng-{rank}.pt")
                (tmp / "state.json").write_text(json.dumps({
                    "step": step, "loss": loss, "tokens": tokens, "processes": self.acc.num_processes,
                    "data_sha256": self.sha256, "inputs": self.inputs, "out": str(self.out), "settings": self.settings,
                    "evals": [{"step": k, "loss": v} for k, v in self.evals],
                    "eval_data": self.eval_data and str(self.eval_data)}, indent=2, sort_keys=True))
        self.acc.wait_for_everyone()
        return path

    def _base_name(self) -> str:
        return self.settings["base"] or "adapterfmt-tiny"

    def final_adapter(self, loss: float | None, eval_loss: float | None, tokens: int) -> Adapter:
        """The trained adapter, its provenance entry saying how it was trained."""
        adapter = self.session.extract(base_name=self._base_name())
        s = self.settings
        adapter.manifest["provenance"][-1].update({
            "version": __version__,
            "data": {"name": self.data.name, "sha256": self.sha256, "examples": len(self.stream.examples)},
            "steps": s["max_steps"], "tokens": tokens, "processes": self.acc.num_processes,
            **({"fsdp": True} if self.sharded else {}),
            "loss": loss, "eval_loss": eval_loss,
            **({"eval_data": {"name": self.eval_data.name, "sha256": data_sha256(self.eval_data)},
                "evals": [{"step": k, "loss": v} for k, v in self.evals]} if self.eval_data else {}),
            "options": {k: s[k] for k in DEFAULTS},
            **({"base_quantization": self.base_quantization} if self.base_quantization else {}),
        })
        return adapter


def train_adapter(opts: TrainOptions, *, progress: Callable[[StepReport], None] | None = None) -> TrainResult:
    """Train ``opts.method`` on ``opts.data`` and save the adapter to ``opts.out``; see the module docstring."""
    run = Run(opts)
    run.prepare()
    return run.loop(progress)

