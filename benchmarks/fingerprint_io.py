"""How much of a ~1 GB checkpoint the base fingerprint reads, against hashing every byte (the naive baseline).

Writes a 1 GiB fp32 safetensors checkpoint (64 tensors of 2048 x 2048, in 3 shards with an index), then, each
with the file evicted from the page cache first (posix_fadvise DONTNEED, no root needed):
  - ``fingerprint_checkpoint`` (structure + sampled values),
  - sha256 of every tensor file (what a content hash of the checkpoint costs).
Reports bytes asked for by read calls (``rchar`` of /proc/self/io), bytes fetched from the disk (``read_bytes``;
includes kernel readahead) and wall time, with ratios. Run: ``python benchmarks/fingerprint_io.py [--gib 1]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import adapterfmt as af
from adapterfmt.format.fingerprint import checkpoint_files
from adapterfmt.format.safetensors_io import read_header


def io_counters() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        key, value = line.split(":")
        out[key] = int(value)
    return out


def evict(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(fn, files: list[Path]) -> dict[str, float]:
    evict(files)
    before, t0 = io_counters(), time.perf_counter()
    result = fn()
    seconds, after = time.perf_counter() - t0, io_counters()
    return {"rchar": after["rchar"] - before["rchar"], "read_bytes": after["read_bytes"] - before["read_bytes"],
            "seconds": seconds, "result": result}


def sha_all(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def write_checkpoint(folder: Path, gib: float) -> None:
    n = max(3, round(gib * 64))
    names = [f"model.layers.{i // 4}.{['q', 'k', 'v', 'o'][i % 4]}_proj.weight" for i in range(n)]
    gen = torch.Generator().manual_seed(0)
    shards = [names[i::3] for i in range(3)]
    weight_map = {}
    for s, group in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-00003.safetensors"
        save_file({name: torch.randn(2048, 2048, generator=gen) for name in group}, folder / fname)
        weight_map.update({name: fname for name in group})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="checkpoint size in GiB (default 1)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="fp-bench-"))
    try:
        write_checkpoint(folder, args.gib)
        files = checkpoint_files(folder)
        size = sum(f.stat().st_size for f in files)
        n_tensors = sum(len(read_header(f).tensors) for f in files)
        fp = measure(lambda: af.fingerprint_checkpoint(folder), files)
        full = measure(lambda: sha_all(files), files)
        print(f"checkpoint: {size / 2**30:.2f} GiB, {n_tensors} tensors in {len(files)} shards")
        for name, m in (("fingerprint_checkpoint", fp), ("sha256 of every byte", full)):
            print(f"{name:24s} read calls {m['rchar']:>14,} B ({m['rchar'] / size:.6%})   "
                  f"from disk {m['read_bytes']:>14,} B ({m['read_bytes'] / size:.4%})   {m['seconds'] * 1e3:9.1f} ms")
        print(f"ratio (sha256 / fingerprint): bytes asked {full['rchar'] / max(fp['rchar'], 1):,.0f}x, "
              f"bytes from disk {full['read_bytes'] / max(fp['read_bytes'], 1):,.0f}x, "
              f"time {full['seconds'] / fp['seconds']:,.0f}x")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
