"""The robust shard reader: every injected fault is skipped and counted under its own kind."""
import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from cliperase.engine.data import tar as data_mod
from cliperase.engine.data import SKIP_KINDS, ShardReader
from cliperase.engine.errors import ConfigError
from cliperase.engine.tools.select import SelectConfig, select
from cliperase.engine.tools.synthetic import _encode, generate


def _samples(n, seed=0, prefix="s"):
    return [{"__key__": s.key, "jpg": _encode(s.image, "JPEG"), "txt": s.caption.encode(), "json": json.dumps(s.meta).encode()}
            for s in generate(n, seed, prefix=prefix)]


def _write(path: Path, samples) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), encoder=False) as sink:
        for s in samples:
            sink.write(s)
    return path


def _offsets(path: Path):
    with tarfile.open(path) as t:
        return [(m.name, m.offset, m.offset_data, m.size) for m in t]


def _read(shards, **kw):
    reader = ShardReader([str(s) for s in shards], retries=kw.pop("retries", 0), backoff_s=0, **kw)
    return reader, [s["__key__"] for s in reader]


def _expected(**nonzero):
    return {k: nonzero.get(k, 0) for k in SKIP_KINDS}


def test_clean_shards_skip_nothing_and_keep_bytes(tmp_path):
    samples = _samples(12)
    shard = _write(tmp_path / "a.tar", samples)
    reader = ShardReader([str(shard)])
    got = list(reader)
    assert [s["__key__"] for s in got] == [s["__key__"] for s in samples]
    assert all(g[e] == s[e] for g, s in zip(got, samples) for e in ("jpg", "txt", "json"))
    assert reader.skip_counts() == _expected()
    assert reader.samples == 12


def test_bad_samples_counted_by_kind(tmp_path):
    samples = _samples(12)
    samples[1]["jpg"] = samples[1]["jpg"][: len(samples[1]["jpg"]) // 2]  # truncated JPEG
    samples[2]["jpg"] = b"this is not an image"
    del samples[3]["txt"]
    samples[4]["txt"] = b"  \n"
    del samples[5]["jpg"]
    samples[6]["txt"] = b"\xff\xfe caption"  # not UTF-8
    shard = _write(tmp_path / "a.tar", samples)
    reader, keys = _read([shard])
    assert reader.skip_counts() == _expected(corrupt_image=2, missing_caption=2, missing_image=1, corrupt_caption=1)
    assert keys == [samples[i]["__key__"] for i in (0, 7, 8, 9, 10, 11)]


def test_image_check_none_trusts_bytes(tmp_path):
    samples = _samples(4)
    samples[1]["jpg"] = b"garbage"
    reader, keys = _read([_write(tmp_path / "a.tar", samples)], check_images="none")
    assert len(keys) == 4 and reader.skip_counts() == _expected()


def test_decode_attaches_rgb_image(tmp_path):
    reader = ShardReader([str(_write(tmp_path / "a.tar", _samples(3)))], check_images="decode")
    images = [s["__image__"] for s in reader]
    assert [im.mode for im in images] == ["RGB"] * 3 and images[0].size == (32, 32)


def test_truncated_inside_a_member_keeps_the_samples_before(tmp_path):
    shard = _write(tmp_path / "a.tar", _samples(10))
    members = _offsets(shard)
    # Cut in the middle of the 5th sample's first file: samples 0..3 are complete.
    name, _, data_at, size = members[4 * 3]
    assert name.startswith("s0000004")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[: data_at + size // 2])
    reader, keys = _read([cut])
    assert reader.skip_counts() == _expected(truncated_tar=1)
    assert keys == [f"s{i:07d}" for i in range(4)]
    assert "truncated_tar" in reader.bad_shards[str(cut)]


def test_truncated_at_a_member_boundary_is_detected(tmp_path):
    # Python's tarfile stops quietly here: no exception, just fewer members.
    shard = _write(tmp_path / "a.tar", _samples(10))
    header_of_sample_6 = _offsets(shard)[6 * 3][1]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[:header_of_sample_6])
    reader, keys = _read([cut])
    assert reader.skip_counts() == _expected(truncated_tar=1)
    # Sample 5 was the one in progress (nothing says its files were all there): dropped.
    assert keys == [f"s{i:07d}" for i in range(5)]


def test_damaged_header_mid_tar_is_corrupt_tar(tmp_path):
    shard = _write(tmp_path / "a.tar", _samples(10))
    at = _offsets(shard)[6 * 3][1]
    raw = bytearray(shard.read_bytes())
    raw[at: at + 512] = b"\xff" * 512
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(raw))
    reader, keys = _read([bad])
    assert reader.skip_counts() == _expected(corrupt_tar=1)
    assert keys == [f"s{i:07d}" for i in range(5)]


