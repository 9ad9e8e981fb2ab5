"""ShardReader's own streaming tar reader against Python's tarfile, which it replaced.

- Differential: on tars written by tarfile (ustar, GNU, pax), webdataset and GNU tar, the
  reader yields exactly the (name, bytes) sequence of regular files that tarfile yields.
- Truncation: cut at every member boundary (and a byte either side) and at random offsets, a
  shard gives the same samples and skip counts as the tarfile-based ShardReader it replaced
  (kept here as the oracle): truncated_tar, the complete samples before the cut kept.
- Damage: a byte flipped in any header after the first gives the oracle's samples and
  corrupt_tar.
"""
from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest
import webdataset as wds

from cliperase.engine.data import SKIP_KINDS, ShardReader
from cliperase.engine.data import tar as data_mod
from cliperase.engine.data.tar import _BadEnd, _split_name, _tar_files


def _tarfile_files(path: Path) -> list:
    """What tarfile reads: (name, bytes) of each regular file, streaming. Sparse files are left
    out: tarfile rebuilds their holes, _tar_files passes them over (shards never hold one)."""
    out = []
    with tarfile.open(path, mode="r|") as tar:
        for member in tar:
            if member.isreg() and member.sparse is None:
                out.append((member.name, tar.extractfile(member).read()))
    return out


def _our_files(path: Path) -> list:
    with open(path, "rb") as f:
        return list(_tar_files(f.read))


def _payload(rng: random.Random, size: int) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(size))


LONG_SINGLE = "long_" + "a" * 140 + ".txt"  # one 149-character component: GNU 'L' or pax path only
LONG_SPLIT = "d" * 90 + "/" + "e" * 90 + ".txt"  # 185 characters that ustar splits into prefix/name


def _write_tarfile(path: Path, fmt: int) -> Path:
    """Regular files of awkward sizes and names, with a directory, links and a fifo between."""
    rng = random.Random(fmt)
    files = [("short.txt", 5), ("empty.txt", 0), ("one_block.bin", 512), ("two_blocks.bin", 1024),
             ("odd.bin", 513), ("just_under.bin", 511), ("caf\u00e9/\u65e5\u672c.jpg", 300), (LONG_SPLIT, 700),
             ("raw\udcff.txt", 9), ("k.ey.with.dots.json", 40), ("last.bin", 3000)]
    if fmt != tarfile.USTAR_FORMAT:
        files.insert(3, (LONG_SINGLE, 2048))
    kw = {"pax_headers": {"comment": "a global header"}} if fmt == tarfile.PAX_FORMAT else {}
    with tarfile.open(path, "w", format=fmt, **kw) as tar:
        for i, (name, size) in enumerate(files):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = size, 1_700_000_000 + i
            tar.addfile(info, io.BytesIO(_payload(rng, size)))
            if i == 2:
                tar.addfile(_special("somedir", tarfile.DIRTYPE))
                tar.addfile(_special("somedir/fifo", tarfile.FIFOTYPE))
            if i == 5:
                link = _special("link_to_short", tarfile.SYMTYPE)
                link.linkname = "short.txt" if fmt == tarfile.USTAR_FORMAT else "x" * 150  # GNU 'K', pax linkpath
                tar.addfile(link)
                hard = _special("hard_to_odd", tarfile.LNKTYPE)
                hard.linkname = "odd.bin"
                tar.addfile(hard)
    return path


