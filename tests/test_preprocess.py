"""FastPreprocess / FastTokenizer against open_clip's own preprocess and tokenizer.

The reference is what the engine runs: `preprocess(Image.open(raw).convert("RGB"))` (PairStream
converts to RGB before preprocessing) and `tokenizer(captions)`. Without draft decoding the two
halves composed are bit-identical to it (tolerance 0: the same PIL resize and crop on the same
uint8 pixels, then the ops of ToTensor + Normalize); with draft the difference is measured in
uint8 levels and bounded by DRAFT_ERROR.
"""
from __future__ import annotations

import io
import pickle
import random

import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms as T
from PIL import Image, ImageDraw, ImageFilter

from cliperase.engine.models import load_model
from cliperase.engine.data.preprocess import DRAFT_ERROR, FastPreprocess, FastTokenizer


@pytest.fixture(scope="module")
def tiny_preprocess():
    return load_model("tiny-clip").preprocess  # 32 px, the engine's own config


PREPROCESSES = {  # name -> open_clip eval transform (no weights needed)
    "vit-b-32": lambda: open_clip.image_transform(224, is_train=False),
    "bilinear-custom-stats": lambda: open_clip.image_transform(48, is_train=False, interpolation="bilinear",
                                                               mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)),
    "longest-pad": lambda: open_clip.image_transform(40, is_train=False, resize_mode="longest", fill_color=7),
    "squash": lambda: open_clip.image_transform(36, is_train=False, resize_mode="squash"),
    "non-square": lambda: open_clip.image_transform((48, 64), is_train=False),
}

SIZES = [(37, 53), (53, 37), (300, 200), (224, 224), (20, 20), (1, 9)]  # (w, h): odd, identity, upscale
MODES = ["RGB", "L", "RGBA", "P", "CMYK"]


