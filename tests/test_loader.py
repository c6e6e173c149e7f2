"""The training loader: global order, exact resume, ranks x workers, weights, latents, bad data.

Everything runs on real data: tar shards from ``write_shards`` or written member by
member with ``tarfile``, MDS directories from ``streaming.MDSWriter``, and real
DataLoader worker processes.
"""
from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from streaming import MDSWriter

from mmtrain.components.data import (
    Batch,
    DataConfig,
    SourceConfig,
    build_train_loader,
)
from mmtrain.config import ConfigError, load_config, save_config
from mmtrain.data.order import CHUNK, StreamOrder
from mmtrain.data.shards import ShardDataError, write_shards
from mmtrain.tokenize.image import pil_to_tensor

N_WDS, N_MDS, N_LAT = 40, 24, 20


def _color(i: int) -> tuple[int, int, int]:
    return (i * 37 % 256, i * 91 % 256, i * 53 % 256)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def latent_of(i: int) -> np.ndarray:
    return (np.arange(4 * 4 * 4, dtype=np.float32).reshape(4, 4, 4) + 100 * i).astype(np.float16)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("loader")
    samples = ({"key": f"w{i:04d}", "image": Image.new("RGB", (24, 24), _color(i)), "caption": f"wds sample {i}",
                "attributes": {"i": i}, "label": i % 5} for i in range(N_WDS))
    write_shards(samples, root / "wds", samples_per_shard=12, progress=False)  # 4 shards: 12, 12, 12, 4
    columns = {"key": "str", "image": "bytes", "caption": "str", "json": "json", "cls": "int", "latent": "ndarray"}
    with MDSWriter(out=str(root / "mds"), columns=columns, size_limit=4096) as writer:  # several shards
        for i in range(N_MDS):
            writer.write({"key": f"m{i:04d}", "image": _png(Image.new("RGB", (24, 24), _color(100 + i))),
                          "caption": f"mds sample {i}", "json": {"i": i}, "cls": 1000 + i, "latent": latent_of(i)})
    lat = []
    for i in range(N_LAT):  # webdataset shard with every optional member, JPEG images
        buf = io.BytesIO()
        Image.new("RGB", (24, 24), _color(200 + i)).save(buf, format="JPEG")
        lat += [(f"l{i:04d}.jpg", buf.getvalue()), (f"l{i:04d}.txt", f"latent sample {i}".encode()),
                (f"l{i:04d}.json", b"{}"), (f"l{i:04d}.cls", str(i).encode()),
                (f"l{i:04d}.latent.npy", _npy(latent_of(i)))]
    write_tar(root / "lat" / "lat-000000.tar", lat)
    assert len(list((root / "mds").glob("shard.*.mds"))) > 1
    return {"root": root, "wds": str(root / "wds"), "mds": str(root / "mds"), "lat": str(root / "lat"),
            "cache": str(root / "index_cache")}


def cfg_for(data: dict, sources: list[dict], **kw) -> DataConfig:
    return DataConfig(sources=sources, index_cache=data["cache"], image_size=kw.pop("image_size", 16), **kw)


def take(cfg: DataConfig, n: int, B: int, rank: int = 0, W: int = 1, seed: int = 0, start: int = 0, **kw) -> list[Batch]:
    loader = build_train_loader(cfg, B, rank, world_size=W, seed=seed, start_sample=start, **kw)
    it = iter(loader)
    try:
        return [next(it) for _ in range(n)]
    except BaseException:
        # The error's traceback keeps the iterator in a reference cycle, and a cyclic garbage
        # collection of a multi-worker iterator waits 5 s per worker: stop the workers now.
        if hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        raise


def keys(batches: list[Batch]) -> list[str]:
    return [k for b in batches for k in b.keys]


# --------------------------------------------------------------------------- coverage and resume


