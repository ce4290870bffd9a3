"""Decoding-time composition (EFT / proxy-tuning): af.compose against the formula written out, the proxy-tuning
authors' raw-logit form, the LogitsProcessor inside generate against a step-by-step loop, vocabulary refusals,
and ``adapter generate``. Tiny Llama models built from configs, tokenizers built in memory (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_spec import invoke
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList, PreTrainedTokenizerFast

import adapterfmt as af

WORDS = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(36)]


def _tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def _model(folder: Path, seed: int, hidden: int, *, vocab: int = 48, words: list[str] = WORDS) -> Path:
    """A tiny Llama (its output layer padded past the tokenizer's 40 tokens, as real models often are)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, pad_token_id=3,
                      bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    _tokenizer(words).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compose")
    out = {"large": _model(root / "large", 0, 48), "small": _model(root / "small", 1, 32),
           "tuned": _model(root / "tuned", 2, 32)}
    small = LlamaForCausalLM.from_pretrained(out["small"])
    gen = torch.Generator().manual_seed(3)
    modules, tensors = {}, {}
    for i in range(2):
        for p in ("q_proj", "v_proj"):
            path = f"model.layers.{i}.self_attn.{p}"
            w = small.get_submodule(path).weight
            modules[path] = af.lowrank_entry(list(w.shape), 2.0)
            tensors[f"{path}.lora_A"] = torch.randn(4, w.shape[1], generator=gen) / 4
            tensors[f"{path}.lora_B"] = torch.randn(w.shape[0], 4, generator=gen) / 4
    out["adapter"] = af.save(af.Adapter(af.new_manifest("lora", modules), tensors), root / "lora.safetensors")
    return out


def _log_probs(folder: Path, ids: torch.Tensor, mask: torch.Tensor | None = None, adapter: Path | None = None):
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    if adapter is not None:
        af.attach(model, af.load(adapter))
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    return logits[:, -1, :40].float()


def test_compose_is_the_eft_formula(models: dict[str, Path]) -> None:
    ids = torch.tensor([[1, 5, 9, 12, 7], [1, 20, 21, 22, 23]])
    beta = 0.7
    got = af.compose(af.eft_terms(models["large"], models["small"], small_tuned=models["tuned"], beta=beta), ids)
    large, tuned, small = (_log_probs(models[k], ids) for k in ("large", "tuned", "small"))
    want = large.log_softmax(-1) + beta * (tuned.log_softmax(-1) - small.log_softmax(-1))
    assert got.shape == (2, 40)
    assert float((got - want).abs().max()) <= 1e-5
    # the proxy-tuning authors' code adds raw logits: the same next-token distribution
    raw = large + beta * (tuned - small)
    assert float((got.softmax(-1) - raw.softmax(-1)).abs().max()) <= 1e-6
    assert torch.equal(got.argmax(-1), raw.argmax(-1))


def test_adapter_term_and_left_padding(models: dict[str, Path]) -> None:
    """The tuned small model may be the small base plus an adapter; a left-padded row scores as it does alone."""
    terms = af.eft_terms(models["large"], models["small"], adapter=models["adapter"], beta=1.0)
    comp = af.Composition(terms)
    ids = torch.tensor([[3, 3, 1, 5, 9], [1, 20, 21, 22, 23]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    got = comp.logits(ids, mask)
    tuned = _log_probs(models["small"], ids, mask, adapter=models["adapter"])
    want = _log_probs(models["large"], ids, mask).log_softmax(-1) + tuned.log_softmax(-1) - \
        _log_probs(models["small"], ids, mask).log_softmax(-1)
    assert float((got - want).abs().max()) <= 1e-5
    alone = comp.logits(ids[:1, 2:])
    assert float((got[0] - alone[0]).abs().max()) <= 1e-4
    rec = comp.record()
    assert [t["coefficient"] for t in rec["terms"]] == [1.0, 1.0, -1.0]
    assert rec["terms"][1]["adapter"] == str(models["adapter"]) and rec["vocabulary"]["size"] == 40
    assert all(t["fingerprint"]["structure"] for t in rec["terms"])


def test_logits_processor_in_generate_matches_a_stepwise_loop(models: dict[str, Path]) -> None:
    """generate(..., logits_processor=[processor]) picks, greedily, the argmax of af.compose on the whole
    sequence at every step (the processor's terms run with KV caches; the loop recomputes everything)."""
    comp = af.Composition(af.eft_terms(models["large"], models["small"], small_tuned=models["tuned"], beta=1.5))
    ids = torch.tensor([[1, 5, 9, 12]])
    driver = comp.models[0]
    steps = []
    out = driver.generate(ids, max_new_tokens=6, do_sample=False, logits_processor=LogitsProcessorList(
        [comp.processor(on_step=lambda: steps.append(1))]), pad_token_id=3, eos_token_id=None)
    seq = ids
    for _ in range(6):
        seq = torch.cat([seq, comp.logits(seq).argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq) and len(steps) == 6
    plain = driver.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=3, eos_token_id=None)
    assert not torch.equal(plain, seq)  # the small models' difference steers the large one


def test_sampling_draws_from_the_composed_distribution(models: dict[str, Path]) -> None:
    """Sampled generate equals a loop that draws each token from softmax(top-k(af.compose / T)) with torch's
    generator seeded the same way; the seed fixes the text; a tiny top-p keeps only the most likely token."""
    comp = af.Composition(af.eft_terms(models["large"], models["small"], small_tuned=models["tuned"], beta=1.0))
    ids = torch.tensor([[1, 5, 9, 12]])
    sample = af.Sampling(temperature=1.7, top_k=6, seed=11)
    out = comp.generate(ids, max_new_tokens=8, stop_at_eos=False, sample=sample)
    torch.manual_seed(11)
    seq = ids
    for _ in range(8):
        scores = torch.full((1, 48), float("-inf"))
        scores[:, :40] = comp.logits(seq) / 1.7
        scores[scores < scores.topk(6).values[:, -1:]] = float("-inf")
        seq = torch.cat([seq, torch.multinomial(scores.softmax(-1), 1)], dim=1)
    assert torch.equal(out, seq)
    assert torch.equal(comp.generate(ids, max_new_tokens=8, stop_at_eos=False, sample=sample), out)
    other = comp.generate(ids, max_new_tokens=8, stop_at_eos=False, sample=af.Sampling(temperature=1.7, top_k=6,
                                                                                       seed=12))
    assert not torch.equal(other, out)
    greedy = comp.generate(ids, max_new_tokens=8, stop_at_eos=False)
    nucleus = comp.generate(ids, max_new_tokens=8, stop_at_eos=False, sample=af.Sampling(top_p=1e-6, seed=3))
    assert torch.equal(nucleus, greedy) and not torch.equal(greedy, out)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        af.Sampling(temperature=0)


def test_incompatible_vocabularies_are_refused(models: dict[str, Path], tmp_path: Path) -> None:
    swapped = WORDS[:4] + ["w1", "w0"] + WORDS[6:]
    other = _model(tmp_path / "other", 4, 32, words=swapped)
    with pytest.raises(af.BaseMismatchError, match=r"other: tokenizer differs from .*large's: token 'w0' has id 5 "
                                                   r"there and 4 in the first term's"):
        af.Composition([af.Term(models["large"]), af.Term(other, -1.0)])
    short = _model(tmp_path / "short", 5, 32, vocab=32)
    with pytest.raises(af.BaseMismatchError, match="output layer has 32 rows, fewer than the tokenizer's 40"):
        af.Composition([af.Term(models["large"]), af.Term(short, 0.5)])


def test_cli_generate(models: dict[str, Path], tmp_path: Path) -> None:
    res = invoke("generate", str(models["large"]), "--small", str(models["small"]), "--adapter", str(models["adapter"]),
                 "--beta", "0", "--beta", "1.5", "--prompt", "w5 w9 w12", "--max-new-tokens", "4", "--json")
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert [r["beta"] for r in data["results"]] == [0.0, 1.5]
    comp = af.Composition(af.eft_terms(models["large"], models["small"], adapter=models["adapter"], beta=1.5))
    for r in data["results"]:  # greedy on af.compose, stopping after the tokenizer's eos (</s>, id 2)
        seq, new = torch.tensor([[9, 13, 16]]), []  # w5 w9 w12
        run = comp.with_coefficients([1.0, r["beta"], -r["beta"]])
        while len(new) < 4 and (not new or new[-1] != 2):
            new.append(int(run.logits(seq).argmax(-1)))
            seq = torch.cat([seq, torch.tensor([[new[-1]]])], dim=1)
        assert r["tokens"] == new
    assert data["results"][0]["tokens"] != data["results"][1]["tokens"]
    text = invoke("generate", str(models["large"]), "--small", str(models["small"]), "--tuned", str(models["tuned"]),
                  "--beta", "1", "--prompt", "w5 w9", "--max-new-tokens", "2")
    assert text.exit_code == 0 and text.stdout.startswith("beta 1: w5 w9 "), text.stdout
    swapped = _model(tmp_path / "swapped", 4, 32, words=WORDS[:4] + ["w1", "w0"] + WORDS[6:])
    bad = invoke("generate", str(models["large"]), "--small", str(swapped), "--tuned", str(models["tuned"]),
                 "--beta", "1", "--prompt", "w5")
    assert bad.exit_code == 1 and bad.stderr.count("\n") == 1 and "tokenizer differs" in bad.stderr
    both = invoke("generate", str(models["large"]), "--small", str(models["small"]), "--tuned", str(models["tuned"]),
                  "--adapter", str(models["adapter"]), "--beta", "1", "--prompt", "w5")
    assert both.exit_code == 2 and "exactly one of --tuned and --adapter" in both.stderr
    args = ["generate", str(models["large"]), "--small", str(models["small"]), "--tuned", str(models["tuned"]),
            "--prompt", "w5 w9", "--max-new-tokens", "5", "--json"]
    sampled = [json.loads(invoke(*args, "--sample", "--temperature", "1.5", "--seed", str(s)).stdout) for s in (4, 4, 5)]
    assert sampled[0]["results"] == sampled[1]["results"] and sampled[0]["results"] != sampled[2]["results"]
    assert sampled[0]["sampling"] == {"temperature": 1.5, "top_k": 0, "top_p": 1.0, "seed": 4}
    loose = invoke(*args, "--top-k", "3")
    assert loose.exit_code == 2 and "--top-k need --sample" in loose.stderr
    zero = invoke(*args, "--sample", "--temperature", "0")
    assert zero.exit_code == 2 and "temperature must be > 0" in zero.stderr
