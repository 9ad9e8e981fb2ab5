"""A method is one unit: a class registered from this file runs end to end through the CLI, with its
own option, without any other file of the engine knowing its name."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, List

import pytest
from torch import Tensor

from cliperase.engine import checks
from cliperase.engine.config import method_names
from cliperase.engine.methods import METHODS, Features, Method, MethodOptions, register
from cliperase.engine.methods.contrastive import infonce
from helpers import run_args, tiny_checkpoint, tiny_data  # noqa: F401
from launch import unlearn as cli


class HalfAscent(Method):
    """The retain CLIP loss minus a weighted forget CLIP loss: GradDiff with a knob."""

    name = "test-half-ascent"
    summary = "retain CLIP loss - forget_weight * forget CLIP loss (registered by a test)"

    @dataclass(frozen=True)
    class Options(MethodOptions):
        forget_weight: float = 0.5  # weight of the ascent on the forget CLIP loss

        def problems(self, cfg) -> List[str]:
            return checks.collect(checks.nonneg_number("forget_weight", self.forget_weight))

    def objective(self, f: Features) -> Dict[str, Tensor]:
        retain, forget = infonce(f.retain, f, self.cfg), infonce(f.forget, f, self.cfg)
        return {"loss": retain - self.options.forget_weight * forget, "retain_infonce": retain,
                "forget_infonce": forget}


@pytest.fixture
def registered():
    register(HalfAscent)
    try:
        yield HalfAscent
    finally:
        METHODS.pop(HalfAscent.name)


def test_a_method_registered_from_a_test_runs_end_to_end(registered, tiny_data, tiny_checkpoint, tmp_path, capsys):
    assert HalfAscent.name in method_names() and HalfAscent.name in cli.build_parser().format_help()
    out = tmp_path / "run"
    args = run_args(tiny_data, out, pretrained=tiny_checkpoint, method=HalfAscent.name) + ["--set", "forget_weight=0.25"]
    assert cli.main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == HalfAscent.name and report["config"]["forget_weight"] == 0.25
    assert set(report["final_losses"]) == {"loss", "retain_infonce", "forget_infonce"}
    final = report["final_losses"]
    assert final["loss"] == pytest.approx(final["retain_infonce"] - 0.25 * final["forget_infonce"], rel=1e-5)
    # Its option is checked with everything else, before anything is built.
    assert cli.main(run_args(tiny_data, tmp_path / "bad", pretrained=tiny_checkpoint, method=HalfAscent.name)
                    + ["--set", "forget_weight=-1"]) == 2
    assert "forget_weight: expected a non-negative number, got -1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_an_option_of_another_method_is_refused(registered, tiny_data, tiny_checkpoint, tmp_path, capsys):
    assert cli.main(run_args(tiny_data, tmp_path / "o", pretrained=tiny_checkpoint, method="ft")
                    + ["--set", "forget_weight=0.25"]) == 2
    assert "forget_weight: an option of method test-half-ascent, not of 'ft'" in capsys.readouterr().err


def test_register_refuses_a_taken_name_and_unknown_streams():
    with pytest.raises(ValueError, match="already registered"):
        register(type("Again", (Method,), {"name": "cliperase", "summary": "a second cliperase"}))
    with pytest.raises(ValueError, match="streams"):
        register(type("Odd", (Method,), {"name": "odd", "summary": "x", "streams": ("holdout",)}))
    with pytest.raises(ValueError, match="teacher"):
        register(type("Odd", (Method,), {"name": "odd", "summary": "x", "streams": ("forget",),
                                         "teacher_streams": ("retain",)}))
    with pytest.raises(TypeError, match="summary"):
        register(type("Odd", (Method,), {"name": "odd"}))
    assert "odd" not in METHODS
