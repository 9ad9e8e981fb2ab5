"""Forget-set selection on generated shards, whose every sample's shape, colour and caption is
known, so each rule's expected set is exact."""
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds

from cliperase.engine.errors import ConfigError
from cliperase.engine.tools.select import SelectConfig, _Reservoir, keys_sha256, select
from cliperase.engine.tools.synthetic import COLOURS, _encode, generate, write_pairs
from helpers import tiny_checkpoint  # noqa: F401  (a fixture)
from launch.select_data import main

N = 216  # each shape x colour x background combination twice


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Shards of N generated pairs (5 shards) and the samples' metadata in stream order."""
    root = tmp_path_factory.mktemp("corpus")
    samples = list(generate(N, 5))
    write_pairs(samples, root / "shards", shard_size=50)
    return root / "shards", [s.meta for s in samples]


def _shard_samples(directory: Path):
    """key -> {ext: bytes} of every sample in the .tar files of a directory, in order."""
    out = {}
    for shard in sorted(directory.glob("*.tar")):
        with tarfile.open(shard) as t:
            for m in t:
                key, _, ext = m.name.partition(".")
                out.setdefault(key, {})[ext] = t.extractfile(m).read()
    return out


def _select(corpus, out, encoder=None, **kw):
    shards, _ = corpus
    return select(SelectConfig(data=str(shards), output_dir=str(out), **kw), encoder=encoder, progress=False)


def _keys(path: Path):
    return path.read_text().splitlines()


