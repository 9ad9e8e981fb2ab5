"""Does Stable Diffusion still draw the forgotten concept? (the CLIPErase paper's diffusion test)

A local diffusers pipeline generates the same images twice: with its own text encoder, and with
the unlearned run's text tower in its place (same prompts, same seeds: image k of every prompt
starts from seed + k). The run's original CLIP scores every image zero-shot over the prompts as
classes: an image "shows its concept" when the scorer ranks its own prompt first. Rates before
and after, per forget and retain prompt, go to a JSON file; the images to a contact sheet.

The unlearned text encoder is built to the measure of the pipeline's own (`hf.hf_text_encoder`):
the same number of layers, so SD 2.x's 23-layer text encoder (OpenCLIP ViT-H-14's penultimate
layer) gets the run's first 23 blocks and the final layer norm, as diffusers' own conversion does.
The safety checker is left out: it blanks the images it flags, which would count as forgetting.
Only local folders are read; nothing is fetched from a hub.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..errors import ConfigError
from ..eval.embed import zeroshot_classifier
from ..models import check_model_spec, load_model
from ..models.hf import hf_text_encoder
from ..runs import read_run
from ..trainer import resolve_device

__all__ = ["DiffusionEvalConfig", "pipeline_problems", "evaluate_diffusion", "contact_sheet", "RESULTS", "SHEET"]

RESULTS, SHEET = "diffusion_eval.json", "contact_sheet.png"
_TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection")
_NEEDED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass(frozen=True)
class DiffusionEvalConfig:
    pipeline: str  # a local diffusers pipeline folder (model_index.json): SD 1.x / 2.x, one CLIP text encoder
    run: str  # an unlearn run folder: report.json names model and original weights, model.pt the unlearned ones
    forget_prompts: Tuple[str, ...]  # prompts of the forgotten concept(s); each is a class for the scorer
    retain_prompts: Tuple[str, ...]  # prompts of concepts that should still be drawn; classes too
    output: str = "diffusion_eval"  # folder for diffusion_eval.json and contact_sheet.png
    images_per_prompt: int = 4  # images per prompt and text encoder
    steps: int = 25  # denoising steps
    guidance_scale: float = 7.5  # classifier-free guidance (<= 1 turns it off)
    size: Optional[int] = None  # image height = width in px (a multiple of 8); None: the pipeline's default
    seed: int = 0  # image k of every prompt starts from seed + k, for both text encoders
    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:N
    thumb: int = 128  # contact-sheet cell size in px
    progress: bool = field(default=True, compare=False)  # a tqdm bar over the generation calls

    def problems(self) -> List[str]:
        """Every problem found without building a model: folders, prompts, numbers, and whether the
        run's text tower can stand in for the pipeline's text encoder (from their configs)."""

        p = pipeline_problems(self.pipeline)
        pipeline_ok = not p
        prompts = list(self.forget_prompts) + list(self.retain_prompts)
        if not self.forget_prompts or not self.retain_prompts:
            p.append("prompts: give at least one --forget-prompts and one --retain-prompts")
        if any(not isinstance(x, str) or not x.strip() for x in prompts):
            p.append(f"prompts: expected non-empty strings, got {prompts!r}")
        elif len(set(prompts)) < len(prompts):
            p.append(f"prompts: each prompt is a class and must appear once, got {sorted(prompts)!r}")
        for name, low in (("images_per_prompt", 1), ("steps", 1), ("thumb", 16)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                p.append(f"{name}: expected an integer >= {low}, got {v!r}")
        if self.size is not None and (not isinstance(self.size, int) or self.size < 8 or self.size % 8):
            p.append(f"size: expected a multiple of 8 (px), got {self.size!r}")
        if not isinstance(self.guidance_scale, (int, float)) or not math.isfinite(self.guidance_scale):
            p.append(f"guidance_scale: expected a number, got {self.guidance_scale!r}")
        if Path(self.output).exists() and not Path(self.output).is_dir():
            p.append(f"output: {self.output!r} exists and is not a directory")
        try:
            run = read_run(self.run)
        except ConfigError as exc:
            return p + exc.problems
        if not run.pretrained:
            return p + [f"run: {self.run!r} records no original weights (config.pretrained): the scorer is the "
                        "original CLIP, and the run's text tower would have nothing to be compared with"]
        spec = check_model_spec(run.model, run.pretrained)
        p += [f"run {self.run!r}: {x}" for x in spec]
        if not spec and pipeline_ok:
            p += _fit_problems(run.model, Path(self.pipeline) / "text_encoder" / "config.json")
        return p


def _read_json(path: Path) -> Optional[dict]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def pipeline_problems(path: str) -> List[str]:
    """Problems with `path` as a local diffusers pipeline with one CLIP text encoder, from its
    files alone: missing, not a pipeline folder, a second text encoder (SDXL, SD 3), components or
    their folders missing, a text encoder that is not transformers' CLIP."""
    p, where = Path(path), f"pipeline: {path!r}"
    if not p.exists():
        return [f"{where} does not exist (expected a local diffusers pipeline folder, as "
                "DiffusionPipeline.save_pretrained writes it)"]
    if not p.is_dir():
        return [f"{where} is not a directory (expected a local diffusers pipeline folder)"]
    index = _read_json(p / "model_index.json")
    if index is None:
        return [f"{where} is not a diffusers pipeline folder: no readable model_index.json"]
    present = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0]}
    if present & {"text_encoder_2", "text_encoder_3"}:
        return [f"{where} has a second text encoder ({index.get('_class_name')}, e.g. SDXL or SD 3); only "
                "pipelines with one CLIP text encoder (SD 1.x, SD 2.x) are supported"]
    problems = [f"{where}: model_index.json names no {k}" for k in _NEEDED if k not in present]
    problems += [f"{where} lacks the folder {k}/ that model_index.json names" for k in sorted(present)
                 if not (p / k).is_dir()]
    if problems:
        return problems
    te = _read_json(p / "text_encoder" / "config.json")
    arch = (te or {}).get("architectures") or [None]
    if te is None or arch[0] not in _TEXT_ENCODERS:
        return [f"{where}: text_encoder/ holds {arch[0] or 'no readable config.json'}, expected one of "
                f"{', '.join(_TEXT_ENCODERS)}"]
    return []


