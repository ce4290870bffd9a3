"""DEFT vs plain LoRA at the same trainable parameters: MLP activation density and task loss, 3 seeds, CPU.

A ReLU Llama (transformers ``LlamaConfig``, 2 layers, hidden 64, MLP 256, vocab 32) is fully trained on task A
(next token = previous + 1 mod 32), then adapted to task B (next token = previous + 5 mod 32, after a random
first token) by LoRA r=4 on every linear layer, 150 AdamW steps at 1e-2, batch 32 x 16, both arms alike;
**deft** adds the density loss (the reference's ``compute_l0_penalty``, weight 1.0 and eps 1e-7 as in its
scripts) on the MLP activations (``mlp.act_fn`` outputs). DEFT adds no parameter, so the budgets are equal.
Measured on 256 held-out task-B sequences: the task loss and the activation density (the reference's
``compute_eval_sparsity``: fraction of exactly non-zero activations). Seeds 0-2 change the LoRA init and the
batches; the base is the same.

    python benchmarks/deft_study.py
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from adapterfmt.plugin.registry import get_method
from adapterfmt.plugins.methods.density import activation_density

V, T, B, STEPS = 32, 16, 32, 150
ARMS = {"lora": ("lora", {}), "deft": ("deft", {"density_weight": 1.0})}


def sequences(n: int, shift: int, gen: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, V, (n, 1), generator=gen)
    return (start + shift * torch.arange(T)) % V


def loss_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def base_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = base_model_shell()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(100)
    for _ in range(200):
        loss = loss_of(model, sequences(B, 1, gen))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def run(base_state: dict, arm: str, seed: int, held: torch.Tensor) -> dict[str, float]:
    method, extra = ARMS[arm]
    model = base_model_shell()
    model.load_state_dict(base_state)
    torch.manual_seed(seed)
    session = get_method(method).train(model, config={"target_modules": "all-linear", "r": 4, "alpha": 8, **extra})
    opt = session.optimizer(lr=1e-2)
    gen = torch.Generator().manual_seed(1000 + seed)
    for _ in range(STEPS):
        (loss_of(model, sequences(B, 5, gen)) + session.regularization()).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        loss = loss_of(model, held).item()
    return {"loss": loss, "density": activation_density(model, held),
            "params": sum(p.numel() for p in session.parameters())}


def base_model_shell() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, hidden_act="relu", max_position_embeddings=T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM(cfg)


def main() -> None:
    torch.set_num_threads(1)
    started = time.perf_counter()
    base = base_model()
    held = sequences(256, 5, torch.Generator().manual_seed(7))
    base.eval()
    with torch.no_grad():
        print(f"base (trained on task A): task-B loss {loss_of(base, held).item():.3f}, activation density "
              f"{activation_density(base, held):.3f}")
    state = base.state_dict()
    results = {arm: [run(state, arm, seed, held) for seed in range(3)] for arm in ARMS}
    for arm, rs in results.items():
        line = f"{arm:5s} trainable {rs[0]['params']:,}"
        for key in ("loss", "density"):
            vals = [r[key] for r in rs]
            line += f"  {key} {statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"
        print(line + "  (per seed: " + ", ".join(f"{r['density']:.3f}" for r in rs) + ")")
    d = [1 - b["density"] / a["density"] for a, b in zip(results["lora"], results["deft"], strict=True)]
    print(f"density reduction deft vs lora: {100 * statistics.mean(d):.1f}% ± {100 * statistics.stdev(d):.1f}% "
          f"(3 seeds); {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
