"""``adapter push`` and ``adapter pull``: share adapters through the Hugging Face Hub (or any Hub-compatible
endpoint named by ``HF_ENDPOINT``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

from .common import JsonOpt, OverwriteOpt, cli_errors, console, print_json


@contextlib.contextmanager
def _quiet_hf(quiet: bool) -> Iterator[None]:
    """Keep huggingface_hub's own warnings off stderr (errors are reported as one line by us), and its
    progress bars too when ``quiet``."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from huggingface_hub.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars_were_off = are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    if quiet:
        disable_progress_bars()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if quiet and not bars_were_off:
            enable_progress_bars()


@cli_errors
def push(
    path: str = typer.Argument(..., help="Adapter to upload: a folder (adapter.json + tensors), a .safetensors file "
                                         "or hf://owner/name\\[@revision]\\[/subfolder]."),
    repo_id: str = typer.Argument(..., help="Target repository, owner/name. Created if it does not exist."),
    revision: str = typer.Option(None, "--revision", "-r", help="Branch to commit to (default: main); created from "
                                                               "main if missing."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private (when it is created)."),
    message: str = typer.Option(None, "--message", "-m", help="Commit message (default: 'Upload <method> adapter "
                                                             "with adapterfmt')."),
    also_peft: bool = typer.Option(False, "--also-peft", help="Also upload the adapter in PEFT's format "
                                                              "(adapter_config.json + adapter_model.safetensors)."),
    as_json: bool = JsonOpt,
) -> None:
    """Upload an adapter to the Hub in one commit, with a generated model card (README.md).

    The adapter is validated first. The commit holds the adapter's files byte for byte, the card
    (base_model, library_name: adapterfmt, tags, method, rank, size, how to load it) and, with
    --also-peft, PEFT's files. The commit is made against the branch head read before uploading, so a
    push that raced with another one fails instead of overwriting it.

    The token comes from HF_TOKEN or `hf auth login`; the endpoint from HF_ENDPOINT.
    Prints the commit id and URL. Exit code 1 on any error, with one line on stderr.
    """
    from adapterfmt.hub import client as hub

    with _quiet_hf(as_json):
        result = hub.push(path, repo_id, revision=revision, private=private, message=message, also_peft=also_peft)
    if as_json:
        print_json(result.as_dict())
        return
    state = "created repo and pushed" if result.created_repo else ("pushed" if result.changed else "unchanged")
    console.print(f"[green]{state}[/] {result.repo_id}@{result.revision}: commit {result.commit}", highlight=False)
    console.print(result.commit_url, highlight=False, soft_wrap=True)


@cli_errors
def pull(
    repo: str = typer.Argument(..., help="owner/name, owner/name@REVISION (a branch, tag or commit), or "
                                         "hf://owner/name@REVISION/SUBFOLDER (revision and subfolder optional)."),
    revision: str = typer.Option(None, "--revision", "-r", help="Branch, tag or commit (overrides @REVISION)."),
    out: str = typer.Option(None, "--out", "-o", help="Write the adapter here (folder form: this folder; single "
                                                      "file: this file). Default: keep it in the HF cache only."),
    overwrite: bool = OverwriteOpt,
    timeout: float = typer.Option(None, "--timeout", help="Seconds each file's download may take in all "
                                                          "(default: ADAPTERFMT_HUB_TIMEOUT, else 600)."),
    as_json: bool = JsonOpt,
) -> None:
    """Download an adapter from the Hub and verify every checksum in its manifest.

    Only the adapter's files are downloaded (not the card or PEFT copies), each bounded by the size the
    commit lists and by --timeout, into adapterfmt's store beside the Hugging Face cache
    (ADAPTERFMT_HUB_VIEWS or $HF_HOME/adapterfmt-hub), where `hf://owner/name@REVISION` paths find it
    afterwards, offline too (HF_HUB_OFFLINE=1). With --out, a copy is written there with a provenance
    entry recording the repository and the resolved commit; nothing is written unless the download
    completed and verified.

    Prints the path and the resolved commit. Exit code 1 on any error, with one line on stderr.
    """
    from adapterfmt.hub import client as hub

    with _quiet_hf(as_json):
        result = hub.pull(repo, revision=revision, out=out, overwrite=overwrite, timeout=timeout)
    if as_json:
        print_json(result.as_dict())
        return
    console.print(f"[green]pulled[/] {result.repo_id}@{result.revision or 'main'} (commit {result.commit}) "
                  f"-> {result.path}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("push")(push)
    app.command("pull")(pull)
