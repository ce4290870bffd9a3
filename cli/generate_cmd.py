"""``adapter generate``: greedy or sampled decoding from a model steered at decoding time (EFT / proxy-tuning)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from .common import JsonOpt, UsageError, cli_errors, console, print_json, progress


@cli_errors
def generate(
    model: Path = typer.Argument(..., help="The (large) model folder: config.json, safetensors weights, tokenizer."),
    prompt: str = typer.Option(..., "--prompt", help="The prompt text."),
    small: Path = typer.Option(None, "--small", help="The small base model folder; with --tuned or --adapter it "
                               "steers MODEL: log p_MODEL + beta (log p_tuned - log p_small)."),
    tuned: Path = typer.Option(None, "--tuned", help="The small tuned model folder."),
    adapter: str = typer.Option(None, "--adapter", help="An adapter that makes --small the small tuned model."),
    beta: list[float] = typer.Option(None, "--beta", help="Scale of the small models' difference (default 1); "
                                     "repeat it for a sweep, one generation per value."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="Tokens to generate at most."),
    sample: bool = typer.Option(False, "--sample", help="Sample from the composed distribution instead of "
                                "taking its most likely token."),
    temperature: float = typer.Option(None, "--temperature", help="With --sample: divide the scores by this "
                                      "(> 0; default 1)."),
    top_k: int = typer.Option(None, "--top-k", help="With --sample: keep the K most likely tokens (default: all)."),
    top_p: float = typer.Option(None, "--top-p", help="With --sample: keep the smallest set of tokens whose "
                                "probability reaches P (default 1: all)."),
    seed: int = typer.Option(None, "--seed", help="With --sample: the seed of the draws (default 0); each beta of "
                             "a sweep starts from it."),
    as_json: bool = JsonOpt,
) -> None:
    """Generate from MODEL, or from MODEL steered by a small tuned model's difference from its base (EFT's
    up-scaling, proxy-tuning): next-token scores log p_MODEL + beta (log p_tuned - log p_small). Greedy unless
    --sample; the same --seed gives the same text."""
    import adapterfmt as af

    if small is None and (tuned is not None or adapter is not None or beta):
        raise UsageError("--tuned, --adapter and --beta need --small")
    if small is not None and (tuned is None) == (adapter is None):
        raise UsageError("with --small give exactly one of --tuned and --adapter")
    given = [n for n, v in (("--temperature", temperature), ("--top-k", top_k), ("--top-p", top_p),
                            ("--seed", seed)) if v is not None]
    if given and not sample:
        raise UsageError(f"{', '.join(given)} need --sample")
    sampling = None
    if sample:
        try:
            sampling = af.Sampling(temperature=1.0 if temperature is None else temperature,
                                   top_k=top_k or 0, top_p=1.0 if top_p is None else top_p, seed=seed or 0)
        except ValueError as e:
            raise UsageError(str(e)) from None
    betas = list(beta or [1.0]) if small is not None else [0.0]
    terms = [af.Term(model)] if small is None else af.eft_terms(model, small, small_tuned=tuned, adapter=adapter,
                                                               beta=betas[0])
    from transformers.utils import logging

    logging.disable_progress_bar()  # stderr keeps one line per error / note (docs/CLI.md)
    comp = af.Composition(terms)
    ids = comp.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    results = []
    for b in progress(betas, "generating", total=len(betas), quiet=as_json):
        run = comp if small is None else comp.with_coefficients([1.0, b, -b])
        new = run.generate(ids, max_new_tokens=max_new_tokens, sample=sampling)[0, ids.shape[1]:].tolist()
        results.append({"beta": b, "tokens": new, "text": comp.tokenizer.decode(new, skip_special_tokens=True)})
    if as_json:
        print_json({"prompt": prompt, "composition": comp.record(), "results": results,
                    "sampling": None if sampling is None else dataclasses.asdict(sampling)})
        return
    for r in results:
        label = f"beta {r['beta']:g}: " if small is not None else ""
        console.print(f"{label}{prompt} {r['text']}", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
