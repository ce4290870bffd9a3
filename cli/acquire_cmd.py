"""``adapter acquire``: one active-learning step (STAR's dynamic uncertainty): the pool's records to label next."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import (
    CallbackBar,
    JsonOpt,
    OverwriteOpt,
    UsageError,
    cli_errors,
    console,
    hidden_alias,
    out_option,
    print_json,
    renamed,
)


class _Bar(CallbackBar):
    """Forward passes done, on stderr (hidden with --quiet / --json or off a terminal)."""

    def __init__(self, quiet: bool) -> None:
        super().__init__("score", quiet)

    def __call__(self, done: int, total: int) -> None:
        self.update(done, total)


@cli_errors
def acquire(
    base: Path = typer.Option(None, "--base", help="The base model folder (as for `adapter train`); default: the "
                              "demo's tiny model. --model is an alias."),
    model: Path = hidden_alias("--model"),
    adapter: Path = typer.Option(None, "--adapter", help="The adapter trained on the labelled records (this "
                                 "iteration's model); without it the bare base is scored."),
    pool: Path = typer.Option(None, "--pool", help="JSONL of the whole pool: objects with string 'prompt' and "
                              "'completion'."),
    labelled: Path = typer.Option(None, "--labelled", help="JSONL of the records already labelled (each must be in "
                                  "the pool); they are not scored."),
    n: int = typer.Option(None, "--n", min=1, help="How many records to select."),
    iteration: int = typer.Option(0, "--iteration", min=0, help="The active-learning iteration (0: the model "
                                  "trained on the initial subset); the current model's weight is "
                                  "--weight-step * (iteration + 1), which must not exceed 1."),
    measure: str = typer.Option("pe", "--measure", help="pe (the completion's negative log-likelihood) or entropy "
                                "(of each next-token distribution), summed over the completion."),
    static: bool = typer.Option(False, "--static", help="Plain uncertainty of the current model (one pass), not "
                                "STAR's dynamic mix with the base model's."),
    mc_passes: int = typer.Option(3, "--mc-passes", min=1, help="Monte-Carlo dropout passes of the current model."),
    dropout: float = typer.Option(None, "--dropout", min=0.0, max=0.999, help="Dropout on the adapter's inputs in "
                                  "those passes (default: the adapter's recorded dropout)."),
    weight_step: float = typer.Option(0.1, "--weight-step", min=0.0, help="The current model's weight per "
                                      "iteration (STAR: 0.1)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Records per forward pass."),
    max_length: int = typer.Option(512, "--max-length", min=2, help="Tokens per record at most."),
    seed: int = typer.Option(0, "--seed", help="Seed of the dropout draws."),
    out: Path = out_option("Where to write the selected records (JSONL, their lines as given, most uncertain "
                           "first)."),
    cpu: bool = typer.Option(False, "--cpu", help="Score on the CPU even when a GPU is available."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    overwrite: bool = OverwriteOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Select the next records to label from a pool (active learning with STAR's dynamic uncertainty: the
    adapter's Monte-Carlo-dropout uncertainty mixed with the base model's); train the next adapter on the
    labelled records plus these, e.g. with `adapter train --method star`."""
    base = renamed(base, model, new="--base", old="--model", warn=False)
    from adapterfmt.verbs.acquire import MEASURES
    from adapterfmt.verbs.acquire import acquire as run

    if pool is None or n is None or out is None:
        raise UsageError("give --pool, --n and --out")
    if measure not in MEASURES:
        raise UsageError(f"--measure {measure!r} is not one of {', '.join(MEASURES)}")
    with _Bar(quiet or as_json) as bar:
        result = run(pool, n=n, base=base, adapter=adapter, labelled=labelled, iteration=iteration, measure=measure,
                     dynamic=not static, mc_passes=mc_passes, dropout=dropout, weight_step=weight_step,
                     batch_size=batch_size, max_length=max_length, seed=seed, out=out, overwrite=overwrite,
                     device="cpu" if cpu else None, progress=bar)
    lines = [result.records[i].number for i in result.selected]
    if as_json:
        print_json({"out": str(out), "measure": measure, "dynamic": not static, "weight": result.weight,
                    "candidates": result.candidates,
                    "selected": [{"line": k, "score": s} for k, s in zip(lines, result.scores, strict=True)]})
        return
    how = f"dynamic, weight {result.weight:g}" if result.weight is not None else "static"
    console.print(f"selected {len(lines)} of {result.candidates} unlabelled records ({measure}, {how}): {out}",
                  highlight=False)


def register(app: typer.Typer) -> None:
    app.command("acquire")(acquire)