def test_one_epoch_over_two_ranks_and_two_workers_covers_every_sample_once(data):
    cfg = cfg_for(data, [{"path": data["wds"]}, {"path": data["mds"]}], num_workers=2)
    B, W = 4, 2
    epoch = N_WDS + N_MDS  # 64: not a multiple of nothing special; 9 global batches of 8 pass the boundary
    steps = epoch // (B * W) + 1
    seen: Counter = Counter()
    later = 0
    for rank in range(W):
        for b in take(cfg, steps, B, rank, W, seed=7):
            assert b.images.shape == (B, 3, 16, 16) and b.images.dtype == torch.float32
            assert -1.0 <= float(b.images.min()) and float(b.images.max()) <= 1.0
            for k, e, p in zip(b.keys, b.epochs.tolist(), b.positions.tolist()):
                assert e == p // epoch  # the epoch label is the stream position's epoch
                if e == 0:
                    seen[k] += 1
                else:
                    later += 1
    expected = {f"0:w{i:04d}" for i in range(N_WDS)} | {f"1:m{i:04d}" for i in range(N_MDS)}
    assert set(seen) == expected and set(seen.values()) == {1}
    assert later == steps * B * W - epoch  # the stream continues into epoch 1 inside the last global batch


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_resume_from_samples_seen_is_exact(data, mode):
    cfg = cfg_for(data, [{"path": data["wds"], "weight": 1}, {"path": data["mds"], "weight": 3}], mode=mode, num_workers=2)
    B, W, N = 3, 2, 12  # 2N * B * W = 144 positions: more than an epoch (mode epoch: 40 + 3 * 24 = 112)
    full = {r: take(cfg, 2 * N, B, r, W, seed=11) for r in range(W)}
    for r in range(W):
        first = take(cfg, N, B, r, W, seed=11)
        resumed = take(cfg, N, B, r, W, seed=11, start=N * B * W)  # start_sample = the checkpoint's samples_seen
        assert keys(first + resumed) == keys(full[r])
        assert torch.equal(torch.cat([b.images for b in first + resumed]), torch.cat([b.images for b in full[r]]))
    # a different world size after the restart continues the same global stream
    one_rank = take(cfg, N, B * W, 0, 1, seed=11, start=N * B * W)
    interleaved = [k for g in range(N, 2 * N) for r in range(W) for k in full[r][g].keys]
    assert keys(one_rank) == interleaved
    assert keys(take(cfg, 4, B, 0, W, seed=12)) != keys(full[0][:4])  # the seed matters


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine
def test_batches_do_not_depend_on_num_workers(data):
    sources = [{"path": data["wds"]}, {"path": data["lat"], "weight": 0.5}]
    runs = [take(cfg_for(data, sources, num_workers=w), 7, 5, rank=1, W=2, seed=3, start=9) for w in (0, 2, 3)]
    for other in runs[1:]:
        assert keys(other) == keys(runs[0])
        assert torch.equal(torch.cat([b.images for b in other]), torch.cat([b.images for b in runs[0]]))
        assert torch.equal(torch.cat([b.labels for b in other]), torch.cat([b.labels for b in runs[0]]))


# --------------------------------------------------------------------------- weights and order


def test_resampled_frequencies_follow_weights_and_each_source_cycles_through_all_its_samples():
    order = StreamOrder([40, 24], [1.0, 3.0], mode="resampled", shuffle=True, seed=5)
    src, local, passes = order.lookup(np.arange(2 * CHUNK))
    share = np.bincount(src, minlength=2) / len(src)
    assert abs(share[1] - 0.75) < 1e-4  # stratified: exact per chunk up to rounding
    first = np.bincount(src[:4000], minlength=2) / 4000  # and mixed well inside a chunk
    assert abs(first[1] - 0.75) < 0.03
    for s, n in ((0, 40), (1, 24)):
        picks = local[src == s]
        for k in range(3):  # pass k uses every sample once, in a fresh order
            assert sorted(picks[k * n:(k + 1) * n].tolist()) == list(range(n))
            assert (passes[src == s][k * n:(k + 1) * n] == k).all()
        assert picks[:n].tolist() != picks[n:2 * n].tolist()


