"""In-process reliability checks: a non-finite loss stops the run naming the step and the term,
keeping the last good checkpoint; unwritable outputs are refused up front; bf16 export."""
from __future__ import annotations

import json
import subprocess

import open_clip
import pytest
import torch

from cliperase.engine.checkpoint import checkpoint_problem, complete_checkpoints
from cliperase.engine.methods import METHODS
from cliperase.engine.methods.contrastive import FineTune
from cliperase.engine.models import register_configs
from helpers import run_args, tiny_checkpoint, tiny_data  # noqa: F401
from launch import unlearn as cli


def test_non_finite_loss_stops_with_the_step_the_term_and_the_last_checkpoint(tiny_data, tiny_checkpoint, tmp_path,
                                                                              monkeypatch, capsys):
    class NanFromStep4(FineTune):  # the retain loss turns NaN from the 4th step on
        def objective(self, f):
            losses = super().objective(f)
            if f.step >= 3:
                losses = {"loss": losses["loss"] * float("nan"), "retain_infonce": losses["retain_infonce"] * float("nan")}
            return losses

    monkeypatch.setitem(METHODS, "ft", NanFromStep4)
    out = tmp_path / "nan"
    code = cli.main(run_args(tiny_data, out, pretrained=tiny_checkpoint, method="ft", steps=6, save_every=2)
                    + ["--set", "log_every=1"])
    err = capsys.readouterr().err
    assert code == 1
    assert "step 4: non-finite loss term(s) ['loss', 'retain_infonce']" in err
    assert "step_00000002" in err and "Lower lr" in err
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and run["last_checkpoint"].endswith("step_00000002")
    saved = complete_checkpoints(out / "checkpoints")
    assert [p.name for p in saved] == ["step_00000002"] and checkpoint_problem(saved[0]) is None
    assert not (out / "model.pt").exists()


def test_unwritable_output_dir_is_refused_before_anything_runs(tiny_data, tiny_checkpoint, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a read-only filesystem here (root bypasses permission bits, so a "
                    "chmod would not make a directory unwritable)")
    try:
        code = cli.main(run_args(tiny_data, ro / "run", pretrained=tiny_checkpoint))
        assert code == 2
        assert "output_dir: cannot write in" in capsys.readouterr().err
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def test_bf16_export_loads_in_open_clip(tiny_data, tiny_checkpoint, tmp_path):
    out = tmp_path / "bf16"
    assert cli.main(run_args(tiny_data, out, pretrained=tiny_checkpoint, steps=2) + ["--set", "export_precision=bf16"]) == 0
    state = torch.load(out / "model.pt", weights_only=True)
    floats = [v for v in state.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.bfloat16 for v in floats)
    register_configs()
    model = open_clip.create_model("tiny-clip", pretrained=str(out / "model.pt"))
    assert json.loads((out / "model.pt.json").read_text())["precision"] == "bf16"
    assert next(model.parameters()).dtype == torch.float32  # open_clip casts into its own fp32 model


def test_non_finite_gradient_is_caught_before_it_reaches_the_weights(tiny_data, tiny_checkpoint, tmp_path,
                                                                      monkeypatch, capsys):
    class NanGradientFromStep2(FineTune):  # finite loss, NaN gradient: d sqrt(u)/du = inf at u = 0, times du = 0
        def objective(self, f):
            losses = super().objective(f)
            poison = torch.sqrt((f.retain.img - f.retain.img.detach()).pow(2).sum()) if f.step >= 1 else 0.0
            return {**losses, "loss": losses["loss"] + poison}

    monkeypatch.setitem(METHODS, "ft", NanGradientFromStep2)
    out = tmp_path / "nangrad"
    code = cli.main(run_args(tiny_data, out, pretrained=tiny_checkpoint, method="ft", steps=4, save_every=1)
                    + ["--set", "log_every=1"])
    err = capsys.readouterr().err
    assert code == 1 and "step 2: non-finite gradient in" in err and "the losses were finite" in err
    saved = complete_checkpoints(out / "checkpoints")
    assert [p.name for p in saved] == ["step_00000001"]
    weights = torch.load(saved[0] / "model_optim.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
