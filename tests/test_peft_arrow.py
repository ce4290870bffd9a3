"""PEFT Arrow routing over a LoRA library (``create_arrow_model`` + ``save_pretrained``) read as a ``mixture``
with ``|x . prototype|`` logits: PEFT's own logits for top-1 / top-2, GenKnowSub, temperatures; the pieces
PEFT needs (sibling task folders) named when missing."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from helpers_peft import build, logits, randomize
from helpers_spec import invoke

import adapterfmt as af


def _library(root: Path, n: int, prefix: str, seed: int) -> list[Path]:
    """``n`` PEFT LoRAs (q_proj, v_proj, o_proj of a tiny Llama; rank 2, different alphas), every factor random."""
    from peft import LoraConfig, get_peft_model

    paths = []
    for i in range(n):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(build("llama"), LoraConfig(r=2, lora_alpha=2 + 2 * i, init_lora_weights=False,
                                                           target_modules=["q_proj", "v_proj", "o_proj"]))
            randomize(pm, seed + i)
            pm.save_pretrained(root / f"{prefix}{i}")
        paths.append(root / f"{prefix}{i}")
    return paths


def _arrow(root: Path, top_k: int, temperature: float, gks: bool, seed: int | None) -> tuple[Path, torch.Tensor]:
    """PEFT's Arrow model over 3 task LoRAs (and 2 general ones with GenKnowSub), saved; its logits."""
    from peft.tuners.lora.arrow import create_arrow_model
    from peft.tuners.lora.config import ArrowConfig

    tasks = _library(root / "lib", 3, "t", 10)
    general = _library(root / "lib", 2, "g", 20) if gks else None
    ids = torch.randint(0, 48, (2, 7), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_arrow_model(build("llama"), [str(p) for p in tasks], ArrowConfig(
            top_k=top_k, router_temperature=temperature, use_gks=gks, rng_seed=seed),
            general_adapter_paths=[str(p) for p in general] if general else None).eval()
        model.save_pretrained(root / "saved")  # before a forward: PEFT's GenKnowSub edits the task LoRAs in place
        want = logits(model, ids)
    return root / "saved" / "arrow_router", want


IDS = torch.randint(0, 48, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("top_k", "temperature", "gks"), [(2, 1.0, False), (1, 1.0, False), (3, 0.5, True)])
def test_arrow_reads_as_a_mixture_with_peft_logits(tmp_path: Path, top_k: int, temperature: float, gks: bool) -> None:
    router, want = _arrow(tmp_path, top_k, temperature, gks, seed=3)
    out = tmp_path / "arrow.safetensors"
    res = invoke("convert", str(router), "--out", str(out))
    assert res.exit_code == 0, res.stderr
    adapter = af.load(out)
    assert adapter.method == "mixture" and len(adapter.modules) == 6
    entry = next(iter(adapter.modules.values()))
    assert entry["params"]["logits"] == "abs" and entry["params"]["top_k"] == top_k
    assert entry["params"]["experts"] == ["task_0", "task_1", "task_2"]
    model = build("llama")
    af.attach(model, adapter)
    plain = logits(build("llama"), IDS)
    got = logits(model, IDS)
    assert float((got - want).abs().max()) <= 1e-5
    assert float((plain - want).abs().max()) > 1e-2  # the routed experts change the model


def test_abs_logits_route_by_magnitude(tmp_path: Path) -> None:
    """The same mixture with dot-product logits routes differently (so ``logits: abs`` is what matches PEFT)."""
    router, want = _arrow(tmp_path, 1, 1.0, False, seed=3)
    adapter = af.load(router)
    model = build("llama")
    af.attach(model, adapter)
    assert float((logits(model, IDS) - want).abs().max()) <= 1e-5
    for entry in adapter.modules.values():
        entry["params"]["logits"] = "cosine"
    with pytest.raises(af.FormatError, match="mixture params.logits must be 'dot' or 'abs', got 'cosine'"):
        af.save(adapter, tmp_path / "bad.safetensors")
    for entry in adapter.modules.values():
        del entry["params"]["logits"]
    dot = build("llama")
    af.attach(dot, adapter)
    assert float((logits(dot, IDS) - want).abs().max()) > 1e-4


def test_missing_sibling_and_unseeded_prototypes(tmp_path: Path) -> None:
    router, _ = _arrow(tmp_path, 2, 1.0, False, seed=None)
    res = invoke("convert", str(router), "--out", str(tmp_path / "a.safetensors"))
    assert res.exit_code == 0, res.stderr
    assert "note: Arrow without rng_seed" in res.stderr
    adapter = af.load(tmp_path / "a.safetensors")
    mod = "model.layers.0.self_attn.q_proj"
    t = adapter.module_tensors(mod)
    a, b = t["lora_A"][0], t["lora_B"][0]
    top = torch.linalg.svd(b @ a).Vh[0]
    assert float(torch.abs(t["router"][0] @ top)) >= 1 - 1e-5  # the exact top right singular vector
    build("llama").save_pretrained(tmp_path / "base")  # with --base, the mixture records its fingerprint
    res = invoke("convert", str(router), "--out", str(tmp_path / "c.safetensors"), "--base", str(tmp_path / "base"))
    assert res.exit_code == 0, res.stderr
    assert af.load(tmp_path / "c.safetensors").base["fingerprint"] == af.base_fingerprint(tmp_path / "base")
    shutil.rmtree(router.parent / "task_1")
    bad = invoke("convert", str(router), "--out", str(tmp_path / "b.safetensors"))
    assert bad.exit_code == 1 and bad.stderr.count("\n") == 1
    assert "Arrow names adapter 'task_1'" in bad.stderr and not (tmp_path / "b.safetensors").exists()
