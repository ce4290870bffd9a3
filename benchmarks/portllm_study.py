"""PortLLM study: a patch trained on base v1 follows the base to its evolved v2 without retraining.

1. v1: a small Llama (transformers ``LlamaConfig``, 4 layers, hidden 128) trained from scratch on a copy
   task (``x  COPY  x``).
2. The personalisation: a LoRA (r=8, all linear layers, the ``lora`` train verb) trained on v1 for the
   target task, reversal (``x  REV  reversed(x)``), which v1 fails.
3. v2, the evolved base: v1 trained further (all weights) on other data (copy plus a new shift task,
   ``x  SHIFT  x+1``); it never sees the target task.
4. Port: ``adapterfmt.verbs.port.port_adapter(patch, new_base=v2 checkpoint)`` — training-free. The patch is
   also ported to snapshots of the evolution after 10, 30 and 100 steps (of 300), to show how far it
   carries as the base drifts.
5. Baseline: the same LoRA recipe trained on v2 directly.

The task metric is exact-token accuracy on the 8 answer tokens of 512 held-out sequences. The cost of the
two ways to personalise v2 (port vs train a new LoRA) is measured in fresh child processes that load v2
first: wall time, and the peak resident memory above what the process held after loading v2 (Linux
``VmHWM`` after resetting it through ``/proc/self/clear_refs``).

    python benchmarks/portllm_study.py [--json] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

SEQ = 8
CONTENT = 64
COPY, REV, SHIFT = 64, 65, 66
VOCAB = 72
LORA = {"target_modules": "all-linear", "r": 8, "alpha": 16}
STEPS = {"pretrain": 600, "lora": 400, "evolve": 300}
LR = {"pretrain": 2e-3, "lora": 3e-3, "evolve": 5e-4}
BATCH = 64
EVOLVE_SNAPSHOTS = (10, 30, 100)


def config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                       tie_word_embeddings=False)


def batch(task: int, n: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randint(0, CONTENT, (n, SEQ), generator=gen)
    y = {COPY: x, REV: x.flip(1), SHIFT: (x + 1) % CONTENT}[task]
    return torch.cat([x, torch.full((n, 1), task), y], 1)


def loss_of(model: torch.nn.Module, seq: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=seq[:, :-1]).logits[:, SEQ:]
    return F.cross_entropy(logits.reshape(-1, VOCAB), seq[:, SEQ + 1:].reshape(-1))


@torch.no_grad()
def accuracy(model: torch.nn.Module, task: int) -> float:
    seq = batch(task, 512, torch.Generator().manual_seed(12345))  # held out: training seeds differ
    logits = model(input_ids=seq[:, :-1]).logits[:, SEQ:]
    return float((logits.argmax(-1) == seq[:, SEQ + 1:]).float().mean())


def train(model: torch.nn.Module, params: list[torch.nn.Parameter], tasks: list[int], steps: int, lr: float,
          seed: int, snapshots: tuple[int, ...] = ()) -> dict[int, torch.nn.Module]:
    """Train in place; returns eval-mode copies of the model after each step count in ``snapshots``."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    kept = {}
    for step in range(1, steps + 1):
        model.train()
        loss = loss_of(model, torch.cat([batch(t, BATCH // len(tasks), gen) for t in tasks]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in snapshots:
            kept[step] = copy.deepcopy(model).eval()
    model.eval()
    return kept


def train_lora(model: torch.nn.Module, seed: int) -> Any:
    import adapterfmt as af

    session = af.registry.verb("lora", "train")(model, config=LORA)
    train(model, list(session.parameters()), [REV], STEPS["lora"], LR["lora"], seed)
    patch = session.extract()
    session.remove()
    return patch


def load_model(path: Path) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path).eval()


# ----- cost of each path, in a fresh process ------------------------------------------------------------
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _measure(path: str, workdir: str, queue: Any) -> None:
    torch.set_num_threads(1)
    import adapterfmt as af
    from adapterfmt.verbs.port import port_adapter

    work = Path(workdir)
    v2 = load_model(work / "v2")
    if path == "port":  # warm the code path on a throwaway copy so imports are not billed to the port
        port_adapter(af.load(work / "patch-v1"), new_base=work / "v2")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
    floor = _rss_kib("VmRSS")
    start = time.perf_counter()
    if path == "port":
        ported = port_adapter(af.load(work / "patch-v1"), new_base=work / "v2", base_name="v2")
        af.save(ported, work / "patch-ported", overwrite=True)
    else:
        torch.manual_seed(1)
        af.save(train_lora(v2, seed=4), work / "patch-v2", overwrite=True)
    seconds = time.perf_counter() - start
    queue.put({"seconds": seconds, "peak_extra_mib": (_rss_kib("VmHWM") - floor) / 1024})


def measure(path: str, workdir: Path) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(path, str(workdir), queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


# ----- the study ----------------------------------------------------------------------------------------
def run(workdir: Path) -> dict[str, Any]:
    from transformers import LlamaForCausalLM

    import adapterfmt as af
    from adapterfmt.verbs.port import port_adapter, port_record

    torch.set_num_threads(1)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    v1 = LlamaForCausalLM(config())
    train(v1, list(v1.parameters()), [COPY], STEPS["pretrain"], LR["pretrain"], seed=1)
    v1.save_pretrained(workdir / "v1")
    torch.manual_seed(1)
    patch = train_lora(v1, seed=3)
    patch.manifest["base"]["name"] = "v1"
    af.save(patch, workdir / "patch-v1", overwrite=True)
    v2 = copy.deepcopy(v1)
    evolving = train(v2, list(v2.parameters()), [COPY, SHIFT], STEPS["evolve"], LR["evolve"], seed=2,
                     snapshots=EVOLVE_SNAPSHOTS)
    v2.save_pretrained(workdir / "v2")
    setup_s = time.perf_counter() - t0
    costs = {"port": measure("port", workdir), "lora on v2": measure("lora", workdir)}
    ported, direct = af.load(workdir / "patch-ported"), af.load(workdir / "patch-v2")

    def scores(model: torch.nn.Module, adapter: af.Adapter | None) -> dict[str, float]:
        if adapter is not None:
            af.attach(model, adapter, name="p")
        out = {"reverse (task)": accuracy(model, REV), "copy": accuracy(model, COPY), "shift": accuracy(model, SHIFT)}
        if adapter is not None:
            af.detach(model)
        return out

    v1w = dict(v1.named_parameters())

    def drift(model: torch.nn.Module) -> float:
        w = dict(model.named_parameters())
        return float(sum((w[n] - v1w[n]).double().square().sum() for n in v1w) ** 0.5
                     / sum(p.double().square().sum() for p in v1w.values()) ** 0.5)

    sweep = []
    for step, snap in sorted(evolving.items()):  # how far the patch carries as the base drifts further
        alone = accuracy(snap, REV)
        on_snap = port_adapter(patch, new_base=snap)
        sweep.append({"evolve_steps": step, "drift": drift(snap), "v2 alone": alone,
                      **{f"v2 + ported patch, {k}": v for k, v in scores(snap, on_snap).items()}})
    rows = {"v1 alone": scores(v1, None), "v1 + patch": scores(v1, patch), "v2 alone": scores(v2, None),
            "v2 + ported patch": scores(v2, ported), "v2 + LoRA trained on v2": scores(v2, direct)}
    return {"rows": rows, "costs": costs, "change": port_record(ported)["change"], "drift": drift(v2), "sweep": sweep,
            "patch_bytes": patch.nbytes(), "setup_seconds": setup_s,
            "params": sum(p.numel() for p in v1.parameters()),
            "lora_params": sum(math.prod(patch.shape(n)) for n in patch.tensor_names())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="portllm-study-"))
    workdir.mkdir(parents=True, exist_ok=True)
    res = run(workdir)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"model: {res['params']:,} parameters; LoRA r=8 all-linear: {res['lora_params']:,} parameters, "
          f"{res['patch_bytes']:,} bytes; v2 drift ||v2 - v1|| / ||v1|| = {res['drift']:.3f}; "
          f"port found: {res['change']}")
    print(f"{'model':28s} {'reverse (task)':>15s} {'copy':>7s} {'shift':>7s}")
    for name, r in res["rows"].items():
        print(f"{name:28s} {r['reverse (task)']:15.3f} {r['copy']:7.3f} {r['shift']:7.3f}")
    print(f"{'evolve steps':>12s} {'drift':>7s} {'v2 alone':>9s} {'+ ported: reverse':>18s} {'copy':>6s}")
    for r in res["sweep"]:
        print(f"{r['evolve_steps']:12d} {r['drift']:7.3f} {r['v2 alone']:9.3f} "
              f"{r['v2 + ported patch, reverse (task)']:18.3f} {r['v2 + ported patch, copy']:6.3f}")
    port, lora = res["costs"]["port"], res["costs"]["lora on v2"]
    print(f"{'cost to personalise v2':28s} {'wall s':>10s} {'peak extra MiB':>15s}")
    for name, c in res["costs"].items():
        print(f"{name:28s} {c['seconds']:10.3f} {c['peak_extra_mib']:15.1f}")
    mem = (f"x{lora['peak_extra_mib'] / port['peak_extra_mib']:.1f}" if port["peak_extra_mib"] >= 0.1 else
           f"{lora['peak_extra_mib']:.1f} MiB vs under 0.1 MiB (the port's peak did not rise measurably)")
    print(f"LoRA on v2 / port: time x{lora['seconds'] / port['seconds']:.0f}, peak extra memory {mem}")


if __name__ == "__main__":
    main()
