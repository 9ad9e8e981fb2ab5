"""Training streams: ranks x workers partition the samples, resume continues where it stopped."""
from __future__ import annotations

import io
import itertools
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from cliperase.engine.data import SKIP_KINDS, PairStream, loader
from cliperase.engine.errors import ConfigError
from helpers import tiny_data  # noqa: F401


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value % 256, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write(root: Path, n: int, per_shard: int, bad: dict = ()) -> list:
    """Shards whose captions are the sample numbers; `bad` maps a number to a defect."""
    root.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(root / "%03d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(n):
            sample = {"__key__": f"s{i:05d}", "png": _png(i), "txt": str(i)}
            defect = dict(bad).get(i)
            if defect == "corrupt_image":
                sample["png"] = b"not an image"
            elif defect == "missing_caption":
                del sample["txt"]
            elif defect == "corrupt_caption":
                sample["txt"] = b"\xff\xfe"
            sink.write(sample)
    return sorted(str(p) for p in root.glob("*.tar"))


def _numbers(texts) -> list:
    return [int(t) for t in texts]


def _to_tensor(image) -> torch.Tensor:  # module level: the loader pickles the stream for its workers
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())


def _stream(shards, batch, **kw):
    return PairStream(shards, _to_tensor, list, batch, shuffle_buffer=7, **kw)


def _take(shards, batch, n_batches, *, workers=0, **kw):
    batches = loader(_stream(shards, batch, **kw), workers)
    got = [_numbers(texts) for _, texts in itertools.islice(batches, n_batches)]
    return got, batches


@pytest.mark.parametrize("world,workers", [(1, 2), (2, 1), (3, 2)], ids=lambda v: str(v))
def test_ranks_and_workers_partition_an_epoch(tmp_path, world, workers):
    n, batch = 60, 5  # 60 = 1 epoch = 12 global batches of 5, divisible by every readers count here
    shards = _write(tmp_path / "d", n, 17)
    per_reader = n // (world * workers) // batch  # batches of one epoch per reader
    seen = []
    for rank in range(world):
        got, _ = _take(shards, batch, per_reader * workers, workers=workers, rank=rank, world=world, seed=4)
        seen += [x for b in got for x in b]
    assert Counter(seen) == Counter(range(n)), "every sample exactly once per epoch"


def test_one_process_sees_the_global_batch_of_the_ranks(tmp_path):
    shards = _write(tmp_path / "d", 45, 9)
    whole, _ = _take(shards, 6, 7, seed=1)
    parts = [_take(shards, 3, 7, seed=1, rank=r, world=2)[0] for r in range(2)]
    for step in range(7):
        assert sorted(parts[0][step] + parts[1][step]) == sorted(whole[step])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_sequence(tmp_path, workers):
    shards = _write(tmp_path / "d", 23, 5, bad={3: "corrupt_image", 11: "missing_caption"})
    reference, _ = _take(shards, 4, 17, workers=workers, seed=2)
    for cut in (1, 5, 6, 11):
        first, batches = _take(shards, 4, cut, workers=workers, seed=2)
        state = batches.state()
        rest, _ = _take(shards, 4, 17 - cut, workers=workers, seed=2, start=state)
        assert first + rest == reference, f"cut after {cut} batches"


def test_resume_with_other_worker_count_is_refused(tmp_path):
    shards = _write(tmp_path / "d", 10, 5)
    _, batches = _take(shards, 2, 3, workers=0)
    with pytest.raises(ConfigError, match="1 data workers per rank, now 2"):
        _take(shards, 2, 1, workers=2, start=batches.state())


def test_bad_samples_skipped_and_counted_once(tmp_path):
    bad = {2: "corrupt_image", 7: "corrupt_image", 9: "missing_caption", 13: "corrupt_caption"}
    shards = _write(tmp_path / "d", 20, 6, bad=bad)
    got, batches = _take(shards, 4, 12, workers=2, world=1, seed=0)  # 48 samples: three epochs of 16 good
    flat = [x for b in got for x in b]
    assert not set(flat) & set(bad)
    assert Counter(flat) == Counter({i: 3 for i in range(20) if i not in bad})
    counts = batches.skipped()
    assert set(counts) == set(SKIP_KINDS)
    assert counts == {**{k: 0 for k in SKIP_KINDS}, "corrupt_image": 2, "missing_caption": 1, "corrupt_caption": 1}