def _fit_problems(model: str, te_config: Path) -> List[str]:
    """Whether the open_clip architecture's text tower has the pipeline text encoder's shape."""
    import open_clip

    text, te = (open_clip.get_model_config(model) or {}).get("text_cfg", {}), _read_json(te_config)
    ours = {"hidden_size": text.get("width", 512), "num_attention_heads": text.get("heads", 8),
            "max_position_embeddings": text.get("context_length", 77), "vocab_size": text.get("vocab_size", 49408)}
    diff = [f"{k} {v} vs {te.get(k)}" for k, v in ours.items() if te.get(k) != v]
    if te.get("num_hidden_layers", 0) > text.get("layers", 12):
        diff.append(f"{te.get('num_hidden_layers')} layers asked for, the tower has {text.get('layers', 12)}")
    if diff:
        return [f"run: the text tower of {model} cannot replace the pipeline's text encoder ({'; '.join(diff)}); "
                "unlearn the CLIP whose text encoder the pipeline uses"]
    return []


def _load_pipeline(path: str, device: torch.device):
    from diffusers import DiffusionPipeline

    index = _read_json(Path(path) / "model_index.json") or {}
    extra = {"safety_checker": None, "requires_safety_checker": False} if (index.get("safety_checker") or [None])[0] else {}
    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, **extra).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, prompt: str, cfg: DiffusionEvalConfig, size: int) -> list:
    # CPU generators: the same starting noise on any device.
    gens = [torch.Generator("cpu").manual_seed(cfg.seed + k) for k in range(cfg.images_per_prompt)]
    return pipe(prompt, num_images_per_prompt=cfg.images_per_prompt, generator=gens, num_inference_steps=cfg.steps,
                guidance_scale=cfg.guidance_scale, height=size, width=size, output_type="pil").images


@torch.no_grad()
def _score(scorer, classifier: Tensor, images: Sequence[Sequence]) -> Tuple[Tensor, Tensor]:
    """(probabilities (P, N, C) of each image over the C prompt classes, image embeddings (P, N, d))."""
    device = next(scorer.model.parameters()).device
    x = torch.stack([scorer.preprocess(im) for row in images for im in row]).to(device)
    emb = scorer.model.encode_image(x, normalize=True).float()
    probs = (scorer.model.logit_scale.exp().float() * emb @ classifier.T).softmax(dim=-1)
    P, N = len(images), len(images[0])
    return probs.view(P, N, -1).cpu(), emb.view(P, N, -1).cpu()


def _max_abs_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return float("inf")
    return max((sa[k].float().cpu() - sb[k].float().cpu()).abs().max().item() for k in sa)


