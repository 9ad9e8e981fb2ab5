"""The one tar reader: every shard the engine reads (training streams, evaluation sets, the teacher
cache, selection) goes through `ShardReader`, one shard at a time, bad data skipped and counted.
"""
from __future__ import annotations

import io
import logging
import re
import struct
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple, TypeVar
from zlib import adler32

from PIL import Image

__all__ = ["SKIP_KINDS", "ShardReader", "decode_image", "sample_image", "DECODE_ERRORS", "IMAGE_EXTS"]

log = logging.getLogger("cliperase.data")
T = TypeVar("T")

IMAGE_EXTS = ("jpg", "png", "jpeg", "webp")

# Every kind a ShardReader counts; reported as a dict with all of them, zeros included, so a
# report reader can tell "none of this kind" from "not checked".
SKIP_KINDS = (
    "unreadable_shard",  # the shard could not be opened as a tar, even after retries
    "truncated_tar",  # the tar ends inside a member or without its end-of-archive block
    "corrupt_tar",  # a damaged header in the middle of a tar; the rest of the shard is lost
    "missing_image",  # a sample without jpg/png/jpeg/webp
    "corrupt_image",  # an image that does not decode
    "missing_caption",  # a sample without txt, or with an empty one
    "corrupt_caption",  # a txt that is not UTF-8
)
_BLOCK = tarfile.BLOCKSIZE
_CHUNK = 1 << 20  # shard reads: 1 MB each, headers and members are then copies out of the buffer
_ZEROS = bytes(_BLOCK)
_REGULAR = frozenset(b"07\0")  # tar types: regular file, contiguous file, old-style regular file
_NO_DATA = frozenset(b"123456")  # hard link, symlink, character / block device, directory, fifo
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")  # tarfile's: "%d %s=%s\n" % (length, keyword, value)
_CHECKS = ("none", "draft", "decode")


def decode_image(raw: bytes, *, draft: bool = False) -> Image.Image:
    """Decode image bytes fully into an RGB PIL image.

    With `draft`, JPEGs decode at 1/8 scale (libjpeg's DCT scaling): every byte of the entropy
    coded data is still read, so truncated or garbled files fail, at a fraction of the cost.
    Raises OSError (PIL.UnidentifiedImageError is one) or ValueError / SyntaxError (from some
    PIL plugins) when the bytes are not a decodable image; PIL.Image.DecompressionBombError for
    images over PIL's pixel limit.
    """
    im = Image.open(io.BytesIO(raw))
    if draft:
        im.draft("RGB", (1, 1))
    im.load()
    return im.convert("RGB")


