"""STAR and its ablations vs random and plain-PE active learning at equal label budgets: exact-match accuracy and
the answer token's calibration per budget, 3 seeds, CPU.

Task (bytes on a tiny Llama, transformers ``LlamaConfig``, hidden 64, 2 layers): a prompt ``"T:abc="`` with three
letters from ``a-p`` and a rule letter ``T``; the completion is one letter, the first letter shifted by the rule's
offset: ``c`` 0 (copy), ``s`` 1, ``t`` 3, ``u`` 7 (mod 16). The base is fully trained on ``copy`` alone (so it is
sure of copies and unsure of the rest). The pool (600 unique records) is imbalanced, the rules the base does not
know rarer: copy 55 %, s 25 %, t 12 %, u 8 %; the test set is balanced (32 per rule, disjoint from the pool), so
the rare rules weigh as much as the common one. Accuracy: the completion's token correct under greedy decoding.
Calibration: the expected calibration error (ECE, 10 equal-width bins of the top probability) of the answer token
on the test set.

Active learning as the reference's loop, scaled down: ``INIT`` random records labelled; at each iteration a LoRA
is trained from scratch on the labelled set (``STEPS`` AdamW steps at ``LR``, batch 16; r 8, alpha 16, dropout 0.1
on the 7 projections, as STAR's defaults but r), then ``ADD`` more records are labelled. An arm (:class:`Arm`) is
a training method and an acquisition:

- method ``lora`` (plain LoRA) or ``star`` (constraint LoRA: ``adapter train --method star``'s session, AdamW
  decay 0.5 on B, 0 on A);
- acquisition: random, or the ``ADD`` highest scores of ``af.star_scores`` over a measure (``pe``: sum of ``-log
  p`` over the completion; ``entropy``: sum of the next-token entropies) of the current model, either one pass
  without dropout (static, the reference's plain ``PE``) or the mean of 3 Monte-Carlo-dropout passes (through
  ``TrainSession.mc_dropout``), optionally dynamic: ``w * mean + (1 - w) * norm(base's measure)``, ``w = 0.1 (i +
  1)``.

STAR is ``star`` + dynamic MC-dropout PE; the ablations remove one part each: the B decay (``star -decay``: plain
LoRA, same acquisition), the dynamic base term (``star -dynamic``: MC-dropout PE of the current model alone), or
swap the measure (``star entropy``). ``random+decay`` labels the same records as ``random`` (the draws do not
depend on the model), so the two differ only in the decay: the paired test of its effect (printed as ``decay
effect``, ``random+decay`` minus ``random`` per seed, then mean ± std).

Each arm's figures after training on each budget (``INIT``, ``INIT + ADD`` ...) are reported as mean ± std over
seeds 0-2 (a seed fixes the initial subset, the LoRA init, the batches and the dropout draws; the base and the
pool are the same for all). The first budget's model is trained once per method and seed (every arm's initial
subset is the same).

    python benchmarks/star_study.py
"""

from __future__ import annotations

import random
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

import adapterfmt as af
from adapterfmt.plugin.registry import get_method
from adapterfmt.verbs.acquire import MEASURES, PoolRecord, encode, minmax, top
from adapterfmt.verbs.trainer import ByteTokenizer, Example, collate, mean_loss

LETTERS = "abcdefghijklmnop"
RULES = {"c": 0.55, "s": 0.25, "t": 0.12, "u": 0.08}
SHIFT = {"c": 0, "s": 1, "t": 3, "u": 7}
WORD = 3
POOL, TEST_PER_RULE, INIT, ADD, ITERATIONS = 600, 32, 32, 32, 4
STEPS, LR, BATCH = 150, 3e-3, 16
LORA = {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"], "r": 8,
        "alpha": 16, "dropout": 0.1}


@dataclass(frozen=True)
class Arm:
    """A training method (``lora`` or ``star``) and an acquisition: ``measure`` ``None`` for random, else scored
    with ``MC_PASSES`` Monte-Carlo-dropout passes (``mc``) or one pass without dropout, mixed with the base's
    normalised measure when ``dynamic`` (module docstring)."""

    method: str
    measure: str | None = None
    mc: bool = False
    dynamic: bool = False


