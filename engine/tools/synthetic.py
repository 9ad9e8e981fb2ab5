"""The embedded default dataset: procedural shapes with compositional captions.

Every image is one shape of one colour on one background, so a class (a shape), a concept (a
colour) or a single association (red circles) can each be chosen for forgetting, and the ground
truth of every selection is known. Generation is deterministic in the seed and needs no download.

Written layouts (what users' real data looks like):
- training pairs as img2dataset webdataset shards: `{key}.jpg`, `{key}.txt`, `{key}.json`;
- evaluation sets as CLIP_benchmark webdataset datasets: `classnames.txt`,
  `zeroshot_classification_templates.txt`, `test/nshards.txt`, `test/{0..K-1}.tar` with
  `{key}.png`, `{key}.cls` and (for retrieval) `{key}.txt`, plus `{key}.json` attributes.
"""
from __future__ import annotations

import io
import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import webdataset as wds
from PIL import Image, ImageDraw

from ..data import ShardReader

__all__ = ["SHAPES", "COLOURS", "BACKGROUNDS", "TEMPLATES", "Sample", "generate", "write_default", "split_pairs"]

# Six shapes a 32-pixel image tells apart; near-twins (hexagon ~ circle, diamond ~ square) are left
# out so that accuracy measures forgetting, not resolution.
SHAPES = ("circle", "square", "triangle", "cross", "star", "ring")
COLOURS: Dict[str, tuple] = {
    "red": (215, 38, 38),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 175),
    "orange": (240, 135, 30),
}
BACKGROUNDS: Dict[str, tuple] = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}

# Zero-shot prompts. Training captions use other phrasings, so zero-shot is not a lookup.
TEMPLATES = ("a photo of a {c}.", "a drawing of a {c}.", "a {c}.")

# Training captions mention any subset of the attributes, shape always: the text tower must
# learn the words one by one for class prompts without colour or background to work.
_CAPTIONS = (
    "a {colour} {shape} on a {background} background",
    "a {colour} {shape}",
    "a {colour} {shape}",
    "a {shape} on a {background} background",
    "a {shape}",
    "a {shape}",
    "a picture of a {shape}",
    "a picture of a {colour} {shape}",
)

_DRAW_SCALE = 4  # draw at 4x and downsample: anti-aliased edges like a photo, not pixel art


@dataclass(frozen=True)
class Sample:
    key: str
    shape: str
    colour: str
    background: str
    caption: str
    image: Image.Image

    @property
    def meta(self) -> dict:
        return {"key": self.key, "shape": self.shape, "colour": self.colour,
                "background": self.background, "caption": self.caption}


def _polygon(cx: float, cy: float, r: float, n: int, phase: float) -> List[tuple]:
    return [(cx + r * math.cos(phase + 2 * math.pi * k / n), cy + r * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rot: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(r * 0.35)))
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r * 1.15, 4, rot + math.pi / 4), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r * 1.15, 3, rot - math.pi / 2), fill=fill)
    elif shape == "star":
        pts = []
        for k in range(10):
            rr = r * 1.2 if k % 2 == 0 else r * 0.5
            a = rot - math.pi / 2 + math.pi * k / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        draw.polygon(pts, fill=fill)
    elif shape == "cross":
        w = r * 0.38
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"shape: expected one of {list(SHAPES)}, got {shape!r}")


def render(shape: str, colour: str, background: str, rng: random.Random, size: int = 32) -> Image.Image:
    """One image: the shape at a random position, size and small rotation, colours jittered."""
    big = size * _DRAW_SCALE

    def jitter(rgb):
        return tuple(max(0, min(255, c + rng.randint(-18, 18))) for c in rgb)

    img = Image.new("RGB", (big, big), jitter(BACKGROUNDS[background]))
    r = big * rng.uniform(0.26, 0.38)
    cx = rng.uniform(r * 1.1, big - r * 1.1)
    cy = rng.uniform(r * 1.1, big - r * 1.1)
    _draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, rng.uniform(-0.3, 0.3), jitter(COLOURS[colour]))
    return img.resize((size, size), Image.LANCZOS)


def generate(
    n: int,
    seed: int,
    *,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    backgrounds: Sequence[str] = tuple(BACKGROUNDS),
    size: int = 32,
    prefix: str = "",
) -> Iterator[Sample]:
    """`n` samples cycling evenly through shapes x colours x backgrounds, deterministic in `seed`."""
    rng = random.Random(seed)
    combos = [(s, c, b) for s in shapes for c in colours for b in backgrounds]
    order: List[tuple] = []
    while len(order) < n:
        block = combos[:]
        rng.shuffle(block)
        order.extend(block)
    for i, (shape, colour, background) in enumerate(order[:n]):
        caption = rng.choice(_CAPTIONS).format(shape=shape, colour=colour, background=background)
        yield Sample(f"{prefix}{i:07d}", shape, colour, background, caption, render(shape, colour, background, rng, size))


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=95) if fmt == "JPEG" else img.save(buf, format=fmt)
    return buf.getvalue()


