"""``adapter train --fsdp``: per-process memory with the base sharded over two processes, against two replicated
processes, on the same model, method, data and global batch (gloo, CPU).

Both runs train LoRA r=16 on every linear layer but the head of the same random Llama checkpoint (built from a
config as ``benchmarks/train.py`` builds it), global batch 4 x 128 tokens, fp32, each under ``accelerate launch``
with two processes. Per process: ``load peak`` is the peak RSS up to the end of ``Run.prepare`` (imports, the
whole base loaded, the method's session, and for FSDP the sharding); ``held`` the RSS after it; ``train peak`` the
peak RSS over the training steps alone (the kernel's peak counter reset after prepare, ``/proc/self/clear_refs``);
``base held`` the base's weights this process holds (a shard's bytes under FSDP). The two adapters are compared.

    python benchmarks/fsdp_memory.py       # ~100M-parameter Llama (8 layers, hidden 768, vocab 32000), 3 steps
    python benchmarks/fsdp_memory.py --layers 8 --hidden 2048 --intermediate 5632 --vocab 8000 --steps 2  # 443M

Results and what they mean: BENCHMARKS.md, "adapter train --fsdp".
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

SEQ, BATCH, R = 128, 4, 16


def _status(field: str) -> float:
    """A ``/proc/self/status`` field in MiB."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def worker(folder: Path, fsdp: bool, steps: int) -> None:
    from torch.distributed.tensor import DTensor

    from adapterfmt.verbs.trainer import Run, TrainOptions

    name = "fsdp" if fsdp else "replicated"
    opts = TrainOptions(method="lora", base=folder / "base", data=folder / "data.jsonl",
                        out=folder / f"{name}.safetensors", config={"target_modules": "all-linear", "r": R, "alpha": R},
                        max_steps=steps, lr=2e-4, batch_size=BATCH, max_length=SEQ, cpu=True, fsdp=fsdp,
                        overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = Run(opts)
        run.prepare()
        gc.collect()
        load_peak, held = _status("VmHWM"), _status("VmRSS")
        adapter = set(run.session.parameters())
        base = sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in run.model.parameters()
                   if p not in adapter)
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS counter
        run.loop()
    row = {"rank": run.acc.process_index, "load_peak_mib": load_peak, "held_mib": held,
           "train_peak_mib": _status("VmHWM"), "base_held_mib": base / 2**20}
    (folder / f"{name}-{run.acc.process_index}.json").write_text(json.dumps(row))


def launch(folder: Path, fsdp: bool, steps: int) -> list[dict[str, float]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--num_cpu_threads_per_process", "1", "--main_process_port", str(port), __file__, "--worker",
                    "--folder", str(folder), "--steps", str(steps), *(["--fsdp"] if fsdp else [])],
                   check=True, capture_output=True, text=True)
    name = "fsdp" if fsdp else "replicated"
    return [json.loads((folder / f"{name}-{rank}.json").read_text()) for rank in range(2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.folder, args.fsdp, args.steps)
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from train import build  # benchmarks/train.py's checkpoint and data

    import adapterfmt as af

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shape = build(folder, args.layers, args.hidden, args.intermediate, args.vocab, examples=BATCH * args.steps)
        print(f"Llama {shape}; LoRA r={R} all-linear; global batch {BATCH} x {SEQ}; {args.steps} steps; 2 processes")
        for fsdp in (False, True):
            for row in launch(folder, fsdp, args.steps):
                print(f"{'fsdp' if fsdp else 'replicated':10s} rank {row['rank']}: load peak {row['load_peak_mib']:.0f}"
                      f" MiB, held {row['held_mib']:.0f} MiB, train peak {row['train_peak_mib']:.0f} MiB, base held "
                      f"{row['base_held_mib']:.0f} MiB")
        a, b = (af.load(folder / f"{n}.safetensors") for n in ("replicated", "fsdp"))
        diff = max((a.tensor(n) - b.tensor(n)).abs().max().item() for n in a.tensors())
        print(f"adapters: max |replicated - fsdp| = {diff:.2e} over {len(a.tensors())} tensors")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