def _split_name(name: str) -> Tuple[str, str]:
    """`dir/key.ext.more` -> (`dir/key`, `ext.more`): the key ends at the first dot of the base
    name, the rule webdataset and img2dataset use, so keys with dots in extensions group right."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext.lower() if dot else "")


class _BadEnd(Exception):
    """Internal: damage found while reading a tar; `kind` is "truncated_tar" or "corrupt_tar"
    and the message says where. `member`: the regular file whose header was whole but whose
    data was cut short, else None."""

    def __init__(self, kind: str, message: str, member: Optional[str] = None):
        super().__init__(message)
        self.kind, self.member = kind, member


def _number(field: bytes) -> int:
    """A numeric tar header field as tarfile reads it: octal digits up to a NUL (blanks around
    them allowed, none = 0), or base-256 when the first byte is 0x80 (0xff: negative). Raises
    ValueError for anything else."""
    if field[0] in (0x80, 0xFF):
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if field[0] == 0xFF else n
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _checked_size(block: bytes, at: int) -> int:
    """The member size of a header that failed _tar_files's fast checks, by tarfile's rules:
    the stored checksum in any form tarfile accepts, against the unsigned or the signed byte
    sum (some old tars sum signed chars); the size in octal or base-256. Raises
    _BadEnd("corrupt_tar") when the header is damaged."""
    try:
        stored = _number(block[148:156])
    except ValueError:
        stored = None
    if stored not in (256 + sum(struct.unpack_from("148B8x356B", block)),
                      256 + sum(struct.unpack_from("148b8x356b", block))):
        raise _BadEnd("corrupt_tar", f"damaged header at byte {at} (bad checksum)")
    try:
        size = _number(block[124:136])
    except ValueError:
        size = -1
    if size < 0:
        raise _BadEnd("corrupt_tar", f"damaged header at byte {at} (size field {block[124:136]!r})")
    return size


def _pax_records(data: bytes, at: int) -> Dict[str, str]:
    """The records of a pax extended header, parsed as tarfile parses them (UTF-8; bytes that
    are not UTF-8 kept as surrogates). Raises _BadEnd("corrupt_tar") for a record of length 0."""
    records: Dict[str, str] = {}
    pos = 0
    while True:
        match = _PAX_RECORD.match(data, pos)
        if match is None:
            return records
        length = int(match.group(1))
        if length == 0:
            raise _BadEnd("corrupt_tar", f"damaged pax header at byte {at}")
        value = data[match.end(2) + 1:match.start(1) + length - 1]
        records[match.group(2).decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length


def _read_up_to(read: Callable[[int], bytes], n: int) -> bytes:
    """`n` bytes, fewer where the stream ends first. Over _CHUNK it reads in pieces: a read(n)
    allocates n bytes first, and a damaged size field can claim gigabytes."""
    if n <= _CHUNK:
        return read(n)
    parts = []
    while n > 0:
        part = read(min(n, _CHUNK))
        if not part:
            break
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


@dataclass
class _Extended:
    """What extended headers (pax, GNU long name) said about the member after them."""

    name: Optional[str] = None  # from a pax `path` or a GNU 'L' entry
    size: Optional[int] = None  # from a pax `size`
    sparse: bool = False  # pax GNU.sparse.* records: the member is a sparse file
    waiting: bool = False  # headers were read and their member has not come yet

    def absorb(self, kind: int, data: bytes, at: int) -> None:
        self.waiting = True
        if kind == 0x4C:  # 'L'
            if self.name is None:  # of several, the first wins, as in tarfile
                self.name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif kind in b"xX" and (b"path=" in data or b"size=" in data or b"GNU.sparse." in data):
            # (webdataset's pax headers hold only an mtime: they are not parsed at all)
            records = _pax_records(data, at)
            if self.name is None and "path" in records:
                self.name = records["path"].rstrip("/")
            if self.size is None and "size" in records:
                try:
                    self.size = int(records["size"])
                except ValueError:
                    self.size = 0
            self.sparse = self.sparse or any(k.startswith("GNU.sparse.") for k in records)


def _header_size(block: bytes, at: int, waiting: bool) -> Optional[int]:
    """The member size a 512-byte header block gives; None at the end-of-archive block."""
    if len(block) != _BLOCK:
        what = f"header cut short at byte {at + len(block)}" if block else f"no end-of-archive block at byte {at}"
        raise _BadEnd("truncated_tar", what)
    # Fast path: octal size and checksum, the unsigned byte sum from zlib's adler32 (its low
    # 16 bits are 1 + the byte sum mod 65521, and half a block sums to at most 65,280).
    try:
        size = int(block[124:136].split(b"\0", 1)[0], 8)
        if size >= 0 and int(block[148:156].split(b"\0", 1)[0], 8) == \
                (adler32(block[:256]) & 0xFFFF) + (adler32(block[256:]) & 0xFFFF) + 254 - sum(block[148:156]):
            return size
    except ValueError:
        pass
    if block == _ZEROS:
        if waiting:
            raise _BadEnd("corrupt_tar", f"extended header with no member after it, at byte {at}")
        return None
    return _checked_size(block, at)


def _ustar_name(block: bytes) -> str:
    raw = block[:100].split(b"\0", 1)[0]
    # ustar's prefix/name; only under the POSIX magic (GNU headers keep times there)
    if block[345] and block[257:263] == b"ustar\0":
        raw = block[345:500].split(b"\0", 1)[0] + b"/" + raw
    return raw.decode("utf-8", "surrogateescape")


def _skip_member(read: Callable[[int], bytes], kind: int, block: bytes, padded: int, at: int) -> int:
    """Read past the data of a member that is not yielded; returns the offset after it."""
    if kind == 0x53:  # 'S' old GNU sparse: blocks of the sparse map, then the data
        more = block[482]
        while more:
            ext = read(_BLOCK)
            at += len(ext)
            if len(ext) != _BLOCK:
                raise _BadEnd("truncated_tar", f"sparse header cut short at byte {at}")
            more = ext[504]
    skipped = 0
    while skipped < padded:
        got = len(read(min(padded - skipped, _CHUNK)))
        if not got:
            raise _BadEnd("truncated_tar", f"member data cut short at byte {at + skipped}")
        skipped += got
    return at + padded


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _tar_files(read: Callable[[int], bytes]) -> Iterator[Tuple[str, bytes]]:
    """(name, bytes) of each regular file of the tar stream that `read(n)` reads, in order.

    A streaming ustar / pax / GNU reader, forward only (no seeks: a pipe or an object store is
    read the same way), which gets each member from a few slices of its 512-byte header. It
    replaces Python's tarfile here, which parses every field of every header in Python: 40% of
    the loader's time at 32 px (webdataset writes a pax header before each member, so three
    files per sample are six headers). Names and sizes come out as tarfile reads them (ustar
    prefix, pax `path` and `size`, GNU long names, undecodable bytes kept as surrogates).
    Directories, links, devices, fifos, sparse files, pax global headers and unknown types are
    passed over.

    The archive ends at its first all-zero block, as in tarfile. Raises _BadEnd:
    "truncated_tar" when the stream ends before it (inside a header, an extended header, member
    data or padding, or where a header should be); "corrupt_tar" for a header with a bad
    checksum or size field, a pax record of length 0, or extended headers with no member after.
    """
    at = 0  # byte offset of the next header, for messages
    ext = _Extended()
    while True:
        block = read(_BLOCK)
        size = _header_size(block, at, ext.waiting)
        if size is None:
            return
        kind, header_at = block[156], at
        at += _BLOCK
        if kind in b"xXLgK":  # pax extended ('X': Solaris), GNU long name, pax global, GNU long link
            data = _read_up_to(read, _padded(size))
            at += len(data)
            if len(data) != _padded(size):
                raise _BadEnd("truncated_tar", f"extended header cut short at byte {at}")
            ext.absorb(kind, data, header_at)
            continue
        size = size if ext.size is None else ext.size
        name, sparse, ext = ext.name, ext.sparse, _Extended()
        if kind == 0 and block[:100].split(b"\0", 1)[0].endswith(b"/"):
            continue  # the old way to store a directory: no data
        if kind in _REGULAR and not sparse:
            name = name if name is not None else _ustar_name(block)
            data = _read_up_to(read, size)
            at += len(data)
            if len(data) != size:
                raise _BadEnd("truncated_tar", f"{name!r} cut short at byte {at}", member=name)
            # Yielded before its padding is read: a stream cut there loses this member's
            # sample, not the one its header completed.
            yield name, data
            if _padded(size) != size:
                got = len(read(_padded(size) - size))
                at += got
                if got != _padded(size) - size:
                    raise _BadEnd("truncated_tar", f"padding after {name!r} cut short at byte {at}")
            continue
        if kind in _NO_DATA:
            continue  # their size fields describe no data (POSIX; tarfile agrees)
        at = _skip_member(read, kind, block, _padded(size), at)


class ShardReader:
    """Samples of image-caption shards, read one shard at a time, never all in memory; bad data
    is skipped and counted in `skipped` by kind (see SKIP_KINDS), never raised.

    Yields webdataset-style dicts: `__key__` (str), `__url__` (the shard path), `__shard__` (its
    index in `shards`), `__ordinal__` (the sample's number in its shard, counting every sample
    the tar holds, skipped ones included) and one entry per file of the sample, extension -> bytes exactly as
    stored (`jpg`, `txt`, `json`, ...). With `check_images="decode"` the decoded RGB image is
    added as `__image__` (a PIL image), so a consumer need not decode it twice. A plain
    iterable (no torch: configs are checked with it before anything heavy is imported), also
    callable as the source of a `webdataset.DataPipeline`; it does not split shards between
    DataLoader workers (PairStream does), and its counts live in the process that iterates it.

    What is skipped:
      - a shard that cannot be opened (unreadable, not a tar) is retried `retries` times with
        exponential backoff from `backoff_s` (a missing file is not retried), then skipped
        with one warning and counted once as `unreadable_shard`; its path and reason go to
        `bad_shards`;
      - a tar that ends early is counted once as `truncated_tar` (or `corrupt_tar` for a damaged
        header); the complete samples before the damage are kept, the one in progress dropped;
      - samples without an image or caption, with an image that does not decode (unless
        `check_images="none"`), or with a non-UTF-8 caption, each counted by kind.

    Shards are opened read-only and never written. `check_images`: "none" (trust the bytes),
    "draft" (JPEGs decoded at 1/8 scale, other formats fully; the default) or "decode" (full
    decode, image attached). `check_samples=False` yields every complete sample unchecked (tar
    damage is still skipped): for a consumer that checks only its own share. Raises ValueError for an unknown `check_images` or negative
    `retries`/`backoff_s`.
    """

    def __init__(self, shards: Sequence[str], *, check_images: str = "draft", retries: int = 2,
                 backoff_s: float = 0.5, check_samples: bool = True):
        if check_images not in _CHECKS:
            raise ValueError(f"check_images: expected one of {list(_CHECKS)}, got {check_images!r}")
        if retries < 0 or backoff_s < 0:
            raise ValueError(f"retries and backoff_s: expected >= 0, got {retries} and {backoff_s}")
        self.shards = [str(s) for s in shards]
        self.check_images, self.retries, self.backoff_s = check_images, retries, backoff_s
        self.check_samples = check_samples
        self.skipped: Counter = Counter({k: 0 for k in SKIP_KINDS})
        self.bad_shards: Dict[str, str] = {}  # shard path -> what was wrong with it
        self.samples = 0  # samples yielded so far

    def skip_counts(self) -> Dict[str, int]:
        """Counts by kind, every kind of SKIP_KINDS present (zeros included)."""
        return {k: int(self.skipped[k]) for k in SKIP_KINDS}

    def __iter__(self) -> Iterator[dict]:
        for index, url in enumerate(self.shards):
            yield from self._shard(index, url)

    def __call__(self) -> Iterator[dict]:
        """The samples, as a webdataset.DataPipeline source (a callable returning an iterator)."""
        return iter(self)

    def _open(self, url: str):
        """Open a shard for streaming, retrying; None (after counting it) when it cannot be."""
        last: Optional[BaseException] = None
        attempts = 0
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            f = None
            attempts += 1
            try:
                f = open(url, "rb", buffering=_CHUNK)
                # Whether the file is a tar at all stays Python's tarfile's call on its first
                # member's headers, as before: the same files fail, with the same messages, and
                # are retried. It parses them from the first 1 MB, already buffered (peek
                # consumes nothing, nothing seeks); _tar_files then reads the members.
                tarfile.open(fileobj=io.BytesIO(f.peek(_BLOCK)), mode="r|").close()
                return f
            except (OSError, tarfile.TarError) as exc:  # missing, permission, I/O, not a tar
                last = exc
                if f is not None:
                    f.close()
                if isinstance(exc, FileNotFoundError):
                    # img2dataset leaves gaps in a brace range for shards it failed to write;
                    # waiting does not fill them, and hundreds of gaps would cost minutes.
                    break
        reason = f"{type(last).__name__}: {last}"
        log.warning("skipping shard %s after %d attempt(s): %s", url, attempts, reason)
        self.skipped["unreadable_shard"] += 1
        self.bad_shards[url] = reason
        return None

    def _shard(self, index: int, url: str) -> Iterator[dict]:
        f = self._open(url)
        if f is None:
            return
        current: Optional[dict] = None
        ordinal = 0  # the sample's place in its shard: with the shard, an id stable across reads
        try:
            try:
                for name, data in _tar_files(f.read):
                    key, ext = _split_name(name)
                    if key.startswith("__") or not ext:  # webdataset's own metadata entries
                        continue
                    if current is not None and current["__key__"] != key:
                        # A new key: the previous sample is complete.
                        yield from self._finish(current)
                        current = None
                    if current is None:
                        current = {"__key__": key, "__url__": url, "__shard__": index, "__ordinal__": ordinal}
                        ordinal += 1
                    current[ext] = data
            except (OSError, _BadEnd) as exc:
                # The sample being read when the stream broke may lack files: drop it. A file
                # cut inside its data still had a whole header: if that opens a new key, the
                # sample before it is complete, as a new key's header always says here.
                member = exc.member if isinstance(exc, _BadEnd) else None
                if current is not None and member is not None:
                    key, ext = _split_name(member)
                    if ext and not key.startswith("__") and current["__key__"] != key:
                        yield from self._finish(current)
                current = None
                kind = exc.kind if isinstance(exc, _BadEnd) else "truncated_tar"  # (an I/O error mid-read)
                log.warning("shard %s: %s (%s); keeping the samples before it", url, kind.replace("_", " "), exc)
                self.skipped[kind] += 1
                self.bad_shards[url] = f"{kind}: {exc}"
            if current is not None:
                yield from self._finish(current)
        finally:
            f.close()

    def _finish(self, sample: dict) -> Iterator[dict]:
        if self.check_samples:
            kind = _sample_problem(sample)
            if kind is None and self.check_images != "none":
                try:
                    image = decode_image(sample[_image_ext(sample)], draft=self.check_images == "draft")
                except DECODE_ERRORS:
                    kind = "corrupt_image"
                else:
                    if self.check_images == "decode":
                        sample["__image__"] = image
            if kind is not None:
                self.skipped[kind] += 1
                return
        self.samples += 1
        yield sample


def _image_ext(sample: dict) -> Optional[str]:
    return next((e for e in IMAGE_EXTS if e in sample), None)


# What PIL raises for bytes that are not a decodable image (UnidentifiedImageError is an OSError).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def sample_image(sample: dict, read: Callable[[bytes], T]) -> Tuple[Optional[T], Optional[str]]:
    """`(read(image bytes), None)` for a sample with a caption and a decodable image, else
    `(None, skip kind)`: the one rule training streams and the teacher cache share."""
    kind = _sample_problem(sample)
    if kind is not None:
        return None, kind
    try:
        return read(sample[_image_ext(sample)]), None
    except DECODE_ERRORS:
        return None, "corrupt_image"


def _sample_problem(sample: dict) -> Optional[str]:
    """The skip kind of a sample without a usable image entry or caption, else None (the image
    bytes are not decoded here)."""
    if _image_ext(sample) is None:
        return "missing_image"
    raw_text = sample.get("txt")
    if raw_text is None:
        return "missing_caption"
    try:
        return None if raw_text.decode("utf-8").strip() else "missing_caption"
    except UnicodeDecodeError:
        return "corrupt_caption"
