"""Malformed configs, checkpoints and shards through the real CLI (launch/unlearn.py main()).

Each case starts from a valid run and breaks one thing (the last breaks several). Every one
must exit with code 2 and a message naming the field and what was wrong (and what was probably
meant, where there is a near match); each is refused by preflight.problems(), before any model
is built and before anything is written; no case may change an input. Legal but suspicious
setups are warned of, not refused (the tests after the table).
"""
import io
import json
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Tuple

import open_clip
import pytest

from cliperase.engine import UnlearnConfig, preflight
from helpers import random_checkpoint, sha256, tiny_checkpoint, tiny_data  # noqa: F401
from launch import unlearn as cli


@dataclass
class Ctx:
    data: Path  # the session's tiny dataset (read-only here)
    ckpt: Path  # a valid tiny-clip checkpoint (read-only here)
    other_arch: Path  # a valid tiny-vit checkpoint
    inp: Path  # this case's own inputs
    out: Path  # the run's output_dir


@dataclass
class Case:
    id: str
    make: Callable[[Ctx], dict]  # flag -> value changes to the good run (None drops the flag); "_extra": more argv
    expect: Tuple[str, ...]  # substrings of the error message
    count: int = 1  # problems in the message


# --- inputs built per case -------------------------------------------------------------------

