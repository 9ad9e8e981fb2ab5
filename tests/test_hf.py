"""Hugging Face CLIP directories <-> open_clip (engine/hf.py, launch/export.py), on random weights.

The reference each way is the other library's own forward: transformers' CLIPModel /
CLIPTextModel on the same token ids and pixels as open_clip's CLIP. Directories written by
transformers itself (CLIPModel.save_pretrained, its own random init) test the import; open_clip
models (open_clip's init) exported by engine/hf.py test the export.
"""
from __future__ import annotations

import json
import math
import shutil

import open_clip
import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.initialization import no_init_weights

from cliperase.engine import ConfigError
from cliperase.engine.checkpoint import export_open_clip
from cliperase.engine.models.hf import export_hf, hf_model_name, hf_text_encoder, hf_to_open_clip, open_clip_to_hf
from cliperase.engine.models import check_model_spec, load_model
from helpers import run_args, tiny_checkpoint, tiny_data  # noqa: F401
from launch import export as export_cli


def _tower(hidden, mlp, layers, heads, act, **extra):
    return dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                hidden_act=act, **extra)


# HF configs as the hub's CLIPs have them (OpenAI B/32: QuickGELU; LAION B/32: GELU), the engine's
# small ViT, and an odd one no registered open_clip config matches (a derived config).
HF_CONFIGS = {
    "ViT-B-32-quickgelu": dict(projection_dim=512, text_config=_tower(512, 2048, 12, 8, "quick_gelu"),
                               vision_config=_tower(768, 3072, 12, 12, "quick_gelu", image_size=224, patch_size=32)),
    "ViT-B-32": dict(projection_dim=512, text_config=_tower(512, 2048, 12, 8, "gelu"),
                     vision_config=_tower(768, 3072, 12, 12, "gelu", image_size=224, patch_size=32)),
    "tiny-vit": dict(projection_dim=64, text_config=_tower(64, 256, 2, 2, "gelu", max_position_embeddings=16),
                     vision_config=_tower(64, 256, 2, 2, "gelu", image_size=32, patch_size=4)),
    "derived": dict(projection_dim=24, text_config=_tower(48, 144, 3, 3, "gelu", max_position_embeddings=11),
                    vision_config=_tower(40, 100, 2, 2, "gelu", image_size=24, patch_size=6)),
}
PROMPTS = ["a photo of a dog", "A Red Circle, drawn badly!", "", "x" * 3 + " 1234 tokens & more, " * 20]


def _inputs(name: str, image_size: int, context: int):
    """Token ids (open_clip's tokenizer, plus one random row with its end-of-text at an odd place)
    and pixels, the same for both libraries."""
    g = torch.Generator().manual_seed(7)
    ids = open_clip.get_tokenizer("tiny-vit" if name == "derived" else name, context_length=context)(PROMPTS)
    ids = ids[:, :context]
    rnd = torch.zeros(1, context, dtype=torch.long)
    rnd[0, : context - 3] = torch.randint(1, 49406, (context - 3,), generator=g)
    rnd[0, 0], rnd[0, context - 4] = 49406, 49407
    return torch.cat([ids, rnd]), torch.randn(2, 3, image_size, image_size, generator=g)


