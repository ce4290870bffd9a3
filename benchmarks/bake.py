"""Baking an r=16 all-linear LoRA into a Llama checkpoint: adapterfmt's streaming bake vs PEFT's
load + merge_and_unload + save_pretrained, and a plain copy of the checkpoint, in the same run.

For two checkpoint sizes (default 6 and 12 layers: about 0.57 and 0.88 GB fp32, the same largest tensor,
the 32000 x 1024 embedding) each contender runs in its own subprocess; its wall time is the work alone
(imports excluded) and its peak RSS (``VmHWM``) is reported above that of a bare ``import torch``
process. The page cache is warm for every contender (the checkpoint was just written or read).
Both outputs are compared tensor by tensor.

    python benchmarks/bake.py [--layers 6 12] [--threads 1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from llama_lora import checkpoint_bytes, largest_tensor_bytes, llama, lora, save_checkpoint  # noqa: E402

import adapterfmt as af  # noqa: E402
from adapterfmt.format.fingerprint import read_checkpoint_headers  # noqa: E402
from adapterfmt.format.safetensors_io import read_tensor  # noqa: E402

CHILD = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
import torch
mode, threads, base, adapter, out = sys.argv[1:6]
torch.set_num_threads(int(threads))
wall = 0.0
if mode == "ours":
    from adapterfmt.verbs.bake import bake
    t0 = time.perf_counter()
    bake([adapter], base, out)
    wall = time.perf_counter() - t0
elif mode == "peft":
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    t0 = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)
    wall = time.perf_counter() - t0
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over execve from the forking parent
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"wall": wall, "peak": int(hwm.split()[1]) * 1024}))
"""


def run(mode: str, threads: int, base: Path = Path("-"), adapter: Path = Path("-"), out: Path = Path("-")) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, mode, str(threads), str(base), str(adapter), str(out)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {n: read_tensor(h, n) for h in read_checkpoint_headers(folder) for n in h.tensors}


def max_diff(a: Path, b: Path) -> float:
    ta, tb = tensors(a), tensors(b)
    assert set(ta) == set(tb), set(ta) ^ set(tb)
    return max(float((ta[n].float() - tb[n].float()).abs().max()) for n in ta)


def one_size(tmp: Path, layers: int, threads: int, bare: int, repeat: int) -> dict:
    base = tmp / f"base-{layers}"
    model = llama(layers)
    save_checkpoint(model, base)
    lora(model, tmp / f"peft-{layers}", seed=1)
    del model
    gc.collect()
    adapter = af.save(af.read_foreign(tmp / f"peft-{layers}", "peft", base=base), tmp / f"lora-{layers}")
    size, largest = checkpoint_bytes(base), largest_tensor_bytes(base)
    copy_s = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        shutil.copytree(base, tmp / f"copy-{layers}")
        copy_s = min(copy_s, time.perf_counter() - t0)
        shutil.rmtree(tmp / f"copy-{layers}")
    runs: dict[str, list[dict]] = {"ours": [], "peft": []}
    for _ in range(repeat):  # the machine is shared: keep each contender's best run
        for p in (tmp / f"ours-{layers}", tmp / f"peftout-{layers}"):
            shutil.rmtree(p, ignore_errors=True)
        runs["ours"].append(run("ours", threads, base, adapter, tmp / f"ours-{layers}"))
        runs["peft"].append(run("peft", threads, base, tmp / f"peft-{layers}", tmp / f"peftout-{layers}"))
    ours, peft = (min(runs[k], key=lambda r: r["wall"]) for k in ("ours", "peft"))
    diff = max_diff(tmp / f"ours-{layers}", tmp / f"peftout-{layers}")
    for p in (base, tmp / f"ours-{layers}", tmp / f"peftout-{layers}"):
        shutil.rmtree(p)
    return {"layers": layers, "bytes": size, "largest": largest, "copy_s": copy_s, "ours": ours, "peft": peft,
            "max_abs_diff": diff, "bare": bare}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[6, 12])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each contender; the fastest is reported")
    args = ap.parse_args()
    mb = 1e6
    bare = run("bare", args.threads)["peak"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-bake-", dir=Path.home()) as tmp:
        for layers in args.layers:
            rows.append(one_size(Path(tmp), layers, args.threads, bare, args.repeat))
    print(f"bare `import torch` process: peak RSS {bare / mb:.0f} MB; {args.threads} torch thread(s); warm page cache; "
          f"best of {args.repeat} runs each")
    for r in rows:
        o, p = r["ours"], r["peft"]
        above_o, above_p = o["peak"] - bare, p["peak"] - bare
        print(f"\nLlama, {r['layers']} layers: checkpoint {r['bytes'] / mb:.0f} MB, largest tensor "
              f"{r['largest'] / mb:.0f} MB; r=16 all-linear LoRA")
        print(f"  plain copy (shutil.copytree)        {r['copy_s']:7.2f} s  {r['bytes'] / r['copy_s'] / mb:7.0f} MB/s")
        print(f"  PEFT load+merge_and_unload+save     {p['wall']:7.2f} s  peak above bare {above_p / mb:6.0f} MB "
              f"({above_p / r['largest']:.2f}x largest tensor)")
        print(f"  adapterfmt bake                     {o['wall']:7.2f} s  peak above bare {above_o / mb:6.0f} MB "
              f"({above_o / r['largest']:.2f}x largest tensor)")
        print(f"  bake / PEFT wall: {o['wall'] / p['wall']:.2f}x; bake throughput "
              f"{r['bytes'] / o['wall'] / mb:.0f} MB/s = {r['copy_s'] / o['wall']:.2f} of a plain copy; "
              f"max |ours - PEFT| over all tensors {r['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
