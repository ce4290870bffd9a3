"""Every method's config refuses unknown keys, naming them and the nearest valid key (issue 11, item 14)."""

from __future__ import annotations

import pytest

import adapterfmt as af
from adapterfmt.plugin import registry

WITH_SCHEMA = sorted(n for n, m in registry.methods().items() if m.config_schema is not None)
WITH_OPTIONS = sorted(n for n in WITH_SCHEMA if registry.get_method(n).config_schema.get("properties"))


def test_every_trained_builtin_method_has_a_schema():
    # A method that can be trained takes a config; without a schema nothing would refuse a misspelt key.
    trained = {n for n, m in registry.methods().items() if type(m).train is not af.Method.train}
    assert trained <= set(WITH_SCHEMA), trained - set(WITH_SCHEMA)


def test_every_schema_lists_its_keys():
    # a schema without "properties" would accept any key silently
    assert all("properties" in registry.get_method(n).config_schema for n in WITH_SCHEMA)


@pytest.mark.parametrize("name", sorted(set(WITH_SCHEMA) - set(WITH_OPTIONS)))
def test_a_method_without_options_refuses_every_key(name):
    with pytest.raises(af.FormatError, match="unknown key"):
        registry.get_method(name).check_config({"scale": 1})


@pytest.mark.parametrize("name", WITH_OPTIONS)
def test_misspelt_key_is_refused_with_a_suggestion(name):
    method = registry.get_method(name)
    known = sorted(method.config_schema["properties"])
    typo = known[0][:-1] + "x" + known[0][-1]  # one letter inserted: close enough for a suggestion
    with pytest.raises(af.FormatError, match=rf"unknown key.*'{typo}' \(did you mean '{known[0]}'\?\)"):
        method.check_config({typo: 1})


@pytest.mark.parametrize("config", [{"densty": 0.5}, {"rank": 2}])
def test_issue_examples_refused_by_train(config):
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    method = registry.get_method("sparse_ft" if "densty" in config else "lora")
    with pytest.raises(af.FormatError, match="unknown key"):
        method.train(model, config={"target_modules": ["0"], **config})


def test_known_keys_still_pass():
    registry.get_method("lora").check_config({"r": 4, "alpha": 8, "target_modules": ["q_proj"]})
