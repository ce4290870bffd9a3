"""Training a ``mixture`` (MeteoRA's recipe): gradients equal a transcription of MeteoRA's training forward and
gate loss (router only, and joint), the router learns to route tasks, and ``adapter train --method mixture``
with a config naming the expert adapters, with its one-line refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from adapterfmt.plugins.methods.mixture import expert_adapter
from helpers_methods import one_thread  # noqa: F401 (fixture)
from helpers_spec import invoke

import adapterfmt as af
from adapterfmt.tiny import TinyConfig, build_tiny
from adapterfmt.verbs.trainer import mean_loss

CFG = TinyConfig(vocab_size=128, hidden=32, layers=2, heads=4, intermediate=64)
PATHS = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
NAMES = ("alpha", "beta", "gamma")


pytestmark = pytest.mark.usefixtures("one_thread")


def _experts(model: torch.nn.Module, seed: int = 0, names: tuple[str, ...] = NAMES) -> dict[str, af.Adapter]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, name in enumerate(names):
        modules, tensors = {}, {}
        for p in PATHS:
            w = model.get_submodule(p).weight
            modules[p] = af.lowrank_entry(list(w.shape), 0.5 + i)
            tensors[f"{p}.lora_A"] = torch.randn(4, w.shape[1], generator=gen) / 4
            tensors[f"{p}.lora_B"] = torch.randn(w.shape[0], 4, generator=gen) / 4
        out[name] = af.Adapter(af.new_manifest("lora", modules), tensors)
    return out


def _meteora_loss(model: torch.nn.Module, gates: dict[str, torch.Tensor], experts: dict[str, dict[str, torch.Tensor]],
                  scales: list[float], top_k: int, ids: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
    """MeteoRA's training loss, transcribed: ``MoELinear.forward`` (accelerated path, training: top-k of the gate
    logits, weight 1 for top-1 else softmax(chosen / T), T = 1; ``_accelerated_forward_inner_loop``: per expert,
    the tokens that chose it, ``index_add_`` of ``B(A x) * scaling * weight``) on every routed module, plus
    ``LlamaMeteorForCausalLM``'s loss: LM cross-entropy + 50 * ``lora_gate_loss_func`` (every module's logits but
    the last position, concatenated, cross-entropy against the next token's task label)."""
    logits_seen: list[torch.Tensor] = []

    def hook(path: str):
        def fn(module, args, result):
            x = args[0]
            b, t, h = x.shape
            x = x.reshape(-1, h)
            moe_logits = x @ gates[path].t()
            moe_weights, selected = torch.topk(moe_logits, top_k, dim=-1)
            if top_k == 1:
                moe_weights = torch.ones_like(moe_weights)
            else:
                moe_weights = F.softmax(moe_weights / 1.0, dim=1, dtype=torch.float)
            result = result.reshape(-1, result.shape[-1]).clone()
            mask = F.one_hot(selected, num_classes=len(scales))
            for e in range(len(scales)):
                token_idx, top_idx = torch.where(mask[:, :, e])
                if len(token_idx) == 0:
                    continue
                a, bb = experts[path]["A"][e], experts[path]["B"][e]
                part = F.linear(F.linear(x[token_idx], a), bb) * scales[e] * moe_weights[token_idx, top_idx, None]
                result = result.index_add(0, token_idx, part)
            logits_seen.append(moe_logits.reshape(b, t, -1))
            return result.reshape(b, t, -1)
        return fn

    handles = [model.get_submodule(p).register_forward_hook(hook(p)) for p in PATHS]
    try:
        logits = model(ids)
    finally:
        for h in handles:
            h.remove()
    lm = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    all_logits = torch.cat([g[..., :-1, :].reshape(-1, len(scales)).float() for g in logits_seen])
    all_labels = torch.cat([tasks[:, 1:].reshape(-1) for _ in logits_seen])
    return lm + 50.0 * F.cross_entropy(all_logits, all_labels)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float32 rounding (both sides sum in their own order), and not trivially zero."""
    scale = float(want.abs().max())
    assert scale > 0 and float((got - want).abs().max()) <= 1e-4 * scale


@pytest.mark.parametrize(("mode", "top_k"), [("router", 2), ("joint", 2), ("router", 1)])
def test_gradients_equal_meteora_transcription(mode: str, top_k: int) -> None:
    base = build_tiny(0, CFG)
    experts = _experts(base)
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    session = af.registry.verb("mixture", "train")(model, config={"train": mode, "top_k": top_k}, experts=experts)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CFG.vocab_size, (3, 9), generator=gen)
    tasks = torch.tensor([[0] * 5 + [2] * 4, [1] * 9, [2] * 9])
    loss = mean_loss(model, (ids, ids)) + session.regularization(task_ids=tasks)
    loss.backward()

    ref_model = copy.deepcopy(base)
    for p in ref_model.parameters():
        p.requires_grad_(False)
    gates = {p: session.layers[p].weights.router.detach().clone().requires_grad_() for p in PATHS}
    factors = {p: {"A": torch.stack([experts[n].tensor(f"{p}.lora_A") for n in NAMES]).requires_grad_(),
                   "B": torch.stack([experts[n].tensor(f"{p}.lora_B") for n in NAMES]).requires_grad_()} for p in PATHS}
    _meteora_loss(ref_model, gates, factors, [0.5, 1.5, 2.5], top_k, ids, tasks).backward()
    trained = dict(session.named_parameters())
    assert sorted(trained) == sorted(f"{p}.{r}" for p in PATHS for r in (["router", "lora_A", "lora_B"]
                                                                          if mode == "joint" else ["router"]))
    for p in PATHS:
        _close(trained[f"{p}.router"].grad, gates[p].grad)
        assert float(gates[p].grad.abs().max()) > 0
        if mode == "joint":
            _close(trained[f"{p}.lora_A"].grad, factors[p]["A"].grad)
            _close(trained[f"{p}.lora_B"].grad, factors[p]["B"].grad)
    if top_k == 1:  # gate weight 1: the LM loss alone sends the router no gradient, as in MeteoRA
        model.zero_grad()
        for q in session.parameters():
            q.grad = None
        mean_loss(model, (ids, ids)).backward()
        assert all(q.grad is None or not q.grad.any() for q in session.parameters())


def test_router_learns_to_route_tasks_and_experts_stay_frozen() -> None:
    """Two tasks (lower-case vs digit text), router only, gate loss: over 90% of held-out tokens of each task
    go to its expert at every routed module (chance: 50%); the extracted mixture holds the experts exactly as given."""
    base = build_tiny(0, CFG)
    experts = _experts(base, seed=2, names=("lower", "digits"))
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    session = af.registry.verb("mixture", "train")(model, config={"top_k": 1}, experts=experts)
    opt = session.optimizer(lr=3e-2)
    gen = torch.Generator().manual_seed(3)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        task = torch.randint(0, 2, (n, 1), generator=gen)
        ids = torch.where(task == 0, torch.randint(97, 123, (n, 12), generator=gen),
                          torch.randint(48, 58, (n, 12), generator=gen))
        return ids, task.expand(n, 12)

    for _ in range(150):
        ids, tasks = batch(8)
        loss = mean_loss(model, (ids, ids)) + session.regularization(task_ids=tasks)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ids, tasks = batch(16)
    mix = session.extract()
    session.remove()
    inputs: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(p).register_forward_pre_hook(lambda m, a, p=p: inputs.update({p: a[0]}))
               for p in PATHS]
    af.attach(model, mix)
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    for p in PATHS:
        chosen = (inputs[p] @ mix.tensor(f"{p}.router").t()).argmax(-1)
        assert float((chosen[:, :-1] == tasks[:, 1:]).float().mean()) > 0.9, p
        for i, name in enumerate(("lower", "digits")):
            assert torch.equal(mix.tensor(f"{p}.lora_A")[i], experts[name].tensor(f"{p}.lora_A"))
            assert torch.equal(mix.tensor(f"{p}.lora_B")[i], experts[name].tensor(f"{p}.lora_B"))


def _cli_setup(tmp_path: Path, **config) -> tuple[Path, dict[str, af.Adapter]]:
    experts = _experts(build_tiny(seed=0), seed=4)
    paths = {n: str(af.save(a, tmp_path / f"{n}.safetensors", overwrite=True)) for n, a in experts.items()}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump({"expert_adapters": paths, **config}))
    with open(tmp_path / "data.jsonl", "w") as f:
        f.writelines(json.dumps({"text": ["abc def ghi", "123 456 789", "ABC DEF GHI"][i % 3] * 2,
                                "task": NAMES[i % 3]}) + "\n" for i in range(12))
    return tmp_path / "mix.yaml", experts


@pytest.mark.parametrize("mode", ["router", "joint"])
def test_cli_trains_a_mixture_from_named_experts(mode: str, tmp_path: Path) -> None:
    cfg, experts = _cli_setup(tmp_path, train=mode)
    res = invoke("train", "--method", "mixture", "--config", str(cfg), "--data", str(tmp_path / "data.jsonl"),
                 "--out", str(tmp_path / "mix.safetensors"), "--max-steps", "3", "--batch-size", "6", "--lr", "1e-2",
                 "--quiet")
    assert res.exit_code == 0, res.stderr
    mix = af.load(tmp_path / "mix.safetensors")
    assert mix.manifest["method"]["config"]["experts"] == list(NAMES)
    assert mix.manifest["method"]["config"]["train"] == mode
    p = PATHS[0]
    assert mix.modules[p]["kind"] == "mixture" and mix.modules[p]["params"]["top_k"] == 2
    same = [torch.equal(mix.tensor(f"{p}.lora_A")[i], experts[n].tensor(f"{p}.lora_A")) for i, n in enumerate(NAMES)]
    assert all(same) if mode == "router" else not any(same)
    one = expert_adapter(mix, "beta")  # the experts stay addressable by name
    assert one.modules[p]["params"]["scale"] == experts["beta"].modules[p]["params"]["scale"]


def test_relative_expert_paths_resolve_against_the_config_folder_and_resume_from_anywhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``expert_adapters: {name: relative path}`` in a --config file is relative to the file's folder (not the
    working directory), and the run records absolute paths: a resume from another working directory finds the
    experts (it used to load the recorded relative paths from there and fail)."""
    folder = tmp_path / "cfg"
    folder.mkdir()
    for name, a in _experts(build_tiny(seed=0), seed=4).items():
        af.save(a, folder / f"{name}.safetensors")
    (folder / "mix.yaml").write_text(yaml.safe_dump({"expert_adapters": {n: f"{n}.safetensors" for n in NAMES}}))
    with open(tmp_path / "data.jsonl", "w") as f:
        f.writelines(json.dumps({"text": "abc def ghi 123", "task": NAMES[i % 3]}) + "\n" for i in range(6))
    for cwd in ("one", "two"):
        (tmp_path / cwd).mkdir()
    monkeypatch.chdir(tmp_path / "one")
    res = invoke("train", "--method", "mixture", "--config", "../cfg/mix.yaml", "--data", "../data.jsonl",
                 "--out", "../mix.safetensors", "--max-steps", "2", "--batch-size", "3", "--checkpoint-every", "1",
                 "--quiet", "--cpu")
    assert res.exit_code == 0, res.output
    want = {n: str(folder / f"{n}.safetensors") for n in NAMES}
    assert af.load(tmp_path / "mix.safetensors").manifest["method"]["config"]["expert_adapters"] == want
    monkeypatch.chdir(tmp_path / "two")
    res = invoke("train", "--resume", str(tmp_path / "mix.safetensors.checkpoints" / "step-00000001"), "--quiet",
                 "--cpu", "--overwrite")
    assert res.exit_code == 0, res.output
    assert af.load(tmp_path / "mix.safetensors").manifest["method"]["config"]["expert_adapters"] == want
    session = af.registry.get_method("mixture").train(build_tiny(seed=0), config={
        "expert_adapters": {n: f"../cfg/{n}.safetensors" for n in NAMES}})  # the API: the working directory
    assert session.config["expert_adapters"] == want


