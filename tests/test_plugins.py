"""The plugin system with real installed distributions: tests/thirdparty_plugin (a method, a delta kind, a verb
override, a foreign format, an understood extension, a CLI command) and tests/broken_plugin (a misspelled hook,
an import failure, a hook that raises), installed by pip. Broken plugins are reported and skipped; blocking works."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers_spec import EXAMPLES, ROOT, example_paths, invoke, run_adapter
from torch import nn

import adapterfmt as af
from adapterfmt.authoring.conformance import check_method
from adapterfmt.plugin import registry

pytestmark = pytest.mark.filterwarnings("ignore:adapterfmt plugin:UserWarning")  # the broken ones, on purpose

EXAMPLE_DIST = "adapterfmt-example-plugin"
EXAMPLE_HOOKS = {"adapterfmt_delta_kinds", "adapterfmt_methods", "adapterfmt_verb", "adapterfmt_formats",
                 "adapterfmt_extensions", "adapterfmt_cli"}


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder that pip installed tests/broken_plugin and tests/thirdparty_plugin into, for this test session
    only (first on the path, so it shadows an older copy installed in the environment). Shared by xdist
    workers, built once."""
    dists = ["broken_plugin", "thirdparty_plugin"]
    digest = hashlib.sha256(repr(dists).encode())
    for d in dists:  # the install is reused only while the plugins' sources are unchanged
        for f in sorted((ROOT / "tests" / d).rglob("*")):
            if f.is_file() and not {"build", "__pycache__"} & set(f.parts) and ".egg-info" not in str(f):
                digest.update(f.relative_to(ROOT).as_posix().encode() + f.read_bytes())
    shared, key = tmp_path_factory.getbasetemp().parent, digest.hexdigest()[:16]
    site, done = shared / f"adapterfmt-plugin-site-{key}", shared / f"adapterfmt-plugin-site-{key}.done"
    with open(shared / "adapterfmt-plugin-site.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            src = shared / f"adapterfmt-plugin-src-{key}"
            shutil.rmtree(src, ignore_errors=True)
            for d in dists:  # build from a copy: the build leaves egg-info / build folders behind
                shutil.copytree(ROOT / "tests" / d, src / d, ignore=shutil.ignore_patterns("*.egg-info", "build"))
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                            "--no-build-isolation", "--target", str(site), *(str(src / d) for d in dists)],
                           check=True, capture_output=True, timeout=300)
            done.touch()
    return site


@pytest.fixture
def plugins(plugin_site: Path) -> Iterator[dict[str, str]]:
    """Make the installed plugin site visible to this process and to `adapter` subprocesses; yields their env."""
    old_path, old_env = list(sys.path), os.environ.get("PYTHONPATH")
    sys.path.insert(0, str(plugin_site))
    env = {"PYTHONPATH": os.pathsep.join([str(plugin_site), *([old_env] if old_env else [])])}
    registry.reset()
    try:
        yield env
    finally:
        sys.path[:] = old_path
        os.environ.pop(af.registry.BLOCK_ENV, None)
        registry.reset()


def rows_by_name(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["name"], []).append(r)
    return out


def kron_model_and_adapter(note: str | None = None):
    from adapterfmt_example_plugin import make_adapter

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 4))
    left, right = torch.randn(2, 3), torch.randn(3, 4)
    return model, make_adapter({"0": (left, right)}, scale=0.5, note=note), torch.kron(left, right) * 0.5


