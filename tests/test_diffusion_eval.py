"""launch/evaluate_diffusion.py end to end on a tiny random Stable Diffusion pipeline built from
configs (UNet, VAE, DDIM scheduler, 32 px, 2 denoising steps) whose text encoder is a random
tiny-vit's text tower exported by engine/hf.py."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from cliperase.engine.checkpoint import export_open_clip
from cliperase.engine.tools.diffusion_eval import RESULTS, SHEET
from cliperase.engine.models.hf import export_hf
from cliperase.engine.models import load_model
from launch import evaluate_diffusion as cli

FORGET, RETAIN = ["a red circle"], ["a blue square", "a green star"]
N, THUMB = 2, 32


def _pipeline(path, text_dir):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, norm_num_groups=4, attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=4, sample_size=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel.from_pretrained(text_dir), unet=unet,
                            tokenizer=CLIPTokenizer.from_pretrained(text_dir), scheduler=scheduler, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(path)
    return str(path)


def _run(path, state, original_ckpt, model="tiny-vit"):
    path.mkdir()
    torch.save(state, path / "model.pt")
    (path / "report.json").write_text(json.dumps({"config": {"model": model, "pretrained": str(original_ckpt)}}))
    return str(path)


def _small_clip_checkpoint(path):
    export_open_clip(load_model("small-clip").model, path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Pipelines (SD 1.x layout: the whole text tower; SD 2.x layout: one layer short) and runs:
    "same" (the original weights) and "unlearned" (another text tower, the same image tower)."""
    root = tmp_path_factory.mktemp("diffusion")
    torch.manual_seed(0)
    original = load_model("tiny-vit").model
    export_open_clip(original, root / "original.pt")
    torch.manual_seed(5)
    other = load_model("tiny-vit").model.state_dict()
    unlearned = {k: (v if k.startswith("visual.") or k == "logit_scale" else other[k])
                 for k, v in original.state_dict().items()}
    w = {"sd1": _pipeline(root / "sd1", export_hf(original, root / "hf")),
         "sd2": _pipeline(root / "sd2", export_hf(original, root / "hf-short", text_layers=1)),
         "same": _run(root / "same", original.state_dict(), root / "original.pt"),
         "unlearned": _run(root / "unlearned", unlearned, root / "original.pt"),
         # A run of another architecture, with an original checkpoint of its own that fits it.
         "wide": _run(root / "wide", {}, _small_clip_checkpoint(root / "small-clip.pt"), model="small-clip"),
         "root": root}
    yield w
    shutil.rmtree(root, ignore_errors=True)


def _main(pipeline, run, out, *extra):
    return cli.main(["--pipeline", pipeline, "--run", run, "--forget-prompts", *FORGET, "--retain-prompts", *RETAIN,
                     "--images-per-prompt", str(N), "--steps", "2", "--thumb", str(THUMB), "--output", str(out),
                     "--device", "cpu", "--no-progress", *extra])


def test_unlearned_text_encoder_changes_what_the_scorer_sees(world, tmp_path, capsys):
    assert _main(world["sd1"], world["unlearned"], tmp_path) == 0
    result = json.loads((tmp_path / RESULTS).read_text())
    assert set(result["before"]) == set(result["after"]) == {"forget_rate", "retain_rate"}
    assert [p["prompt"] for p in result["per_prompt"]] == FORGET + RETAIN
    assert [p["part"] for p in result["per_prompt"]] == ["forget", "retain", "retain"]
    assert result["text_encoder"] == {"class": "CLIPTextModel", "num_hidden_layers": 2,
                                      "max_abs_diff_to_run_original": 0.0}
    for p in result["per_prompt"]:
        assert len(p["before"]["own_prob"]) == len(p["after"]["own_prob"]) == N
        assert p["before"]["rate"] == sum(x == p["prompt"] for x in p["before"]["predicted"]) / N
    # other text tower, same seeds: other images, so the scorer sees other embeddings
    assert max(1 - c for p in result["per_prompt"] for c in p["image_cosine_before_after"]) > 1e-4
    assert any(p["before"]["own_prob"] != p["after"]["own_prob"] for p in result["per_prompt"])
    sheet = Image.open(tmp_path / SHEET)
    cell = THUMB + 4
    assert sheet.size == (3 * THUMB + 2 * N * cell + 12, 24 + 3 * cell + 4)
    assert "forget concept drawn:" in capsys.readouterr().out


@pytest.mark.parametrize("pipeline, layers", [("sd1", 2), ("sd2", 1)])
def test_same_weights_same_images_and_the_pipelines_layer_count(world, tmp_path, pipeline, layers):
    """With the original weights as the "unlearned" run, the swapped encoder must be the pipeline's
    own to the bit: same seeds, same images, same scores. For the SD 2.x layout that holds only
    when the swap keeps the pipeline's number of layers (1 of the tower's 2)."""
    assert _main(world[pipeline], world["same"], tmp_path) == 0
    result = json.loads((tmp_path / RESULTS).read_text())
    assert result["text_encoder"]["num_hidden_layers"] == layers
    assert result["before"] == result["after"]
    for p in result["per_prompt"]:
        assert p["before"] == p["after"] and min(p["image_cosine_before_after"]) > 1 - 1e-6


def _index(world, tmp_path, change: dict):
    d = tmp_path / "pipe"
    shutil.copytree(world["sd1"], d)
    index = json.loads((d / "model_index.json").read_text())
    (d / "model_index.json").write_text(json.dumps({**index, **change}))
    return str(d)


REFUSALS = {
    "pipeline-missing": (lambda w, t: (str(t / "nope"), w["unlearned"]), "nope' does not exist (expected a local "
                         "diffusers pipeline folder"),
    "pipeline-not-a-pipeline": (lambda w, t: (str(w["root"] / "hf"), w["unlearned"]),
                                "is not a diffusers pipeline folder: no readable model_index.json"),
    "sdxl": (lambda w, t: (_index(w, t, {"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}),
                           w["unlearned"]), "has a second text encoder"),
    "component-missing": (lambda w, t: (_index(w, t, {"unet": [None, None]}), w["unlearned"]),
                          "model_index.json names no unet"),
    "run-missing": (lambda w, t: (w["sd1"], str(t / "norun")), "norun' is not a directory"),
    "run-unfinished": (lambda w, t: (w["sd1"], str(w["root"])), "has no report.json and model.pt"),
    "text-tower-mismatch": (lambda w, t: (w["sd1"], w["wide"]), "the text tower of small-clip cannot replace the "
                            "pipeline's text encoder (hidden_size 192 vs 64"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_exit_2_before_building_anything(world, tmp_path, capsys, monkeypatch, case):
    import diffusers

    import cliperase.engine.models as models

    def built(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(models, "load_model", built)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", built)
    make, expected = REFUSALS[case]
    pipeline, run = make(world, tmp_path)
    assert _main(pipeline, run, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert expected in err and "evaluate_diffusion: error:" in err
    assert not (tmp_path / "out").exists()


def test_bad_numbers_and_prompts_are_listed_together(world, tmp_path, capsys):
    args = ["--pipeline", world["sd1"], "--run", world["same"], "--forget-prompts", "a dog", "--retain-prompts",
            "a dog", "--steps", "0", "--size", "30", "--output", str(tmp_path / "out")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    for part in ("prompts: each prompt is a class and must appear once", "steps: expected an integer >= 1, got 0",
                 "size: expected a multiple of 8 (px), got 30"):
        assert part in err
