"""What a run's input files say, found by reading a little of each, before anything is built.

Problems refuse the run; warnings are legal but suspicious setups the run goes on with:
- the training streams: usable pairs at all, the same shards given as forget and retain data
  (refused) or shared samples (a warning, measured on the first shards), a batch that repeats
  the data many times over (refused) or at all (a warning);
- the evaluation set: which images the forget classes and attributes select: none, or all of
  them (refused: a metric without images is NaN); class names with the closest one offered;
- the output folder: inside an input data folder (refused: outputs would mix with the shards),
  beside the pretrained checkpoint (a warning).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, List, Optional, Set, Tuple

from .checks import closest
from .data.eval_set import classnames, eval_records
from .data.shards import expand_shards, resolve_shards
from .data.tar import ShardReader
from .dist.ds_config import world_size_from_env
from .eval.splits import forgotten, parse_attributes

if TYPE_CHECKING:
    from .config import UnlearnConfig

__all__ = ["Findings", "stream_findings", "eval_findings", "output_findings", "class_problems"]

_KEYS_COMPARED = 2000  # samples of each training stream compared for shared samples
# A batch that needs more than this many passes over a stream's usable pairs is refused (each pair
# would be its own false negative that many times); one that needs more than one pass is warned of.
_MAX_REPEATS = 10


@dataclass
class Findings:
    problems: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    def add(self, other: "Findings") -> "Findings":
        self.problems += other.problems
        self.warnings += other.warnings
        return self


@dataclass
class _Stream:
    usable: int  # usable pairs read (at most the number asked for)
    complete: bool  # every shard was read
    samples: Set[Tuple[str, bytes]]  # (key, caption) of the first _KEYS_COMPARED usable pairs
    reader: ShardReader


def _scan(spec: str, what: str, want: int) -> _Stream:
    """Read `spec`'s shards until `want` usable pairs are seen (images not decoded)."""
    reader = ShardReader(resolve_shards(spec, what), check_images="none", retries=0)
    samples: Set[Tuple[str, bytes]] = set()
    usable, it = 0, iter(reader)
    try:
        for sample in it:
            usable += 1
            if len(samples) < _KEYS_COMPARED:
                samples.add((sample["__key__"], sample["txt"]))
            if usable >= max(want, _KEYS_COMPARED):
                return _Stream(usable, False, samples, reader)
    finally:
        it.close()
    return _Stream(usable, True, samples, reader)