# ----- the third-party plugin ----------------------------------------------------------------------------------
def test_cli_lists_the_third_party_plugin_and_reports_the_broken_ones(plugins):
    r = run_adapter("plugins", "--json", env=plugins)
    assert r.returncode == 0, r.stderr
    rows = rows_by_name(json.loads(r.stdout))
    (example,) = rows["example"]
    assert example["status"] == "loaded" and example["distribution"] == EXAMPLE_DIST
    assert example["version"] == "0.1.0" and EXAMPLE_HOOKS <= set(example["hooks"])
    assert {"lora", "patches", "vectors", "prompts"} <= set(rows)
    (misspelled,) = rows["broken_misspelled"]
    assert misspelled["status"] == "broken" and misspelled["distribution"] == "adapterfmt-broken-plugin"
    assert "adapterfmt_method" in misspelled["error"] and "unknown hook" in misspelled["error"]
    (failed,) = rows["broken_import"]
    assert failed["status"] == "broken" and "failed to import" in failed["error"]
    assert "adapterfmt_dependency_that_does_not_exist" in failed["error"]

    m = run_adapter("methods", "--json", env=plugins)
    assert m.returncode == 0, m.stderr
    methods = {row["name"]: row for row in json.loads(m.stdout)}
    assert methods["example_kron"]["kinds"] == ["kron"] and "lora" in methods
    assert "never_registered" not in methods
    assert "this plugin's method table is corrupt" in m.stderr  # the hook that raises is reported, not fatal


def test_broken_plugins_never_take_down_the_cli(plugins):
    r = run_adapter("validate", *map(str, example_paths()), env=plugins)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("valid") == len(example_paths())
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("single_file", [False, True])
def test_an_adapter_of_the_plugin_method_saves_loads_validates_and_applies(plugins, tmp_path, single_file):
    model, adapter, dw = kron_model_and_adapter()
    path = af.save(adapter, tmp_path / ("kron.safetensors" if single_file else "kron"))
    loaded = af.validate(path)
    assert loaded.method == "example_kron" and loaded.modules["0"]["kind"] == "kron"
    assert af.save(loaded, tmp_path / "again", single_file=single_file).exists()

    x = torch.randn(5, 12)
    with torch.no_grad():
        ref = model[2](torch.relu(nn.functional.linear(x, model[0].weight + dw, model[0].bias)))
        base = model(x)
        name = af.registry.verb("example_kron", "apply")(model, loaded)
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
        af.merge_into(model, name)
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
        af.detach(model)
        torch.testing.assert_close(model(x), base, rtol=1e-6, atol=1e-6)

    if single_file:  # the installed `adapter` command sees the plugin's kind too
        r = run_adapter("inspect", str(path), "--json", env=plugins)
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        assert info["method"]["name"] == "example_kron" and info["kinds"] == {"kron": 1}
        assert info["parameters"] == 6 + 12


def test_a_bad_kron_adapter_is_refused_by_the_plugin_check(plugins, tmp_path):
    from adapterfmt_example_plugin import make_adapter

    bad = make_adapter({"0": (torch.ones(2, 3), torch.ones(3, 5))})
    bad.modules["0"]["shape"] = [6, 12]
    with pytest.raises(af.FormatError, match=r"kron left \[2, 3\] x right \[3, 5\] does not make a weight"):
        af.validate(af.load(af.save(bad, tmp_path / "bad.safetensors")))


def test_the_verb_override_replaces_merge_of_the_plugin_method_only(plugins):
    from adapterfmt_example_plugin import make_adapter, merge_kron

    merge = registry.verb("example_kron", "merge")
    assert merge is merge_kron
    assert registry.verb("lora", "merge").__func__ is af.Method.merge
    a = make_adapter({"0": (torch.randn(2, 3), torch.randn(3, 4))}, scale=2.0)
    b = make_adapter({"0": (torch.randn(2, 3), torch.randn(3, 4))})
    merged = merge([a, b], weights=[0.5, 1.0])
    kind = registry.get_kind("kron")
    expected = 0.5 * kind.delta(a.modules["0"], a.module_tensors("0")) + kind.delta(b.modules["0"], b.module_tensors("0"))
    assert merged.modules["0"]["kind"] == "dense"
    torch.testing.assert_close(merged.tensor("0.delta"), expected)
    af.validate(merged)


def test_the_plugin_format_round_trips_an_adapter_exactly(plugins, tmp_path):
    fmt = registry.formats()["example_json"]
    assert isinstance(fmt, af.ForeignFormat)
    src = af.load(EXAMPLES / "lowrank.safetensors")
    fmt.write(src, tmp_path / "x.adapterjson")
    assert fmt.detect(tmp_path / "x.adapterjson") and not fmt.detect(EXAMPLES / "lowrank.safetensors")
    back = fmt.read(tmp_path / "x.adapterjson")
    af.save(back, tmp_path / "back.safetensors")
    assert (tmp_path / "back.safetensors").read_bytes() == (EXAMPLES / "lowrank.safetensors").read_bytes()