def write_pairs(samples, out_dir: Path, *, shard_size: int = 1000) -> int:
    """img2dataset layout: `{out_dir}/{00000..}.tar` with jpg/txt/json. Returns the count."""
    out_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    with wds.ShardWriter(str(out_dir / "%05d.tar"), maxcount=shard_size, verbose=0) as sink:
        for s in samples:
            sink.write({"__key__": s.key, "jpg": _encode(s.image, "JPEG"), "txt": s.caption, "json": json.dumps(s.meta)})
            count += 1
    return count


def write_eval(samples, root: Path, classnames: Sequence[str], *, shard_size: int = 1000) -> int:
    """CLIP_benchmark webdataset layout, one `test` split with png/cls/txt/json per sample."""
    split = root / "test"
    split.mkdir(parents=True, exist_ok=True)
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    index = {c: i for i, c in enumerate(classnames)}
    count = 0
    with wds.ShardWriter(str(split / "%d.tar"), maxcount=shard_size, verbose=0) as sink:
        for s in samples:
            sink.write({"__key__": s.key, "png": _encode(s.image, "PNG"), "cls": str(index[s.shape]),
                        "txt": s.caption, "json": json.dumps(s.meta)})
            count += 1
    (split / "nshards.txt").write_text(f"{len(list(split.glob('*.tar')))}\n")
    return count


def write_retrieval_copy(src: Path, root: Path) -> Path:
    """`src` (a CLIP_benchmark classification folder whose samples carry captions) as a retrieval
    folder CLIP_benchmark reads: its shards, nshards.txt and classnames.txt (which decide the
    forget part in cliperase; CLIP_benchmark ignores them here) copied unchanged, and
    `dataset_type.txt` = "retrieval". Written beside `root` and renamed into place. Returns root."""
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "test").mkdir(parents=True)
    for shard in sorted((src / "test").iterdir()):
        if shard.suffix == ".tar" or shard.name == "nshards.txt":
            shutil.copyfile(shard, tmp / "test" / shard.name)
    shutil.copyfile(src / "classnames.txt", tmp / "classnames.txt")
    (tmp / "dataset_type.txt").write_text("retrieval\n")
    tmp.rename(root)
    return root


def write_default(
    root: Path,
    *,
    forget: Callable[[Sample], bool],
    n_train: int = 9600,
    n_eval: int = 1440,
    seed: int = 0,
    progress: Optional[Callable[[str], None]] = None,
) -> Dict[str, int]:
    """The demo's data under `root`: `train/` (all pairs, for pretraining), `forget/` and
    `retain/` (the training pairs split by the `forget` predicate), `eval/` (held out; a
    classification folder whose samples also carry captions) and `eval_retrieval/` (the same
    samples as a retrieval folder, `write_retrieval_copy`).

    Returns sample counts per part. Writes into a temporary folder first and renames it into
    place, so an interrupted run never leaves a partial dataset that looks complete.
    """
    tmp = root.with_name(root.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    say = progress or (lambda _msg: None)
    say(f"generating {n_train} training pairs")
    train = list(generate(n_train, seed, prefix="train-"))
    counts = {"train": write_pairs(train, tmp / "train")}
    counts["forget"] = write_pairs([s for s in train if forget(s)], tmp / "forget")
    counts["retain"] = write_pairs([s for s in train if not forget(s)], tmp / "retain")
    say(f"generating {n_eval} evaluation samples")
    counts["eval"] = write_eval(generate(n_eval, seed + 1, prefix="eval-"), tmp / "eval", SHAPES)
    write_retrieval_copy(tmp / "eval", tmp / "eval_retrieval")
    (tmp / "manifest.json").write_text(json.dumps({"seed": seed, "counts": counts}, indent=1))
    tmp.rename(root)
    return counts


def split_pairs(src: Path, root: Path, *, forget: Callable[[dict], bool], shard_size: int = 1000) -> Dict[str, int]:
    """Split img2dataset shards by their `{key}.json` attributes into `root/forget/` and
    `root/retain/`, bytes copied unchanged (the same pairs another split of the same data holds).

    `forget(meta)` gets each sample's decoded json. Samples without json go to retain. Writes into
    a temporary folder renamed into place, like `write_default`. Returns the count of each part.
    """
    tmp = root.with_name(root.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    counts = {"forget": 0, "retain": 0}
    (tmp / "forget").mkdir(parents=True)
    (tmp / "retain").mkdir(parents=True)
    sinks = {part: wds.ShardWriter(str(tmp / part / "%05d.tar"), maxcount=shard_size, verbose=0) for part in counts}
    try:
        # Every sample as stored (unchecked), through the engine's one tar reader.
        for stored in ShardReader([str(s) for s in sorted(Path(src).glob("*.tar"))], check_images="none",
                                  check_samples=False):
            sample = {k: v for k, v in stored.items() if k == "__key__" or not k.startswith("__")}
            meta = json.loads(sample["json"]) if "json" in sample else {}
            part = "forget" if forget(meta) else "retain"
            sinks[part].write(sample)
            counts[part] += 1
    finally:
        for sink in sinks.values():
            sink.close()
    (tmp / "manifest.json").write_text(json.dumps({"source": str(src), "counts": counts}, indent=1))
    tmp.rename(root)
    return counts
