"""`adapter demo`'s prompt-space step: prompt tuning trained, saved, reloaded and applied on the tiny model."""

from __future__ import annotations

from adapterfmt.demo.prompt import step_prompt
from adapterfmt.demo.run import default_steps, run_demo


def test_demo_step_shows_a_prompt_adapter(tmp_path):
    assert step_prompt in default_steps()
    (row,) = run_demo(tmp_path, steps=[step_prompt]).report
    assert row["step"] == "prompt" and row["kind"] == "prompt" and row["virtual_tokens"] == 8
    assert row["loss_after"] < row["loss_before"] and row["seq_len"] == "12 -> 20"
    assert float(row["reloaded_vs_trained"]) == 0.0 and row["detach_exact"] is True
    assert (tmp_path / "prompt.safetensors").is_file()