def _random_image(w: int, h: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode == "RGBA":
        return rgba
    if mode == "P":
        return rgba.convert("RGB").quantize(64)
    return rgba.convert("RGB").convert(mode)


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG" and im.mode in ("RGBA", "P"):
        im = im.convert("RGB")
    im.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _reference(preprocess, raw: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(raw)) as im:
        return preprocess(im.convert("RGB"))


def _photo(w: int, h: int, seed: int) -> Image.Image:
    """Photo-like: smooth shading, shapes with hard edges, a slight blur and mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    shade = np.stack([rng.uniform(0, 255) * (1 - xx) + rng.uniform(0, 255) * yy for _ in range(3)], -1)
    im = Image.fromarray(np.clip(shade, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(w // 20, w // 3)), y0 + int(rng.integers(h // 20, h // 3))]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    a = np.asarray(im.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.int16) + rng.integers(-4, 5, (h, w, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------------------------
# Exact equivalence without draft


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("mode", MODES)
def test_tiny_clip_exact(tiny_preprocess, mode, fmt):
    if fmt == "PNG" and mode == "CMYK":
        pytest.skip("PNG has no CMYK")
    fast = FastPreprocess.from_open_clip(tiny_preprocess, draft=False)
    assert fast.image_size == (32, 32)
    for i, (w, h) in enumerate(SIZES):
        raw = _encode(_random_image(w, h, mode, seed=i), fmt)
        image = fast.cpu(raw)
        assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
        assert torch.equal(fast.device(image), _reference(tiny_preprocess, raw)), (mode, fmt, w, h)


@pytest.mark.parametrize("name", list(PREPROCESSES))
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_open_clip_transforms_exact(name, fmt):
    preprocess = PREPROCESSES[name]()
    fast = FastPreprocess.from_open_clip(preprocess, draft=False)
    raws = [_encode(_random_image(w, h, mode, seed=i), fmt)
            for i, ((w, h), mode) in enumerate(zip(SIZES, ["RGB", "L", "RGBA", "RGB", "P", "RGB"]))]
    batch = torch.stack([fast.cpu(raw) for raw in raws])
    assert batch.dtype == torch.uint8 and batch.shape == (len(raws), 3, *fast.image_size)
    expected = torch.stack([_reference(preprocess, raw) for raw in raws])
    assert torch.equal(fast.device(batch), expected)


@pytest.mark.parametrize("shared", [False, True])
def test_cpu_into_empty_batch(tiny_preprocess, shared):
    fast = FastPreprocess.from_open_clip(tiny_preprocess, draft=False)
    raws = [_encode(_random_image(w, h, mode, seed=i), "PNG")
            for i, ((w, h), mode) in enumerate(zip(SIZES, ["RGB", "L", "RGBA", "RGB", "P", "RGB"]))]
    batch = fast.empty_batch(len(raws), shared=shared)
    assert batch.shape == (len(raws), 3, 32, 32) and batch.dtype == torch.uint8
    assert batch.is_contiguous(memory_format=torch.channels_last) and batch.is_shared() == shared
    for i, raw in enumerate(raws):
        assert fast.cpu_into(raw, batch, i) is None
    expected = torch.stack([_reference(tiny_preprocess, raw) for raw in raws])
    assert torch.equal(fast.device(batch), expected)
    nchw = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)  # any layout works, and batches can alternate
    fast.cpu_into(raws[1], nchw, 1)
    fast.cpu_into(raws[0], batch, 0)
    assert torch.equal(nchw[1], batch[1]) and not nchw[0].any()
    with pytest.raises(ValueError, match="batch"):
        fast.cpu_into(raws[0], torch.zeros(2, 3, 16, 16, dtype=torch.uint8), 0)
    with pytest.raises(ValueError, match="batch"):
        fast.cpu_into(raws[0], torch.zeros(2, 3, 32, 32), 0)
    with pytest.raises(IndexError):
        fast.cpu_into(raws[0], nchw, 2)
    with pytest.raises(ValueError, match="fixed output size"):
        FastPreprocess.from_open_clip(T.Compose([T.Resize(32), T.ToTensor()])).empty_batch(2)
    with pytest.raises(ValueError, match="at least 1"):
        fast.empty_batch(0)


class _Stream(torch.utils.data.IterableDataset):
    """Batches made in a DataLoader worker the way a loader should: cpu_into an empty_batch."""

    def __init__(self, fast: FastPreprocess, raws):
        self.fast, self.raws = fast, raws

    def __iter__(self):
        batch = self.fast.empty_batch(len(self.raws))  # in a worker: shared memory
        for i, raw in enumerate(self.raws):
            self.fast.cpu_into(raw, batch, i)
        yield batch, batch.is_shared()


def test_batches_from_a_dataloader_worker(tiny_preprocess):
    fast = FastPreprocess.from_open_clip(tiny_preprocess, draft=False)  # 300x200 would be drafted
    raws = [_encode(_random_image(w, h, "RGB", seed=i), "JPEG") for i, (w, h) in enumerate(SIZES)]
    loader = torch.utils.data.DataLoader(_Stream(fast, raws), batch_size=None, num_workers=1)
    (batch, shared_in_worker), = list(loader)
    assert shared_in_worker and batch.shape == (len(raws), 3, 32, 32)
    assert torch.equal(fast.device(batch), torch.stack([_reference(tiny_preprocess, raw) for raw in raws]))


def test_pil_input_not_drafted():
    preprocess = PREPROCESSES["vit-b-32"]()
    fast = FastPreprocess.from_open_clip(preprocess, draft_gap=1.0)
    with Image.open(io.BytesIO(_encode(_photo(1000, 800, 0), "JPEG"))) as im:  # lazy, not yet decoded
        assert torch.equal(fast(im), preprocess(im.convert("RGB")))
        assert im.size == (1000, 800)  # the caller's image object was not drafted


def test_pil_input_and_call(tiny_preprocess):
    fast = FastPreprocess.from_open_clip(tiny_preprocess)
    im = _random_image(45, 31, "RGBA", seed=1)
    assert torch.equal(fast(im), tiny_preprocess(im.convert("RGB")))


def test_settings_read_from_the_transform():
    preprocess = PREPROCESSES["bilinear-custom-stats"]()
    fast = FastPreprocess.from_open_clip(preprocess)
    normalize = preprocess.transforms[-1]
    assert fast.mean == tuple(normalize.mean) and fast.std == tuple(normalize.std)
    assert fast.image_size == (48, 48)
    assert fast.steps[0].resample == Image.BILINEAR
    vit = FastPreprocess.from_open_clip(PREPROCESSES["vit-b-32"]())
    assert vit.mean == open_clip.OPENAI_DATASET_MEAN and vit.std == open_clip.OPENAI_DATASET_STD
    assert vit.steps[0].resample == Image.BICUBIC and vit.image_size == (224, 224)
    assert FastPreprocess.from_open_clip(PREPROCESSES["non-square"]()).image_size == (48, 64)


# --------------------------------------------------------------------------------------------
# Draft (DCT-scaled) JPEG decoding


@pytest.mark.parametrize("gap", sorted(DRAFT_ERROR))
@pytest.mark.parametrize("target", [32, 224])
def test_draft_error_bounded(gap, target, tiny_preprocess):
    preprocess = tiny_preprocess if target == 32 else PREPROCESSES["vit-b-32"]()
    exact = FastPreprocess.from_open_clip(preprocess, draft=False)
    fast = FastPreprocess.from_open_clip(preprocess, draft_gap=gap)
    worst_max, worst_mean, drafted = 0, 0.0, 0
    for i, (w, h) in enumerate([(640, 480), (449, 600), (1024, 768), (1400, 950), (2000, 1500)]):
        raw = _encode(_photo(w, h, seed=i), "JPEG")
        with Image.open(io.BytesIO(raw)) as im:
            drafted += fast._plan(*im.size)[0] is not None
        diff = (fast.cpu(raw).int() - exact.cpu(raw).int()).abs()
        worst_max, worst_mean = max(worst_max, int(diff.max())), max(worst_mean, float(diff.float().mean()))
    assert drafted >= 2  # the bound is about something: some of these images are decoded scaled
    bound = DRAFT_ERROR[gap]
    assert worst_max <= bound["max_abs"] and worst_mean <= bound["mean_abs"], (worst_max, worst_mean)


def test_draft_leaves_small_and_non_jpeg_images_exact():
    preprocess = PREPROCESSES["vit-b-32"]()
    exact = FastPreprocess.from_open_clip(preprocess, draft=False)
    fast = FastPreprocess.from_open_clip(preprocess, draft_gap=1.0)
    for raw in [_encode(_photo(440, 300, 0), "JPEG"),  # under 2x the target: no DCT scale fits
                _encode(_photo(1000, 800, 1), "PNG")]:  # draft is JPEG only
        assert torch.equal(fast.cpu(raw), exact.cpu(raw))


# --------------------------------------------------------------------------------------------
# Device half, collation, errors


def test_device_bit_identical_to_totensor_normalize():
    preprocess = PREPROCESSES["bilinear-custom-stats"]()
    fast = FastPreprocess.from_open_clip(preprocess)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (5, 48, 48, 3), dtype=torch.uint8, generator=g)
    to_tensor, normalize = T.ToTensor(), preprocess.transforms[-1]
    expected = torch.stack([normalize(to_tensor(b.numpy())) for b in batch])
    out = fast.device(batch.permute(0, 3, 1, 2))  # channels-last strides, as empty_batch gives
    assert out.is_contiguous() and out.dtype == torch.float32
    assert torch.equal(out, expected)
    assert torch.equal(fast.device(batch.permute(0, 3, 1, 2).contiguous()), expected)
    assert fast.device(batch.permute(0, 3, 1, 2), dtype=torch.bfloat16).dtype == torch.bfloat16


def test_device_rejects_wrong_input():
    fast = FastPreprocess.from_open_clip(PREPROCESSES["squash"]())
    with pytest.raises(ValueError, match="uint8"):
        fast.device(torch.zeros(2, 3, 36, 36))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        fast.device(torch.zeros(2, 36, 36, 3, dtype=torch.uint8))


@pytest.mark.parametrize("transform, named", [
    (open_clip.image_transform(224, is_train=True), "RandomResizedCrop"),
    (T.Compose([T.Resize(32), T.CenterCrop(32), T.ColorJitter(0.4), T.ToTensor()]), "ColorJitter"),
    (T.Compose([T.Resize(32), T.CenterCrop(32), T.RandomHorizontalFlip(), T.ToTensor()]), "RandomHorizontalFlip"),
    (T.Compose([T.Resize(32), T.CenterCrop(32)]), "no ToTensor"),
    (T.Compose([T.Resize(32), T.ToTensor(), T.Normalize((0.5,), (0.5,)), T.Resize(16)]), "transform 3"),
])
def test_unsupported_transforms_named(transform, named):
    with pytest.raises(ValueError, match=named):
        FastPreprocess.from_open_clip(transform)


def test_undecodable_bytes_raise_like_pil():
    fast = FastPreprocess.from_open_clip(PREPROCESSES["squash"]())
    with pytest.raises(OSError):
        fast.cpu(b"not an image")
    with pytest.raises(ValueError, match="draft_gap"):
        FastPreprocess.from_open_clip(PREPROCESSES["squash"](), draft_gap=0.5)


def test_picklable(tiny_preprocess):
    fast = FastPreprocess.from_open_clip(tiny_preprocess)
    fast.device(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))  # fills the per-device stats cache
    fast.cpu_into(_encode(_random_image(9, 9, "RGB", 0), "PNG"), fast.empty_batch(1), 0)  # and the batch view
    raw = _encode(_random_image(40, 30, "RGB", 0), "PNG")
    assert torch.equal(pickle.loads(pickle.dumps(fast)).cpu(raw), fast.cpu(raw))
    tok = FastTokenizer(open_clip.get_tokenizer("ViT-B-32"))
    tok(["a dog"])
    assert torch.equal(pickle.loads(pickle.dumps(tok))(["a dog"]), tok(["a dog"]))


# --------------------------------------------------------------------------------------------
# Tokenizer

CAPTIONS = [
    "a green square", "A Photo of a  DOG\tin the   park.", "", "   ", "don't stop'em, it's 42!",
    "fish &amp; chips &lt;3", "Tom &amp;amp; Jerry", "<start_of_text> literal <end_of_text>",
    "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e", "s\u00c3\u00b3 mojibake", "\u201ccurly\u201d quotes \u2014 dash",
    "\uff2c\uff2f\uff35\uff24 width", "emoji \U0001F436\U0001F431",
    "\u65e5\u672c\u8a9e\u306e\u30ad\u30e3\u30d7\u30b7\u30e7\u30f3",
    "line\nbreak\r\nand\rcarriage", "ctrl\x00\x07chars\x1b[31m red", "del\x7fchar", "ligature \ufb01sh",
    "x" * 300, " ".join(["word"] * 100), "numbers 1234567890 3.14 1,000", "MiXeD-CaSe_snake_case #tag @user",
]


@pytest.mark.parametrize("model", ["ViT-B-32", "tiny-clip"])
def test_tokenizer_matches_open_clip(model):
    reference = load_model("tiny-clip").tokenizer if model == "tiny-clip" else open_clip.get_tokenizer(model)
    fast = FastTokenizer.from_open_clip(reference)
    assert fast.fast
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(32, 127)] + ["\u00e9", "\t", "\n", "&amp;", "&"]
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(300)]
    texts = CAPTIONS + fuzz
    out = fast(texts)
    assert out.dtype == torch.int64 and out.shape == (len(texts), reference.context_length)
    assert torch.equal(out, reference(texts))
    assert torch.equal(fast(texts), reference(texts))  # second call: from the word cache
    assert torch.equal(fast("a dog", context_length=8), reference("a dog", context_length=8))


def test_tokenizer_other_modes_delegate():
    reference = open_clip.tokenizer.SimpleTokenizer(clean="canonicalize")
    fast = FastTokenizer(reference)
    assert not fast.fast
    assert torch.equal(fast(CAPTIONS), reference(CAPTIONS))
    whitespace = open_clip.tokenizer.SimpleTokenizer(clean="whitespace")
    fast = FastTokenizer(whitespace)
    assert fast.fast and torch.equal(fast(CAPTIONS), whitespace(CAPTIONS))
