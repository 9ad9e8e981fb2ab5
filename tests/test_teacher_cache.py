"""The on-disk teacher-embedding cache: the live teacher's rows to the stated precision, looked up in
the data workers, reused, invalidated shard by shard, resumed after a SIGKILL."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cliperase.engine import UnlearnConfig, unlearn
from cliperase.engine.data import PairStream, loader
from cliperase.engine.models import load_model
from cliperase.engine import teacher_cache as tc
from cliperase.engine.teacher_cache import TeacherCache, teacher_fingerprint
from helpers import tiny_checkpoint, tiny_data  # noqa: F401

# Largest |stored - exact| of a unit row's element, relative to the element (round to nearest:
# half a unit in the last place): fp16 has 11 significant bits, bf16 8. After re-normalising
# the row the bound grows by at most the norm's own rounding (~sqrt(d) * that, tiny); 2x covers it.
REL_ERROR = {"fp32": 1e-6, "fp16": 2.0 ** -11 * 2, "bf16": 2.0 ** -8 * 2}


def _cfg(data: Path, ckpt: Path, out: Path, **kw) -> UnlearnConfig:
    base = dict(model="tiny-clip", pretrained=str(ckpt), forget_data=str(data / "forget"),
                retain_data=str(data / "retain"), eval_data=str(data / "eval"), forget_classes=("circle",), steps=4,
                batch_size=8, lr=1e-4, output_dir=str(out), log_every=1, save_every=0)
    return UnlearnConfig.from_dict({**base, **kw})


def _losses(out: Path) -> list:
    return [{k: v for k, v in json.loads(line).items() if k not in ("steps_per_s", "elapsed_s")}
            for line in (out / "log.jsonl").read_text().splitlines()]


def _shards(data: Path, what: str) -> list:
    return sorted(str(p) for p in (data / what).glob("*.tar"))


@pytest.fixture(scope="module")
def four_shards(tmp_path_factory) -> list:
    """96 pairs in 4 shards: per-shard behaviour needs more than the tiny set's one shard a stream."""
    from cliperase.engine.tools.synthetic import generate, write_pairs

    out = tmp_path_factory.mktemp("four") / "pairs"
    write_pairs(generate(96, 5), out, shard_size=24)
    return sorted(str(p) for p in out.glob("*.tar"))


def _build(root: Path, what: str, shards, model, loaded, **kw) -> TeacherCache:
    return TeacherCache.build_or_load(root, what, shards, model, loaded.preprocess, loaded.tokenizer,
                                      device=torch.device("cpu"), progress=False, **kw)


@pytest.mark.parametrize("method,precision", [("cliperase", "fp32"), ("multidelete", "fp32"), ("cliperase", "fp16")])
def test_cache_gives_the_live_teachers_losses(tiny_data, tiny_checkpoint, tmp_path, method, precision):
    runs = {}
    for teacher in ("live", "cache"):
        out = tmp_path / teacher
        unlearn(_cfg(tiny_data, tiny_checkpoint, out, method=method, teacher=teacher,
                     teacher_cache_precision=precision, data_workers=0), progress=False)
        runs[teacher] = out
    live, cached = _losses(runs["live"]), _losses(runs["cache"])
    assert len(live) == len(cached) == 4
    # Step 1 runs on the same weights: in fp32 the losses agree to float rounding (the cache's rows
    # come from other batch compositions, ~1e-7 apart); fp16 rows move each similarity by up to
    # ~2^-11 and the losses by ~1e-4 relative. Later steps drift a little further: where a
    # gradient is pure rounding noise (multidelete's retain term at step 1: student == teacher,
    # MSE 2e-14 live, 0 cached) Adam's normalisation turns the noise into full-size updates.
    first = dict(rel=1e-5, abs=1e-7) if precision == "fp32" else dict(rel=1e-3, abs=1e-5)
    for a, b in zip(live, cached):
        assert a.keys() == b.keys()
        for k in a:
            if k.endswith("mse") and a["step"] == 1:
                assert a[k] < 1e-12 and b[k] < (1e-12 if precision == "fp32" else 1e-6)
                continue
            tol = first if a["step"] == 1 else dict(rel=2e-3, abs=1e-6)
            assert b[k] == pytest.approx(a[k], **tol), (method, a["step"], k)
    (cache_dir,) = (runs["cache"] / "teacher_cache").iterdir()
    streams = sorted(p.name[len("index-"):-len(".json")] for p in cache_dir.glob("index-*.json"))
    assert streams == (["forget", "retain"] if method == "multidelete" else ["retain"])
    assert json.loads((cache_dir / "manifest.json").read_text())["precision"] == precision
    assert not (runs["live"] / "teacher_cache").exists()