def test_cli_refusals(tmp_path: Path) -> None:
    cfg, _ = _cli_setup(tmp_path, gate_loss_wieght=1.0)
    data, out = tmp_path / "data.jsonl", tmp_path / "o.safetensors"
    args = ["--data", str(data), "--out", str(out), "--max-steps", "1", "--batch-size", "3", "--quiet"]
    res = invoke("train", "--method", "mixture", "--config", str(cfg), *args)
    assert res.exit_code == 1 and res.stderr.count("error:") == 1 and res.stderr.endswith("?)\n")
    assert "mixture config has unknown key(s): 'gate_loss_wieght' (did you mean 'gate_loss_weight'?)" in res.stderr
    cfg, _ = _cli_setup(tmp_path)
    with open(data, "a") as f:
        f.write(json.dumps({"text": "zzz zzz", "task": "poetry"}) + "\n")
    res = invoke("train", "--method", "mixture", "--config", str(cfg), *args)
    assert res.exit_code == 1 and "task 'poetry' is not one of the session's tasks (alpha, beta, gamma)" in res.stderr
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump({"target_modules": ["q_proj"], "r": 2}))
    res = invoke("train", "--method", "lora", "--config", str(tmp_path / "lora.yaml"), *args)
    assert res.exit_code == 1 and "records carry a 'task' ('alpha'), which method 'lora' does not train on" in res.stderr
    assert not out.exists()