@pytest.mark.parametrize("workers", [0, 1])
def test_empty_stream_is_a_clear_error(tmp_path, workers):
    shards = _write(tmp_path / "d", 3, 5, bad={0: "corrupt_image", 1: "corrupt_image", 2: "missing_caption"})
    with pytest.raises(ConfigError) as info:
        next(loader(_stream(shards, 2, what="forget_data"), workers))
    assert str(info.value).startswith("forget_data: no usable samples")  # not a worker's traceback


def test_shard_vanishing_mid_run_is_skipped_and_counted_once(tmp_path):
    shards = _write(tmp_path / "d", 20, 5)  # 4 shards: samples 0-4, 5-9, ...
    batches = loader(_stream(shards, 4, seed=3), 0)
    first = [x for _ in range(5) for x in _numbers(next(batches)[1])]  # one epoch
    assert sorted(first) == list(range(20))
    Path(shards[1]).unlink()  # samples 5-9 gone from the next epoch on
    later = [x for _ in range(15) for x in _numbers(next(batches)[1])]  # four more epochs of 15
    assert Counter(later) == Counter({i: 4 for i in range(20) if not 5 <= i <= 9})
    assert batches.skipped()["unreadable_shard"] == 1


def test_resampled_mode_draws_shards_with_replacement_and_resumes(tmp_path):
    shards = _write(tmp_path / "d", 40, 5)  # 8 shards of 5
    got, batches = _take(shards, 5, 16, seed=7, resampled=True)  # two rounds of 8 shards' worth
    per_round = [Counter(x // 5 for b in got[r * 8:(r + 1) * 8] for x in b) for r in range(2)]
    assert any(max(c.values()) > 5 for c in per_round), "some shard drawn twice in a round"
    assert all(sum(c.values()) == 40 for c in per_round)
    first, cut = _take(shards, 5, 6, seed=7, resampled=True)
    rest, _ = _take(shards, 5, 10, seed=7, resampled=True, start=cut.state())
    assert first + rest == got


def _reads(monkeypatch) -> list:
    """Shard paths opened by ShardReaders in this process, in order."""
    from cliperase.engine.data import ShardReader

    opened = []
    real = ShardReader._open

    def spy(self, url):
        opened.append(url)
        return real(self, url)
    monkeypatch.setattr(ShardReader, "_open", spy)
    return opened


@pytest.mark.parametrize("world,workers", [(2, 1), (2, 2)], ids=lambda v: str(v))
def test_by_shard_each_reader_reads_only_its_shards_and_an_epoch_is_every_sample_once(tmp_path, monkeypatch,
                                                                                     world, workers):
    n, per_shard, batch = 64, 4, 4  # 16 shards of 4: 8 or 4 a reader, so "auto" splits by shard
    shards = _write(tmp_path / "d", n, per_shard)
    readers = world * workers
    assert _stream(shards, batch).by_shard(readers) and not _stream(shards, batch, split="sample").by_shard(readers)
    per_reader = n // readers // batch  # equal-size shards: equal epochs
    seen, shards_of = [], []
    for rank in range(world):
        got, _ = _take(shards, batch, 2 * per_reader * workers, workers=workers, rank=rank, world=world, seed=5)
        epoch1 = [got[i] for i in range(len(got)) if i // workers < per_reader]  # worker turns interleave
        seen += [x for b in epoch1 for x in b]
        for w in range(workers):  # each reader's samples of an epoch come from whole shards, its own
            own = {x // per_shard for i, b in enumerate(got) if i % workers == w and i // workers < per_reader for x in b}
            assert sum(len(b) for i, b in enumerate(got) if i % workers == w and i // workers < per_reader) == len(own) * per_shard
            shards_of.append(own)
    assert Counter(seen) == Counter(range(n)), "every sample exactly once per epoch"
    assert all(not a & b for i, a in enumerate(shards_of) for b in shards_of[i + 1:]), "disjoint shards"
    # In one process (no workers) a reader opens only its share of the shards each epoch.
    opened = _reads(monkeypatch)
    _take(shards, batch, per_reader, rank=1, world=readers, seed=5)
    assert len(opened) == len(shards) // readers and len(set(opened)) == len(opened)
    opened.clear()
    _take(shards, batch, per_reader, rank=1, world=readers, seed=5, split="sample")
    assert len(opened) == len(shards), "by sample every reader reads every shard"


@pytest.mark.parametrize("workers", [0, 2])
def test_by_shard_resume_continues_the_sequence_and_counts_bad_data_once(tmp_path, workers):
    bad = {3: "corrupt_image", 22: "missing_caption"}
    shards = _write(tmp_path / "d", 40, 4, bad=bad)  # 10 shards of 4, 2 readers (rank 1 of 2 here)
    kw = dict(workers=workers, rank=1, world=2, seed=2, split="shard")
    reference, batches = _take(shards, 3, 15, **kw)  # several epochs of this reader's ~19 samples
    for cut in (1, 4, 7):
        first, part = _take(shards, 3, cut, **kw)
        rest, _ = _take(shards, 3, 15 - cut, **kw, start=part.state())
        assert first + rest == reference, f"cut after {cut} batches"
    # Both ranks' counts together: each bad sample once, whichever reader read it in epoch 0.
    other = _take(shards, 3, 15, **{**kw, "rank": 0})[1]
    total = Counter(batches.skipped()) + Counter(other.skipped())
    assert total == Counter({"corrupt_image": 1, "missing_caption": 1})


def test_data_split_is_checked():
    from cliperase.engine import preflight
    from cliperase.engine.config import UnlearnConfig

    assert any(p.startswith("data_split: expected one of ['auto', 'sample', 'shard'], got 'rows'")
               for p in preflight.problems(UnlearnConfig(data_split="rows")))
    with pytest.raises(ValueError, match="split: expected one of"):
        PairStream([], None, list, 2, split="rows")


def test_by_shard_a_damaged_shard_is_counted_once_over_the_readers(tmp_path, monkeypatch):
    shards = _write(tmp_path / "d", 40, 4)  # 10 shards of 4
    Path(shards[6]).write_bytes(b"this is not a tar archive" * 40)  # samples 24-27 unreadable
    kw = dict(workers=0, world=2, seed=9, split="shard")
    opened = _reads(monkeypatch)
    slept = []  # the retries' backoff, recorded instead of waited (1.5 s a meeting, 7 meetings here)
    monkeypatch.setattr("cliperase.engine.data.tar.time.sleep", slept.append)
    runs, openers = [], []
    for rank in range(2):  # several epochs each
        runs.append(_take(shards, 3, 40, rank=rank, **kw))
        openers.append(opened.count(shards[6]))
        opened.clear()
    assert all(openers), f"both readers met the damaged shard in some epoch: {openers}"
    seen = {x for got, _ in runs for b in got for x in b}
    assert seen == set(range(40)) - {24, 25, 26, 27}
    total = sum(batches.skipped()["unreadable_shard"] for _, batches in runs)
    assert total == 1, [batches.skipped() for _, batches in runs]
    assert slept == [0.5, 1.0] * sum(openers), "each meeting retried twice, after 0.5 s then 1 s"


@pytest.mark.parametrize("workers", [0, 2])
def test_close_stops_the_workers_at_once(tmp_path, workers):
    """close() ends the DataLoader workers there and then, not whenever the garbage collector
    frees the iterator (inside a reference cycle that cost a 5 s join per worker)."""
    got, batches = _take(_write(tmp_path / "d", 40, 10), 4, 2, workers=workers)
    assert len(got) == 2 and len(multiprocessing.active_children()) == workers
    batches.close()
    assert multiprocessing.active_children() == []
    with pytest.raises(StopIteration):
        next(batches)


@pytest.mark.parametrize("workers", [0, 2])
def test_data_workers_reach_the_loader_and_none_outlives_the_run(tiny_data, tmp_path, monkeypatch, workers):  # noqa: F811
    """`data_workers` worker processes per training stream (forget, retain), none with 0; the run
    closes its streams before the evaluation, so no worker outlives it."""
    from cliperase.engine import UnlearnConfig, unlearn

    started = []
    real = multiprocessing.process.BaseProcess.start
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", lambda p: (started.append(p.name), real(p))[1])
    d = tiny_data
    unlearn(UnlearnConfig.from_dict(dict(
        model="tiny-clip", forget_data=str(d / "forget"), retain_data=str(d / "retain"), eval_data=str(d / "eval"),
        forget_classes=("circle",), steps=1, batch_size=8, data_workers=workers, output_dir=str(tmp_path / "run"))),
        progress=False)
    assert len(started) == 2 * workers, started
    assert multiprocessing.active_children() == []


def test_workers_get_the_stream_pickled_and_a_lambda_is_a_clear_error(tmp_path):
    """A large rank starts its workers from a forkserver, which sends them the stream pickled; a
    lambda preprocess is refused with what to do, before any batch, whatever the rank's size
    (so a run does not break only once its model grows), and 0 workers (in-process) take it."""
    shards = _write(tmp_path / "d", 8, 4)
    stream = lambda: PairStream(shards, lambda im: _to_tensor(im), list, 2, what="forget_data")  # noqa: E731
    with pytest.raises(ConfigError, match=r"forget_data: data workers may receive the stream pickled.*or use 0 workers"):
        loader(stream(), 1)
    assert len(next(loader(stream(), 0))[1]) == 2


_KILLED_RANK = """
import sys, time
sys.path.insert(0, sys.argv[2])
import test_streams
from cliperase.engine.data import loader, streams
streams.FORK_BELOW_BYTES = int(sys.argv[3])
batches = loader(test_streams._stream(test_streams._write(test_streams.Path(sys.argv[1]), 8, 4), 2), 1)
next(batches)
print(" ".join(str(p.pid) for p in batches._it._workers), flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("start", ["fork", "forkserver"])
def test_workers_end_when_their_rank_is_killed(tmp_path, start):
    """SIGKILL the rank: its workers (forked, or children of the forkserver, not of the rank)
    notice and exit, and a forkserver with them; nothing is left holding memory."""
    threshold = 1 << 60 if start == "fork" else 0
    rank = subprocess.Popen([sys.executable, "-c", _KILLED_RANK, str(tmp_path / "d"), str(Path(__file__).parent),
                             str(threshold)], stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in rank.stdout.readline().split()]
    server = {int(line.split()[0]) for line in subprocess.run(["ps", "-eo", "pid,ppid"], capture_output=True,
              text=True).stdout.splitlines()[1:] if int(line.split()[1]) == rank.pid} - set(workers)
    assert len(workers) == 1 and bool(server) == (start == "forkserver"), (workers, server)
    rank.send_signal(signal.SIGKILL)
    rank.wait()
    left, deadline = [*workers, *server], time.monotonic() + 60
    while left and time.monotonic() < deadline:
        left = [p for p in left if Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]]
        time.sleep(0.2)
    assert not left, f"outlived their rank: {left}"


@pytest.mark.parametrize("threshold, forked", [(1 << 60, True), (0, False)])
def test_a_large_rank_starts_its_workers_from_a_forkserver(tmp_path, monkeypatch, threshold, forked):
    """Under FORK_BELOW_BYTES of anonymous memory the worker is the rank's fork; at or over it, a
    forkserver's child, so it shares none of the rank's pages."""
    from cliperase.engine.data import streams

    monkeypatch.setattr(streams, "FORK_BELOW_BYTES", threshold)
    got, batches = _take(_write(tmp_path / "d", 8, 4), 2, 1, workers=1)
    (worker,) = batches._it._workers
    parent = int(Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    batches.close()
    assert got and (parent == os.getpid()) == forked