def test_missing_and_unreadable_shards_are_skipped_with_a_warning(tmp_path, caplog):
    good = _write(tmp_path / "good.tar", _samples(5))
    not_a_tar = tmp_path / "junk.tar"
    not_a_tar.write_bytes(b"\x01" * 3000)
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    caplog.set_level(logging.WARNING, logger="cliperase.data")
    reader, keys = _read([tmp_path / "missing.tar", not_a_tar, good, empty], retries=2)
    assert reader.skip_counts() == _expected(unreadable_shard=3)
    assert len(keys) == 5
    assert set(reader.bad_shards) == {str(tmp_path / "missing.tar"), str(not_a_tar), str(empty)}
    warned = [r.getMessage() for r in caplog.records if "skipping shard" in r.getMessage()]
    assert len(warned) == 3
    assert any("junk.tar after 3 attempt(s)" in m for m in warned)
    assert any("missing.tar after 1 attempt(s)" in m for m in warned)  # a gap is not retried


def test_transient_open_failure_is_retried(tmp_path, monkeypatch):
    good = _write(tmp_path / "good.tar", _samples(5))
    real_open, calls = tarfile.open, []

    def flaky_open(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise tarfile.ReadError("transient")
        return real_open(*args, **kwargs)

    monkeypatch.setattr(data_mod.tarfile, "open", flaky_open)
    reader, keys = _read([good], retries=2)
    assert len(keys) == 5 and reader.skip_counts()["unreadable_shard"] == 0 and len(calls) == 3

    calls.clear()
    reader, keys = _read([good], retries=1)
    assert keys == [] and reader.skip_counts()["unreadable_shard"] == 1 and len(calls) == 2


def test_reader_feeds_a_webdataset_pipeline(tmp_path):
    shard = _write(tmp_path / "a.tar", _samples(6))
    pairs = list(wds.DataPipeline(ShardReader([str(shard)]), wds.to_tuple("jpg", "txt")))
    assert len(pairs) == 6 and all(isinstance(j, bytes) and isinstance(t, bytes) for j, t in pairs)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="check_images"):
        ShardReader([], check_images="full")
    with pytest.raises(ValueError, match="retries"):
        ShardReader([], retries=-1)


def test_select_manifest_reports_what_was_injected(tmp_path):
    samples = _samples(20)
    samples[2]["jpg"] = b"not a jpeg"
    del samples[7]["txt"]
    _write(tmp_path / "in" / "00000.tar", samples)
    truncated = _write(tmp_path / "tmp" / "t.tar", _samples(8, seed=1, prefix="t"))
    cut_at = _offsets(truncated)[3 * 3][2] + 10  # inside sample 3: samples 0..2 survive
    (tmp_path / "in" / "00001.tar").write_bytes(truncated.read_bytes()[:cut_at])
    (tmp_path / "in" / "00002.tar").write_bytes(b"junk" * 300)
    before = {p.name: p.read_bytes() for p in (tmp_path / "in").iterdir()}
    manifest = select(SelectConfig(data=str(tmp_path / "in"), regex=(".",), output_dir=str(tmp_path / "out"),
                                   retries=1, backoff_s=0), progress=False)
    assert manifest["source"]["skipped"] == _expected(corrupt_image=1, missing_caption=1, truncated_tar=1,
                                                      unreadable_shard=1)
    assert manifest["source"]["samples_read"] == 18 + 3
    assert manifest["forget"]["count"] == 21 and manifest["retain"]["count"] == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "in").iterdir()} == before  # inputs untouched


def test_select_with_nothing_readable_fails_and_leaves_no_selection(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "00000.tar").write_bytes(b"junk" * 300)
    with pytest.raises(ConfigError, match="no usable samples"):
        select(SelectConfig(data=str(tmp_path / "in"), keywords=("red",), output_dir=str(tmp_path / "out"),
                            retries=0), progress=False)
    assert list((tmp_path / "out").iterdir()) == []