def test_resampled_loader_mixes_sources_by_weight(data):
    cfg = cfg_for(data, [{"path": data["wds"], "weight": 1}, {"path": data["lat"], "weight": 4}],
                  mode="resampled", use_latents=False, num_workers=0)
    got = Counter(k.split(":")[0] for k in keys(take(cfg, 50, 8, seed=1)))
    assert abs(got["1"] / 400 - 0.8) < 0.06


def test_epoch_mode_weights_repeat_and_subsample_each_epoch():
    order = StreamOrder([10, 20], [2.0, 0.5], mode="epoch", shuffle=True, seed=0)
    assert order.epoch_length == 2 * 10 + 10
    subsets = []
    for e in range(3):
        src, local, epochs = order.lookup(np.arange(e * 30, (e + 1) * 30))
        assert (epochs == e).all()
        a = Counter(local[src == 0].tolist())
        assert a == {i: 2 for i in range(10)}  # weight 2: every sample exactly twice per epoch
        b = local[src == 1].tolist()
        assert len(b) == len(set(b)) == 10  # weight 0.5: half the samples, once each
        subsets.append(frozenset(b))
    assert len(set(subsets)) > 1  # a fresh subset per epoch


def test_no_shuffle_keeps_file_order(data):
    cfg = cfg_for(data, [{"path": data["wds"]}], shuffle=False, num_workers=0)
    assert keys(take(cfg, 3, 4)) == [f"0:w{i:04d}" for i in range(12)]


# --------------------------------------------------------------------------- decoding


def test_pixels_match_the_reference_transform_and_labels_come_through(data):
    cfg = cfg_for(data, [{"path": data["wds"]}], shuffle=False, num_workers=0, image_size=8)
    (b,) = take(cfg, 1, 3)
    ref = pil_to_tensor([Image.new("RGB", (24, 24), _color(i)).resize((8, 8), resample=3) for i in range(3)])
    assert b.pixels.dtype == torch.uint8 and b.pixels.shape == (3, 8, 8, 3)  # what crosses process boundaries
    assert torch.equal(b.images, ref) and b.images.is_contiguous()
    assert torch.equal(b.images_on("cpu", torch.bfloat16), ref.to(torch.bfloat16))
    assert b.captions == [f"wds sample {i}" for i in range(3)] and b.labels.tolist() == [0, 1, 2]
    assert b.substituted == 0 and b.latents is None


def test_resize_mode_center_crop_versus_squash(tmp_path):
    image = Image.new("RGB", (60, 20), (255, 0, 0))
    image.paste((0, 255, 0), (20, 0, 40, 20))  # red | green | blue thirds
    image.paste((0, 0, 255), (40, 0, 60, 20))
    write_tar(tmp_path / "s" / "a.tar", [("x.png", _png(image)), ("x.txt", b"thirds")])
    crop = take(DataConfig(train_shards=str(tmp_path / "s"), image_size=10, index_cache="", num_workers=0), 1, 1)[0]
    squash = take(DataConfig(train_shards=str(tmp_path / "s"), image_size=10, resize_mode="resize", index_cache="",
                             num_workers=0), 1, 1)[0]
    green = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1)
    assert torch.allclose(crop.images[0], green.expand(3, 10, 10), atol=0.02)  # only the middle third
    assert squash.images[0, 0, 5, 0] > 0.9 and squash.images[0, 2, 5, 9] > 0.9  # red left, blue right


def test_big_jpeg_fast_decode_stays_close_to_full_decode(tmp_path):
    ramp = np.tile(np.linspace(0, 255, 512, dtype=np.float32), (384, 1))
    image = Image.fromarray(np.stack([ramp, ramp[:, ::-1], np.full_like(ramp, 128)], -1).astype(np.uint8))  # 512 x 384
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    write_tar(tmp_path / "s" / "a.tar", [("x.jpg", buf.getvalue()), ("x.txt", b"ramp")])
    fast, full = (take(DataConfig(train_shards=str(tmp_path / "s"), image_size=64, fast_jpeg_decode=f, index_cache="",
                                  num_workers=0), 1, 1)[0].images for f in (True, False))
    assert fast.shape == full.shape == (1, 3, 64, 64)
    assert (fast - full).abs().mean() < 0.02


