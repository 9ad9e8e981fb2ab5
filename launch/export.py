"""Export an unlearned run, or any open_clip checkpoint, as a Hugging Face CLIP or an open_clip one.

    python launch/export.py --run runs/x --to hf --output exports/x-hf
    python launch/export.py --model ViT-B-32 --pretrained ckpt.pt --to hf --output exports/b32-hf
    python launch/export.py --pretrained hf/clip-vit-large-patch14 --to open_clip --output exports/l14

--to hf writes a transformers CLIPModel directory (config.json, model.safetensors, tokenizer and
image-processor files from open_clip's own vocabulary; no hub needed). transformers loads it as
CLIPModel, CLIPTextModel or CLIPTextModelWithProjection, diffusers takes the text encoder:

    text_encoder = CLIPTextModel.from_pretrained("exports/x-hf")
    pipe = StableDiffusionPipeline.from_pretrained("sd15/", text_encoder=text_encoder)

Stable Diffusion 1.x reads all layers of its text encoder (OpenAI ViT-L/14's 12). SD 2.x reads
the penultimate layer of OpenCLIP ViT-H/14 and diffusers stores it as a 23-layer text encoder:
export with --text-layers 23 for it (the directory's CLIPModel then gives other text embeddings
than the open_clip model; its CLIPTextModel gives what SD 2.x conditions on).

--to open_clip writes <output>/model.pt, a plain open_clip state dict, with model.pt.json naming
its architecture (and holding its config, for architectures derived from a HF directory).
--pretrained also takes a HF CLIP directory (the architecture comes from its config.json; --model
may be left out). open_clip -> hf -> open_clip gives back the same tensors, bit for bit.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from cliperase.engine import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--run", help="an unlearn run folder: its report.json names the model, model.pt holds the weights")
    a("--model", help="open_clip architecture of --pretrained (default for a HF CLIP directory: from its config)")
    a("--pretrained", help="open_clip tag, checkpoint file or Hugging Face CLIP directory")
    a("--to", required=True, choices=("hf", "open_clip"), help="hf: a transformers CLIPModel directory; "
      "open_clip: an open_clip state dict")
    a("--output", required=True, help="folder to write (must be new or empty, unless --overwrite)")
    a("--text-layers", type=int, help="--to hf: keep the first N text-transformer layers (SD 2.x: 23 of "
      "ViT-H-14's 24); default all")
    a("--overwrite", action="store_true", help="replace what --output holds")
    return p


def resolve_source(args: argparse.Namespace) -> Tuple[str, str]:
    """(model name, checkpoint) to export; raises ConfigError listing every problem."""
    from cliperase.engine.models.hf import hf_model_name
    from cliperase.engine.models import check_model_spec
    from cliperase.engine.runs import read_run

    if bool(args.run) == bool(args.pretrained):
        raise ConfigError(["give exactly one source: --run DIR, or --pretrained CKPT (with --model NAME)"])
    if args.run:
        if args.model:
            raise ConfigError(["--model: not with --run (the run's report.json names its model)"])
        run = read_run(args.run)
        name, ckpt = run.model, str(run.checkpoint)
    else:
        name, ckpt = args.model, args.pretrained
        if not name and not Path(ckpt).is_dir():
            if not Path(ckpt).exists() and (os.sep in ckpt or ckpt.startswith(".")):
                raise ConfigError([f"--pretrained: {ckpt!r} does not exist (expected a checkpoint file or a Hugging "
                                   "Face CLIP directory)"])
            raise ConfigError([f"--model: required with --pretrained {ckpt!r} (only a Hugging Face CLIP directory "
                               "names its own architecture)"])
    problems = check_model_spec(name, ckpt)  # a HF directory with name None: its own architecture
    if problems:
        raise ConfigError(problems)
    return name or hf_model_name(ckpt), ckpt


def output_problems(args: argparse.Namespace) -> List[str]:
    out, p = Path(args.output), []
    if args.text_layers is not None and args.to != "hf":
        p.append("--text-layers: only with --to hf")
    if args.text_layers is not None and args.text_layers < 1:
        p.append(f"--text-layers: expected a positive integer, got {args.text_layers}")
    sources = [Path(s).resolve() for s in (args.run, args.pretrained) if s and Path(s).exists()]
    if any(out.resolve() == s or s.is_relative_to(out.resolve()) for s in sources):
        p.append(f"--output: {args.output!r} would overwrite the input")
    elif out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.overwrite)):
        p.append(f"--output: {args.output!r} exists and is {'not a directory' if not out.is_dir() else 'not empty'}"
                 f"{'' if not out.is_dir() else ' (pass --overwrite to replace it)'}")
    return p


def export(name: str, ckpt: str, args: argparse.Namespace) -> Path:
    """Build the model and write it to a temporary sibling of --output, then move it into place,
    so an interrupted export never leaves a half-written directory under the asked name."""
    import open_clip

    from cliperase.engine.checkpoint import export_open_clip
    from cliperase.engine.models.hf import export_hf
    from cliperase.engine.models import load_model

    model = load_model(name, ckpt).model
    out = Path(args.output)
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        if args.to == "hf":
            export_hf(model, tmp, text_layers=args.text_layers)
        else:
            tmp.mkdir(parents=True)
            export_open_clip(model, tmp / "model.pt",
                             meta={"model": name, "source": ckpt, "model_cfg": open_clip.get_model_config(name)})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        problems = output_problems(args)
        try:
            name, ckpt = resolve_source(args)
        except ConfigError as exc:
            raise ConfigError(exc.problems + problems) from exc
        if problems:
            raise ConfigError(problems)
        out = export(name, ckpt, args)
    except ConfigError as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    if args.to == "hf":
        print(f"{out}: transformers CLIPModel of {name} ({ckpt}); load with CLIPModel.from_pretrained({str(out)!r}) "
              f"or CLIPTextModel.from_pretrained({str(out)!r})")
    else:
        print(f"{out / 'model.pt'}: open_clip state dict of {name} ({ckpt}); load with --model {name} "
              f"--pretrained {out / 'model.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