def _file(ctx: Ctx, name: str, data: bytes) -> str:
    path = ctx.inp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def _truncated_checkpoint(ctx: Ctx) -> str:
    raw = ctx.ckpt.read_bytes()
    return _file(ctx, "cut.pt", raw[: len(raw) // 2])  # a download cut short: no zip central directory


def _torch_file(ctx: Ctx, name: str, obj) -> str:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return _file(ctx, name, buf.getvalue())


def _json_only_shard(ctx: Ctx) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(3):
            body = json.dumps({"key": i}).encode()
            info = tarfile.TarInfo(f"s{i:05d}.json")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    _file(ctx, "jsononly/00000.tar", buf.getvalue())
    return str(ctx.inp / "jsononly")


def _brace_with_gap(ctx: Ctx) -> str:
    shard = next((ctx.data / "retain").glob("*.tar"))
    for i in (0, 1):
        _file(ctx, f"retain/{i:05d}.tar", shard.read_bytes())
    return str(ctx.inp / "retain" / "{00000..00002}.tar")


def _eval_without_classnames(ctx: Ctx) -> str:
    root = ctx.inp / "eval"
    shutil.copytree(ctx.data / "eval", root)
    (root / "classnames.txt").unlink()
    return str(root)


def _out_inside_audit(ctx: Ctx) -> dict:
    root = ctx.inp / "audit"
    shutil.copytree(ctx.data / "retain", root)
    return {"audit_data": str(root), "output_dir": str(root / "run")}


def _out_is_file(ctx: Ctx) -> str:
    return _file(ctx, "out.txt", b"not a directory")


def _out_with_run(ctx: Ctx) -> str:
    ctx.out.mkdir()
    (ctx.out / "run.json").write_text(json.dumps({"status": "finished"}))
    (ctx.out / "report.json").write_text(json.dumps({}))
    return str(ctx.out)


def _ckpt_inside_out(ctx: Ctx) -> dict:
    ctx.out.mkdir()
    shutil.copy(ctx.ckpt, ctx.out / "model.pt")  # e.g. unlearning again on top of an earlier run
    return {"pretrained": str(ctx.out / "model.pt"), "_extra": ["--overwrite"]}


def _json(ctx: Ctx, name: str, obj) -> str:
    return _file(ctx, name, json.dumps(obj).encode())


def _empty_dir(ctx: Ctx) -> str:
    _file(ctx, "forget/README.txt", b"shards were supposed to be here")
    return str(ctx.inp / "forget")


CASES: List[Case] = [
    # --- model and checkpoint
    Case("model-unknown", lambda c: {"model": "ViT-B-33"},
         ("model: unknown architecture 'ViT-B-33'", "Did you mean", "Available:", "tiny-clip")),
    Case("pretrained-missing", lambda c: {"pretrained": str(c.inp / "nope.pt")},
         ("pretrained: checkpoint file", "nope.pt' does not exist")),
    Case("pretrained-directory", lambda c: {"pretrained": str(c.data / "forget")},
         ("pretrained:", "is a directory, expected a checkpoint file")),
    Case("pretrained-unknown-tag", lambda c: {"pretrained": "laion9000"},
         ("pretrained: 'laion9000' is neither a file nor an open_clip tag of tiny-clip",)),
    Case("pretrained-garbage", lambda c: {"pretrained": _file(c, "garbage.pt", b"\x13\x37 no tensors here " * 64)},
         ("pretrained:", "garbage.pt' is not a PyTorch checkpoint",)),
    Case("pretrained-empty-file", lambda c: {"pretrained": _file(c, "empty.pt", b"")},
         ("pretrained: checkpoint file", "empty.pt' is empty (0 bytes)")),
    Case("pretrained-truncated", lambda c: {"pretrained": _truncated_checkpoint(c)},
         ("pretrained:", "cut.pt' is not a PyTorch checkpoint", "truncated download")),
    Case("pretrained-not-a-state-dict", lambda c: {"pretrained": _torch_file(c, "list.pt", [1, 2, 3])},
         ("pretrained:", "list.pt' holds no state dict of tensors (found a list)")),
    Case("pretrained-empty-state-dict", lambda c: {"pretrained": _torch_file(c, "nothing.pt", {})},
         ("pretrained:", "nothing.pt' holds no state dict of tensors (found an empty dict)")),
    Case("pretrained-other-architecture", lambda c: {"pretrained": str(c.other_arch)},
         ("pretrained:", "vit.pt' is not a checkpoint of tiny-clip", "visual.attnpool.c_proj.weight missing",
          "it fits tiny-vit: pass --model tiny-vit")),
    # --- shards and the evaluation set
    Case("forget-dir-without-tar", lambda c: {"forget_data": _empty_dir(c)},
         ("forget_data:", "matches no .tar shards")),
    Case("retain-brace-missing-shard", lambda c: {"retain_data": _brace_with_gap(c)},
         ("retain_data: 1 of 3 shards do not exist", "00002.tar")),
    Case("forget-shard-not-a-tar", lambda c: {"forget_data": _file(c, "junk.tar", b"\x01 not a tar " * 300)},
         ("forget_data: no usable image-caption sample in 1 shard(s)", "unreadable_shard", "junk.tar")),
    Case("forget-shard-empty-file", lambda c: {"forget_data": _file(c, "empty.tar", b"")},
         ("forget_data: no usable image-caption sample in 1 shard(s)", "unreadable_shard", "empty.tar")),
    Case("forget-shard-json-only", lambda c: {"forget_data": _json_only_shard(c)},
         ("forget_data: no usable image-caption sample in 1 shard(s)", "'missing_image': 3")),
    Case("eval-data-missing", lambda c: {"eval_data": str(c.inp / "no-eval")},
         ("eval_data:", "no-eval' is not a directory",)),
    Case("eval-data-without-classnames", lambda c: {"eval_data": _eval_without_classnames(c)},
         ("eval_data:", "classnames.txt is missing", "class labels (cls)")),
    Case("forget-class-wrong-case", lambda c: {"forget_classes": "Circle"},
         ("forget_classes: ['Circle'] not in", "did you mean 'circle'?")),
    Case("forget-classes-all-of-them", lambda c: {"forget_classes": "circle,square,triangle,cross,star,ring"},
         ("forget_classes:", "select every one of the", "images of", "nothing would measure what is kept")),
    Case("forget-attributes-select-nothing", lambda c: {"_extra": ["--set", "forget_attributes=colour=teal"]},
         ("forget_classes: forget_classes ['circle'] with forget_attributes 'colour=teal' select none of the",
          "nothing would measure forgetting")),
    Case("set-json-unterminated", lambda c: {"_extra": ["--set", 'forget_attributes="colour=red']},
         ("--set 'forget_attributes=\"colour=red'", "starts like JSON but does not parse")),
    Case("retain-is-the-forget-data", lambda c: {"retain_data": str(c.data / "forget")},
         ("retain_data: the same shards as forget_data", "keep exactly what it forgets")),
    Case("batch-far-larger-than-the-data", lambda c: {"batch_size": 100000},
         ("batch_size: a global batch of 100000 pairs, but forget_data holds", "but retain_data holds",
          "lower --batch-size"), count=2),
    Case("output-inside-the-forget-data", lambda c: {"output_dir": str(c.data / "forget" / "run")},
         ("output_dir:", "is inside forget_data's folder", "choose a folder outside the inputs")),
    Case("output-inside-the-audit-data", _out_inside_audit,
         ("output_dir:", "is inside audit_data's folder", "choose a folder outside the inputs")),
    Case("forget-class-unknown", lambda c: {"forget_classes": "circle,unicorn"},
         ("forget_classes: ['unicorn'] not in", "classes: ", "circle")),
    Case("forget-classes-set-as-string", lambda c: {"forget_classes": None, "_extra": ["--set", "forget_classes=unicorn"]},
         ("forget_classes: ['unicorn'] not in",)),  # one name, not the letters u, n, i, ...
    # --- numbers
    Case("steps-zero", lambda c: {"steps": 0}, ("steps: expected a positive integer, got 0",)),
    Case("steps-negative", lambda c: {"steps": -5}, ("steps: expected a positive integer, got -5",)),
    Case("steps-fractional", lambda c: {"steps": None, "_extra": ["--set", "steps=2.5"]},
         ("steps: expected a positive integer, got 2.5",)),
    Case("steps-text", lambda c: {"steps": None, "_extra": ["--set", "steps=ten"]},
         ("steps: expected a positive integer, got 'ten'",)),
    Case("batch-size-zero", lambda c: {"batch_size": 0}, ("batch_size: expected a positive integer, got 0",)),
    Case("lr-nan", lambda c: {"lr": "nan"}, ("lr: expected a positive number, got nan",)),
    Case("lr-inf", lambda c: {"lr": "inf"}, ("lr: expected a positive number, got inf",)),
    Case("lr-negative", lambda c: {"lr": "-1e-3"}, ("lr: expected a positive number, got -0.001",)),
    Case("beta-above-one", lambda c: {"method": "neggrad+", "_extra": ["--set", "beta=1.5"]},
         ("beta: expected a number in [0, 1], got 1.5",)),
    Case("option-of-another-method", lambda c: {"_extra": ["--set", "beta=0.5"]},
         ("beta: an option of method neggrad+, not of 'cliperase' (it would change nothing)",)),
    Case("seed-text", lambda c: {"seed": None, "_extra": ["--set", "seed=abc"]}, ("seed: expected an integer, got 'abc'",)),
    # --- names
    Case("method-unknown", lambda c: {"method": "forgetall"},
         ("method: unknown method 'forgetall'; available: cliperase, ft, ga",)),
    Case("forget-mode-unknown", lambda c: {"_extra": ["--set", "forget_mode=sine"]},
         ("forget_mode: expected one of ['cosine', 'dot', 'hinge'], got 'sine'",)),
    Case("zero-stage-5", lambda c: {"zero_stage": 5}, ("zero_stage: expected 0, 1, 2 or 3, got 5",)),
    Case("precision-fp8", lambda c: {"precision": "fp8"},
         ("precision: expected one of ['fp32', 'bf16', 'fp16'], got 'fp8'",)),
    Case("device-malformed", lambda c: {"_extra": ["--set", "device=cuda:x"]},
         ("device: expected 'auto', 'cpu' or 'cuda[:N]', got 'cuda:x'",)),
    Case("device-absent", lambda c: {"_extra": ["--set", "device=cuda:99"]}, ("device: 'cuda:99' asked for",)),
    # --- output directory
    Case("output-dir-is-a-file", lambda c: {"output_dir": _out_is_file(c)},
         ("output_dir:", "out.txt' exists and is not a directory")),
    Case("output-dir-holds-a-run", lambda c: {"output_dir": _out_with_run(c)},
         ("output_dir:", "holds another run (run.json, report.json)", "--overwrite")),
    Case("output-would-overwrite-input-checkpoint", _ckpt_inside_out,
         ("output_dir: the unlearned model.pt would overwrite the input checkpoint",)),
    # --- --config and --set plumbing
    Case("set-unknown-field", lambda c: {"_extra": ["--set", "stepz=3"]},
         ("--set 'stepz=3': expected FIELD=VALUE with FIELD one of", "'steps'")),
    Case("set-malformed", lambda c: {"_extra": ["--set", "steps"]}, ("--set 'steps': expected FIELD=VALUE",)),
    Case("set-path-wrong-type", lambda c: {"output_dir": None, "_extra": ["--set", "output_dir=3"]},
         ("output_dir: expected a non-empty string, got 3",)),
    Case("set-bool-as-word", lambda c: {"_extra": ["--set", "overwrite=no"]},
         ("overwrite: expected true or false, got 'no'",)),
    Case("config-not-json", lambda c: {"_extra": ["--config", _file(c, "run.json", b"{steps: 3,")]},
         ("config: cannot read", "run.json' as JSON")),
    Case("config-not-an-object", lambda c: {"_extra": ["--config", _json(c, "run.json", [1, 2])]},
         ("config:", "must hold a JSON object of UnlearnConfig fields, got list")),
    Case("config-unknown-field", lambda c: {"_extra": ["--config", _json(c, "run.json", {"stepz": 3})]},
         ("stepz: unknown config field", "did you mean 'steps'?")),
    # --- DeepSpeed
    Case("ds-config-missing", lambda c: {"zero_stage": 1, "deepspeed_config": str(c.inp / "ds.json")},
         ("deepspeed_config: file", "ds.json' does not exist")),
    Case("ds-config-conflicts", lambda c: {"zero_stage": 1, "deepspeed_config": _json(
        c, "ds.json", {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}})},
         ("deepspeed_config:", "sets train_micro_batch_size_per_gpu=4 but the run config gives 8",
          "sets zero_optimization.stage=2 but the run config gives 1"), count=2),
    Case("ds-config-optimizer-section", lambda c: {"zero_stage": 1, "deepspeed_config": _json(
        c, "ds.json", {"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}})},
         ("deepspeed_config:", "has an 'optimizer' section; the engine supplies its own", "lr, weight_decay")),
    Case("ds-config-without-deepspeed", lambda c: {"deepspeed_config": _json(c, "ds.json", {"zero_optimization": {}})},
         ("deepspeed_config:", "does not go through DeepSpeed (zero_stage 0, precision fp32, no launcher)")),
    Case("eval-every-under-zero", lambda c: {"zero_stage": 2, "_extra": ["--set", "eval_every=5"]},
         ("eval_every: periodic evaluation runs on the single-process fp32 path only",)),
    # --- several at once
    Case("several-problems-at-once", lambda c: {
        "steps": 0, "lr": "-1", "method": "nope", "forget_data": str(c.inp / "gone"), "_extra": ["--set", "beta=2"]},
         ("5 problems:", "steps: expected a positive integer", "lr: expected a positive number",
          "method: unknown method 'nope'", "forget_data:", "beta: expected a number in [0, 1]"), count=5),
]


# --- running a case ---------------------------------------------------------------------------

def _argv(ctx: Ctx, changes: dict) -> list:
    flags = {"model": "tiny-clip", "pretrained": str(ctx.ckpt), "forget_data": str(ctx.data / "forget"),
             "retain_data": str(ctx.data / "retain"), "eval_data": str(ctx.data / "eval"), "forget_classes": "circle",
             "steps": 3, "batch_size": 8, "lr": 1e-4, "output_dir": str(ctx.out)}
    extra = changes.pop("_extra", [])
    flags.update(changes)
    argv = []
    for name, value in flags.items():
        if value is not None:
            argv.append(f"--{name.replace('_', '-')}={value}")  # "=": argparse takes "-1e-3" for a flag
    return argv + ["--no-progress"] + extra


def _hashes(*roots: Path) -> dict:
    files = [f for r in roots for f in ([r] if r.is_file() else sorted(r.rglob("*"))) if f.is_file()]
    return {str(f): sha256(f) for f in files}


@pytest.fixture(scope="module")
def other_arch_checkpoint(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory, "tiny-vit", "vit.pt")


def test_table_is_large_and_named():
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused(case, tiny_data, tiny_checkpoint, other_arch_checkpoint, tmp_path, capsys, monkeypatch):
    ctx = Ctx(tiny_data, tiny_checkpoint, other_arch_checkpoint, tmp_path / "in", tmp_path / "out")
    ctx.inp.mkdir()
    made = case.make(ctx)
    argv = _argv(ctx, made if isinstance(made, dict) else {})
    shared = (tiny_data / "forget", tiny_data / "retain", tiny_data / "eval", tiny_checkpoint, other_arch_checkpoint)
    before = _hashes(*shared, tmp_path)
    def built(*args, **kwargs):
        raise AssertionError(f"{case.id}: a model was built before the input was refused")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", built)
    monkeypatch.setattr(open_clip, "create_model", built)

    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    message = err[err.index("unlearn: error: "):]
    for needle in case.expect:
        assert needle in message, f"{needle!r} not in:\n{message}"
    if case.count == 1:
        assert "problems:" not in message, message
    else:
        assert message.startswith(f"unlearn: error: {case.count} problems:"), message

    after = _hashes(*shared, tmp_path)
    assert after == before, "nothing may be written, and no input changed, for refused input"


def test_non_integer_steps_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--steps", "ten"])
    assert exc.value.code == 2
    assert "argument --steps: invalid int value: 'ten'" in capsys.readouterr().err


def test_problems_reports_every_field_without_the_cli(tiny_data, tmp_path):
    """The same checks from Python: wrong types that only a JSON config can carry."""
    cfg = UnlearnConfig(model=7, pretrained=["x"], forget_data=3, retain_data=str(tiny_data / "retain"),
                        eval_data=str(tiny_data / "eval"), forget_classes=("circle", 5), output_dir=str(tmp_path / "o"),
                        mask_duplicate_captions="yes", train_logit_scale=1, warmup_steps=True, data_workers=-1)
    problems = preflight.problems(cfg)
    for needle in ("model: expected a non-empty string, got 7", "pretrained: expected a string (a path), got ['x']",
                   "forget_data: expected a string (a path), got 3", "forget_classes: expected a list of class names",
                   "mask_duplicate_captions: expected true or false, got 'yes'",
                   "train_logit_scale: expected true or false, got 1",
                   "warmup_steps: expected a non-negative integer, got True",
                   "data_workers: expected a non-negative integer, got -1"):
        assert sum(needle in p for p in problems) == 1, (needle, problems)
    assert len(problems) == 8, problems


def test_retrieval_only_eval_set_needs_no_classnames(tiny_data, tmp_path):
    """Not every missing classnames.txt is an error: a retrieval set (captions, no labels) has none."""
    root = tmp_path / "retrieval"
    (root / "test").mkdir(parents=True)
    with tarfile.open(next((tiny_data / "eval" / "test").glob("*.tar"))) as src, \
            tarfile.open(root / "test" / "0.tar", "w") as dst:
        for member in src:
            if not member.name.endswith(".cls"):
                dst.addfile(member, src.extractfile(member))
    cfg = UnlearnConfig(forget_data=str(tiny_data / "forget"), retain_data=str(tiny_data / "retain"),
                        eval_data=str(root), forget_classes=("circle",), output_dir=str(tmp_path / "out"))
    assert preflight.problems(cfg) == []


# --- legal but suspicious: warned of, and the run goes on -----------------------------------

def _good_cfg(data: Path, ckpt: Path, out: Path, **keys) -> UnlearnConfig:
    return UnlearnConfig.from_dict({**dict(model="tiny-clip", pretrained=str(ckpt), forget_data=str(data / "forget"),
                                           retain_data=str(data / "retain"), eval_data=str(data / "eval"),
                                           forget_classes=["circle"], steps=2, batch_size=8, output_dir=str(out)), **keys})


def test_suspicious_inputs_are_warned_of_not_refused(tiny_data, tiny_checkpoint, tmp_path):
    # A retain set holding some forget pairs: the forget shard plus the retain shards.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for shard in [*sorted((tiny_data / "forget").glob("*.tar")), *sorted((tiny_data / "retain").glob("*.tar"))]:
        shutil.copy(shard, mixed / f"{len(list(mixed.iterdir())):05d}.tar")
    ckpt_dir = tmp_path / "models"
    ckpt_dir.mkdir()
    shutil.copy(tiny_checkpoint, ckpt_dir / "tiny.pt")
    cfg = _good_cfg(tiny_data, ckpt_dir / "tiny.pt", ckpt_dir / "run", batch_size=64).replace(retain_data=str(mixed))
    found = preflight.inspect(cfg)
    assert found.problems == [], found.problems
    warnings = "\n".join(found.warnings)
    assert "retain_data:" in warnings and "are forget pairs too (same key and caption" in warnings
    assert "batch_size: a global batch of 64 pairs, but forget_data holds" in warnings  # ~40 pairs: repeated, < 10x
    assert "output_dir:" in warnings and "inside the folder of the pretrained checkpoint" in warnings
    assert preflight.check(cfg) == found.warnings
    assert preflight.inspect(_good_cfg(tiny_data, tiny_checkpoint, tmp_path / "plain")).warnings == []


def test_warnings_reach_the_user_and_the_run_goes_on(tiny_data, tiny_checkpoint, tmp_path, caplog):
    caplog.set_level("WARNING", logger="cliperase")
    out = tmp_path / "run"
    assert cli.main(["--model", "tiny-clip", "--pretrained", str(tiny_checkpoint), "--forget-data",
                     str(tiny_data / "forget"), "--retain-data", str(tiny_data / "retain"), "--eval-data",
                     str(tiny_data / "eval"), "--forget-classes", "circle", "--steps", "1", "--batch-size", "64",
                     "--output-dir", str(out), "--no-progress"]) == 0
    assert any("batch_size: a global batch of 64 pairs" in r.getMessage() for r in caplog.records)
    assert (out / "report.json").is_file()


def test_output_dir_alone_runs_the_demo_there(tiny_data, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """`launch/unlearn.py --output-dir DIR` (no data flag) is the demo, into DIR, with the other
    settings given; the demo's own data preparation is stood in for by the tiny dataset."""
    from cliperase.engine.tools import demo

    paths = {"data": tiny_data, "pretrained": tiny_checkpoint, "forget": tiny_data / "forget",
             "retain": tiny_data / "retain", "calibration": None,
             "audit": tiny_data / "retain"}  # stands in for never-seen pairs: no audit figure is read here
    monkeypatch.setattr(demo, "prepare_demo", lambda cache=None, progress=True, task="circle": paths)
    out = tmp_path / "mine"
    assert cli.main(["--output-dir", str(out), "--steps", "2", "--batch-size", "8", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["pretrained"] == str(tiny_checkpoint) and report["steps"] == 2
    assert report["config"]["overwrite"] is False, "a folder of the user's own is not overwritten silently"
    assert cli.main(["--output-dir", str(out), "--steps", "2", "--no-progress"]) == 2
    assert "holds another run" in capsys.readouterr().err