def _special(name: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
def test_same_files_as_tarfile_for_each_format(tmp_path, fmt):
    path = _write_tarfile(tmp_path / "t.tar", fmt)
    expected = _tarfile_files(path)
    assert len(expected) == (11 if fmt == tarfile.USTAR_FORMAT else 12)
    assert _our_files(path) == expected


def test_same_files_as_tarfile_for_webdataset_shards(tmp_path):
    rng = random.Random(1)
    with wds.ShardWriter(str(tmp_path / "%03d.tar"), maxcount=7, verbose=0) as sink:
        for i in range(20):
            sink.write({"__key__": f"dir/s{i:04d}", "jpg": _payload(rng, rng.choice([0, 100, 512, 2000])),
                        "txt": f"caption {i} caf\u00e9", "seg.json": "{}"})
    shards = sorted(tmp_path.glob("*.tar"))
    assert len(shards) == 3
    for shard in shards:
        expected = _tarfile_files(shard)
        assert expected and _our_files(shard) == expected


def _gnu_tar() -> Optional[str]:
    tar = shutil.which("tar")
    if tar is None:
        return None
    try:
        version = subprocess.run([tar, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return tar if "GNU tar" in version else None


@pytest.mark.parametrize("fmt", ["gnu", "oldgnu", "posix", "ustar", "v7"])
def test_same_files_as_tarfile_for_gnu_tar(tmp_path, fmt):
    tar = _gnu_tar()
    if tar is None:
        pytest.skip("GNU tar is not installed")
    rng = random.Random(2)
    src = tmp_path / "src"
    names = ["short.txt", "empty.txt", "one_block.bin", "dir/inner.jpg", "caf\u00e9_\u65e5\u672c.txt", "z_last.txt"]
    if fmt != "v7":
        names.append(LONG_SPLIT)
    if fmt in ("gnu", "oldgnu", "posix"):
        names += [LONG_SINGLE, "deep/" + "/".join(["p" * 60] * 5) + ".bin"]  # > 255 characters
    sizes = {"empty.txt": 0, "one_block.bin": 512}
    for name in names:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(_payload(rng, sizes.get(name, rng.randrange(1, 3000))))
    os.symlink("short.txt", src / "link.txt")
    (src / "empty_dir").mkdir()
    sparse = ["--sparse"] if fmt in ("gnu", "oldgnu", "posix") else []
    if sparse:  # 30 runs of data between holes: old GNU sparse headers chain two extension blocks
        with open(src / "sparse.bin", "wb") as f:
            for i in range(30):
                f.seek(i * 40_000)
                f.write(_payload(rng, 1000))
            f.truncate(1_300_000)
    archive = tmp_path / f"{fmt}.tar"
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    subprocess.run([tar, f"--format={fmt}", *sparse, "-cf", str(archive), "-C", str(src), "."], check=True,
                   env=env, capture_output=True, timeout=60)
    expected = _tarfile_files(archive)
    assert len(expected) == len(names)  # (and where holes are not kept, sparse.bin is a plain file)
    assert _our_files(archive) == expected


def _fix_checksum(raw: bytearray, at: int, *, signed: bool = False) -> None:
    raw[at + 148:at + 156] = b" " * 8
    total = sum(b - 256 if signed and b > 127 else b for b in raw[at:at + 512])
    raw[at + 148:at + 156] = b"%06o\0 " % total


def _headers(path: Path) -> dict:
    """name -> offset of its (last) header, from tarfile."""
    with tarfile.open(path) as tar:
        return {m.name: m.offset_data - 512 for m in tar}


def test_crafted_headers_read_as_tarfile_reads_them(tmp_path):
    """A pax `size` that overrides the header's, a base-256 size field, a signed checksum (over
    a byte > 127), an old-style directory ('\\0' type, name ending in '/'), one zero block then
    junk."""
    rng = random.Random(3)
    path = tmp_path / "c.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, size, pax in [("a.bin", 700, {"size": "700"}), ("b.bin", 600, {}), ("s.bin", 10, {}),
                                ("olddir/", 0, {}), ("c.bin", 5, {})]:
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = size, pax
            tar.addfile(info, io.BytesIO(_payload(rng, size)))
    raw = bytearray(path.read_bytes())
    at = _headers(path)
    raw[at["a.bin"] + 124:at["a.bin"] + 136] = b"00000000000\0"  # only the pax record says 700
    _fix_checksum(raw, at["a.bin"])
    raw[at["b.bin"] + 124:at["b.bin"] + 136] = b"\x80" + (600).to_bytes(11, "big")
    _fix_checksum(raw, at["b.bin"])
    raw[at["s.bin"] + 500] = 0xE9  # in the header's unused tail
    _fix_checksum(raw, at["s.bin"], signed=True)
    raw[at["olddir/"] + 156] = 0
    _fix_checksum(raw, at["olddir/"])
    end = at["c.bin"] + 1024
    assert len(raw) >= end + 1024 and raw[end:end + 1024] == bytes(1024)
    raw[end + 512:end + 1024] = b"junk" * 128  # tarfile stops at the first zero block
    path.write_bytes(bytes(raw))
    expected = _tarfile_files(path)
    assert [n for n, _ in expected] == ["a.bin", "b.bin", "s.bin", "c.bin"] and len(expected[0][1]) == 700
    assert _our_files(path) == expected


def test_extended_header_without_member_is_corrupt(tmp_path):
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(LONG_SINGLE)
        tar.addfile(info, io.BytesIO(b""))
    raw = bytearray(path.read_bytes())
    raw[1024:1536] = bytes(512)  # the member header after the GNU long name: now an end block
    with pytest.raises(_BadEnd) as info:
        list(_tar_files(io.BytesIO(bytes(raw)).read))
    assert info.value.kind == "corrupt_tar"


# ---------------------------------------------------------------------------------------------
# Truncation and damage against the tarfile-based ShardReader this module's reader replaced.


class _TarfileShardReader(ShardReader):
    """The previous ShardReader._open/_shard/_check_end, on Python's tarfile, verbatim."""

    def _open(self, url: str):
        last = None
        attempts = 0
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            f = None
            attempts += 1
            try:
                f = open(url, "rb")
                return f, tarfile.open(fileobj=f, mode="r|")
            except (OSError, tarfile.TarError) as exc:
                last = exc
                if f is not None:
                    f.close()
                if isinstance(exc, FileNotFoundError):
                    break
        self.skipped["unreadable_shard"] += 1
        self.bad_shards[url] = f"{type(last).__name__}: {last}"
        return None

    def _shard(self, index: int, url: str) -> Iterator[dict]:
        opened = self._open(url)
        if opened is None:
            return
        f, tar = opened
        current = None
        ordinal = 0
        try:
            try:
                for member in tar:
                    if not member.isreg():
                        continue
                    key, ext = _split_name(member.name)
                    if key.startswith("__") or not ext:
                        continue
                    if current is not None and current["__key__"] != key:
                        yield from self._finish(current)
                        current = None
                    if current is None:
                        current = {"__key__": key, "__url__": url, "__shard__": index, "__ordinal__": ordinal}
                        ordinal += 1
                    current[ext] = tar.extractfile(member).read()
                self._check_end(url, tar.offset)
            except (tarfile.TarError, EOFError, OSError, _BadEnd) as exc:
                current = None
                kind = exc.kind if isinstance(exc, _BadEnd) else "truncated_tar"
                self.skipped[kind] += 1
                self.bad_shards[url] = f"{kind}: {exc}"
            if current is not None:
                yield from self._finish(current)
        finally:
            tar.close()
            f.close()

    @staticmethod
    def _check_end(url: str, offset: int) -> None:
        size = os.path.getsize(url)
        with open(url, "rb") as f:
            f.seek(offset)
            block = f.read(512)
        if len(block) < 512:
            raise _BadEnd("truncated_tar", f"no end-of-archive block after byte {offset} of {size}")
        if block.count(0) != 512:
            raise _BadEnd("corrupt_tar", f"damaged header at byte {offset}")


def _read_both(path: Path):
    runs = []
    for cls in (ShardReader, _TarfileShardReader):
        reader = cls([str(path)], check_images="none", check_samples=False, retries=0, backoff_s=0)
        runs.append((list(reader), reader.skip_counts()))
    return runs


def _sample_shard(path: Path, fmt: int, seed: int) -> Path:
    """Samples of 1-3 files of varied sizes (0 and 512 included), as a tarfile `fmt` tar, with
    a metadata entry webdataset skips; long keys in GNU and pax (GNU 'L', pax path records)."""
    rng = random.Random(seed)
    with tarfile.open(path, "w", format=fmt) as tar:
        for i in range(12):
            key = f"k{i:03d}" + ("_" + "x" * 110 if fmt != tarfile.USTAR_FORMAT and i % 3 == 0 else "")
            exts = ["jpg", "txt", "json"][:rng.choice([1, 2, 3, 3])]
            for ext in exts:
                data = _payload(rng, rng.choice([0, 3, 100, 512, 700, 1024, 1500]))
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 1_700_000_000.25  # a float mtime: a pax header per member
                tar.addfile(info, io.BytesIO(data))
            if i == 4:
                info = tarfile.TarInfo("__index__.json")
                info.size = 2
                tar.addfile(info, io.BytesIO(b"{}"))
    return path


def _webdataset_shard(path: Path, seed: int) -> Path:
    rng = random.Random(seed)
    with wds.TarWriter(str(path), encoder=False) as sink:
        for i in range(10):
            sink.write({"__key__": f"s{i:04d}", "jpg": _payload(rng, rng.choice([0, 200, 512, 1300])),
                        "txt": _payload(rng, 30), "json": b"{}"})
    return path


SHARDS = {"webdataset": lambda p: _webdataset_shard(p, 4),
          "ustar": lambda p: _sample_shard(p, tarfile.USTAR_FORMAT, 5),
          "gnu": lambda p: _sample_shard(p, tarfile.GNU_FORMAT, 6),
          "pax": lambda p: _sample_shard(p, tarfile.PAX_FORMAT, 7)}


@pytest.mark.parametrize("kind", list(SHARDS))
def test_truncation_keeps_the_samples_tarfile_kept(tmp_path, kind):
    whole = SHARDS[kind](tmp_path / "whole.tar")
    raw = whole.read_bytes()
    with tarfile.open(whole) as tar:
        members = tar.getmembers()
        end = tar.offset  # the first end-of-archive block
    # Every header and data boundary, one byte either side, plus random offsets (seeded).
    cuts = {0, 1, 511, 512, end, end + 1, end + 511, end + 512, len(raw) - 1}
    for m in members:
        for at in (m.offset, m.offset_data, m.offset_data + m.size):
            cuts.update((at - 1, at, at + 1))
    rng = random.Random(8)
    cuts.update(rng.randrange(len(raw)) for _ in range(250))
    cut = tmp_path / "cut.tar"
    for n in sorted(c for c in cuts if 0 <= c < len(raw)):
        cut.write_bytes(raw[:n])
        (ours, our_counts), (old, old_counts) = _read_both(cut)
        assert ours == old and our_counts == old_counts, f"cut at {n}"
        expected_kind = ("unreadable_shard" if our_counts["unreadable_shard"]
                         else None if n >= end + 512 else "truncated_tar")
        assert [k for k in SKIP_KINDS if our_counts[k]] == ([expected_kind] if expected_kind else []), f"cut at {n}"


@pytest.mark.parametrize("kind", list(SHARDS))
def test_damaged_header_is_corrupt_and_keeps_the_samples_tarfile_kept(tmp_path, kind):
    whole = SHARDS[kind](tmp_path / "whole.tar")
    raw = whole.read_bytes()
    with tarfile.open(whole) as tar:
        members = tar.getmembers()
    headers = sorted({m.offset for m in members} | {m.offset_data - 512 for m in members})  # extended ones too
    rng = random.Random(9)
    bad = tmp_path / "bad.tar"
    # (Damage in the first member's headers makes a shard that is not a tar: test_bad_data.)
    for at in [h for h in headers if h >= members[0].offset_data]:
        damaged = bytearray(raw)
        damaged[at + rng.randrange(512)] ^= 0xFF
        bad.write_bytes(bytes(damaged))
        (ours, our_counts), (old, _) = _read_both(bad)
        # (tarfile called a damaged header after an extended one "truncated": a bad checksum is
        # corrupt_tar here wherever it is.)
        assert ours == old, f"header at {at}"
        assert our_counts == {k: int(k == "corrupt_tar") for k in SKIP_KINDS}, f"header at {at}"


def test_reads_are_large_and_forward_only(tmp_path, monkeypatch):
    """One shard is read through one buffered file, never seeked, and tarfile only looks at the
    first header (the rest are parsed here)."""
    shard = _webdataset_shard(tmp_path / "a.tar", 10)
    seeks, opens = [], []
    real_open = open

    def spy_open(file, mode="r", buffering=-1):
        opens.append(buffering)
        return _Spy(real_open(file, mode, buffering), seeks)

    monkeypatch.setattr(data_mod, "open", spy_open, raising=False)
    reader = ShardReader([str(shard)], check_images="none", check_samples=False)
    assert len(list(reader)) == 10 and sum(reader.skip_counts().values()) == 0
    assert opens == [data_mod._CHUNK] and seeks == []


class _Spy:
    def __init__(self, f, seeks):
        self._f, self._seeks = f, seeks

    def seek(self, *a):
        self._seeks.append(a)
        return self._f.seek(*a)

    def __getattr__(self, name):
        return getattr(self._f, name)