def test_use_latents_reads_latents_instead_of_images(data):
    cfg = cfg_for(data, [{"path": data["lat"]}, {"path": data["mds"]}], use_latents=True, shuffle=False, num_workers=2)
    batches = take(cfg, 6, 8)
    assert all(b.images is None and b.latents.shape == (8, 4, 4, 4) and b.latents.dtype == torch.float32 for b in batches)
    for b in batches:
        for k, latent, label in zip(b.keys, b.latents, b.labels.tolist()):
            source, key = k.split(":")
            i = int(key[1:])
            assert torch.equal(latent, torch.from_numpy(latent_of(i).astype(np.float32)))
            assert label == (i if source == "0" else 1000 + i)


def test_latents_of_the_wrong_shape_name_file_and_key(data):
    cfg = cfg_for(data, [{"path": data["lat"]}], use_latents=True, shuffle=False, num_workers=0)
    assert take(cfg, 1, 2, latent_shape=(4, 4, 4))[0].latents.shape == (2, 4, 4, 4)
    with pytest.raises(ShardDataError, match=r"lat-000000\.tar, sample l0000: latent has shape \(4, 4, 4\), but the "
                                             r"image tokenizer expects \(16, 2, 2\)"):
        take(cfg, 1, 2, latent_shape=(16, 2, 2))


def test_use_latents_on_a_source_without_latents_names_file_and_key(data):
    cfg = cfg_for(data, [{"path": data["lat"]}, {"path": data["wds"]}], use_latents=True)
    with pytest.raises(ShardDataError) as err:
        build_train_loader(cfg, 2, 0, world_size=1, seed=0, start_sample=0)
    assert "shard-000000.tar" in str(err.value) and "w0000" in str(err.value) and "latent" in str(err.value)
    (Path(data["root"]) / "mds_nolat").mkdir()
    with MDSWriter(out=str(Path(data["root"]) / "mds_nolat"), columns={"key": "str", "image": "bytes", "caption": "str"}) as w:
        w.write({"key": "a", "image": _png(Image.new("RGB", (8, 8))), "caption": "c"})
    cfg = cfg_for(data, [{"path": str(Path(data["root"]) / "mds_nolat")}], use_latents=True)
    with pytest.raises(ShardDataError, match=r"mds_nolat/index.json: missing column 'latent'"):
        build_train_loader(cfg, 2, 0, world_size=1, seed=0, start_sample=0)


def test_bad_latents_are_named():
    from mmtrain.data.sources import decode_latent

    good = _npy(latent_of(3))
    assert np.array_equal(decode_latent(good, "w"), latent_of(3))
    for data, message in ((b"not npy", "not .npy data"), (good[:-6], "expected 128 bytes got 122"),
                          (_npy(np.zeros((4, 4), np.float16)), "shape (4, 4), expected a float array C, h, w"),
                          (_npy(np.zeros((1, 4, 4), np.int32)), "int32 with shape")):
        with pytest.raises(ShardDataError, match=r"shard s\.tar, sample k7: .*" + re.escape(message)):
            decode_latent(data, "shard s.tar, sample k7")


def test_loader_tokenizes_captions_in_the_workers(data, tmp_path):
    from mmtrain.tokenize.text import TextTokenizerConfig, train_text_tokenizer

    tok = train_text_tokenizer([f"wds sample {i}" for i in range(N_WDS)], tmp_path / "tok", TextTokenizerConfig(vocab_size=40),
                               progress=False)
    cfg = cfg_for(data, [{"path": data["wds"]}], num_workers=2)
    for b in take(cfg, 3, 4, text_tokenizer=tok, max_text_len=6):
        ids, lengths = tok.encode_batch(b.captions, 6)
        assert torch.equal(b.text, ids) and torch.equal(b.text_len, lengths)


# --------------------------------------------------------------------------- bad data


