"""A CPU install has no Triton (it is the ``gpu`` extra): the library imports and every apply path runs through the
kernel dispatcher's torch code. Checked in a fresh interpreter where ``import triton`` fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers_spec import EXAMPLES

PROBE = r"""
import json, sys

class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "triton":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTriton())

import torch
import adapterfmt as af
from adapterfmt import kernels
from adapterfmt.format.golden import golden_base
from adapterfmt.kernels._triton import triton_available

LINEAR = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj",
          "model.layers.0.mlp.down_proj")
x = {m: torch.randn(5, golden_base().get_submodule(m).in_features, generator=torch.Generator().manual_seed(0))
     for m in LINEAR}
errors, moved = {}, {}
for kind in ("lowrank", "sparse", "ternary", "vector"):
    model, adapter = golden_base(), af.load(sys.argv[1] + "/" + kind)
    mods = [m for m in LINEAR if m in adapter.modules]
    with torch.no_grad():
        base = {m: model.get_submodule(m)(x[m]) for m in mods}
        af.attach(model, adapter, name="a")
        unmerged = {m: model.get_submodule(m)(x[m]) for m in mods}
        af.merge_into(model, "a")
        merged = {m: model.get_submodule(m)(x[m]) for m in mods}
    errors[kind] = max((unmerged[m] - merged[m]).abs().max().item() for m in mods)
    moved[kind] = max((unmerged[m] - base[m]).abs().max().item() for m in mods)

model = golden_base()  # per-row adapters in one batched pass (the multi-LoRA pool)
af.attach(model, af.load(sys.argv[1] + "/lowrank"), name="a")
af.attach(model, af.load(sys.argv[1] + "/lowrank_svd"), name="b", activate=False)
q = model.get_submodule(LINEAR[0])
xq = x[LINEAR[0]][:3]
with torch.no_grad():
    singles = []
    for name in ("a", None, "b"):
        af.activate(model, name)
        singles.append(q(xq))
    with af.adapter_ids(model, ["a", None, "b"]):
        rows = q(xq)
errors["per_row"] = max((rows[i] - singles[i][i]).abs().max().item() for i in range(3))

import os
os.environ[kernels.ENV] = "triton"
try:
    kernels.lora_linear(xq, q.weight, torch.ones(1, 8), torch.ones(8, 1), 1.0)
    forced = "ran"
except RuntimeError as e:
    forced = str(e)
print(json.dumps({"errors": errors, "moved": moved, "triton_loaded": "triton" in sys.modules,
                  "available": triton_available(), "forced": forced}))
"""


def test_the_cpu_paths_run_without_triton():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ADAPTERFMT_KERNELS")}
    r = subprocess.run([sys.executable, "-c", PROBE, str(EXAMPLES)], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["triton_loaded"] is False and out["available"] is False
    assert out["forced"] == "ADAPTERFMT_KERNELS=triton but triton is not installed"
    for kind, err in out["errors"].items():
        assert err < 1e-5, (kind, err)  # unmerged (the dispatcher's torch paths) == merged weights
    for kind, delta in out["moved"].items():
        assert delta > 1e-3, (kind, delta)  # ... and each adapter changed the output