def _digest_dir(directory: Path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_keyword_writes_exact_sets_with_bytes_unchanged(corpus, tmp_path):
    shards, meta = corpus
    before = _digest_dir(shards)
    m = _select(corpus, tmp_path / "sel", keywords=("red",))
    expected = [s["key"] for s in meta if "red" in s["caption"].split()]
    rest = [s["key"] for s in meta if s["key"] not in set(expected)]
    assert 0 < len(expected) < N
    forget, retain = _shard_samples(tmp_path / "sel" / "forget"), _shard_samples(tmp_path / "sel" / "retain")
    assert list(forget) == expected and list(retain) == rest
    source = _shard_samples(shards)
    assert all(forget[k] == source[k] for k in forget) and all(retain[k] == source[k] for k in retain)
    assert set(source[expected[0]]) == {"jpg", "txt", "json"}
    assert m["forget"]["count"] == len(expected) and m["retain"]["count"] == len(rest)
    assert m["forget"]["keys_sha256"] == keys_sha256(expected) and m["retain"]["keys_sha256"] == keys_sha256(rest)
    assert m["rule"] == {"kind": "keywords", "keywords": ["red"], "whole_words": True, "case_sensitive": False}
    assert len(m["source"]["shards"]) == 5 and m["source"]["samples_read"] == N and m["version"]
    assert json.loads((tmp_path / "sel" / "manifest.json").read_text()) == m
    assert _digest_dir(shards) == before  # inputs never modified


def test_keyword_rules_whole_words_and_case(tmp_path):
    captions = ["A Red car", "a reddish car", "bored", "red-brick wall", "RED", "a red  car", "redcar", "car red"]
    image = _encode(next(generate(1, 0)).image, "JPEG")
    with wds.TarWriter(str(tmp_path / "in.tar"), encoder=False) as sink:
        for i, c in enumerate(captions):
            sink.write({"__key__": f"k{i}", "jpg": image, "txt": c.encode()})

    def forget(**kw):
        m = select(SelectConfig(data=str(tmp_path / "in.tar"), output_dir=str(tmp_path / "o"), keys_only=True,
                                overwrite=True, **kw), progress=False)
        assert m["forget"]["count"] + m["retain"]["count"] == len(captions)
        return [captions[int(k[1:])] for k in _keys(tmp_path / "o" / "forget.txt")]

    assert forget(keywords=("red",)) == ["A Red car", "red-brick wall", "RED", "a red  car", "car red"]
    assert forget(keywords=("red",), case_sensitive=True) == ["red-brick wall", "a red  car", "car red"]
    assert forget(keywords=("red car",)) == ["A Red car", "a red  car"]
    assert forget(keywords=("reddish", "bored")) == ["a reddish car", "bored"]
    assert forget(regex=(r"^red",)) == ["red-brick wall", "RED", "redcar"]
    assert forget(regex=(r"^red",), case_sensitive=True) == ["red-brick wall", "redcar"]


def test_regex(corpus, tmp_path):
    _, meta = corpus
    m = _select(corpus, tmp_path / "sel", regex=(r"\b(circle|ring)\b",), keys_only=True)
    expected = [s["key"] for s in meta if s["shape"] in ("circle", "ring")]  # every caption names the shape
    assert _keys(tmp_path / "sel" / "forget.txt") == expected
    assert m["forget"]["keys_sha256"] == hashlib.sha256((tmp_path / "sel" / "forget.txt").read_bytes()).hexdigest()
    assert m["retain"]["count"] == N - len(expected)


def test_key_list(corpus, tmp_path):
    _, meta = corpus
    wanted = [s["key"] for s in meta][::7]
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("\n".join(wanted[::-1] + ["", "no-such-key"]) + "\n")
    m = _select(corpus, tmp_path / "sel", keys_file=str(keys_file))
    assert list(_shard_samples(tmp_path / "sel" / "forget")) == wanted  # stream order, not list order
    assert m["rule"]["keys_listed"] == len(wanted) + 1
    assert m["rule"]["keys_not_found"] == 1 and m["rule"]["keys_not_found_examples"] == ["no-such-key"]


class ColourEncoder:
    """A deterministic stand-in teacher in colour space: a text embeds as the bag of colour words
    it names, an image as its histogram of pixels near each colour, so "red" is near exactly
    the red shapes or the captions saying red."""

    names = list(COLOURS)

    def __init__(self):
        self.batches = []

    def encode_text(self, texts):
        self.batches.append(len(texts))
        return torch.tensor([[float(c in t.split()) for c in self.names] for t in texts])

    def encode_images(self, images):
        self.batches.append(len(images))
        palette = torch.tensor([COLOURS[c] for c in self.names], dtype=torch.float32)
        out = []
        for im in images:
            pixels = torch.from_numpy(np.asarray(im, dtype=np.float32).reshape(-1, 3))  # (P, 3)
            out.append((torch.cdist(pixels, palette) < 40).sum(0).float())
        return torch.stack(out)


def test_concept_threshold_on_images_and_captions(corpus, tmp_path):
    _, meta = corpus
    enc = ColourEncoder()
    m = _select(corpus, tmp_path / "img", encoder=enc, concept="red", threshold=0.5, batch_size=64, keys_only=True,
                model="tiny-clip")
    assert _keys(tmp_path / "img" / "forget.txt") == [s["key"] for s in meta if s["colour"] == "red"]
    assert enc.batches == [1, 64, 64, 64, 24]  # the prompt, then batches of the stream
    assert m["rule"]["embedding"] == "image" and m["rule"]["lowest_forget_score"] >= 0.5

    # Red captions score exactly 1.0: a threshold of 1.0 keeps them all (cosine >= threshold).
    _select(corpus, tmp_path / "cap", encoder=ColourEncoder(), concept="red", threshold=1.0,
            embedding="caption", model="tiny-clip")
    assert list(_shard_samples(tmp_path / "cap" / "forget")) == [s["key"] for s in meta if "red" in s["caption"].split()]


def test_concept_top_k_is_exact_with_ties_to_the_first_read(corpus, tmp_path):
    _, meta = corpus
    red = [s["key"] for s in meta if "red" in s["caption"].split()]
    m = _select(corpus, tmp_path / "k", encoder=ColourEncoder(), concept="red", top_k=5, embedding="caption",
                batch_size=32, model="tiny-clip")
    # Every red caption scores 1.0: the five read first win.
    assert list(_shard_samples(tmp_path / "k" / "forget")) == red[:5]
    assert list(_shard_samples(tmp_path / "k" / "retain")) == [s["key"] for s in meta if s["key"] not in red[:5]]
    assert m["rule"]["cutoff_score"] == pytest.approx(1.0)
    _select(corpus, tmp_path / "all", encoder=ColourEncoder(), concept="red", top_k=len(red) + 3,
            embedding="caption", keys_only=True, model="tiny-clip")
    # Then three of the captions scoring 0, again the ones read first.
    first_others = [s["key"] for s in meta if s["key"] not in set(red)][:3]
    assert _keys(tmp_path / "all" / "forget.txt") == [s["key"] for s in meta if s["key"] in set(red + first_others)]
    assert len(_keys(tmp_path / "all" / "retain.txt")) == N - len(red) - 3


def test_concept_on_tiny_clip_matches_brute_force_cosine(corpus, tmp_path, tiny_checkpoint):  # noqa: F811
    from PIL import Image

    from cliperase.engine.models import load_model

    shards, meta = corpus
    teacher = load_model("tiny-clip", str(tiny_checkpoint))
    prompt = "a red circle"
    images = [teacher.preprocess(Image.open(io.BytesIO(v["jpg"])).convert("RGB")) for v in _shard_samples(shards).values()]
    with torch.no_grad():
        img = F.normalize(teacher.model.encode_image(torch.stack(images)), dim=-1)
        txt = F.normalize(teacher.model.encode_text(teacher.tokenizer([prompt])), dim=-1)[0]
    scores = (img @ txt).tolist()
    # A threshold in the widest gap around the median, so batching's rounding cannot flip a sample.
    ranked = sorted(scores)
    gap, i = max((ranked[j + 1] - ranked[j], j) for j in range(N // 4, 3 * N // 4))
    threshold = (ranked[i] + ranked[i + 1]) / 2
    expected = [s["key"] for s, x in zip(meta, scores) if x >= threshold]
    assert gap > 1e-5 and 0 < len(expected) < N
    m = _select(corpus, tmp_path / "sel", concept=prompt, threshold=threshold, model="tiny-clip",
                pretrained=str(tiny_checkpoint), batch_size=100, keys_only=True, device="cpu")
    assert _keys(tmp_path / "sel" / "forget.txt") == expected
    assert m["forget"]["count"] == len(expected) and m["rule"]["model"] == "tiny-clip"


def test_retain_sample_is_disjoint_seeded_and_of_the_requested_size(corpus, tmp_path):
    _, meta = corpus
    m = _select(corpus, tmp_path / "a", keywords=("red",), retain_size=40, seed=1)
    forget = list(_shard_samples(tmp_path / "a" / "forget"))
    retain = list(_shard_samples(tmp_path / "a" / "retain"))
    non_forget = [s["key"] for s in meta if s["key"] not in set(forget)]
    assert len(retain) == 40 and set(retain) <= set(non_forget)
    assert retain == [k for k in non_forget if k in set(retain)]  # stream order
    assert m["retain"]["sampled"] == {"requested": 40, "from": len(non_forget), "seed": 1, "method": "reservoir"}
    _select(corpus, tmp_path / "b", keywords=("red",), retain_size=40, seed=1, keys_only=True)
    assert _keys(tmp_path / "b" / "retain.txt") == retain  # the same draw with or without shards
    _select(corpus, tmp_path / "c", keywords=("red",), retain_size=40, seed=2, keys_only=True)
    assert _keys(tmp_path / "c" / "retain.txt") != retain
    m = _select(corpus, tmp_path / "d", keywords=("red",), retain_size=10 * N, keys_only=True)
    assert _keys(tmp_path / "d" / "retain.txt") == non_forget


def test_retain_sample_with_top_k(corpus, tmp_path):
    _, meta = corpus
    _select(corpus, tmp_path / "s", encoder=ColourEncoder(), concept="red", top_k=30, retain_size=50,
            embedding="caption", model="tiny-clip")
    forget = list(_shard_samples(tmp_path / "s" / "forget"))
    retain = list(_shard_samples(tmp_path / "s" / "retain"))
    assert len(forget) == 30 and len(retain) == 50 and not set(forget) & set(retain)


def test_reservoir_is_uniform():
    # Fixed seeds: deterministic, yet each of 20 items must be drawn about 5/20 of the time.
    hits = [0] * 20
    for seed in range(2000):
        r = _Reservoir(5, seed)
        for i in range(20):
            r.add((0, str(i)), i)
        for _, (_, key) in r.smallest(5):
            hits[int(key)] += 1
    assert all(0.2 < h / 2000 < 0.3 for h in hits)


def test_refuses_existing_selection_unless_overwrite(corpus, tmp_path):
    _select(corpus, tmp_path / "sel", keywords=("red",))
    first = (tmp_path / "sel" / "manifest.json").read_text()
    with pytest.raises(ConfigError, match="already holds a selection"):
        _select(corpus, tmp_path / "sel", keywords=("blue",))
    assert (tmp_path / "sel" / "manifest.json").read_text() == first
    m = _select(corpus, tmp_path / "sel", keywords=("blue",), overwrite=True, keys_only=True)
    assert m["rule"]["keywords"] == ["blue"]
    assert sorted(p.name for p in (tmp_path / "sel").iterdir()) == ["forget.txt", "manifest.json", "retain.txt"]


def test_refuses_to_replace_its_own_input(corpus, tmp_path):
    _select(corpus, tmp_path / "sel", keywords=("red",))
    with pytest.raises(ConfigError, match="input shards lie inside"):
        select(SelectConfig(data=str(tmp_path / "sel" / "forget"), output_dir=str(tmp_path / "sel"),
                            keywords=("circle",), overwrite=True), progress=False)


def test_config_problems_all_at_once(tmp_path):
    cfg = SelectConfig(data=str(tmp_path / "nothing"), keywords=("red",), regex=("(",), threshold=2.0,
                       retain_size=-1, shard_size=0, output_dir=str(tmp_path / "o"))
    with pytest.raises(ConfigError) as err:
        select(cfg, progress=False)
    text = str(err.value)
    for expected in ("data:", "rule:", "regex:", "threshold, top_k", "retain_size", "shard_size"):
        assert expected in text
    concept = SelectConfig(data="x.tar", concept="dog", output_dir=str(tmp_path / "o"))
    assert any("exactly one of threshold and top_k" in p for p in concept.problems())
    assert any("model:" in p for p in concept.problems())
    unknown = SelectConfig(data="x.tar", concept="dog", top_k=3, model="ViT-B-33", output_dir=str(tmp_path / "o"))
    assert any("unknown architecture 'ViT-B-33'" in p for p in unknown.problems())


def test_cli(corpus, tmp_path, capsys):
    shards, meta = corpus
    out = tmp_path / "sel"
    assert main([str(shards), "-o", str(out), "--keyword", "red,blue", "--keys-only", "--no-progress"]) == 0
    expected = [s["key"] for s in meta if {"red", "blue"} & set(s["caption"].split())]
    assert _keys(out / "forget.txt") == expected
    assert json.loads(capsys.readouterr().out)["forget"] == len(expected)
    assert main([str(shards), "-o", str(out), "--keyword", "red", "--no-progress"]) == 2
    assert "already holds a selection" in capsys.readouterr().err
    assert main([str(shards), "-o", str(tmp_path / "x"), "--concept", "dog", "--no-progress"]) == 2
    assert "threshold and top_k" in capsys.readouterr().err
