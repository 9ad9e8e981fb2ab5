"""What every unlearning method is made of, and the registry that lists them. Importing it costs no
torch: the config reads method names and options from here before a run is decided.

A method is one class in one file of this package: its name and summary, the streams and teacher
embeddings it needs, its options dataclass, its objective (embeddings -> named losses) and
optional hooks around the engine's one training loop. `@register` adds it to `METHODS`, which
the config reads its method names from; nothing else in the engine names a method.

    @register
    class MyMethod(Method):
        name, summary = "mine", "what it does"
        streams = ("forget", "retain")

        @dataclass(frozen=True)
        class Options(MethodOptions):
            weight: float = 1.0  # reachable as --set weight=2

        def objective(self, f: Features) -> Dict[str, Tensor]:
            forget = clip_infonce(*f.forget.pairs(), f.logit_scale, **f.forget.columns())
            return {"loss": -self.options.weight * forget, "forget_infonce": forget}
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, Iterator, List, Optional, Tuple, Type

if TYPE_CHECKING:  # annotations only: config imports this package (for the registry), not the reverse
    import torch
    from torch import Tensor, nn

    from ..config import UnlearnConfig
    from .features import Features

__all__ = ["Method", "MethodOptions", "RunContext", "METHODS", "register", "get_method", "option_names", "STREAMS"]

STREAMS = ("forget", "retain")


@dataclass(frozen=True)
class MethodOptions:
    """Base of a method's options: a frozen dataclass whose fields are config keys (a comment on
    each), with `problems(cfg)` naming every bad value. No options: this class itself."""

    def problems(self, cfg: "UnlearnConfig") -> List[str]:
        return []


@dataclass
class RunContext:
    """What a method's hooks see of a run. Built by the recipe, one per rank.

    `state` is the method's own state (chosen layers, an EMA, prompt embeddings...): saved in
    every checkpoint and restored before `setup` runs again on resume, so a hook that finds its
    result in `state` need not recompute it. Tensors in it are saved as they are.
    """

    cfg: "UnlearnConfig"
    student: nn.Module  # the open_clip model being trained (plain module, full parameters)
    teacher: Optional[nn.Module]  # the frozen original, when the method uses one
    tokenizer: Callable
    device: torch.device
    # Fresh batch iterators of this rank's forget / retain data, separate from the training
    # streams (reading them does not move the training data position): `batches("forget")`.
    batches: Callable[[str], Iterator[Tuple[Tensor, Tensor]]]
    # Rank 0 only (None elsewhere): evaluate(model, eval_data) -> the metrics of engine/eval.
    evaluate: Optional[Callable[..., dict]] = None
    state: Dict[str, Any] = field(default_factory=dict)
    report: Dict[str, Any] = field(default_factory=dict)  # entries for report.json, under "method_details"


class Method:
    """An unlearning method. Subclasses set the class attributes and `objective`; the hooks are
    optional and none of them touches the loop itself.

    - `setup(ctx)`: every rank, before the optimizer is built (so it may freeze parameters with
      `requires_grad_(False)`; the optimizer then holds only the rest). Called again on resume.
    - `after_step(ctx, step)`: every rank, after each optimizer step (1-based), e.g. an EMA update.
    - `finish(ctx, model)`: rank 0, after training, on the consolidated fp32 model; may change
      its weights in place (a model soup) and record choices in `ctx.report`.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    streams: ClassVar[Tuple[str, ...]] = STREAMS  # the training streams it reads, of STREAMS
    teacher_streams: ClassVar[Tuple[str, ...]] = ()  # streams whose original-model embeddings it needs
    Options: ClassVar[Type[MethodOptions]] = MethodOptions
    needs_full_params: ClassVar[bool] = False  # hooks read whole parameters: ZeRO-3 (sharded) is refused
    needs_teacher_model: ClassVar[bool] = False  # hooks read the original model itself, not only its embeddings

    def __init__(self, cfg: "UnlearnConfig"):
        self.cfg = cfg
        self.options = cfg.options

    @property
    def uses_teacher(self) -> bool:
        return bool(self.teacher_streams) or self.needs_teacher_model

    def objective(self, f: Features) -> Dict[str, Tensor]:
        """Named 0-dim losses of one step; "loss" is the one minimised."""
        raise NotImplementedError

    def setup(self, ctx: RunContext) -> None:
        pass

    def after_step(self, ctx: RunContext, step: int) -> None:
        pass

    def finish(self, ctx: RunContext, model: nn.Module) -> None:
        pass


METHODS: Dict[str, Type[Method]] = {}


def register(cls: Type[Method]) -> Type[Method]:
    """Class decorator: add a method to METHODS under `cls.name` (which must be new)."""
    for attr in ("name", "summary"):
        if not isinstance(getattr(cls, attr, None), str):
            raise TypeError(f"{cls.__name__}: a method needs a string {attr!r}")
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is already registered ({METHODS[cls.name].__name__})")
    unknown = [s for s in (*cls.streams, *cls.teacher_streams) if s not in STREAMS]
    if unknown or not cls.streams or not set(cls.teacher_streams) <= set(cls.streams):
        raise ValueError(f"{cls.__name__}: streams {cls.streams} / teacher_streams {cls.teacher_streams} "
                         f"must be non-empty subsets of {STREAMS}, the teacher's within the streams")
    METHODS[cls.name] = cls
    return cls


def get_method(cfg: "UnlearnConfig") -> Method:
    """The method of `cfg`, built with its options. Raises ValueError for an unknown name."""
    if cfg.method not in METHODS:
        raise ValueError(f"method: unknown method {cfg.method!r}; available: {', '.join(METHODS)}")
    return METHODS[cfg.method](cfg)


def option_names(method: str) -> List[str]:
    return [f.name for f in fields(METHODS[method].Options)]
