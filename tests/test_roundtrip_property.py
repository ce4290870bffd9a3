"""Property: any valid manifest with tensors of every core delta kind (any bit pattern, any dtype), and roles
stored through every built-in codec, survives save -> load -> save byte for byte, in both file forms and
across them."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
from helpers_spec import tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adapterfmt as af
from adapterfmt.format.codecs import encode
from adapterfmt.format.safetensors_io import DTYPES, ITEMSIZE
from adapterfmt.format.ternary import ternary_encode

FLOATS = ["F32", "F16", "BF16", "F64"]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalar = (st.none() | st.booleans() | st.integers(-(2 ** 53), 2 ** 53)
               | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_value = st.recursive(json_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                          max_leaves=8)
json_object = st.dictionaries(st.text(max_size=8), json_value, max_size=4)
dims = st.integers(1, 5)


@st.composite
def tensor(draw, shape: tuple[int, ...], dtypes: list[str] = FLOATS) -> torch.Tensor:
    """A tensor of any bit pattern (NaNs, infinities and subnormals included)."""
    dtype = draw(st.sampled_from(dtypes))
    n = math.prod(shape) * ITEMSIZE[dtype]
    raw = bytearray(draw(st.binary(min_size=n, max_size=n)))
    if not raw:
        return torch.empty(shape, dtype=DTYPES[dtype])
    return torch.frombuffer(raw, dtype=DTYPES[dtype]).reshape(shape).clone()


@st.composite
def lowrank(draw):
    out, n_in, r = draw(dims), draw(dims), draw(st.integers(1, 3))
    transposed = draw(st.booleans())
    params = {"scale": draw(st.floats(-4, 4, allow_nan=False)), **({"transposed": True} if transposed else {})}
    t = {"lora_A": draw(tensor((r, n_in))), "lora_B": draw(tensor((out, r)))}
    extra = draw(st.sampled_from([None, "magnitude", "bias"]))  # never both (spec 6.2)
    if extra:
        t[extra] = draw(tensor((out,)))
    return {"kind": "lowrank", "shape": [n_in, out] if transposed else [out, n_in], "params": params}, t


@st.composite
def dense(draw):
    shape = (draw(dims), draw(dims))
    mode = draw(st.sampled_from(["add", "replace"]))
    main, bias = ("value", "bias_value") if mode == "replace" else ("delta", "bias_delta")
    t = {main: draw(tensor(shape))}
    if draw(st.booleans()):
        t[bias] = draw(tensor((shape[0],)))
    return {"kind": "dense", "shape": list(shape), "params": {"mode": mode, "scale": draw(st.floats(-2, 2))}}, t


@st.composite
def sparse(draw):
    shape = (draw(dims), draw(dims))
    idx = sorted(draw(st.sets(st.integers(0, math.prod(shape) - 1), max_size=math.prod(shape))))
    t = {"indices": torch.tensor(idx, dtype=torch.int64), "values": draw(tensor((len(idx),)))}
    return {"kind": "sparse", "shape": list(shape), "params": {"scale": draw(st.floats(-2, 2))}}, t


@st.composite
def vector(draw):
    shape = (draw(dims), draw(dims))
    op, side = draw(st.sampled_from(["scale", "offset"])), draw(st.sampled_from(["output", "input"]))
    t = {"vector": draw(tensor((shape[0] if side == "output" else shape[1],)))}
    return {"kind": "vector", "shape": list(shape), "params": {"op": op, "side": side}}, t


@st.composite
def mask(draw):
    group, groups, other = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(dims)
    side = draw(st.sampled_from(["input", "output"]))
    shape = [other, group * groups] if side == "input" else [group * groups, other]
    keep = torch.tensor(draw(st.lists(st.integers(0, 1), min_size=groups, max_size=groups)), dtype=torch.uint8)
    return {"kind": "mask", "shape": shape, "params": {"side": side, "group": group}}, {"keep": keep}


@st.composite
def prompt(draw):
    vocab, dim = draw(dims), draw(dims)
    t = {"embeddings": draw(tensor((draw(st.integers(1, 4)), dim)))}
    return {"kind": "prompt", "shape": [vocab, dim], "params": {"position": "prefix"}}, t


@st.composite
def ternary(draw):
    shape = (draw(dims), draw(dims))
    n = math.prod(shape)
    keep = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    group = draw(st.none() | st.integers(1, n))
    parts, params = ternary_encode(draw(tensor(shape, ["F32"])).nan_to_num(), keep, group_size=group,
                                   layout=draw(st.sampled_from(["bitmap", "gaps"])))
    return {"kind": "ternary", "shape": list(shape), "params": {**params, "scale": draw(st.floats(-2, 2))}}, parts


@st.composite
def encoded(draw):
    """A dense delta stored through a compression codec (roles ``delta.<part>``)."""
    entry, t = draw(dense())
    role = "value" if entry["params"]["mode"] == "replace" else "delta"
    codec = draw(st.sampled_from(["int8", "int4", "ternary"]))
    options = {"group_size": draw(st.integers(1, 8))} if codec == "int4" else {}
    if codec == "ternary":
        options = {"density": draw(st.floats(0, 1))}
    parts, spec = encode(codec, t.pop(role).float().nan_to_num(), **options)
    entry["encoding"] = {role: spec}
    t.update({f"{role}.{part}": v for part, v in parts.items()})
    return entry, t


KINDS = {"lowrank": lowrank(), "dense": dense(), "sparse": sparse(), "vector": vector(), "mask": mask(), "prompt": prompt(),
         "ternary": ternary(), "encoded": encoded()}
module_path = st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9_\-]{0,5}(\.[A-Za-z0-9_\-]{1,5}){0,3}\Z")
hex64 = st.from_regex(r"\A[0-9a-f]{64}\Z")


@st.composite
def adapters(draw) -> af.Adapter:
    """A random valid adapter: one module of every core kind plus random others, and random manifest content."""
    paths = draw(st.lists(module_path, min_size=len(KINDS), max_size=len(KINDS) + 2, unique=True))
    kinds = list(KINDS) + draw(st.lists(st.sampled_from(list(KINDS)), min_size=len(paths) - len(KINDS),
                                        max_size=len(paths) - len(KINDS)))
    modules, tensors = {}, {}
    for path, kind in zip(paths, kinds):
        entry, t = draw(KINDS[kind])
        entry["params"].update(draw(st.dictionaries(st.sampled_from(["note", "x_extra"]), json_value, max_size=1)))
        modules[path] = entry
        tensors.update({f"{path}.{role}": v for role, v in t.items()})
    fingerprint = draw(st.none() | st.fixed_dictionaries(
        {"algorithm": st.just("adapterfmt-fp1"), "structure": hex64, "values": st.none() | hex64,
         "tensors": st.integers(0, 10 ** 6)}))
    extensions = draw(st.dictionaries(st.from_regex(r"\A[a-z0-9][a-z0-9_\-]{0,4}\.[A-Za-z0-9_.\-]{1,6}\Z"),
                                      json_value, max_size=2))
    manifest = af.new_manifest(
        draw(st.from_regex(r"\A[a-z0-9][a-z0-9_.\-]{0,8}\Z")), modules,
        method_version=draw(st.text(min_size=1, max_size=5)), config=draw(json_object),
        base={"name": draw(st.none() | st.text(max_size=10)), "revision": draw(st.none() | st.text(max_size=8)),
              "fingerprint": fingerprint},
        provenance=draw(st.lists(st.builds(lambda tool, extra: {**extra, "tool": tool}, st.text(max_size=8), json_object),
                                 max_size=2)),
        extensions=extensions,
    )
    if draw(st.booleans()):
        manifest["compression"] = draw(st.none() | json_object)
    return af.Adapter(manifest, tensors)


def same_tensors(a: af.Adapter, b: af.Adapter) -> bool:
    return a.tensor_names() == b.tensor_names() and all(
        a.tensor(n).dtype == b.tensor(n).dtype and a.tensor(n).shape == b.tensor(n).shape
        and a.tensor(n).reshape(-1).view(torch.uint8).equal(b.tensor(n).reshape(-1).view(torch.uint8))
        for n in a.tensor_names())


@SETTINGS
@given(adapter=adapters())
def test_save_load_save_is_byte_identical_in_both_forms(adapter):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        folder, single = af.save(adapter, d / "f"), af.save(adapter, d / "s.safetensors")
        loaded_f, loaded_s = af.validate(folder), af.validate(single)
        assert same_tensors(loaded_f, adapter) and same_tensors(loaded_s, adapter)
        af.save(loaded_f, d / "f2")
        af.save(loaded_s, d / "s2.safetensors")
        assert tree(d / "f2") == tree(folder)
        assert (d / "s2.safetensors").read_bytes() == single.read_bytes()
        # across forms: a folder re-saved as one file and back gives the same bytes as saving directly
        af.save(loaded_f, d / "fs.safetensors")
        af.save(af.load(d / "fs.safetensors"), d / "fsf")
        assert (d / "fs.safetensors").read_bytes() == single.read_bytes()
        assert tree(d / "fsf") == tree(folder)
        assert loaded_s.manifest == {**loaded_f.manifest, "files": loaded_s.manifest["files"]}