def evaluate_diffusion(cfg: DiffusionEvalConfig) -> dict:
    """Generate, score and write `cfg.output`/diffusion_eval.json and contact_sheet.png.

    Returns the JSON's dict: {"before": {"forget_rate", "retain_rate"}, "after": {...},
    "per_prompt": [...], "text_encoder": {...}, "settings": {...}, ...}; a rate is the fraction of
    a part's images whose own prompt the original CLIP ranks first. Raises ConfigError (all
    problems of cfg.problems()) before any model is built.
    """
    from tqdm import tqdm


    problems = cfg.problems()
    if problems:
        raise ConfigError(problems)
    run, device = read_run(cfg.run), resolve_device(cfg.device)
    scorer = load_model(run.model, run.pretrained, device=device)
    pipe = _load_pipeline(cfg.pipeline, device)
    original = pipe.text_encoder
    unlearned = hf_text_encoder(load_model(run.model, str(run.checkpoint)).model, original.config)
    diff = _max_abs_diff(hf_text_encoder(scorer.model, original.config), original)
    prompts = list(cfg.forget_prompts) + list(cfg.retain_prompts)
    size = cfg.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    classifier = zeroshot_classifier(scorer.model, scorer.tokenizer, prompts, ["{c}"])
    images: Dict[str, list] = {}
    bar = tqdm(total=2 * len(prompts), desc="generating", disable=not cfg.progress)
    try:
        for label, encoder in (("before", original), ("after", unlearned.to(device, original.dtype))):
            pipe.text_encoder = encoder
            images[label] = []
            for prompt in prompts:
                images[label].append(_generate(pipe, prompt, cfg, size))
                bar.update()
    finally:
        pipe.text_encoder = original
        bar.close()
    scores = {label: _score(scorer, classifier, imgs) for label, imgs in images.items()}
    result = _summarise(cfg, run, scores, size, original, diff)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS).write_text(json.dumps(result, indent=2) + "\n")
    contact_sheet(images, prompts, scores, len(cfg.forget_prompts), cfg.thumb).save(out / SHEET)
    return result


def _summarise(cfg: DiffusionEvalConfig, run, scores: Dict[str, Tuple[Tensor, Tensor]], size: int,
               original, diff: float) -> dict:
    import diffusers
    import open_clip
    import transformers

    prompts = list(cfg.forget_prompts) + list(cfg.retain_prompts)
    n_forget = len(cfg.forget_prompts)
    own = torch.arange(len(prompts))
    hits = {k: (probs.argmax(dim=-1) == own[:, None]).float() for k, (probs, _) in scores.items()}  # (P, N)
    rates = {k: {"forget_rate": h[:n_forget].mean().item(), "retain_rate": h[n_forget:].mean().item()}
             for k, h in hits.items()}
    cos = (scores["before"][1] * scores["after"][1]).sum(dim=-1)  # (P, N) scorer embeddings before . after
    per_prompt = [{"prompt": p, "part": "forget" if i < n_forget else "retain",
                   **{k: {"rate": hits[k][i].mean().item(), "own_prob": scores[k][0][i, :, i].tolist(),
                          "predicted": [prompts[j] for j in scores[k][0][i].argmax(dim=-1).tolist()]} for k in hits},
                   "image_cosine_before_after": cos[i].tolist()} for i, p in enumerate(prompts)]
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("progress", "forget_prompts", "retain_prompts")}
    return {"pipeline": cfg.pipeline, "run": cfg.run, "model": run.model, "scorer": run.pretrained,
            "forget_prompts": list(cfg.forget_prompts), "retain_prompts": list(cfg.retain_prompts),
            "before": rates["before"], "after": rates["after"], "per_prompt": per_prompt,
            "text_encoder": {"class": type(original).__name__, "num_hidden_layers": original.config.num_hidden_layers,
                             "max_abs_diff_to_run_original": diff},
            "settings": dict(settings, size=size),
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__, "open_clip": open_clip.__version__}}


def contact_sheet(images: Dict[str, list], prompts: Sequence[str], scores: Dict[str, Tuple[Tensor, Tensor]],
                  n_forget: int, thumb: int):
    """A PIL image: one row per prompt (forget prompts first), its images with the original text
    encoder, then with the unlearned one; a green frame where the scorer ranks the image's own
    prompt first, red where not."""
    from PIL import Image, ImageDraw

    n, pad, label_w, head = len(images["before"][0]), 4, 3 * thumb, 24
    cell = thumb + pad
    width = label_w + 2 * n * cell + 3 * pad
    sheet = Image.new("RGB", (width, head + len(prompts) * cell + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for j, title in enumerate(("original text encoder", "unlearned text encoder")):
        draw.text((label_w + j * (n * cell + 2 * pad) + pad, 6), title, fill="black")
    for i, prompt in enumerate(prompts):
        y = head + i * cell
        part = "forget" if i < n_forget else "retain"
        draw.text((pad, y + thumb // 2 - 6), f"[{part}] {prompt}"[: label_w // 6], fill="black")
        for j, label in enumerate(("before", "after")):
            probs = scores[label][0][i]
            for k, im in enumerate(images[label][i]):
                x = label_w + j * (n * cell + 2 * pad) + k * cell + pad
                sheet.paste(im.convert("RGB").resize((thumb - 4, thumb - 4)), (x + 2, y + 2))
                hit = int(probs[k].argmax()) == i
                draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], outline="green" if hit else "red", width=2)
    return sheet