def test_an_understood_extension_makes_must_understand_pass(plugins, tmp_path):
    _, adapter, _ = kron_model_and_adapter(note="made by the example plugin")
    path = af.save(adapter, tmp_path / "noted.safetensors")
    assert "example.note" in registry.understood_extensions()
    assert af.validate(path).manifest["must_understand"] == ["example.note"]


def test_the_plugin_command_is_in_the_cli(plugins, tmp_path):
    """Plugin commands come from the entry-point plugins, loaded without the built-ins for `adapter --help`."""
    _, adapter, _ = kron_model_and_adapter(note="made by the example plugin")
    path = af.save(adapter, tmp_path / "noted.safetensors")
    r = run_adapter("--help", env=plugins)
    assert r.returncode == 0 and "example-note" in r.stdout, r.stdout
    r = run_adapter("example-note", str(path), env=plugins)
    assert r.returncode == 0 and r.stdout.strip() == "made by the example plugin", r.stderr


def test_the_plugin_method_passes_the_conformance_kit(plugins):
    """The kit on example_kron, also where the example plugin is not installed (as in CI)."""
    from test_conformance import EXPECTED_SKIPS, FACTORIES

    report = check_method("example_kron", FACTORIES["example_kron"])
    assert report.by_status("fail") == {}, json.dumps(report.to_dict(), indent=1)
    assert set(report.by_status("skip")) == EXPECTED_SKIPS["example_kron"]


# ----- blocking ------------------------------------------------------------------------------------------------
def test_the_block_env_var_keeps_named_plugins_out(plugins, tmp_path):
    _, adapter, _ = kron_model_and_adapter(note="x")
    noted = af.save(adapter, tmp_path / "noted.safetensors")
    adapter.manifest.pop("must_understand")
    plain = af.save(adapter, tmp_path / "plain.safetensors")
    os.environ[registry.BLOCK_ENV] = "example,broken_import"
    registry.reset()
    names = {r["name"] for r in registry.plugin_info()}
    assert "example" not in names and "broken_import" not in names and "broken_misspelled" in names
    assert "example_kron" not in registry.methods() and "kron" not in registry.delta_kinds()
    with pytest.raises(af.FormatError, match="does not understand: example.note"):
        af.load(noted)
    with pytest.raises(af.FormatError, match="unknown delta kind 'kron'"):
        af.validate(plain)

    r = invoke("validate", str(plain))
    assert r.exit_code == 1 and "unknown delta kind 'kron'" in r.stderr and str(plain) in r.stderr
    r = run_adapter("plugins", "--json", env={**plugins, registry.BLOCK_ENV: "example, lora"})
    names = {row["name"] for row in json.loads(r.stdout)}
    assert "example" not in names and "lora" not in names and "vectors" in names


# ----- broken plugins in-process -------------------------------------------------------------------------------
def test_broken_plugins_are_reported_and_skipped_in_process(plugins):
    with pytest.warns(UserWarning) as caught:
        registry.reset()
        methods = registry.methods()
    messages = " | ".join(str(w.message) for w in caught)
    assert "broken_misspelled" in messages and "broken_import" in messages and "broken_hook" in messages
    assert {"lora", "ia3", "example_kron"} <= set(methods) and "never_registered" not in methods
    broken = {r["name"]: r["error"] for r in registry.plugin_info() if r["status"] == "broken"}
    assert set(broken) == {"broken_misspelled", "broken_import", "broken_hook"}
    assert "failed in adapterfmt_methods: RuntimeError" in broken["broken_hook"]
    assert not registry.plugin_manager().is_registered(sys.modules.get("adapterfmt_broken_plugin.misspelled"))
    registry.plugin_manager().check_pending()  # nothing unknown is left registered