def test_library_refusals() -> None:
    base = build_tiny(0, CFG)
    experts = _experts(base)
    train = af.registry.verb("mixture", "train")
    with pytest.raises(af.FormatError, match="needs its experts"):
        train(copy.deepcopy(base), config={})
    with pytest.raises(af.FormatError, match="top_k 4 exceeds the 3 experts"):
        train(copy.deepcopy(base), config={"top_k": 4}, experts=experts)
    with pytest.raises(af.FormatError, match=r"config experts \['x'\] differ"):
        train(copy.deepcopy(base), config={"experts": ["x"]}, experts=experts)
    odd = dict(experts)
    odd["gamma"] = af.Adapter(af.new_manifest("lora", {PATHS[0]: experts["gamma"].modules[PATHS[0]]}),
                              {f"{PATHS[0]}.{r}": experts["gamma"].tensor(f"{PATHS[0]}.{r}") for r in ("lora_A", "lora_B")})
    with pytest.raises(af.UnsupportedError, match="target different modules"):
        train(copy.deepcopy(base), config={}, experts=odd)
    other = build_tiny(0, TinyConfig(vocab_size=128, hidden=32, layers=1, heads=4, intermediate=64))
    with pytest.raises(af.BaseMismatchError, match="'model.layers.1.self_attn.q_proj', which the model does not have"):
        train(other, config={}, experts=experts)


def test_sequence_granularity_trains_on_the_lm_loss_and_refuses_the_gate_loss() -> None:
    """One routing per sequence: top-2 sends the router LM gradients; MeteoRA's per-token gate loss does not apply."""
    base = build_tiny(0, CFG)
    model = copy.deepcopy(base)
    session = af.registry.verb("mixture", "train")(model, config={"granularity": "sequence"}, experts=_experts(base))
    ids = torch.randint(0, CFG.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    mean_loss(model, (ids, ids)).backward()
    assert all(float(p.grad.abs().max()) > 0 for p in session.parameters())
    with pytest.raises(af.UnsupportedError, match="the gate loss needs granularity 'token'"):
        session.regularization(task_ids=torch.zeros(2, 6, dtype=torch.long))