def _random_hf(name: str) -> CLIPModel:
    """A transformers CLIPModel with seeded random weights of neither library's init (fast: no init)."""
    with no_init_weights():
        model = CLIPModel(CLIPConfig(**HF_CONFIGS[name]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key == "logit_scale":
                p.fill_(math.log(1 / 0.07))
            elif "norm" in key and key.endswith("weight"):  # the layer norms' gains around 1
                p.normal_(1.0, 0.1, generator=g)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval()


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """name -> {"hf_dir", "hf": the CLIPModel saved there by transformers, "oc": load_model of it,
    "export": export_hf of that open_clip model}, built on first use."""
    made = {}

    def get(name):
        if name not in made:
            hf = _random_hf(name)
            path = tmp_path_factory.mktemp(f"hf-{name}")
            hf.save_pretrained(path)
            oc = load_model(None, str(path)).model
            made[name] = {"hf_dir": path, "hf": hf, "oc": oc,
                          "export": export_hf(oc, tmp_path_factory.mktemp(f"export-{name}"))}
        return made[name]

    yield get
    for c in made.values():  # a ViT-B-32 pair is 1.2 GB; pytest's retention keeps factory folders
        shutil.rmtree(c["hf_dir"], ignore_errors=True)
        shutil.rmtree(c["export"], ignore_errors=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(a tiny-vit at open_clip's own random init, its export_hf directory)."""
    torch.manual_seed(1)
    model = load_model("tiny-vit").model
    return model, export_hf(model, tmp_path_factory.mktemp("export-tiny-vit"))


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _oc_embeddings(oc, name):
    """(text, image) features of open_clip's CLIP on `_inputs`; cached on the model."""
    if not hasattr(oc, "_test_embeddings"):
        ids, pixels = _inputs(name, oc.visual.image_size[0], oc.positional_embedding.shape[0])
        with torch.no_grad():
            oc._test_embeddings = (oc.encode_text(ids), oc.encode_image(pixels))
    return oc._test_embeddings


def _same_embeddings(oc, hf, name):
    ids, pixels = _inputs(name, oc.visual.image_size[0], oc.positional_embedding.shape[0])
    text, image = _oc_embeddings(oc, name)
    with torch.no_grad():
        _close(text, hf.get_text_features(input_ids=ids).pooler_output)
        _close(image, hf.get_image_features(pixel_values=pixels).pooler_output)
    assert oc.logit_scale.item() == hf.logit_scale.item()


def _equal_states(got: dict, want: dict):
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-32-quickgelu", "tiny-vit", "derived"])
def test_import_gives_transformers_embeddings(chain, name):
    c = chain(name)
    inferred = hf_model_name(str(c["hf_dir"]))
    assert inferred.startswith("hf-clip-") if name == "derived" else inferred == name
    assert inferred in open_clip.list_models()
    _same_embeddings(c["oc"], c["hf"], name)
    assert check_model_spec(inferred, str(c["hf_dir"])) == []  # the same architecture named explicitly


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-32-quickgelu", "tiny-vit", "derived"])
def test_round_trips_are_exact(chain, name):
    c = chain(name)
    want_hf, want_oc = c["hf"].state_dict(), c["oc"].state_dict()
    _equal_states(open_clip_to_hf(hf_to_open_clip(want_hf)), want_hf)  # hf -> open_clip -> hf
    written = load_file(str(c["export"] / "model.safetensors"))
    _equal_states(written, want_hf)  # the exported file holds transformers' own tensors
    _equal_states(hf_to_open_clip(written), want_oc)  # open_clip -> hf -> open_clip


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-32-quickgelu", "tiny-vit", "tiny-vit-open-clip-init"])
def test_export_loads_in_transformers_with_open_clip_embeddings(chain, exported, name):
    oc, path = exported if name == "tiny-vit-open-clip-init" else (chain(name)["oc"], chain(name)["export"])
    name = name.replace("-open-clip-init", "")
    hf, info = CLIPModel.from_pretrained(path, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert hf.config.text_config.hidden_act == ("quick_gelu" if "quickgelu" in name else "gelu")
    _same_embeddings(oc, hf.eval(), name)
    ids, _ = _inputs(name, oc.visual.image_size[0], oc.positional_embedding.shape[0])
    with torch.no_grad():
        _close(CLIPTextModelWithProjection.from_pretrained(path).eval()(ids).text_embeds, _oc_embeddings(oc, name)[0])


def _open_clip_states(oc, ids):
    """Every text block's output (pre final LN), open_clip's own modules: the reference."""
    x = oc.token_embedding(ids) + oc.positional_embedding
    out = [x]
    for block in oc.transformer.resblocks:
        x = block(x, attn_mask=oc.attn_mask)
        out.append(x)
    return out


@pytest.mark.parametrize("name", ["tiny-vit", "ViT-B-32-quickgelu"])
def test_text_encoder_hidden_states_match_open_clip(chain, exported, tmp_path, name):
    oc, path = exported if name == "tiny-vit" else (chain(name)["oc"], chain(name)["export"])
    ids, _ = _inputs(name, oc.visual.image_size[0], oc.positional_embedding.shape[0])
    encoder = CLIPTextModel.from_pretrained(path).eval()
    with torch.no_grad():
        ref = _open_clip_states(oc, ids)
        got = encoder(ids, output_hidden_states=True)
        assert len(got.hidden_states) == len(ref)
        for mine, theirs in zip(ref, got.hidden_states):
            _close(theirs, mine)
        _close(got.last_hidden_state, oc.ln_final(ref[-1]))  # what SD 1.x reads
        # diffusers' clip_skip=1: the penultimate layer through the final layer norm
        _close(encoder.final_layer_norm(got.hidden_states[-2]), oc.ln_final(ref[-2]))
        if name != "tiny-vit":
            return
        # SD 2.x's layout: a text encoder one layer short, whose last_hidden_state is that same thing
        short = export_hf(oc, tmp_path / "short", text_layers=len(ref) - 2)
        sd2 = CLIPTextModel.from_pretrained(short).eval()
        assert sd2.config.num_hidden_layers == len(ref) - 2
        _close(sd2(ids).last_hidden_state, oc.ln_final(ref[-2]))
        built = hf_text_encoder(oc, sd2.config)  # what evaluate_diffusion swaps into a pipeline
        _close(built(ids).last_hidden_state, oc.ln_final(ref[-2]))


def test_tokenizer_files_give_open_clip_ids(exported):
    oc, path = exported
    hf_tok = CLIPTokenizer.from_pretrained(path)
    ids = hf_tok(PROMPTS, padding="max_length", truncation=True, return_tensors="pt").input_ids
    want = open_clip.get_tokenizer("tiny-vit")(PROMPTS)
    # the same ids up to the end-of-text token; then open_clip pads with 0, transformers with <|endoftext|>
    after = torch.arange(want.shape[1]) > want.argmax(dim=1, keepdim=True)
    assert torch.equal(ids[~after], want[~after]) and (ids[after] == 49407).all() and (want[after] == 0).all()
    assert after.any() and (~after).sum() > 20
    vocab = json.loads((path / "vocab.json").read_text())
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407
    assert (path / "merges.txt").read_text().startswith("#version")


def test_sharded_and_legacy_weight_files(chain, tmp_path):
    path, hf = chain("tiny-vit")["hf_dir"], chain("tiny-vit")["hf"]
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    legacy = tmp_path / "legacy"  # pytorch_model.bin as older transformers wrote it, position_ids included
    legacy.mkdir()
    shutil.copy(path / "config.json", legacy)
    state = dict(hf.state_dict(), **{"text_model.embeddings.position_ids": torch.arange(16)[None]})
    torch.save(state, legacy / "pytorch_model.bin")
    for d in (sharded, legacy):
        _same_embeddings(load_model("tiny-vit", str(d)).model, hf, "tiny-vit")


# The hub's CLIP configs (numbers as in their config.json), without their weights.
HUB = {
    "ViT-B-16-quickgelu": (512, (512, 2048, 12, 8), (768, 3072, 12, 12, 224, 16), "quick_gelu"),  # openai B/16
    "ViT-L-14-quickgelu": (768, (768, 3072, 12, 12), (1024, 4096, 24, 16, 224, 14), "quick_gelu"),  # openai L/14
    "ViT-L-14-336-quickgelu": (768, (768, 3072, 12, 12), (1024, 4096, 24, 16, 336, 14), "quick_gelu"),
    "ViT-B-16": (512, (512, 2048, 12, 8), (768, 3072, 12, 12, 224, 16), "gelu"),  # laion B/16
    "ViT-L-14": (768, (768, 3072, 12, 12), (1024, 4096, 24, 16, 224, 14), "gelu"),  # laion L/14
    "ViT-H-14": (1024, (1024, 4096, 24, 16), (1280, 5120, 32, 16, 224, 14), "gelu"),  # laion H/14 (SD 2.x)
    "ViT-bigG-14": (1280, (1280, 5120, 32, 20), (1664, 8192, 48, 16, 224, 14), "gelu"),  # laion bigG (SDXL)
}


@pytest.mark.parametrize("name", sorted(HUB))
def test_hub_configs_map_onto_open_clip_names(tmp_path, name):
    from safetensors.torch import save_file

    proj, (tw, tm, tl, th), (vw, vm, vl, vh, size, patch), act = HUB[name]
    cfg = CLIPConfig(projection_dim=proj, text_config=_tower(tw, tm, tl, th, act, eos_token_id=2),  # the legacy id
                     vision_config=_tower(vw, vm, vl, vh, act, image_size=size, patch_size=patch))
    cfg.save_pretrained(tmp_path)
    save_file({"logit_scale": torch.zeros(())}, str(tmp_path / "model.safetensors"))  # found, never loaded here
    assert hf_model_name(str(tmp_path)) == name


def _config_dir(tmp_path, config: dict, weights_from=None):
    d = tmp_path / "dir"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    if weights_from is not None:
        shutil.copy(weights_from / "model.safetensors", d)
    return d


def _clip_config(**change):
    cfg = CLIPConfig(**HF_CONFIGS["tiny-vit"]).to_dict()
    for tower in ("text_config", "vision_config"):
        cfg[tower].update(change)
    return cfg


REFUSALS = {
    "missing": (lambda tmp, ok: tmp / "nope", "nope' does not exist"),
    "no-config": (lambda tmp, ok: tmp, "is a directory, expected a checkpoint file or a Hugging Face CLIP directory"),
    "siglip": (lambda tmp, ok: _config_dir(tmp, {"model_type": "siglip"}), "model_type 'siglip', expected 'clip'"),
    "text-tower-alone": (lambda tmp, ok: _config_dir(tmp, {"model_type": "clip_text_model"}),
                         "a text or vision tower alone"),
    "no-weights": (lambda tmp, ok: _config_dir(tmp, _clip_config()), "no weights (expected model.safetensors"),
    "relu": (lambda tmp, ok: _config_dir(tmp, _clip_config(hidden_act="relu"), ok),
             "activations vision='relu', text='relu'; open_clip's CLIP has one activation"),
    "layer-norm-eps": (lambda tmp, ok: _config_dir(tmp, _clip_config(layer_norm_eps=1e-6), ok),
                       "vision layer_norm_eps=1e-06; open_clip's CLIP uses 1e-05"),
    "vocab": (lambda tmp, ok: _config_dir(tmp, _clip_config(vocab_size=1000), ok), "text vocab_size=1000"),
    "other-model": (lambda tmp, ok: ok, "model: 'ViT-B-32' disagrees with the Hugging Face directory"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_the_path_and_the_reason(chain, tmp_path, case):
    make, expected = REFUSALS[case]
    good = chain("tiny-vit")["hf_dir"]
    path = str(make(tmp_path, good))
    problems = check_model_spec("ViT-B-32", path)
    assert any(expected in p and path in p for p in problems), problems
    with pytest.raises(ConfigError, match="pretrained|model"):
        load_model("ViT-B-32", path)


def test_other_model_names_what_the_directory_holds(chain):
    path = chain("ViT-B-32-quickgelu")["hf_dir"]
    (problem,) = check_model_spec("ViT-B-32", str(path))
    assert "holds ViT-B-32-quickgelu" in problem and "QuickGELU" in problem and "another network" in problem


def test_export_refuses_a_resnet_clip(tmp_path):
    with pytest.raises(ConfigError, match="only open_clip's CLIP with a ViT image tower"):
        export_hf(load_model("tiny-clip").model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _fake_run(tmp_path, model_name: str, ckpt) -> str:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ckpt, run / "model.pt")
    (run / "report.json").write_text(json.dumps({"config": {"model": model_name, "pretrained": None}}))
    return str(run)


def test_cli_round_trip_run_to_hf_to_open_clip_is_exact(tmp_path, capsys):
    torch.manual_seed(2)
    export_open_clip(load_model("tiny-vit").model, tmp_path / "ckpt.pt")
    run = _fake_run(tmp_path, "tiny-vit", tmp_path / "ckpt.pt")
    assert export_cli.main(["--run", run, "--to", "hf", "--output", str(tmp_path / "hf")]) == 0
    assert export_cli.main(["--pretrained", str(tmp_path / "hf"), "--to", "open_clip", "--output",
                            str(tmp_path / "oc")]) == 0
    want, back = torch.load(tmp_path / "ckpt.pt"), torch.load(tmp_path / "oc" / "model.pt")
    assert back.keys() == want.keys() and all(torch.equal(back[k], want[k]) for k in want)
    assert json.loads((tmp_path / "oc" / "model.pt.json").read_text())["model"] == "tiny-vit"
    assert "--model tiny-vit" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*.partial"))


def test_cli_text_layers_writes_a_shorter_text_tower(tmp_path):
    torch.manual_seed(2)
    export_open_clip(load_model("tiny-vit").model, tmp_path / "ckpt.pt")
    args = ["--model", "tiny-vit", "--pretrained", str(tmp_path / "ckpt.pt"), "--to", "hf", "--text-layers", "1"]
    assert export_cli.main(args + ["--output", str(tmp_path / "short")]) == 0
    assert json.loads((tmp_path / "short" / "config.json").read_text())["text_config"]["num_hidden_layers"] == 1
    assert not any(k.startswith("text_model.encoder.layers.1.")
                   for k in load_file(str(tmp_path / "short" / "model.safetensors")))


CLI_REFUSALS = {
    "mismatched-model": (lambda t, hf: ["--model", "ViT-B-32", "--pretrained", hf, "--to", "open_clip"],
                         "model: 'ViT-B-32' disagrees with the Hugging Face directory"),
    "missing-dir": (lambda t, hf: ["--pretrained", str(t / "nope"), "--to", "hf"],
                    "nope' does not exist (expected a checkpoint file or a Hugging Face CLIP directory)"),
    "dir-without-config": (lambda t, hf: ["--pretrained", str(t), "--to", "hf"], "is a directory, expected a checkpoint"),
    "no-source": (lambda t, hf: ["--to", "hf"], "give exactly one source"),
    "run-not-finished": (lambda t, hf: ["--run", str(t), "--to", "hf"], "has no report.json and model.pt"),
    "text-layers-open-clip": (lambda t, hf: ["--pretrained", hf, "--to", "open_clip", "--text-layers", "2"],
                              "--text-layers: only with --to hf"),
    "text-layers-too-many": (lambda t, hf: ["--pretrained", hf, "--to", "hf", "--text-layers", "3"],
                             "text_layers: expected an integer from 1 to the text tower's 2 layers, got 3"),
    "resnet": (lambda t, hf: ["--model", "tiny-clip", "--to", "hf"], "only open_clip's CLIP with a ViT image tower"),
}


@pytest.mark.parametrize("case", sorted(CLI_REFUSALS))
def test_cli_refusals_exit_2_with_the_reason(chain, tiny_checkpoint, tmp_path, capsys, case):
    make, expected = CLI_REFUSALS[case]
    hf_path = chain("tiny-vit")["hf_dir"]
    args = make(tmp_path, str(hf_path))
    if case == "resnet":
        args += ["--pretrained", str(tiny_checkpoint)]
    out = tmp_path / "out"
    assert export_cli.main(args + ["--output", str(out)]) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()


def test_cli_refuses_a_non_empty_output(chain, tmp_path, capsys):
    hf_path = chain("tiny-vit")["hf_dir"]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    args = ["--pretrained", str(hf_path), "--to", "open_clip", "--output", str(tmp_path / "out")]
    assert export_cli.main(args) == 2
    assert "exists and is not empty (pass --overwrite" in capsys.readouterr().err
    assert export_cli.main(args + ["--overwrite"]) == 0
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "model.pt").is_file()
    assert export_cli.main(["--pretrained", str(hf_path), "--to", "hf", "--output", str(hf_path), "--overwrite"]) == 2
    assert "would overwrite the input" in capsys.readouterr().err


def test_unlearn_from_a_hf_directory_then_export_the_run(chain, tiny_data, tmp_path):
    """The hook in models.py end to end: a run starts from a HF directory, records it as its original,
    and its result goes back out as a HF directory."""
    from launch import unlearn

    hf_path = str(chain("tiny-vit")["hf_dir"])
    args = run_args(tiny_data, tmp_path / "run")
    del args[args.index("--model"):args.index("--model") + 2]  # the directory names its own architecture
    assert unlearn.main(args + ["--pretrained", hf_path]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["config"]["pretrained"] == hf_path and report["before"]  # evaluated the imported weights
    assert report["config"]["model"] == "tiny-vit"
    assert export_cli.main(["--run", str(tmp_path / "run"), "--to", "hf", "--output", str(tmp_path / "out")]) == 0
    _equal_states(hf_to_open_clip(load_file(str(tmp_path / "out" / "model.safetensors"))),
                  torch.load(tmp_path / "run" / "model.pt"))