@pytest.fixture
def corrupt_shards(tmp_path) -> Path:
    members = []
    for i in range(6):
        image = b"\x89PNG not an image at all" if i == 2 else _png(Image.new("RGB", (8, 8), _color(i)))
        members += [(f"k{i}.png", image), (f"k{i}.txt", f"caption {i}".encode())]
    write_tar(tmp_path / "bad" / "bad-000000.tar", members)
    return tmp_path / "bad"


def test_corrupt_sample_is_logged_and_replaced_by_the_next_one(corrupt_shards, caplog):
    cfg = DataConfig(train_shards=str(corrupt_shards), shuffle=False, image_size=8, index_cache="", num_workers=0)
    with caplog.at_level(logging.WARNING, logger="mmtrain.data"):
        (b,) = take(cfg, 1, 6)
    assert b.keys == ["0:k0", "0:k1", "0:k3", "0:k3", "0:k4", "0:k5"]  # k2 -> the next sample of the stream
    assert b.substituted == 1 and b.captions[2] == "caption 3"
    assert "bad-000000.tar" in caplog.text and "k2" in caplog.text and "cannot decode image" in caplog.text
    # the same in worker processes: deterministic, so the batch does not depend on num_workers
    assert take(DataConfig(train_shards=str(corrupt_shards), shuffle=False, image_size=8, index_cache="", num_workers=2),
                1, 6)[0].keys == b.keys


def test_corrupt_sample_is_an_error_when_none_are_allowed(corrupt_shards):
    cfg = DataConfig(train_shards=str(corrupt_shards), shuffle=False, image_size=8, index_cache="", num_workers=2,
                     max_bad_samples=0)
    with pytest.raises(ShardDataError) as err:
        take(cfg, 1, 6)
    assert str(corrupt_shards / "bad-000000.tar") in str(err.value) and "k2" in str(err.value)


def test_only_bad_samples_is_an_error_naming_shard_and_key(tmp_path):
    write_tar(tmp_path / "s" / "only.tar", [("k9.png", b"garbage"), ("k9.txt", b"c")])
    with pytest.raises(ShardDataError) as err:
        take(DataConfig(train_shards=str(tmp_path / "s"), index_cache="", num_workers=0), 1, 1)
    assert "only.tar" in str(err.value) and "k9" in str(err.value) and "no good sample" in str(err.value)