def test_cache_is_reused_and_invalidated_shard_by_shard(four_shards, tiny_checkpoint, tmp_path):
    loaded = load_model("tiny-clip", str(tiny_checkpoint))
    shards = four_shards
    first = _build(tmp_path, "retain", shards, loaded.model, loaded)
    (where,) = tmp_path.iterdir()
    files = lambda: {p.stem: p.stat().st_mtime_ns for p in where.glob("*.npy")}  # noqa: E731
    stamp = files()
    assert len(stamp) == len(shards)
    ids = torch.tensor([[i, 0] for i in range(len(shards))])
    again = _build(tmp_path, "retain", shards, loaded.model, loaded)
    assert files() == stamp, "reused, not rewritten"
    assert torch.equal(first.rows(ids), again.rows(ids))

    os.utime(shards[1], ns=(0, 0))  # one shard rewritten (new mtime): that shard alone is embedded again
    _build(tmp_path, "retain", shards, loaded.model, loaded)
    now = files()
    assert len(now) == len(shards) + 1 and {k: now[k] for k in stamp} == stamp
    index = json.loads((where / "index-retain.json").read_text())["shards"]
    assert [Path(f).stem for f in _build(tmp_path, "retain", shards, loaded.model, loaded).rows.files] == \
        [p for _, p in index] and index[1][1] not in stamp and index[0][1] in stamp

    changed = load_model("tiny-clip", str(tiny_checkpoint)).model
    with torch.no_grad():
        changed.text_projection.mul_(1.001)
    assert teacher_fingerprint(changed) != teacher_fingerprint(loaded.model)
    _build(tmp_path, "retain", shards, changed, loaded)
    assert len(list(tmp_path.iterdir())) == 2, "other teacher weights: another cache"
    _build(tmp_path, "retain", shards, loaded.model, loaded, precision="bf16")
    assert len(list(tmp_path.iterdir())) == 3, "another precision: another cache"


def _live_rows(model, images, texts):
    with torch.no_grad():
        return torch.stack([F.normalize(model.encode_image(images), dim=-1),
                            F.normalize(model.encode_text(texts), dim=-1)], 1)


def test_cache_rows_are_the_teachers_embeddings_to_the_stated_precision(tiny_data, tiny_checkpoint, tmp_path):
    loaded = load_model("tiny-clip", str(tiny_checkpoint))
    model = loaded.model.eval()
    shards = _shards(tiny_data, "forget")
    errors, sizes = {}, {}
    for precision in ("fp32", "fp16", "bf16"):
        cache = _build(tmp_path / precision, "forget", shards, model, loaded, precision=precision, batch_size=5)
        stored = np.load(cache.rows.files[0], mmap_mode="r")
        assert stored.dtype == {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}[precision]
        sizes[precision] = stored.nbytes
        batches = loader(PairStream(shards, loaded.preprocess, loaded.tokenizer, 7, seed=1), 0)
        worst = 0.0
        for _ in range(3):
            images, texts = next(batches)
            got = torch.stack(cache.lookup(batches.last_ids), 1)
            want = _live_rows(model, images, texts)
            worst = max(worst, float((got - want).abs().max()))
            torch.testing.assert_close(got, want, rtol=REL_ERROR[precision], atol=1e-6 if precision == "fp32" else 1e-4)
        errors[precision] = worst
    # The option has its effect: half the bytes in 16 bits, bf16 coarser than fp16, both inexact.
    assert sizes["fp16"] == sizes["bf16"] == sizes["fp32"] // 2
    assert errors["fp32"] < 1e-6 < errors["fp16"] < errors["bf16"], errors


