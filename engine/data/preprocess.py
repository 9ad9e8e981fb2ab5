"""Fast loader-side preprocessing equivalent to open_clip's eval preprocess, and a faster tokenizer.

open_clip's eval preprocess (`open_clip.create_model_and_transforms(...)[2]`) is a torchvision
Compose: Resize (bicubic, shorter edge) or ResizeKeepRatio, CenterCrop or CenterCropOrPad,
convert to RGB, ToTensor (uint8 -> float / 255) and Normalize. Run per image in a loader worker,
ToTensor and Normalize write 12 bytes per pixel on the CPU. `FastPreprocess` splits the same
computation in two halves, the way fast loaders (FFCV, DALI) do:

- `cpu(raw)`, in the loader worker: decode, resize (the same PIL filter, so the same
  antialiasing) and center crop straight to a uint8 (3, H, W) tensor; 3 bytes per pixel.
  `cpu_into(raw, batch, i)` writes the same pixels straight into row i of an `empty_batch`
  (no per-image tensor, no stacking copy): what a loader should call. With
  `draft=True`, a JPEG is decoded by libjpeg at the smallest DCT scale (1/2, 1/4, 1/8) whose
  size is still at least `draft_gap` times the resize target (PIL's `draft`, as
  `Image.thumbnail` uses it); that skips most of the decode of large photos, and the PIL resize
  does the rest of the downscale.
- `device(batch)`, in the training step (on the GPU when there is one): uint8 (B, 3, H, W) ->
  float, / 255, normalised with the preprocess's mean and std.

Equivalence (tests/test_preprocess.py): the reference is
`preprocess(Image.open(raw).convert("RGB"))`, what the engine runs (`PairStream` decodes to
RGB, then preprocesses). Without draft, `device(torch.stack([cpu(raw), ...]))` (or `device` of
an `empty_batch` filled by `cpu_into`) equals it bit for bit on the CPU: the same PIL resize and
crop on the same uint8 pixels, then the same float ops as ToTensor + Normalize. Draft only touches
JPEGs at least 2 x `draft_gap` times the resize target in both sides: libjpeg's scaled IDCT
then does part of the downscale instead of PIL's bicubic filter, which changes the pixels a
little. Measured (uint8 levels, 0-255, of the cropped image; tests/test_preprocess.py asserts
`DRAFT_ERROR`):
- `draft_gap=2.0` (default): photo-like JPEGs (shading, edges, mild noise) max 5, mean <= 0.25;
  pure noise (worst case) max 15, mean 2.5. Images under 4x the target are decoded exactly.
- `draft_gap=1.0` (the smallest scale still >= the target; fastest): photo-like max 25, mean
  0.6; pure noise max 72, mean 12.6 (a 449x600 -> 224 noise JPEG decoded at 1/2). Opt-in only.

`FastTokenizer` wraps open_clip's `SimpleTokenizer` and returns the same tokens faster: ftfy
(most of the per-caption cost of short captions) is skipped for captions on which it is provably
the identity (printable ASCII without `&`), the regex is used compiled, and each word's BPE ids
are cached. Other tokenizers (HF, SigLIP) are called unchanged.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ["FastPreprocess", "FastTokenizer", "DRAFT_ERROR"]

# Bounds the tests assert for draft-mode JPEG decoding against full decode + PIL resize, per
# draft_gap, in uint8 levels (0-255) of the (3, H, W) image on photo-like JPEGs: the max over
# pixels and the mean over pixels (measured values in the module docstring, with margin).
DRAFT_ERROR = {2.0: {"max_abs": 12, "mean_abs": 0.5}, 1.0: {"max_abs": 40, "mean_abs": 1.5}}

ImageInput = Union[bytes, bytearray, memoryview, Image.Image]


# ---------------------------------------------------------------------------------------------
# The geometric steps, each the PIL path of its torchvision / open_clip transform. A step turns
# an input size into PIL operations (`_Op`s) and an output size; FastPreprocess chains them into
# a plan per input size, cached, so an image costs a dict lookup and its PIL calls.

_Op = Tuple[Any, ...]  # ("resize", (w, h), filter) | ("pad", (w, h), (left, top), fill) | ("crop", box)


@dataclass(frozen=True)
class _Resize:
    """torchvision `Resize` on a PIL image: `size` is (s,) (shorter edge to s, longer edge
    `int(s * long / short)`, capped by `max_size`) or (h, w); `resample` a PIL filter."""

    size: Tuple[int, ...]
    max_size: Optional[int]
    resample: int

    def out_size(self, w: int, h: int) -> Tuple[int, int]:
        """(width, height) after the resize of a w x h image (torchvision's arithmetic)."""
        if len(self.size) == 2:
            return self.size[1], self.size[0]
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.size[0], int(self.size[0] * long / short)
        if self.max_size is not None and new_long > self.max_size:
            new_short, new_long = int(self.max_size * new_short / new_long), self.max_size
        return (new_short, new_long) if w <= h else (new_long, new_short)

    def fixed_size(self) -> Optional[Tuple[int, int]]:
        return (self.size[1], self.size[0]) if len(self.size) == 2 else None

    def ops(self, w: int, h: int) -> Tuple[List[_Op], Tuple[int, int]]:
        size = self.out_size(w, h)  # torchvision returns the image itself when the size is unchanged
        return ([] if size == (w, h) else [("resize", size, self.resample)]), size


@dataclass(frozen=True)
class _ResizeKeepRatio(_Resize):
    """open_clip `ResizeKeepRatio` without its random scale/aspect (eval): `size` (h, w),
    `longest` in [0, 1] mixes the two edge ratios (0: shorter edge fits, 1: longer edge)."""

    longest: float = 0.0

    def out_size(self, w: int, h: int) -> Tuple[int, int]:
        target_h, target_w = self.size
        ratio_h, ratio_w = h / target_h, w / target_w
        ratio = max(ratio_h, ratio_w) * self.longest + min(ratio_h, ratio_w) * (1.0 - self.longest)
        return round(w * 1.0 / ratio), round(h * 1.0 / ratio)

    def fixed_size(self) -> Optional[Tuple[int, int]]:
        return None


@dataclass(frozen=True)
class _CenterCrop:
    """torchvision `CenterCrop` (pads with 0 when the image is smaller) and open_clip
    `CenterCropOrPad` (pads with `fill`): `size` (h, w)."""

    size: Tuple[int, int]
    fill: int

    def fixed_size(self) -> Optional[Tuple[int, int]]:
        return self.size[1], self.size[0]

    def ops(self, w: int, h: int) -> Tuple[List[_Op], Tuple[int, int]]:
        crop_h, crop_w = self.size
        ops: List[_Op] = []
        if crop_w > w or crop_h > h:  # torchvision's padding, as ImageOps.expand does it
            left = (crop_w - w) // 2 if crop_w > w else 0
            top = (crop_h - h) // 2 if crop_h > h else 0
            right = (crop_w - w + 1) // 2 if crop_w > w else 0
            bottom = (crop_h - h + 1) // 2 if crop_h > h else 0
            w, h = w + left + right, h + top + bottom
            ops.append(("pad", (w, h), (left, top), self.fill))
            if (w, h) == (crop_w, crop_h):
                return ops, (w, h)
        top, left = int(round((h - crop_h) / 2.0)), int(round((w - crop_w) / 2.0))
        if (left, top, crop_w, crop_h) != (0, 0, w, h):
            ops.append(("crop", (left, top, left + crop_w, top + crop_h)))
        return ops, (crop_w, crop_h)


_Step = Union[_Resize, _ResizeKeepRatio, _CenterCrop]


def _pil_filter(interpolation: Any, what: str) -> int:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import pil_modes_mapping

    if isinstance(interpolation, int) and not isinstance(interpolation, InterpolationMode):
        return int(interpolation)  # a PIL constant, as torchvision accepts
    if interpolation not in pil_modes_mapping:
        raise ValueError(f"preprocess: {what} uses interpolation {interpolation!r}, which has no PIL equivalent")
    return pil_modes_mapping[interpolation]


def _flatten(transform: Any) -> List[Any]:
    from torchvision.transforms import Compose

    if isinstance(transform, Compose):
        return [t for inner in transform.transforms for t in _flatten(inner)]
    if isinstance(transform, (list, tuple)):
        return [t for inner in transform for t in _flatten(inner)]
    return [transform]


_SUPPORTED = ("Resize, CenterCrop, open_clip's ResizeKeepRatio (no random scale/aspect), CenterCropOrPad, "
              "MaybeConvertMode/_convert_to_rgb (RGB), ToTensor/MaybeToTensor, Normalize")


def _parse(transform: Any) -> Tuple[List[_Step], Tuple[float, ...], Tuple[float, ...]]:
    """Geometric steps, mean and std of an eval preprocess; ValueError naming what cannot be
    reproduced."""
    import torchvision.transforms as T
    from open_clip import transform as oct

    items = _flatten(transform)
    steps: List[_Step] = []
    mean: Tuple[float, ...] = (0.0, 0.0, 0.0)
    std: Tuple[float, ...] = (1.0, 1.0, 1.0)
    phase = "pil"  # pil -> tensor (after ToTensor) -> done (after Normalize)
    for i, t in enumerate(items):
        name = getattr(t, "__name__", None) or type(t).__name__
        where = f"transform {i} ({name}: {t!r})"
        if phase == "pil":
            if isinstance(t, T.Resize):
                size = (t.size,) if isinstance(t.size, int) else tuple(int(s) for s in t.size)
                if len(size) not in (1, 2):
                    raise ValueError(f"preprocess: {where}: size must be an int, (s,) or (h, w)")
                if t.max_size is not None and (len(size) != 1 or t.max_size <= size[0]):
                    raise ValueError(f"preprocess: {where}: max_size needs an int size smaller than it")
                steps.append(_Resize(size, t.max_size, _pil_filter(t.interpolation, where)))
                continue
            if isinstance(t, oct.ResizeKeepRatio):
                if t.random_scale_prob > 0 or t.random_aspect_prob > 0:
                    raise ValueError(f"preprocess: {where} has random scale/aspect (a training augmentation); "
                                     "FastPreprocess reproduces deterministic eval transforms only")
                steps.append(_ResizeKeepRatio(tuple(int(s) for s in t.size), None, _pil_filter(t.interpolation, where),
                                              float(t.longest)))
                continue
            if isinstance(t, (T.CenterCrop, oct.CenterCropOrPad)):
                fill = getattr(t, "fill", 0)
                if not isinstance(fill, int):
                    raise ValueError(f"preprocess: {where}: only an int fill is supported, got {fill!r}")
                steps.append(_CenterCrop(tuple(int(s) for s in t.size), fill))
                continue
            if isinstance(t, oct.MaybeConvertMode) or t is getattr(oct, "_convert_to_rgb", None):
                if getattr(t, "mode", "RGB") != "RGB":
                    raise ValueError(f"preprocess: {where} converts to {t.mode!r}; only RGB is supported")
                continue  # every image is converted to RGB anyway (before the steps, as PairStream does)
            if isinstance(t, T.ToTensor):  # MaybeToTensor is a subclass
                phase = "tensor"
                continue
        elif phase == "tensor" and isinstance(t, T.Normalize):
            mean, std = _channels(t.mean, where, "mean"), _channels(t.std, where, "std")
            if any(s == 0 for s in std):
                raise ValueError(f"preprocess: {where}: std has a zero")
            phase = "done"
            continue
        random_aug = name.startswith("Random") or name in ("ColorJitter", "color_jitter", "gray_scale", "Grayscale")
        hint = " (a training augmentation: use the eval preprocess, is_train=False)" if random_aug else ""
        raise ValueError(f"preprocess: cannot reproduce {where}{hint}; FastPreprocess supports, in this order, "
                         f"{_SUPPORTED}")
    if phase == "pil":
        raise ValueError("preprocess: no ToTensor, so it does not produce a tensor; FastPreprocess supports, in "
                         f"this order, {_SUPPORTED}")
    return steps, mean, std


def _channels(values: Any, where: str, what: str) -> Tuple[float, ...]:
    values = tuple(float(v) for v in (values if isinstance(values, (list, tuple)) else [values]))
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise ValueError(f"preprocess: {where}: {what} must have 1 or 3 values, got {len(values)}")
    return values


# ---------------------------------------------------------------------------------------------

class FastPreprocess:
    """open_clip's eval preprocess in two halves: `cpu` (decode, resize, crop -> uint8) in the
    loader, `device` (-> float, / 255, normalise) in the training step.

    Build it with `FastPreprocess.from_open_clip(preprocess)`. Attributes: `image_size` (H, W)
    of the output, or None when the preprocess has no fixed output size (no crop); `mean`,
    `std` (3 floats each); `draft` (bool), `draft_gap` (float >= 1). Picklable (DataLoader
    workers). Raises ValueError for `draft_gap < 1`.
    """

    def __init__(self, steps: Sequence[_Step], mean: Sequence[float], std: Sequence[float], *, draft: bool = True,
                 draft_gap: float = 2.0):
        if not draft_gap >= 1.0:
            raise ValueError(f"draft_gap: expected >= 1.0, got {draft_gap!r}")
        self.steps = tuple(steps)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.draft, self.draft_gap = bool(draft), float(draft_gap)
        size = None
        for step in self.steps:
            size = step.fixed_size() or (None if isinstance(step, _Resize) else size)
        self.image_size: Optional[Tuple[int, int]] = (size[1], size[0]) if size else None
        self._stats: Dict[torch.device, Tuple[Tensor, Tensor]] = {}
        self._batch_view: Optional[Tuple[Tensor, np.ndarray]] = None
        self._plans: Dict[Tuple[int, int], Tuple[Optional[Tuple[int, int]], Tuple[_Op, ...]]] = {}

    @classmethod
    def from_open_clip(cls, preprocess: Any, *, draft: bool = True, draft_gap: float = 2.0) -> "FastPreprocess":
        """Read image size, interpolation, resize mode, mean and std from an open_clip eval
        preprocess (a torchvision Compose, `create_model_and_transforms(...)[2]` or
        `open_clip.image_transform(size, is_train=False, ...)`).

        Raises ValueError naming the transform when it holds one that cannot be reproduced
        (training augmentations such as RandomResizedCrop, ColorJitter; a mode other than RGB;
        an interpolation without a PIL filter) or when it has no ToTensor; ValueError for
        `draft_gap < 1`. `draft`, `draft_gap`: see the module docstring (JPEG DCT-scaled decode).
        """
        steps, mean, std = _parse(preprocess)
        return cls(steps, mean, std, draft=draft, draft_gap=draft_gap)

    def __repr__(self) -> str:
        return (f"FastPreprocess(steps={list(self.steps)}, mean={self.mean}, std={self.std}, draft={self.draft}, "
                f"draft_gap={self.draft_gap})")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_stats"], state["_batch_view"], state["_plans"] = {}, None, {}
        return state

    # -- CPU half ------------------------------------------------------------------------------

    def cpu(self, image: ImageInput) -> Tensor:
        """Decode (bytes) or take (a PIL image), convert to RGB, resize and center crop.

        Returns a new uint8 tensor (3, H, W), a channel-first view of a contiguous (H, W, 3)
        tensor; (H, W) is `image_size` when the preprocess has a crop or an (h, w) resize.
        Raises what PIL raises for bytes that are not an image: OSError
        (PIL.UnidentifiedImageError), ValueError or SyntaxError from some plugins,
        PIL.Image.DecompressionBombError over PIL's pixel limit.
        """
        with self._open(image) as im:
            pixels = self._pixels(im, self.draft and im is not image)
        out = torch.empty((pixels.shape[0], pixels.shape[1], 3), dtype=torch.uint8)
        out.numpy()[...] = pixels if pixels.ndim == 3 else pixels[:, :, None]
        return out.permute(2, 0, 1)

    def cpu_into(self, image: ImageInput, batch: Tensor, index: int) -> None:
        """`cpu(image)` written straight into `batch[index]`: the loader's fast path, one copy
        from PIL's pixels into the batch and no per-image tensor.

        `batch`: a CPU uint8 (B, 3, H, W) tensor with (H, W) = `image_size`, any strides
        (`empty_batch(B)` gives the channels-last one where each image is one contiguous
        write). The numpy view of the last batch written to is kept (so the per-image cost
        is numpy's, not torch's): that batch stays referenced until another one is written to;
        not thread-safe (one FastPreprocess per thread). Raises ValueError for a batch of
        another dtype, device or shape, IndexError for an index outside it, and what `cpu`
        raises for an image that does not decode.
        """
        view = self._batch_view
        if view is None or view[0] is not batch:
            if (not isinstance(batch, Tensor) or batch.dtype != torch.uint8 or batch.device.type != "cpu"
                    or batch.dim() != 4 or batch.shape[1] != 3 or tuple(batch.shape[2:]) != self.image_size):
                got = (f"{batch.dtype} {tuple(batch.shape)} on {batch.device}" if isinstance(batch, Tensor)
                       else type(batch).__name__)
                raise ValueError(f"batch: expected a CPU uint8 tensor (B, 3, *{self.image_size}), got {got}")
            view = self._batch_view = (batch, batch.detach().permute(0, 2, 3, 1).numpy())
        with self._open(image) as im:
            pixels = self._pixels(im, self.draft and im is not image)
        view[1][index] = pixels if pixels.ndim == 3 else pixels[:, :, None]

    def empty_batch(self, n: int, *, shared: Optional[bool] = None) -> Tensor:
        """An uninitialised uint8 (n, 3, H, W) batch for `cpu_into`, stored channels-last
        ((n, H, W, 3) in memory, `torch.channels_last` strides). `shared` (default: when
        called inside a DataLoader worker) allocates it in shared memory, as torch's
        default_collate does, so handing it to the main process costs no second copy.
        Raises ValueError when the preprocess has no fixed output size or `n < 1`.
        """
        if self.image_size is None:
            raise ValueError("empty_batch: the preprocess has no fixed output size (no crop or (h, w) resize)")
        if n < 1:
            raise ValueError(f"n: expected at least 1, got {n}")
        h, w = self.image_size
        if shared is None:
            shared = torch.utils.data.get_worker_info() is not None
        if shared:  # straight into shared memory, as default_collate does (share_memory_() would copy)
            hwc = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(n * h * w * 3))
            hwc = hwc.view(n, h, w, 3)
        else:
            hwc = torch.empty((n, h, w, 3), dtype=torch.uint8)
        return hwc.permute(0, 3, 1, 2)

    @staticmethod
    def _open(image: ImageInput):
        if isinstance(image, Image.Image):
            return contextlib.nullcontext(image)
        return Image.open(io.BytesIO(image))

    def _pixels(self, im: Image.Image, draft: bool) -> np.ndarray:
        """uint8 (H, W, 3), or (H, W) for a grayscale image (the same pixels in each channel),
        read-only: decode (draft only for images opened here: it changes the image object),
        convert, resize, crop, then PIL's tobytes."""
        size = im.size
        plan = self._plans.get(size)
        if plan is None:
            plan = self._plan(*size)
        least, ops = plan
        box = None
        if draft and least is not None:
            drafted = im.draft(None, least)  # JPEG only (None otherwise): libjpeg decodes at 1/s
            if drafted is not None and im.size != size:
                box = drafted[1]  # the full image in the reduced one's coordinates, for the resize
        # PairStream's order: convert first, then preprocess. A grayscale image is resized and
        # cropped as one channel and copied to the three at the end: the same pixels, a third
        # of the work.
        if im.mode != "RGB" and im.mode != "L":
            im = im.convert("RGB")
        for op in ops:
            kind = op[0]
            if kind == "resize":
                im = im.resize(op[1], op[2], box=box) if box is not None else im.resize(op[1], op[2])
                box = None
            elif kind == "crop":
                im = im.crop(op[1])
            else:
                padded = Image.new(im.mode, op[1], (op[3],) * len(im.getbands()))
                padded.paste(im, op[2])
                im = padded
        w, h = im.size  # PIL packs its 4-byte pixels into RGB bytes; numpy views them, no copy
        return np.frombuffer(im.tobytes(), np.uint8).reshape((h, w, 3) if im.mode == "RGB" else (h, w))

    def _plan(self, w: int, h: int) -> Tuple[Optional[Tuple[int, int]], Tuple[_Op, ...]]:
        """The PIL operations for a w x h input, and the size to ask libjpeg's draft for (None
        when no DCT scale fits: the first step is not a resize, or the image is under 2 x
        `draft_gap` times its target)."""
        ops: List[_Op] = []
        size = (w, h)
        for step in self.steps:
            step_ops, size = step.ops(*size)
            ops.extend(step_ops)
        least = None
        if self.steps and isinstance(self.steps[0], _Resize):
            target = self.steps[0].out_size(w, h)
            least = (max(1, int(target[0] * self.draft_gap)), max(1, int(target[1] * self.draft_gap)))
            if w < 2 * least[0] or h < 2 * least[1]:
                least = None  # no DCT scale (1/2 at least) keeps it >= least: decode in full
        if len(self._plans) >= 4096:
            self._plans.clear()
        plan = self._plans[(w, h)] = (least, tuple(ops))
        return plan

    # -- device half ---------------------------------------------------------------------------

    def device(self, batch: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """uint8 (B, 3, H, W) or (3, H, W), any strides, on any device -> normalised `dtype`
        tensor of the same shape on the same device, contiguous: `(x / 255 - mean) / std`,
        computed in float32 with the ops of ToTensor and Normalize (bit-identical to them on
        the CPU, tested; the same IEEE float32 ops on a GPU, not tested here).

        Move the uint8 batch to the GPU first (`batch.to(dev, non_blocking=True)`): a quarter
        of the bytes of a float batch. Raises ValueError for another dtype or shape.
        """
        if not isinstance(batch, Tensor) or batch.dtype != torch.uint8:
            raise ValueError(f"batch: expected a uint8 tensor, got {getattr(batch, 'dtype', type(batch).__name__)}")
        if batch.dim() not in (3, 4) or batch.shape[-3] != 3:
            raise ValueError(f"batch: expected shape (B, 3, H, W) or (3, H, W), got {tuple(batch.shape)}")
        mean, std = self._stats_on(batch.device)
        # Made contiguous while still uint8 (a quarter of the bytes of the float copy).
        x = batch.contiguous().to(torch.float32).div_(255).sub_(mean).div_(std)
        return x if dtype == torch.float32 else x.to(dtype)

    def _stats_on(self, device: torch.device) -> Tuple[Tensor, Tensor]:
        stats = self._stats.get(device)
        if stats is None:
            stats = tuple(torch.tensor(v, dtype=torch.float32).view(3, 1, 1).to(device) for v in (self.mean, self.std))
            self._stats[device] = stats
        return stats

    def __call__(self, image: ImageInput) -> Tensor:
        """Both halves for one image on the CPU: float32 (3, H, W), as `preprocess(image)`."""
        return self.device(self.cpu(image))


# ---------------------------------------------------------------------------------------------

class FastTokenizer:
    """open_clip tokenizer, same output, less time per caption.

    For open_clip's `SimpleTokenizer` (the CLIP BPE tokenizer; clean "lower" or "whitespace",
    no reduction mask): ftfy and html unescaping are skipped for captions that are printable
    ASCII without "&" (ftfy and html.unescape return those unchanged), the word regex runs
    compiled, and every word's BPE ids are cached (open_clip caches the BPE string only).
    Any other tokenizer, or clean mode, is called unchanged. `fast` tells which.

    `tokenizer(texts, context_length=None)` -> int64 (B, context_length), like open_clip's:
    start token, ids, end token, zero padding; over-long captions truncated with the end token
    last. Picklable.
    """

    def __init__(self, tokenizer: Callable, *, max_cache: int = 1_000_000):
        from open_clip import tokenizer as oct

        self.tokenizer = tokenizer
        self.context_length = getattr(tokenizer, "context_length", None)
        clean = getattr(tokenizer, "clean_fn", None)
        self.fast = (type(tokenizer) is oct.SimpleTokenizer and tokenizer.reduction_fn is None
                     and clean in (oct._clean_lower, oct._clean_whitespace))
        self._lower = clean is oct._clean_lower
        self.max_cache = max_cache
        self._ids: Dict[str, Tuple[int, ...]] = {}

    @classmethod
    def from_open_clip(cls, tokenizer: Callable) -> "FastTokenizer":
        """Wrap `open_clip.get_tokenizer(name)` (or `LoadedModel.tokenizer`)."""
        return cls(tokenizer)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_ids"] = {}
        return state

    def __call__(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None) -> Tensor:
        """Tokenize a caption or a list of captions: int64 (B, context_length). Raises
        ValueError when no context length is given or set."""
        if not self.fast:
            return self.tokenizer(texts, context_length) if context_length else self.tokenizer(texts)
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        if not n:
            raise ValueError("context_length: none given and the tokenizer has none")
        tok = self.tokenizer
        sot, eot = tok.sot_token_id, tok.eot_token_id
        out = np.zeros((len(texts), n), dtype=np.int64)
        for i, text in enumerate(texts):
            ids = [sot]
            ids.extend(self._encode(text))
            ids.append(eot)
            if len(ids) > n:
                ids = ids[:n]
                ids[-1] = eot
            out[i, :len(ids)] = ids
        return torch.from_numpy(out)

    def _encode(self, text: str) -> List[int]:
        if text.isascii() and text.isprintable() and "&" not in text:
            text = " ".join(text.split())  # basic_clean is the identity here; whitespace_clean
            if self._lower:
                text = text.lower()
        else:
            text = self.tokenizer.clean_fn(text)
        cache, ids = self._ids, []
        for word in self.tokenizer.pat.findall(text):
            word_ids = cache.get(word)
            if word_ids is None:
                word_ids = self._bpe_ids(word)
                if len(cache) >= self.max_cache:
                    cache.clear()
                cache[word] = word_ids
            ids.extend(word_ids)
        return ids

    def _bpe_ids(self, word: str) -> Tuple[int, ...]:
        tok = self.tokenizer
        if not (word.isascii() and word.isprintable()):  # printable ASCII maps to itself
            word = "".join(tok.byte_encoder[b] for b in word.encode("utf-8"))
        return tuple(tok.encoder[piece] for piece in tok.bpe(word).split(" "))
