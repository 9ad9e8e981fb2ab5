"""ZeRO-3 models built partitioned (engine/dist/partitioned.py): no rank materialises the whole
model, the shards hold the checkpoint's values, the frozen original's cache pass runs in
lockstep with the key of a whole model, and the consolidated export is the trained weights."""
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import random_checkpoint, tiny_data  # noqa: F401

MODEL = "tiny-vit"


@pytest.fixture(scope="module")
def tiny_vit_checkpoint(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory, MODEL, "tiny-vit.pt")


def test_load_empty_materialises_no_parameter_and_assemble_restores_the_model(tiny_vit_checkpoint):
    """The meta-device build holds no parameter storage (buffers real); assembling it from a
    state dict takes those very tensors (no copy) and gives the model open_clip loads."""
    from cliperase.engine.dist.partitioned import assemble
    from cliperase.engine.models import load_empty, load_model

    empty = load_empty(MODEL).model
    assert {p.device.type for p in empty.parameters()} == {"meta"}
    assert all(b.device.type == "cpu" for b in empty.buffers())  # the causal mask is built, not loaded
    whole = load_model(MODEL, str(tiny_vit_checkpoint)).model
    state = {k: v.clone() for k, v in whole.state_dict().items()}
    state["logit_scale"] = state["logit_scale"].reshape(1)  # as DeepSpeed trains it
    model = assemble(MODEL, state)
    assert model.logit_scale.shape == ()
    assert model.visual.conv1.weight.data_ptr() == state["visual.conv1.weight"].data_ptr()
    x, t = torch.randn(2, 3, 32, 32), torch.randint(0, 100, (2, whole.context_length))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), whole.encode_image(x), rtol=0, atol=0)
        torch.testing.assert_close(model.encode_text(t), whole.encode_text(t), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="lacks"):
        assemble(MODEL, {k: v for k, v in state.items() if k != "text_projection"})


def _gathered(clip) -> dict:
    import deepspeed

    out = {}
    for name, p in clip.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.detach().clone()
    return out


def _rank_main(rank: int, world: int, port: int, ckpt: str, shards: list, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    import deepspeed

    from cliperase.engine.dist.partitioned import (ShardedOriginal, gather_full_state, load_partitioned,
                                                   release_optimizer_state, sharded_engine)
    from cliperase.engine.models import Towers
    from cliperase.engine.teacher_cache import TeacherCache, teacher_fingerprint

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    ds = {"train_batch_size": 2 * world, "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
          "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1}
    res = {}
    loaded = load_partitioned(MODEL, ckpt, ds, dtype=torch.float32, train_logit_scale=True)
    clip = loaded.model
    res["numel"] = {"local": sum(p.ds_tensor.numel() for p in clip.parameters()),
                    "materialised": sum(p.data.numel() for p in clip.parameters()),
                    "full": sum(p.ds_numel for p in clip.parameters()), "params": len(list(clip.parameters()))}
    res["gathered"] = _gathered(clip)
    # The frozen original: a lockstep cache pass (rank 1 has no shard of its own and idles).
    original = ShardedOriginal(sharded_engine(load_partitioned(MODEL, ckpt, ds, dtype=torch.float32,
                                                               train_logit_scale=False).model, ds, torch.float32))
    res["fingerprint"] = teacher_fingerprint(original)
    cache = TeacherCache.build_or_load(Path(out) / "cache", "retain", shards, original, loaded.preprocess,
                                       loaded.tokenizer, device=torch.device("cpu"), precision="fp32", batch_size=64,
                                       progress=False)
    res["cache"] = [torch.from_numpy(np.load(f)) for f in cache.rows.files]  # (n, 2, d) per shard
    original.close()
    # One training step, a DeepSpeed checkpoint, and the consolidated state on rank 0 only.
    towers = Towers(clip, zero3=True)
    engine, *_ = deepspeed.initialize(model=towers, optimizer=torch.optim.AdamW(towers.parameters(), lr=1e-2),
                                      config=ds)
    torch.manual_seed(rank)
    img, txt, scale = engine(torch.randn(2, 3, 32, 32), torch.randint(0, 100, (2, clip.context_length)))
    engine.backward((img.square().mean() + txt.square().mean()) * scale)
    engine.step()
    engine.save_checkpoint(str(Path(out) / "ckpt"), tag="step1")
    release_optimizer_state(engine)
    res["state"] = gather_full_state(clip, keep=rank == 0)
    torch.save(res, f"{out}/rank{rank}.pt")
    torch.distributed.barrier()
    os._exit(0)  # see test_distributed._rank_main: gloo's teardown can abort a spawned process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_build_partitioned_cache_in_lockstep_and_export_the_trained_weights(tiny_vit_checkpoint, tiny_data,  # noqa: F811
                                                                                     tmp_path):
    import torch.multiprocessing as mp
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from cliperase.engine.data import resolve_shards
    from cliperase.engine.models import load_model
    from cliperase.engine.teacher_cache import TeacherCache, teacher_fingerprint

    world = 2
    shards = resolve_shards(str(tiny_data / "retain"), "retain_data")
    assert len(shards) == 1  # so rank 1 has no shard of its own: the lockstep's idle path
    mp.spawn(_rank_main, args=(world, _free_port(), str(tiny_vit_checkpoint), shards, str(tmp_path)), nprocs=world,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    file = torch.load(tiny_vit_checkpoint)
    n = sum(v.numel() for v in file.values())
    for r in ranks:
        numel = r["numel"]
        assert numel["full"] == n and numel["materialised"] == 0
        # 1/world of the model, plus at most world - 1 elements of padding per parameter
        assert n / world <= numel["local"] <= n / world + numel["params"] * (world - 1)
        for k, v in r["gathered"].items():
            assert torch.equal(v.reshape(file[k].shape), file[k]), k
    assert sum(r["numel"]["local"] for r in ranks) >= n
    # The cache of the sharded original is the whole model's, under the same key.
    whole = load_model(MODEL, str(tiny_vit_checkpoint))
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"] == teacher_fingerprint(whole.model)
    plain = TeacherCache.build_or_load(tmp_path / "plain", "retain", shards, whole.model, whole.preprocess,
                                       whole.tokenizer, device=torch.device("cpu"), precision="fp32", progress=False)
    assert [p.name for p in (tmp_path / "plain").iterdir()] == [p.name for p in (tmp_path / "cache").iterdir()]
    expected = [torch.from_numpy(np.load(f)) for f in plain.rows.files]
    for r in ranks:
        assert len(r["cache"]) == len(expected) and expected[0].abs().sum() > 0
        for got, want in zip(r["cache"], expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Consolidation: rank 0 only, equal to DeepSpeed's own reconstruction, moved from the file.
    assert ranks[1]["state"] == {}
    got = ranks[0]["state"]
    reference = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "ckpt"), tag="step1")
    assert {k.removeprefix("clip.") for k in reference} == set(got)
    for k, v in reference.items():
        assert torch.equal(got[k.removeprefix("clip.")], v.float()), k
    assert not torch.equal(got["visual.conv1.weight"], file["visual.conv1.weight"])
    json.dumps({k: list(v.shape) for k, v in got.items()})
