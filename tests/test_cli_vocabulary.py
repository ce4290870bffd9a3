"""One vocabulary across commands (docs/CLI.md): --base, --out/-o, --to (convert), --energy; the old spellings
are hidden aliases printing one deprecation line; usage errors exit 2, data errors 1; an option given twice
is refused; docs/CLI.md's table matches the commands."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import typer
from adapterfmt.cli.main import app
from helpers_cli import cli, tiny_setup

import adapterfmt as af


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_setup(tmp_path_factory.mktemp("vocab"))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    return {k: v for f in files for k, v in load_file(f).items()}


def _deprecation_lines(result) -> list[str]:
    return [ln for ln in result.stderr.splitlines() if ln.startswith("deprecated:")]


def _help(*command: str) -> str:
    r = cli(*command, "--help")
    assert r.exit_code == 0, r.output
    return r.stdout


def test_base_is_base_everywhere(setup, tmp_path):
    """merge (bake) and port take the base as --base; --into / port's --to still work, hidden, with one line."""
    new = cli("merge", setup["a"], "--base", setup["base"], "-o", tmp_path / "baked-new")
    old = cli("merge", setup["a"], "--into", setup["base"], "--out", tmp_path / "baked-old")
    assert new.exit_code == 0 and old.exit_code == 0, (new.output, old.output)
    assert _deprecation_lines(new) == []
    (line,) = _deprecation_lines(old)
    assert "--into is now --base" in line
    got, want = _tensors(tmp_path / "baked-new"), _tensors(tmp_path / "baked-old")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in got)

    new = cli("port", setup["a"], "--base", setup["base"], "-o", tmp_path / "p-new", "--json")
    old = cli("port", setup["a"], "--to", setup["base"], "--out", tmp_path / "p-old", "--json")
    assert new.exit_code == 0 and old.exit_code == 0, (new.output, old.output)
    assert "--to is now --base" in _deprecation_lines(old)[0] and _deprecation_lines(new) == []
    assert json.loads(new.stdout)["change"] == json.loads(old.stdout)["change"] == "same"
    assert "--into" not in _help("merge") and "--to" not in _help("port") and "--base" in _help("port")


def test_out_is_out_everywhere(setup, tmp_path):
    """convert and compress write to --out/-o; the positional DST stays a silent shorthand; both is refused."""
    for cmd, extra in (("convert", ["--to", "peft"]), ("compress", ["--rank", "2"])):
        short = cli(cmd, setup["a"], "-o", tmp_path / f"{cmd}-o", *extra)
        long = cli(cmd, setup["a"], "--out", tmp_path / f"{cmd}-out", *extra)
        positional = cli(cmd, setup["a"], tmp_path / f"{cmd}-pos", *extra)
        assert short.exit_code == long.exit_code == positional.exit_code == 0, positional.output
        assert positional.stderr == ""
        assert _tensors(tmp_path / f"{cmd}-o").keys() == _tensors(tmp_path / f"{cmd}-pos").keys()
        both = cli(cmd, setup["a"], tmp_path / "x", "-o", tmp_path / "y", *extra)
        assert both.exit_code == 2 and "DST and --out" in both.stderr
        assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    root = typer.main.get_command(app)
    for cmd in ("convert", "compress", "merge", "extract", "port", "pull"):
        (opts,) = [p.opts for p in root.commands[cmd].params if "--out" in p.opts]
        assert sorted(opts) == ["--out", "-o"], cmd


def _ranks(path: Path) -> dict[str, int]:
    a = af.load(path)
    return {m: a.shape(f"{m}.lora_A")[0] for m in a.modules}


def test_energy_means_one_thing(setup, tmp_path):
    """--energy is the fraction of sum s^2 kept, in compress as in merge; --sv-fro x (kohya's unsquared
    fraction) is a hidden alias that keeps the rank of --energy x^2 and says so."""
    src = af.load(setup["a"])
    expected = {}
    for m in src.modules:
        s = torch.linalg.svdvals(src.tensor(f"{m}.lora_B").double() @ src.tensor(f"{m}.lora_A").double())
        frac = s.square().cumsum(0) / s.square().sum()
        expected[m] = int((frac < 0.9 - 1e-12).sum()) + 1
    assert set(expected.values()) != {4}  # the threshold does cut
    r = cli("compress", setup["a"], "-o", tmp_path / "c", "--energy", "0.9")
    assert r.exit_code == 0, r.output
    assert _ranks(tmp_path / "c") == expected
    r = cli("merge", setup["a"], "--strategy", "svd", "--energy", "0.9", "-o", tmp_path / "m")
    assert r.exit_code == 0, r.output
    assert _ranks(tmp_path / "m") == expected
    r = cli("compress", setup["a"], "-o", tmp_path / "f", "--sv-fro", str(0.9 ** 0.5))
    assert r.exit_code == 0, r.output
    assert _ranks(tmp_path / "f") == expected
    (line,) = _deprecation_lines(r)
    assert "--sv-fro is now --energy" in line and "--energy 0.9" in line
    assert "--sv-fro" not in _help("compress") and "--energy" in _help("compress")


