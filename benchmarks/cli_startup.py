"""Start-up time of the ``adapter`` command: median wall and CPU time (user + sys) of N fresh processes per
command, against ``python -c pass`` (the interpreter's own start) and ``python -c "import torch"`` in the same
run. On a shared machine the CPU time is the steadier figure: waiting for a core adds wall time only.

    python benchmarks/cli_startup.py [--runs 15]

Runs are interleaved (one of each command per round) so that a busy machine slows every command alike.
Entry-point plugins are blocked (``ADAPTERFMT_BLOCK_PLUGINS``): a third-party plugin's own imports are its
own start-up cost, not adapterfmt's. Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = shutil.which("adapter") or str(Path(sys.executable).with_name("adapter"))
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "python -c 'import adapterfmt'": [sys.executable, "-c", "import adapterfmt"],
    "adapter --help": [ADAPTER, "--help"],
    "adapter --version": [ADAPTER, "--version"],
    "adapter inspect spec/examples/lowrank": [ADAPTER, "inspect", str(ROOT / "spec/examples/lowrank")],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    blocked = ",".join(ep.name for ep in md.entry_points(group="adapterfmt"))
    env = {**os.environ, "ADAPTERFMT_BLOCK_PLUGINS": blocked}
    wall: dict[str, list[float]] = {name: [] for name in COMMANDS}
    cpu: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.runs + 1):  # the first round warms the page cache and is dropped
        for name, cmd in COMMANDS.items():
            r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=True)
            t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            wall[name].append(t1 - t0)
            cpu[name].append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
    base = statistics.median(cpu["python -c pass"][1:])
    print(f"{args.runs} runs each; entry-point plugins blocked: {blocked or 'none installed'}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| command | wall, median (min) | CPU, median | CPU above `python -c pass` |")
    print("|---|---|---|---|")
    for name in COMMANDS:
        w, c = wall[name][1:], statistics.median(cpu[name][1:])
        print(f"| `{name}` | {statistics.median(w) * 1000:.0f} ms ({min(w) * 1000:.0f} ms) | {c * 1000:.0f} ms | "
              f"{(c - base) * 1000:+.0f} ms |")


if __name__ == "__main__":
    main()