def test_bad_input_errors_name_the_culprit(data, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_train_loader(cfg_for(data, [{"path": str(missing)}]), 2, 0, world_size=1, seed=0, start_sample=0)
    with pytest.raises(ValueError, match=r"sources\[1\]\.format: expected one of .*'parquet'"):
        cfg_for(data, [{"path": data["wds"]}, {"path": data["mds"], "format": "parquet"}])
    with pytest.raises(ValueError, match=r"unknown key 'sources\[0\]\.wieght' \(known keys here: format, path, weight\)"):
        cfg_for(data, [{"path": data["wds"], "wieght": 2}])
    # an MDS dataset without the caption column
    with MDSWriter(out=str(tmp_path / "nocap"), columns={"key": "str", "image": "bytes"}) as w:
        w.write({"key": "a", "image": _png(Image.new("RGB", (8, 8)))})
    with pytest.raises(ShardDataError, match=r"nocap/index.json: missing column 'caption'"):
        build_train_loader(cfg_for(data, [{"path": str(tmp_path / "nocap")}]), 2, 0, world_size=1, seed=0, start_sample=0)
    # an MDS column with the wrong type
    with MDSWriter(out=str(tmp_path / "strimg"), columns={"key": "str", "image": "str", "caption": "str"}) as w:
        w.write({"key": "a", "image": "not bytes", "caption": "c"})
    with pytest.raises(ShardDataError, match=r"strimg/index.json: column 'image' has encoding 'str'"):
        build_train_loader(cfg_for(data, [{"path": str(tmp_path / "strimg")}]), 2, 0, world_size=1, seed=0, start_sample=0)
    # a sample without its caption member
    write_tar(tmp_path / "nocaption" / "a.tar", [("k0.png", _png(Image.new("RGB", (8, 8)))), ("k0.txt", b"c"),
                                                ("k1.png", _png(Image.new("RGB", (8, 8))))])
    with pytest.raises(ShardDataError, match=r"a\.tar, sample k1: has no caption member"):
        build_train_loader(DataConfig(train_shards=str(tmp_path / "nocaption"), index_cache=""), 2, 0, world_size=1,
                           seed=0, start_sample=0)
    # a compressed tar
    (tmp_path / "gz").mkdir()
    with tarfile.open(tmp_path / "gz" / "a.tar", "w:gz") as tar:
        tar.add(str(tmp_path / "nocaption" / "a.tar"), arcname="k0.png")
    with pytest.raises(ShardDataError, match=r"gz/a\.tar: not a readable uncompressed tar"):
        build_train_loader(DataConfig(train_shards=str(tmp_path / "gz"), index_cache=""), 2, 0, world_size=1,
                           seed=0, start_sample=0)
    with pytest.raises(ValueError, match="rank 2 is not < world_size 2"):
        build_train_loader(cfg_for(data, [{"path": data["wds"]}]), 2, 2, world_size=2, seed=0, start_sample=0)


# --------------------------------------------------------------------------- config and index cache


def test_yaml_config_with_sources_loads_and_old_keys_still_work(data, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {
        "sources": [{"path": data["wds"], "weight": 2}, {"path": data["mds"], "format": "mds"}],
        "mode": "resampled", "shuffle_buffer": 10000, "num_workers": 0, "image_size": 16, "index_cache": data["cache"]}}))
    cfg = load_config(path)
    assert cfg.data.sources == [SourceConfig(data["wds"], "auto", 2.0), SourceConfig(data["mds"], "mds", 1.0)]
    # the YAML's sources draw as the same sources given in code, and the weight changes the draw
    # (sampling by source size alone would also favour source 0, so its count proves nothing)
    drawn = keys(take(cfg.data, 10, 6))
    in_code = [{"path": data["wds"], "weight": 2}, {"path": data["mds"], "format": "mds"}]
    assert drawn == keys(take(cfg_for(data, in_code, mode="resampled", num_workers=0), 10, 6))
    assert drawn != keys(take(cfg_for(data, [{"path": data["wds"]}, {"path": data["mds"], "format": "mds"}], mode="resampled",
                                      num_workers=0), 10, 6))
    save_config(cfg, tmp_path / "saved.yaml")  # what a run writes to its run_dir and reloads on resume
    assert load_config(tmp_path / "saved.yaml").data == cfg.data
    with pytest.raises(ConfigError, match=r"c\.yaml: data\.sources\[0\]\.weight: expected a number >= 0"):
        load_config(path, ["data.sources=[{path: x, weight: -1}]"])
    with pytest.raises(ConfigError, match=r"c\.yaml: data\.mode: expected one of \['epoch', 'resampled'\]"):
        load_config(path, ["data.mode=shuffled"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_batches_pin_memory(data):
    loader = build_train_loader(cfg_for(data, [{"path": data["wds"]}], num_workers=1), 4, 0, world_size=1, seed=0,
                                start_sample=0)
    assert loader.pin_memory
    b = next(iter(loader))
    assert b.pixels.is_pinned() and b.labels.is_pinned() and b.images_on("cuda").device.type == "cuda"


def test_tar_index_cache_is_used_and_refreshed_when_a_shard_changes(tmp_path):
    shards, cache = tmp_path / "s", tmp_path / "cache"
    write_tar(shards / "a.tar", [("k0.png", _png(Image.new("RGB", (8, 8)))), ("k0.txt", b"first")])
    cfg = DataConfig(train_shards=str(shards), index_cache=str(cache), image_size=8, num_workers=0)
    assert take(cfg, 1, 1)[0].captions == ["first"]
    (entry,) = cache.iterdir()
    assert json.loads(entry.read_text())["keys"] == ["k0"]
    write_tar(shards / "a.tar", [("z0.png", _png(Image.new("RGB", (8, 8)))), ("z0.txt", b"second caption")])
    assert take(cfg, 1, 1)[0].keys == ["0:z0"]  # size/mtime changed: rescanned, not served stale
    assert len(list(cache.iterdir())) == 2