ARMS = {
    "random": Arm("lora"),
    "random+decay": Arm("star"),
    "pe": Arm("lora", "pe"),
    "star": Arm("star", "pe", mc=True, dynamic=True),
    "star -decay": Arm("lora", "pe", mc=True, dynamic=True),
    "star -dynamic": Arm("star", "pe", mc=True),
    "star entropy": Arm("star", "entropy", mc=True, dynamic=True),
}
MC_PASSES, BINS = 3, 10
TOK = ByteTokenizer(128)


def answer(rule: str, word: str) -> str:
    return LETTERS[(LETTERS.index(word[0]) + SHIFT[rule]) % len(LETTERS)]


def record(rule: str, word: str) -> PoolRecord:
    return PoolRecord("", 0, "", f"{rule}:{word}=", answer(rule, word))


def words(gen: random.Random) -> str:
    return "".join(gen.choice(LETTERS) for _ in range(WORD))


def data() -> tuple[list[PoolRecord], list[PoolRecord]]:
    gen = random.Random(0)
    test = [record(rule, words(gen)) for rule in RULES for _ in range(TEST_PER_RULE)]
    seen = {r.prompt for r in test}
    pool: list[PoolRecord] = []
    while len(pool) < POOL:
        r = record(gen.choices(list(RULES), weights=list(RULES.values()))[0], words(gen))
        if r.prompt not in seen:
            seen.add(r.prompt)
            pool.append(r)
    return pool, test


def examples(records: list[PoolRecord]) -> list[Example]:
    return encode(records, TOK, 64)


def shell() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM(cfg)


def base_model() -> torch.nn.Module:
    """The model fully trained on the copy rule."""
    model = shell().train()
    gen = random.Random(1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        ids, labels = collate(examples([record("c", words(gen)) for _ in range(32)]), TOK.pad_id)
        mean_loss(model, (ids, labels)).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def train(base_state: dict, method: str, labelled: list[Example], seed: int) -> tuple[torch.nn.Module, af.TrainSession]:
    model = shell()
    model.load_state_dict(base_state)
    torch.manual_seed(seed)
    session = get_method(method).train(model.train(), config=LORA)
    opt = session.optimizer(lr=LR)
    gen = random.Random(seed)
    for _ in range(STEPS):
        ids, labels = collate(gen.sample(labelled, min(BATCH, len(labelled))), TOK.pad_id)
        mean_loss(model, (ids, labels)).backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), session


@dataclass(frozen=True)
class Scores:
    """A trained model's figures on the test set: exact-match accuracy per rule; the answer token's expected
    calibration error and overconfidence (mean top probability minus accuracy)."""

    per_rule: list[float]
    ece: float
    overconfidence: float


def calibration_error(conf: torch.Tensor, correct: torch.Tensor) -> float:
    """ECE: over ``BINS`` equal-width bins of the top probability, the bin's share times ``|accuracy - mean
    confidence|`` in it."""
    bins = (conf * BINS).long().clamp(max=BINS - 1)
    return sum(float((bins == b).float().mean() * (correct[bins == b].mean() - conf[bins == b].mean()).abs())
               for b in range(BINS) if (bins == b).any())


@torch.no_grad()
def evaluate(model: torch.nn.Module, test: list[Example]) -> Scores:
    ids, labels = collate(test, TOK.pad_id)
    conf, pred = torch.softmax(model(ids).logits[:, :-1].float(), -1).max(-1)
    target = labels[:, 1:]
    keep = target != -100
    exact = ((pred == target) | ~keep).all(1).float()
    per_rule = [float(exact[i * TEST_PER_RULE:(i + 1) * TEST_PER_RULE].mean()) for i in range(len(RULES))]
    conf, correct = conf[keep], (pred == target)[keep].float()
    return Scores(per_rule, calibration_error(conf, correct), float(conf.mean() - correct.mean()))


