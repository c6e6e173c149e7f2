"""Tests for webdataset shard writing/reading and the synthetic shard builder."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter

import numpy as np
import pytest

from mmtrain.data.shards import (
    ShardDataError,
    list_shards,
    write_shards,
)
from mmtrain.data.sources import iter_samples
from mmtrain.data.synthetic import SyntheticConfig, generate_sample, write_synthetic_shards

CFG = SyntheticConfig(image_size=32, min_shapes=1, max_shapes=4, seed=9)


def _samples(n: int, cfg: SyntheticConfig = CFG) -> list[dict]:
    return [generate_sample(i, cfg) for i in range(n)]


def _assert_same(read: list[dict], written: list[dict]) -> None:
    assert [s["key"] for s in read] == [s["key"] for s in written]
    for r, w in zip(read, written):
        assert r["image"].mode == "RGB"
        assert np.array_equal(np.asarray(r["image"]), np.asarray(w["image"])), r["key"]
        assert r["caption"] == w["caption"]
        assert r["attributes"] == w["attributes"]


def _tar_with(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(sample: dict) -> bytes:
    buffer = io.BytesIO()
    sample["image"].save(buffer, format="PNG")
    return buffer.getvalue()


# --- round trip --------------------------------------------------------------


def test_png_round_trip_is_exact_and_ordered(tmp_path):
    samples = _samples(25)
    paths = write_shards(samples, tmp_path, samples_per_shard=10, progress=False)
    assert [os.path.basename(p) for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert list_shards(tmp_path) == paths
    read = list(iter_samples(tmp_path))
    _assert_same(read, samples)
    assert [r["where"].split(",")[0] for r in read] == [f"shard {p}" for p in [paths[0]] * 10 + [paths[1]] * 10 + [paths[2]] * 5]
    with tarfile.open(paths[2]) as tar:
        assert tar.getnames()[:3] == ["00000020.json", "00000020.png", "00000020.txt"]


def test_jpg_round_trip(tmp_path):
    samples = _samples(6)
    paths = write_shards(samples, tmp_path, image_format="jpg", prefix="part", progress=False)
    assert [os.path.basename(p) for p in paths] == ["part-000000.tar"]
    with tarfile.open(paths[0]) as tar:
        assert "00000000.jpg" in tar.getnames()
    read = list(iter_samples(tmp_path))
    assert [r["caption"] for r in read] == [s["caption"] for s in samples]
    for r, s in zip(read, samples):
        diff = np.abs(np.asarray(r["image"]).astype(int) - np.asarray(s["image"]).astype(int))
        assert r["image"].size == s["image"].size and diff.mean() < 10


def test_same_samples_give_identical_shard_bytes(tmp_path):
    a = write_shards(_samples(5), tmp_path / "a", progress=False)
    b = write_shards(_samples(5), tmp_path / "b", progress=False)
    c = write_shards(_samples(5, SyntheticConfig(seed=10)), tmp_path / "c", progress=False)
    read = lambda p: open(p, "rb").read()  # noqa: E731
    assert read(a[0]) == read(b[0])
    assert read(a[0]) != read(c[0])


def test_rewrite_with_fewer_samples_removes_stale_shards(tmp_path):
    write_shards(_samples(30), tmp_path, samples_per_shard=10, progress=False)
    paths = write_shards(_samples(12), tmp_path, samples_per_shard=10, progress=False)
    assert list_shards(tmp_path) == paths and len(paths) == 2
    assert len(list(iter_samples(tmp_path))) == 12
    # An empty input writes nothing and deletes nothing.
    assert write_shards([], tmp_path, progress=False) == []
    assert list_shards(tmp_path) == paths


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"samples_per_shard": 0}, "samples_per_shard"),
        ({"image_format": "webp"}, "image_format"),
    ],
)
def test_write_shards_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_shards(_samples(1), tmp_path, progress=False, **kwargs)


def test_write_shards_rejects_bad_samples(tmp_path):
    sample = _samples(1)[0]
    with pytest.raises(ValueError, match="caption"):
        write_shards([{k: v for k, v in sample.items() if k != "caption"}], tmp_path, progress=False)
    with pytest.raises(ValueError, match="key"):
        write_shards([dict(sample, key="a.b")], tmp_path, progress=False)
    with pytest.raises(ValueError, match="duplicate"):
        write_shards([sample, sample], tmp_path, progress=False)
    assert os.listdir(tmp_path) == []


# --- atomicity -----------------------------------------------------------------


def test_no_temp_files_left(tmp_path):
    write_shards(_samples(7), tmp_path, samples_per_shard=3, progress=False)
    names = [f"shard-00000{i}.tar" for i in range(3)]
    assert sorted(os.listdir(tmp_path)) == sorted(names + [n + ".index.json" for n in names])  # shards + sidecar indexes


def test_failure_mid_shard_leaves_no_partial_shard(tmp_path):
    samples = _samples(25)

    seen_mid_write = []

    def failing():
        for i, sample in enumerate(samples):
            if i == 24:  # in the middle of the third shard
                # What a hard kill (no cleanup) would leave right now: the third
                # shard exists only under its hidden temporary name.
                seen_mid_write.extend(sorted(os.listdir(tmp_path)))
                raise RuntimeError("generator died")
            yield sample

    with pytest.raises(RuntimeError, match="generator died"):
        write_shards(failing(), tmp_path, samples_per_shard=10, progress=False)
    assert seen_mid_write == [".shard-000002.tar.tmp", "shard-000000.tar", "shard-000000.tar.index.json",
                              "shard-000001.tar", "shard-000001.tar.index.json"]
    # Completed shards are in place and intact; the third one never appeared.
    assert sorted(os.listdir(tmp_path)) == ["shard-000000.tar", "shard-000000.tar.index.json",
                                            "shard-000001.tar", "shard-000001.tar.index.json"]
    _assert_same(list(iter_samples(tmp_path)), samples[:20])


def test_bad_sample_mid_shard_leaves_no_partial_shard(tmp_path):
    samples = _samples(5)
    samples[3] = dict(samples[3], image="not an image")
    with pytest.raises(ValueError, match="00000003"):
        write_shards(samples, tmp_path, samples_per_shard=2, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["shard-000000.tar", "shard-000000.tar.index.json"]


# --- listing -------------------------------------------------------------------


def test_list_shards_sources(tmp_path):
    paths = write_shards(_samples(8), tmp_path, samples_per_shard=2, progress=False)
    (tmp_path / "notes.txt").write_text("not a shard")
    assert list_shards(str(tmp_path)) == paths
    assert list_shards(paths[1]) == [paths[1]]
    assert list_shards(str(tmp_path / "shard-{000001..000002}.tar")) == paths[1:3]
    keys = [s["key"] for s in iter_samples(str(tmp_path / "shard-{000002..000003}.tar"))]
    assert keys == ["00000004", "00000005", "00000006", "00000007"]


def test_list_shards_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        list_shards(missing)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        list(iter_samples(missing))


def test_list_shards_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        list_shards(tmp_path)


def test_list_shards_missing_shard_in_pattern(tmp_path):
    write_shards(_samples(4), tmp_path, samples_per_shard=2, progress=False)
    with pytest.raises(FileNotFoundError, match="shard-000002.tar"):
        list_shards(str(tmp_path / "shard-{000000..000002}.tar"))


# --- corrupt data ----------------------------------------------------------------


def test_corrupt_image_names_shard_and_key(tmp_path):
    good = _samples(1)[0]
    shard = tmp_path / "shard-000000.tar"
    _tar_with(
        shard,
        {
            "00000000.png": _png(good),
            "00000000.txt": good["caption"].encode(),
            "00000000.json": json.dumps(good["attributes"]).encode(),
            "00000003.png": b"\x89PNG garbage, definitely not an image",
            "00000003.txt": b"a small red circle at the top left",
            "00000003.json": b"{}",
        },
    )
    samples = iter_samples(tmp_path)
    assert next(samples)["key"] == "00000000"
    with pytest.raises(ShardDataError) as info:
        next(samples)
    message = str(info.value)
    assert str(shard) in message and "00000003" in message and "cannot decode image" in message


def test_missing_field_and_bad_json(tmp_path):
    shard = tmp_path / "shard-000000.tar"
    _tar_with(shard, {"00000005.png": _png(_samples(1)[0]), "00000005.json": b"{}"})
    with pytest.raises(ShardDataError, match=r"shard .*shard-000000\.tar, sample 00000005: has no caption member KEY\.txt"):
        list(iter_samples(tmp_path))

    image = _png(_samples(1)[0])
    for name, members, error in (
            ("json", {"k1.png": image, "k1.txt": b"hi", "k1.json": b"{oops"}, r"sample k1: cannot decode field 'json'"),
            ("list", {"k1.png": image, "k1.txt": b"hi", "k1.json": b"[1, 2]"}, "expected a JSON object"),
            ("noimage", {"k1.txt": b"hi", "k1.json": b"{}"}, r"sample k1: has no image member KEY\.jpg\|jpeg\|png\|webp")):
        (tmp_path / name).mkdir()
        _tar_with(tmp_path / name / "shard-000000.tar", members)
        with pytest.raises(ShardDataError, match=error):
            list(iter_samples(tmp_path / name))
    assert [s["caption"] for s in iter_samples(tmp_path / "noimage", want_image=False)] == ["hi"]


def test_truncated_shard_names_shard(tmp_path):
    paths = write_shards(_samples(10), tmp_path, progress=False)
    data = open(paths[0], "rb").read()
    with open(paths[0], "wb") as f:
        f.write(data[: len(data) // 2 + 100])
    with pytest.raises(ShardDataError, match="shard-000000.tar"):
        list(iter_samples(tmp_path))


# --- synthetic shards + stats ------------------------------------------------------


def test_write_synthetic_shards_and_stats(tmp_path, caplog):
    cfg = SyntheticConfig(image_size=32, min_shapes=1, max_shapes=3, seed=4)
    with caplog.at_level("INFO", logger="mmtrain.data"):
        stats = write_synthetic_shards(tmp_path, 45, cfg, samples_per_shard=20, progress=False)
    assert "samples/s" in caplog.text

    with open(tmp_path / "stats.json") as f:
        assert json.load(f) == stats
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]

    read = list(iter_samples(tmp_path))
    _assert_same(read, _samples(45, cfg))

    assert stats["num_samples"] == 45 and stats["num_shards"] == 3
    assert stats["shard_files"] == [os.path.basename(p) for p in list_shards(tmp_path)]
    assert (stats["image_size"], stats["seed"], stats["image_format"]) == (32, 4, "png")

    shapes = [s for r in read for s in r["attributes"]["shapes"]]
    for field in ("kind", "color", "size", "position"):
        expected = Counter(s[field] for s in shapes)
        assert {k: v for k, v in stats["counts"][field].items() if v} == dict(expected)
    assert stats["shape_count_histogram"] == {
        str(k): v for k, v in sorted(Counter(len(r["attributes"]["shapes"]) for r in read).items())
    }
    lengths = [len(r["caption"].split()) for r in read]
    assert stats["caption_length_histogram"] == {str(k): v for k, v in sorted(Counter(lengths).items())}
    assert stats["caption_length_min"] == min(lengths)
    assert stats["caption_length_max"] == max(lengths)
    assert stats["caption_length_mean"] == pytest.approx(sum(lengths) / len(lengths))
    assert stats["samples_per_s"] > 0


def test_write_synthetic_shards_rejects_bad_num(tmp_path):
    with pytest.raises(ValueError, match="num"):
        write_synthetic_shards(tmp_path, 0, CFG, progress=False)


# --- the one tar reader ------------------------------------------------------------


def test_every_tar_reader_groups_members_by_the_same_rule(tmp_path):
    """Loader index, prep source, prepared-dataset reader (latent precompute) and iter_samples all
    read tars through mmtrain.data.tar: consecutive members share a sample, a key that comes back is an
    error naming it."""
    from mmtrain.data.index import scan_tar
    from mmtrain.data.sources import iter_shards
    from mmtrain.data.prep.sources.wds import list_wds
    from mmtrain.data.sources import open_source
    from mmtrain.data.tar import iter_tar_samples

    a, b = _samples(2)
    good = tmp_path / "good" / "shard-000000.tar"
    good.parent.mkdir()
    _tar_with(good, {"./00000000.PNG": _png(a), "00000000.txt": a["caption"].encode(), "00000000.json": b"{}",
                     "__meta__.json": b"{}", ".hidden.txt": b"x", "README": b"no extension",
                     "sub/00000001.png": _png(b), "sub/00000001.txt": b["caption"].encode(), "sub/00000001.json": b"{}"})
    assert [(s.key, sorted(s.members)) for s in iter_tar_samples(str(good))] == [
        ("00000000", ["json", "png", "txt"]), ("sub/00000001", ["json", "png", "txt"])]
    assert scan_tar(str(good)).keys == ["00000000", "sub/00000001"]
    assert [s.key for _, samples in iter_shards(good) for s in samples] == ["00000000", "sub/00000001"]
    assert [s["key"] for s in iter_samples(good.parent)] == ["00000000", "sub/00000001"]
    assert [c.group for c in list_wds(good).candidates] == ["00000000", "sub/00000001"]

    broken = tmp_path / "broken" / "shard-000000.tar"
    broken.parent.mkdir()
    _tar_with(broken, {"00000000.png": _png(a), "00000000.txt": b"one", "00000000.json": b"{}", "00000001.png": _png(b),
                       "00000001.txt": b"two", "00000001.json": b"{}", "00000000.cls": b"3"})  # 00000000 comes back
    rule = "sample key '00000000' appears in two separate runs of members"
    for read in (lambda: scan_tar(str(broken)), lambda: list(iter_shards(broken)),
                 lambda: list(iter_samples(broken.parent)), lambda: open_source(str(broken.parent), cache_dir="")):
        with pytest.raises(ShardDataError, match=rule) as info:
            read()
        assert str(broken) in str(info.value)
    source = list_wds(broken)  # prep keeps what came before the damage and counts the shard
    assert [c.group for c in source.candidates] == ["00000000"] and [d.reason for d in source.drops] == ["corrupt_shard"]
    assert rule in source.drops[0].detail