USAGE_ERRORS = {
    "merge --weights twice": ["merge", "{a}", "{b}", "--weights", "1,1", "--weights", "2,2", "-o", "{out}"],
    "compress --rank twice": ["compress", "{a}", "-o", "{out}", "--rank", "2", "--rank", "3"],
    "convert --single-file/--folder": ["convert", "{a}", "-o", "{out}", "--single-file", "--folder"],
    "merge without --out": ["merge", "{a}", "{b}"],
    "merge --dtype with a bake": ["merge", "{a}", "--base", "{base}", "--dtype", "F16", "-o", "{out}"],
    "merge --shard-size without --base": ["merge", "{a}", "--shard-size", "5GB", "-o", "{out}"],
    "merge --weights not numbers": ["merge", "{a}", "--weights", "x", "-o", "{out}"],
    "merge --into and --base": ["merge", "{a}", "--into", "{base}", "--base", "{base}", "-o", "{out}"],
    "compress without a step": ["compress", "{a}", "-o", "{out}"],
    "compress --steps and --rank": ["compress", "{a}", "-o", "{out}", "--rank", "2", "--steps", "[]"],
    "compress --steps not JSON": ["compress", "{a}", "-o", "{out}", "--steps", "[{{"],
    "compress --energy above 1": ["compress", "{a}", "-o", "{out}", "--energy", "1.5"],
    "extract --rank and --energy": ["extract", "--base", "{base}", "--finetuned", "{tuned}", "-o", "{out}",
                                    "--rank", "2", "--energy", "0.9"],
    "extract --rank with --form dense": ["extract", "--base", "{base}", "--finetuned", "{tuned}", "-o", "{out}",
                                         "--form", "dense", "--rank", "2"],
    "extract --form lowrank alone": ["extract", "--base", "{base}", "--finetuned", "{tuned}", "-o", "{out}"],
    "port without --base": ["port", "{a}", "-o", "{out}"],
    "plugin check --config not JSON": ["plugin", "check", "lora", "--config", "{{"],
}


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_errors_exit_2(setup, tmp_path, case):
    out = tmp_path / "out"
    args = [a.format(out=out, **setup) for a in USAGE_ERRORS[case]]
    r = cli(*args)
    assert r.exit_code == 2, (case, r.output)
    assert "Traceback" not in r.output and r.stderr.strip()
    assert not out.exists()


def test_data_errors_still_exit_1(setup, tmp_path):
    missing = cli("merge", setup["a"], tmp_path / "nope", "-o", tmp_path / "out")
    assert missing.exit_code == 1 and "nope" in missing.stderr
    exists = cli("compress", setup["a"], "-o", setup["b"], "--rank", "2")
    assert exists.exit_code == 1 and "output exists" in exists.stderr


def test_deprecated_aliases_are_hidden_everywhere():
    """No command's --help shows an old spelling."""
    for command in [c.name for c in app.registered_commands]:
        text = _help(command)
        for old in ("--into", "--sv-fro", "--dir"):
            assert old not in text, (command, old)
    assert "--dir" not in _help("plugin", "new") and "--out" in _help("plugin", "new")


def _commands(group, prefix: str = "") -> dict:
    """Every command of the ``adapter`` app by name ("merge", "plugin new")."""
    out = {}
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            out.update(_commands(command, f"{prefix}{name} "))
        else:
            out[prefix + name] = command
    return out


def _table_rows() -> list[list[str]]:
    """docs/CLI.md's vocabulary table: one list of cells per concept."""
    text = (Path(__file__).parents[1] / "docs" / "CLI.md").read_text(encoding="utf-8")
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in text.splitlines() if ln.startswith("| ")]
    assert rows[0][0] == "concept" and len(rows) > 5
    return rows[1:]


def test_cli_md_vocabulary_table_matches_the_commands():
    """The commands docs/CLI.md lists under a spelling are the ones that take that option (all of them where it says
    "every command"), and every hidden deprecated spelling it lists is one the command accepts without showing it."""
    commands_ = _commands(typer.main.get_command(app))
    checked = 0
    for concept, spelling, commands, old in _table_rows():
        flags = re.findall(r"`(--?[a-z][\w-]*)", spelling)
        names = [re.sub(r"\s*\(.*", "", c).removesuffix(" only").strip()
                 for c in re.split(r",\s*(?![^()]*\))", commands)]
        shown = {n: {o for p in c.params if not p.hidden for o in p.opts} for n, c in commands_.items()}
        taking = {n for n, opts in shown.items() if set(flags) <= opts}
        if names != ["every command that writes"]:  # which commands write is not in their parameters
            want = set(commands_) if names == ["every command"] else set(names)
            assert taking == want, (concept, taking ^ want)
        checked += len(taking)
        for name, flag in re.findall(r"`([a-z ]+?) (--[\w-]+)`", old):
            (param,) = [p for p in commands_[name].params if flag in p.opts]
            assert param.hidden, (name, flag)
            checked += 1
    assert checked > 30