def acquisition(arm: Arm, iteration: int, model: torch.nn.Module, session: af.TrainSession,
                candidates: list[Example], base_u: torch.Tensor, seed: int) -> torch.Tensor:
    """The candidates' normalised scores under ``arm`` (``base_u``: the base's normalised measure of each)."""
    def measure() -> torch.Tensor:
        return af.answer_uncertainty(model, candidates, measure=arm.measure, batch_size=64)

    if arm.mc:
        torch.manual_seed(seed)
        with session.mc_dropout():
            current = torch.stack([measure() for _ in range(MC_PASSES)])
    else:
        current = measure()[None]
    return af.star_scores(current, base_u if arm.dynamic else None, 0.1 * (iteration + 1))


def run(arm: Arm, seed: int, base_state: dict, pool: list[Example], test: list[Example],
        base_u: dict[str, torch.Tensor], trained: dict) -> list[Scores]:
    """Per budget, the test figures of the model trained on the labelled set; ``trained`` caches the models by
    method, seed and labelled set (the first budget's is every arm's)."""
    gen = random.Random(100 + seed)
    labelled = gen.sample(range(len(pool)), INIT)
    out = []
    for it in range(ITERATIONS + 1):
        key = (arm.method, seed, tuple(labelled))
        if key not in trained:
            trained[key] = train(base_state, arm.method, [pool[i] for i in labelled], seed)
        model, session = trained[key]
        out.append(evaluate(model, test))
        if it == ITERATIONS:
            break
        taken = set(labelled)
        rest = [i for i in range(len(pool)) if i not in taken]
        if arm.measure is None:
            labelled += gen.sample(rest, ADD)
        else:
            scores = acquisition(arm, it, model, session, [pool[i] for i in rest], base_u[arm.measure][rest],
                                 1000 * seed + it)
            labelled += [rest[i] for i in top(scores, ADD)]
    return out


def table(title: str, budgets: list[int], results: dict[str, list[list[Scores]]],
          figure: Callable[[Scores], float]) -> None:
    """One figure per arm and budget, mean ± std over the seeds; last, the paired per-seed difference of the two
    random arms (same labelled records, with and without the decay)."""
    rows = {name: [[figure(s) for s in seed_run] for seed_run in runs] for name, runs in results.items()}
    rows["decay effect"] = [[a - b for a, b in zip(with_decay, plain, strict=True)]
                            for with_decay, plain in zip(rows["random+decay"], rows["random"], strict=True)]
    print(f"{title}\n{'labels':14s} " + "  ".join(f"{b:>13d}" for b in budgets))
    for name, seed_rows in rows.items():
        cols = zip(*seed_rows, strict=True)
        print(f"{name:14s} " + "  ".join(f"{statistics.mean(c):>6.3f} ± {statistics.stdev(c):.3f}" for c in cols))


def main() -> None:
    torch.set_num_threads(1)
    started = time.perf_counter()
    pool_records, test_records = data()
    pool, test = examples(pool_records), examples(test_records)
    base = base_model()
    print("base (trained on copy) accuracy per rule: "
          + ", ".join(f"{k} {v:.2f}" for k, v in zip(RULES, evaluate(base, test).per_rule, strict=True)))
    base_u = {m: minmax(af.answer_uncertainty(base, pool, measure=m, batch_size=64)) for m in MEASURES}
    state = base.state_dict()
    budgets = [INIT + ADD * i for i in range(ITERATIONS + 1)]
    trained: dict = {}
    results = {name: [run(arm, seed, state, pool, test, base_u, trained) for seed in range(3)]
               for name, arm in ARMS.items()}
    table("exact-match accuracy, all rules (balanced)", budgets, results, lambda s: statistics.mean(s.per_rule))
    table("exact-match accuracy, the two rarest rules (t, u)", budgets, results,
          lambda s: statistics.mean(s.per_rule[2:]))
    table(f"answer-token ECE ({BINS} bins; lower is better calibrated)", budgets, results, lambda s: s.ece)
    table("answer-token overconfidence (mean top probability - accuracy)", budgets, results,
          lambda s: s.overconfidence)
    print(f"(balanced test set, mean ± std over 3 seeds; {len(trained)} LoRAs trained; "
          f"{time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