def stream_findings(cfg: "UnlearnConfig", streams: Iterable[str]) -> Findings:
    """The training streams `streams` (of "forget_data", "retain_data"), whose specs resolve."""
    found, scans = Findings(), {}
    batch = cfg.batch_size * world_size_from_env() if isinstance(cfg.batch_size, int) else 0
    for what in streams:
        scans[what] = s = _scan(getattr(cfg, what), what, batch)
        if s.usable == 0:
            skipped = {k: v for k, v in s.reader.skip_counts().items() if v}
            bad = "; ".join(f"{url}: {why}" for url, why in list(s.reader.bad_shards.items())[:3])
            found.problems.append(f"{what}: no usable image-caption sample in {len(s.reader.shards)} shard(s) of "
                                  f"{getattr(cfg, what)!r} (skipped: {skipped or 'nothing, the shards hold no samples'})"
                                  + (f"; {bad}" if bad else ""))
        elif s.complete and batch > s.usable:
            passes = -(-batch // s.usable)
            say = (f"batch_size: a global batch of {batch} pairs, but {what} holds {s.usable} usable pairs: each "
                   f"batch would repeat each pair up to {passes} times, and a repeated pair is its own negative in "
                   "the contrastive losses")
            (found.problems if passes > _MAX_REPEATS else found.warnings).append(
                say + ("; lower --batch-size" if passes > _MAX_REPEATS else ""))
    if len(scans) == 2:
        found.add(_overlap(cfg, scans["forget_data"], scans["retain_data"]))
    return found


def _overlap(cfg: "UnlearnConfig", forget: _Stream, retain: _Stream) -> Findings:
    found = Findings()
    f_shards = {str(Path(s).resolve()) for s in forget.reader.shards}
    r_shards = {str(Path(s).resolve()) for s in retain.reader.shards}
    if f_shards == r_shards:
        found.problems.append(f"retain_data: the same shards as forget_data ({len(f_shards)}): the run would train "
                              "to keep exactly what it forgets; give the pairs to keep")
        return found
    shared = forget.samples & retain.samples
    if shared:
        examples = ", ".join(repr(k) for k, _ in sorted(shared)[:3])
        found.warnings.append(f"retain_data: {len(shared)} of the first {len(retain.samples)} retain pairs are forget "
                              f"pairs too (same key and caption: {examples}): training to keep them teaches them back")
    return found


def class_problems(eval_data: str, forget_classes) -> List[str]:
    """Forget classes that are not classes of the set, each with the closest name when there is one."""
    names_file = Path(eval_data) / "classnames.txt"
    names = classnames(eval_data)
    missing = [c for c in forget_classes if c not in names]
    if not missing:
        return []
    lowered = {n.lower(): n for n in names}
    hints = [lowered.get(c.lower()) or closest(c, names) for c in missing]
    meant = [f"{h!r}" + (f" for {c!r}" if len(missing) > 1 else "") for c, h in zip(missing, hints) if h]
    return [f"forget_classes: {missing} not in {names_file}" + (f"; did you mean {', '.join(meant)}?" if meant else "")
            + f" (classes: {', '.join(names)})"]


def eval_findings(cfg: "UnlearnConfig") -> Findings:
    """Whether the forget classes (and attributes) leave images on both sides of the split: the
    forget metrics need forgotten images, the retain metrics kept ones. Reading stops once both
    sides have one, so a good set costs a few samples and only a bad one is read to its end."""
    try:
        where = parse_attributes(cfg.forget_attributes)
    except ValueError:
        return Findings()  # named by the value checks
    names = classnames(cfg.eval_data)
    rule = forgotten(cfg.forget_classes, where, classnames=names)
    counts, seen = {True: 0, False: 0}, 0
    for rec in eval_records(cfg.eval_data, retries=0):
        seen += 1
        counts[rule(rec.label if names else None, rec.captions, rec.attributes)] += 1
        if counts[True] and counts[False]:
            return Findings()
    chosen = f"forget_classes {list(cfg.forget_classes)}" + (f" with forget_attributes {cfg.forget_attributes!r}"
                                                            if where else "")
    if not counts[True]:
        return Findings([f"forget_classes: {chosen} select none of the {seen} images of {cfg.eval_data}: nothing would "
                         "measure forgetting (check the class names and the attributes of the images' json)"])
    return Findings([f"forget_classes: {chosen} select every one of the {seen} images of {cfg.eval_data}: nothing "
                     "would measure what is kept; name fewer classes, or evaluate on a set with other classes too"])


def _data_folders(spec: Optional[str]) -> Set[Path]:
    """The folders a data spec reads from: the folder itself, or each shard's folder."""
    if not isinstance(spec, str) or not spec:
        return set()
    out = set()
    for part in spec.split("::"):
        if Path(part).is_dir():
            out.add(Path(part).resolve())
    out |= {Path(s).resolve().parent for s in expand_shards(spec) if Path(s).is_file()}
    return out


def output_findings(cfg: "UnlearnConfig", calibration: Optional[str] = None) -> Findings:
    """Refused: an output folder equal to or inside a folder the run reads data from. Warned: one
    inside the folder of the pretrained checkpoint."""
    found = Findings()
    out = Path(cfg.output_dir).resolve()
    for what, spec in (("forget_data", cfg.forget_data), ("retain_data", cfg.retain_data),
                       ("eval_data", cfg.eval_data), ("audit_data", cfg.audit_data),
                       ("calibration_data", calibration)):
        for folder in sorted(_data_folders(spec)):
            if out == folder or folder in out.parents:
                found.problems.append(f"output_dir: {cfg.output_dir!r} is inside {what}'s folder {str(folder)!r}: the "
                                      "model, checkpoints and teacher cache would land among the input data; choose "
                                      "a folder outside the inputs")
    if isinstance(cfg.pretrained, str) and Path(cfg.pretrained).is_file():
        folder = Path(cfg.pretrained).resolve().parent
        if out == folder or folder in out.parents:
            found.warnings.append(f"output_dir: {cfg.output_dir!r} is inside the folder of the pretrained checkpoint "
                                  f"{str(folder)!r}: the run's files will sit beside the original model")
    return found
