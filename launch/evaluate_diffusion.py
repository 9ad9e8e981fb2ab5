"""Stable Diffusion with the original and the unlearned text encoder: is the forgotten concept still drawn?

    python launch/evaluate_diffusion.py --pipeline sd15/ --run runs/dog \\
        --forget-prompts "a photo of a dog" "a dog in a park" \\
        --retain-prompts "a photo of a cat" "a photo of a car" --output results/dog-sd15

--pipeline is a local diffusers pipeline folder with one CLIP text encoder (SD 1.x: OpenAI
ViT-L/14's; SD 2.x: OpenCLIP ViT-H/14's, stored as 23 layers, the penultimate layer; the
unlearned encoder is built with the pipeline's own number of layers). --run is an unlearn run of
that same CLIP. Each prompt gets --images-per-prompt images with each text encoder from the same
seeds (image k: --seed + k), and the run's original CLIP scores every image zero-shot with the
prompts as classes. Written to --output:
  diffusion_eval.json   forget/retain rates before and after (the fraction of a part's images
                        whose own prompt the scorer ranks first), per prompt and per image
  contact_sheet.png     each prompt's images, original | unlearned text encoder; green frame:
                        the scorer sees the prompt's concept, red: it does not
The safety checker is left out (it blanks images, which would count as forgetting). Nothing is
fetched from a hub.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from cliperase.engine import ConfigError
from cliperase.engine.tools.diffusion_eval import RESULTS, SHEET, DiffusionEvalConfig

_D = DiffusionEvalConfig("", "", (), ())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate_diffusion", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--pipeline", required=True, help="local diffusers pipeline folder (model_index.json)")
    a("--run", required=True, help="unlearn run folder (report.json, model.pt) of the pipeline's CLIP")
    a("--forget-prompts", nargs="+", default=[], metavar="PROMPT", help="prompts of the forgotten concept(s)")
    a("--retain-prompts", nargs="+", default=[], metavar="PROMPT", help="prompts of concepts to keep")
    a("--images-per-prompt", type=int, default=_D.images_per_prompt, help=f"default {_D.images_per_prompt}")
    a("--steps", type=int, default=_D.steps, help=f"denoising steps (default {_D.steps})")
    a("--guidance-scale", type=float, default=_D.guidance_scale, help=f"default {_D.guidance_scale}")
    a("--size", type=int, help="image height = width in px, a multiple of 8 (default: the pipeline's)")
    a("--seed", type=int, default=_D.seed, help=f"image k of each prompt uses seed + k (default {_D.seed})")
    a("--device", default=_D.device, help="auto (cuda when available), cpu, cuda, cuda:N (default auto)")
    a("--thumb", type=int, default=_D.thumb, help=f"contact-sheet cell size in px (default {_D.thumb})")
    a("--output", default=_D.output, help=f"results folder (default {_D.output})")
    a("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from cliperase.engine.tools.diffusion_eval import evaluate_diffusion

    args = build_parser().parse_args(argv)
    cfg = DiffusionEvalConfig(
        pipeline=args.pipeline, run=args.run, forget_prompts=tuple(args.forget_prompts),
        retain_prompts=tuple(args.retain_prompts), output=args.output, images_per_prompt=args.images_per_prompt,
        steps=args.steps, guidance_scale=args.guidance_scale, size=args.size, seed=args.seed, device=args.device,
        thumb=args.thumb, progress=not args.no_progress)
    try:
        result = evaluate_diffusion(cfg)
    except ConfigError as exc:
        print(f"evaluate_diffusion: error: {exc}", file=sys.stderr)
        return 2
    b, a = result["before"], result["after"]
    print(f"forget concept drawn: {b['forget_rate']:.3f} -> {a['forget_rate']:.3f}   "
          f"retain concepts drawn: {b['retain_rate']:.3f} -> {a['retain_rate']:.3f}")
    if result["text_encoder"]["max_abs_diff_to_run_original"] > 1e-3:
        print("warning: the pipeline's text encoder is not the run's original CLIP text tower (max abs weight "
              f"difference {result['text_encoder']['max_abs_diff_to_run_original']:.3g}): 'before' is the "
              "pipeline's own encoder, not the run's starting point", file=sys.stderr)
    print(f"{Path(args.output) / RESULTS}, {Path(args.output) / SHEET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