def test_rows_come_with_the_batch_from_the_workers(four_shards, tiny_checkpoint, tmp_path):
    loaded = load_model("tiny-clip", str(tiny_checkpoint))
    shards = four_shards
    cache = _build(tmp_path, "retain", shards, loaded.model, loaded)
    stream = PairStream(shards, loaded.preprocess, loaded.tokenizer, 8, seed=2, teacher=cache.rows)
    batches, check = loader(stream, 2), pickle.loads(pickle.dumps(cache.rows))  # a copy, as a worker gets
    for _ in range(4):
        next(batches)
        assert batches.last_teacher.dtype == torch.float16 and batches.last_teacher.shape[:2] == (8, 2)
        assert torch.equal(batches.last_teacher, check(batches.last_ids))
    assert not stream.teacher._maps, "the stream's own copy mapped nothing: the workers did"

    # A sample the cache has no row for (undecodable when cached: a stale cache) is an error, not zeros.
    np.lib.format.open_memmap(cache.rows.files[0], mode="r+")[:] = 0
    cache.rows._maps.clear()
    ids = torch.tensor([[0, 0]])
    with pytest.raises(RuntimeError, match="has no row"):
        cache.rows(ids)


# A child that builds the cache and SIGKILLs itself right after writing its 2nd shard file
# (a fresh interpreter: a forked copy of the test process can deadlock in torch's thread pools).
_KILLED_BUILD = """
import os, signal, sys, torch
from cliperase.engine import teacher_cache as tc
from cliperase.engine.models import load_model
root, checkpoint, shards = sys.argv[1], sys.argv[2], sys.argv[3:]
loaded = load_model("tiny-clip", checkpoint)
real, written = tc.atomic_write_bytes, []
def write(data, path):
    real(data, path)
    written.append(path)
    if len(written) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
tc.atomic_write_bytes = write
tc.TeacherCache.build_or_load(root, "retain", shards, loaded.model, loaded.preprocess, loaded.tokenizer,
                              device=torch.device("cpu"), progress=False)
"""


def test_a_pass_killed_by_sigkill_resumes_from_the_shards_done(four_shards, tiny_checkpoint, tmp_path):
    shards = four_shards
    child = subprocess.run([sys.executable, "-c", _KILLED_BUILD, str(tmp_path), str(tiny_checkpoint), *shards],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    (where,) = tmp_path.iterdir()
    done = {p.name: p.stat().st_mtime_ns for p in where.glob("*.npy")}
    assert len(done) == 2 and not (where / "manifest.json").exists()
    loaded = load_model("tiny-clip", str(tiny_checkpoint))
    calls = []
    real = tc._embed_shards
    tc_embed = lambda jobs, *a, **k: (calls.append(len(jobs)), real(jobs, *a, **k))  # noqa: E731
    try:
        tc._embed_shards = tc_embed
        cache = _build(tmp_path, "retain", shards, loaded.model, loaded)
    finally:
        tc._embed_shards = real
    assert calls == [len(shards) - 2], "only the shards the killed pass had not written"
    now = {p.name: p.stat().st_mtime_ns for p in where.glob("*.npy")}
    assert len(now) == len(shards) and {k: now[k] for k in done} == done
    fresh = _build(tmp_path / "fresh", "retain", shards, loaded.model, loaded)
    ids = torch.tensor([[i, o] for i in range(len(shards)) for o in range(3)])
    assert torch.equal(cache.rows(ids), fresh.rows(ids))


def test_precision_without_a_cache_is_warned_of_and_a_bad_one_refused(tiny_data, tiny_checkpoint, tmp_path):
    from cliperase.engine import preflight

    live = _cfg(tiny_data, tiny_checkpoint, tmp_path / "run", teacher="live", teacher_cache_precision="bf16")
    assert any(w.startswith("teacher_cache_precision:") for w in preflight.inspect(live).warnings)
    cached = _cfg(tiny_data, tiny_checkpoint, tmp_path / "run", teacher_cache_precision="bf16")
    assert not any(w.startswith("teacher_cache_precision:") for w in preflight.inspect(cached).warnings)
    bad = _cfg(tiny_data, tiny_checkpoint, tmp_path / "run", teacher_cache_precision="int8")
    assert any(p.startswith("teacher_cache_precision:") and "fp16" in p for p in preflight.problems(bad))
