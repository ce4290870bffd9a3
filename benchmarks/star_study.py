"""STAR vs random and plain-PE active learning at equal label budgets: exact-match accuracy per budget, 3 seeds, CPU.

Task (bytes on the tiny Llama-shaped model, ``adapterfmt.tiny``, hidden 64, 2 layers): a prompt ``"T:abc="`` with
three letters from ``a-h`` and a rule letter ``T``; the completion applies the rule: ``c`` copy, ``r`` reverse,
``s`` shift each letter by one (``h`` -> ``a``), ``m`` shift and reverse. The base is fully trained on ``copy``
alone (so it is sure of copies and unsure of the rest). The pool (600 records) is imbalanced, the harder rules
rarer: copy 55 %, reverse 25 %, shift 12 %, shift+reverse 8 %; the test set is balanced (64 per rule, disjoint
from the pool), so the rare rules weigh as much as the common one. Accuracy: the completion's tokens all
correct under greedy decoding (teacher-forced argmax, which is the same thing for a fixed-length answer).

Active learning as the reference's loop, scaled down: ``INIT`` random records labelled; at each iteration a LoRA
is trained from scratch on the labelled set (``STEPS`` AdamW steps at ``LR``, batch 16; r 8, alpha 16, dropout 0.1
on the 7 projections, as STAR's defaults but r), then ``ADD`` more records are labelled:

- **random**: drawn at random (plain LoRA);
- **pe**: the ``ADD`` highest predictive entropies (sum of ``-log p`` over the completion) of the current model,
  one pass, no dropout (the reference's plain ``PE`` acquisition; plain LoRA);
- **star**: STAR: constraint LoRA (``adapter train --method star``'s session: AdamW decay 0.5 on B, 0 on A) and the
  dynamic PE ``w * mean(3 MC-dropout passes) + (1 - w) * norm(base PE)``, ``w = 0.1 (i + 1)``
  (:func:`adapterfmt.star_scores`; the MC passes through ``TrainSession.mc_dropout``).

Each arm's accuracy after training on each budget (``INIT``, ``INIT + ADD`` ...) is reported as mean ± std over
seeds 0-2 (a seed fixes the initial subset, the LoRA init, the batches and the dropout draws; the base and the
pool are the same for all).

    python benchmarks/star_study.py
"""

from __future__ import annotations

import random
import statistics
import time
import warnings

import torch

import adapterfmt as af
from adapterfmt.plugin.registry import get_method
from adapterfmt.verbs.acquire import PoolRecord, encode, minmax, top
from adapterfmt.verbs.trainer import ByteTokenizer, Example, collate, mean_loss

LETTERS = "abcdefghijklmnop"
RULES = {"c": 0.55, "s": 0.25, "t": 0.12, "u": 0.08}
SHIFT = {"c": 0, "s": 1, "t": 3, "u": 7}
WORD = 3
POOL, TEST_PER_RULE, INIT, ADD, ITERATIONS = 600, 32, 32, 32, 4
STEPS, LR, BATCH = 150, 3e-3, 16
LORA = {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"], "r": 8,
        "alpha": 16, "dropout": 0.1}
ARMS = ("random", "pe", "star")
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


@torch.no_grad()
def accuracy(model: torch.nn.Module, test: list[Example]) -> float:
    ids, labels = collate(test, TOK.pad_id)
    pred = model(ids).logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    keep = target != -100
    return float(((pred == target) | ~keep).all(1).float().mean())


def per_rule(model: torch.nn.Module, test: list[Example]) -> list[float]:
    return [accuracy(model, test[i * TEST_PER_RULE:(i + 1) * TEST_PER_RULE]) for i in range(len(RULES))]


def run(arm: str, seed: int, base_state: dict, pool: list[Example], test: list[Example],
        base_pe: torch.Tensor) -> list[list[float]]:
    """Per budget, the accuracy on each rule's test records."""
    gen = random.Random(100 + seed)
    labelled = gen.sample(range(len(pool)), INIT)
    accs = []
    for it in range(ITERATIONS + 1):
        model, session = train(base_state, "star" if arm == "star" else "lora", [pool[i] for i in labelled], seed)
        accs.append(per_rule(model, test))
        if it == ITERATIONS:
            break
        rest = [i for i in range(len(pool)) if i not in set(labelled)]
        if arm == "random":
            labelled += gen.sample(rest, ADD)
            continue
        mine = [pool[i] for i in rest]
        if arm == "pe":
            scores = af.star_scores(af.answer_uncertainty(model, mine, measure="pe", batch_size=64)[None])
        else:
            torch.manual_seed(1000 * seed + it)
            with session.mc_dropout():
                current = torch.stack([af.answer_uncertainty(model, mine, measure="pe", batch_size=64)
                                       for _ in range(3)])
            scores = af.star_scores(current, base_pe[rest], 0.1 * (it + 1))
        labelled += [rest[i] for i in top(scores, ADD)]
    return accs


def main() -> None:
    torch.set_num_threads(1)
    started = time.perf_counter()
    pool_records, test_records = data()
    pool, test = examples(pool_records), examples(test_records)
    base = base_model()
    print("base (trained on copy) accuracy per rule: "
          + ", ".join(f"{k} {v:.2f}" for k, v in zip(RULES, per_rule(base, test), strict=True)))
    base_pe = minmax(af.answer_uncertainty(base, pool, measure="pe", batch_size=64))
    state = base.state_dict()
    budgets = [INIT + ADD * i for i in range(ITERATIONS + 1)]
    results = {arm: [run(arm, seed, state, pool, test, base_pe) for seed in range(3)] for arm in ARMS}
    for title, rules in (("all rules (balanced)", slice(None)), ("the two rarest rules (t, u)", slice(2, None))):
        print(f"{title}\nlabels   " + "  ".join(f"{b:>13d}" for b in budgets))
        for arm, rs in results.items():
            cols = zip(*[[statistics.mean(acc[rules]) for acc in seed_accs] for seed_accs in rs], strict=True)
            cells = [f"{statistics.mean(c):.3f} ± {statistics.stdev(c):.3f}" for c in cols]
            print(f"{arm:8s} " + "  ".join(f"{c:>13s}" for c in cells))
    print(f"(exact-match accuracy on the balanced test set, mean ± std over 3 seeds; "
          f"{time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
