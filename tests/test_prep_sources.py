"""Tests for the manifest, COCO and webdataset sources, latent precompute and the prep CLI."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_prep import (
    SIZES,
    cfg,
    encoded,
    file_bytes,
    make_folder,
    noise_image,
    pixels,
    read_mds,
    save,
    tar_members,
    tar_with,
    wds_samples,
)

from mmtrain.data.prep import (
    precompute_latents,
    prep_coco,
    prep_folder,
    prep_manifest,
    prep_wds,
)
from mmtrain.data.sources import iter_shards
from mmtrain.data.prep.split import split_of


def _nonzero(stats: dict) -> dict[str, int]:
    return {r: n for r, n in stats["dropped_by_reason"].items() if n}


# --------------------------------------------------------------------------- (b) manifest


def _manifest_images(root: Path, n: int = 12) -> list[Path]:
    return [save(noise_image(i, *SIZES[i % len(SIZES)]), root / "imgs" / f"p{i:02d}.png") for i in range(n)]


def test_csv_manifest_with_labels_and_bad_rows(tmp_path):
    paths = _manifest_images(tmp_path / "data")
    lines = ["image,caption,label,url"]
    for i, p in enumerate(paths):
        # Relative paths resolve against the manifest folder; one absolute path works too.
        ref = str(p) if i == 0 else f"imgs/{p.name}"
        lines.append(f'{ref},"caption, number {i}",{i % 3},http://example.com/{i}')
    lines += [
        "imgs/missing.png,no such file,1,u",   # missing_file
        "imgs/p01.png,,1,u",                   # empty_caption
        "imgs/p02.png,bad label,cat,u",        # bad_label
        "imgs/p03.png,too few fields",         # bad_row (missing columns)
        "imgs/p04.png,too many,1,u,extra",     # bad_row (surplus field)
    ]
    manifest = tmp_path / "data" / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")

    stats = prep_manifest(manifest, tmp_path / "out", cfg())

    assert stats["kept"] == 12
    assert _nonzero(stats) == {"missing_file": 1, "empty_caption": 1, "bad_label": 1, "bad_row": 2}
    examples = " ".join(line for lines in stats["drop_examples"].values() for line in lines)
    assert "manifest.csv row 16" in examples and "manifest.csv row 17" in examples  # row = line number
    samples = wds_samples(tmp_path / "out" / "train")
    # key = the image's path relative to the manifest's folder, extension dropped, sanitized (see
    # prep.sources.manifest): row 0's absolute path names a file in that folder, so it gets the key its
    # relative spelling would; samples are written in manifest order
    assert list(samples) == [f"imgs_p{i:02d}" for i in range(12)]
    for key, members in samples.items():
        i = int(key[-2:])
        assert set(members) == {"jpg", "txt", "json", "cls"}
        assert members["cls"] == str(i % 3).encode()
        assert members["txt"].decode() == f"caption, number {i}"
        meta = json.loads(members["json"])
        assert meta["url"] == f"http://example.com/{i}" and meta["manifest_row"] == i + 2
        assert "label" not in meta and "caption" not in meta


def test_manifest_column_names_are_configurable_and_checked(tmp_path):
    paths = _manifest_images(tmp_path / "data", 4)
    manifest = tmp_path / "data" / "m.tsv"
    manifest.write_text("path\ttext\n" + "".join(f"imgs/{p.name}\tpicture {i}\n" for i, p in enumerate(paths)))
    stats = prep_manifest(manifest, tmp_path / "out", cfg(), image_column="path", caption_column="text")
    assert stats["kept"] == 4
    assert all("cls" not in m for m in wds_samples(tmp_path / "out" / "train").values())
    with pytest.raises(ValueError, match=r"m\.tsv.*no column 'image'"):
        prep_manifest(manifest, tmp_path / "out2", cfg())
    with pytest.raises(ValueError, match="no column 'label'"):
        prep_manifest(manifest, tmp_path / "out3", cfg(), image_column="path", caption_column="text", label_column="label")
    with pytest.raises(FileNotFoundError, match="nothere.csv"):
        prep_manifest(tmp_path / "nothere.csv", tmp_path / "out4", cfg())
    (tmp_path / "m.xlsx").write_text("x")
    with pytest.raises(ValueError, match="unknown format"):
        prep_manifest(tmp_path / "m.xlsx", tmp_path / "out5", cfg())


def test_jsonl_manifest_to_mds_with_cls_column(tmp_path):
    paths = _manifest_images(tmp_path / "data", 10)
    rows = [json.dumps({"image": f"imgs/{p.name}", "caption": f"jsonl caption {i}", "label": i, "score": 0.5})
            for i, p in enumerate(paths)]
    rows += ["{not json", json.dumps(["a", "list"]), json.dumps({"caption": "no image"}),
             json.dumps({"image": "imgs/p00.png", "caption": "label -1", "label": -1})]
    manifest = tmp_path / "data" / "m.jsonl"
    manifest.write_text("\n".join(rows) + "\n")

    stats = prep_manifest(manifest, tmp_path / "out", cfg(output_format="mds", val_fraction=0.3))

    assert _nonzero(stats) == {"bad_row": 3, "bad_label": 1}
    rows_read = read_mds(tmp_path / "out" / "train") + read_mds(tmp_path / "out" / "val")
    assert sorted(r["key"] for r in rows_read) == [f"imgs_p{i:02d}" for i in range(10)]
    for row in rows_read:
        i = int(row["key"][-2:])
        assert row["cls"] == i and row["caption"] == f"jsonl caption {i}"
        assert row["json"]["score"] == 0.5
        assert np.array_equal(pixels(row["image"]).shape, (SIZES[i % 5][1], SIZES[i % 5][0], 3))


def test_parquet_manifest_read_with_pyarrow(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = _manifest_images(tmp_path / "data", 6)
    manifest = tmp_path / "data" / "m.parquet"
    table = pa.table({
        "image": [f"imgs/{p.name}" for p in paths] + ["imgs/missing.png"],
        "caption": [f"pq caption {i}" for i in range(6)] + ["gone"],
        "label": [0, 1, 2, 3, None, 5, 1],          # a null label is a bad label, not label 0
        "score": [0.5, float("nan"), 1.5, 2.5, 3.5, 4.5, 0.0],  # NaN is not JSON: stored as null
        "tags": [["a", "b"], [], ["c"], ["d"], ["e"], ["f"], []],
    })
    pq.write_table(table, manifest, row_group_size=4)

    stats = prep_manifest(manifest, tmp_path / "out", cfg())

    assert stats["kept"] == 5 and _nonzero(stats) == {"bad_label": 1, "missing_file": 1}
    assert "m.parquet row 5: " in " ".join(stats["drop_examples"]["bad_label"])  # rows count from 1
    samples = wds_samples(tmp_path / "out" / "train")
    assert list(samples) == [f"imgs_p{i:02d}" for i in (0, 1, 2, 3, 5)]
    for key, members in samples.items():
        i = int(key[-2:])
        assert members["txt"].decode() == f"pq caption {i}" and members["cls"] == str(i).encode()
        meta = json.loads(members["json"])
        assert meta["manifest_row"] == i + 1 and meta["tags"] == table["tags"][i].as_py()
        assert meta["score"] == (None if i == 1 else table["score"][i].as_py())
        assert pixels(members["jpg"]).shape[:2] == (SIZES[i % len(SIZES)][1], SIZES[i % len(SIZES)][0])

    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"bad\.parquet.*cannot read parquet"):
        prep_manifest(tmp_path / "bad.parquet", tmp_path / "out2", cfg())


# --------------------------------------------------------------------------- (c) COCO


def _coco(root: Path) -> dict:
    images, annotations = [], []
    for i in range(10):
        name = f"{i:012d}.jpg"
        noise_image(200 + i, *SIZES[i % 5]).save(root / "train2017" / name) if (root / "train2017").is_dir() else None
        images.append({"id": 1000 + i, "file_name": name, "width": SIZES[i % 5][0], "height": SIZES[i % 5][1]})
        for n in range(i % 3 + 1 if i != 9 else 0):  # image 1009 has no caption
            annotations.append({"id": len(annotations), "image_id": 1000 + i, "caption": f" image {i} caption {n} "})
    images.append({"id": 77})                                        # bad_row: no file_name
    annotations.append({"id": 999, "image_id": 5555, "caption": "x"})  # bad_row: unknown image
    return {"images": images, "annotations": annotations}


def test_coco_one_sample_per_image_with_all_captions_in_json(tmp_path):
    (tmp_path / "train2017").mkdir()
    data = _coco(tmp_path)
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "captions.json").write_text(json.dumps(data))

    stats = prep_coco(tmp_path / "ann" / "captions.json", tmp_path / "out", cfg(), images_dir=tmp_path / "train2017")

    assert stats["kept"] == 9 and _nonzero(stats) == {"bad_row": 2, "missing_caption": 1}
    samples = wds_samples(tmp_path / "out" / "train")
    assert list(samples) == [str(1000 + i) for i in range(9)]
    for key, members in samples.items():
        i = int(key) - 1000
        meta = json.loads(members["json"])
        assert meta["captions"] == [f"image {i} caption {n}" for n in range(i % 3 + 1)]
        assert members["txt"].decode() == "image 0 caption 0".replace("0", str(i), 1)
        assert meta["image_id"] == 1000 + i and meta["source"] == f"{i:012d}.jpg"
        # Already JPEG and not resized: the original file bytes are stored.
        assert members["jpg"] == (tmp_path / "train2017" / f"{i:012d}.jpg").read_bytes()


def test_coco_all_captions_keeps_an_image_in_one_split(tmp_path):
    (tmp_path / "train2017").mkdir()
    (tmp_path / "train2017" / "captions.json").write_text(json.dumps(_coco(tmp_path)))
    stats = prep_coco(tmp_path / "train2017" / "captions.json", tmp_path / "out", cfg(val_fraction=0.4), all_captions=True)
    n_captions = sum(i % 3 + 1 for i in range(9))
    assert stats["kept"] == n_captions and stats["dropped_by_reason"]["duplicate"] == 0
    by_split = {split: wds_samples(tmp_path / "out" / split) for split in ("train", "val")}
    assert by_split["val"] and by_split["train"]
    for split, samples in by_split.items():
        for key, members in samples.items():
            image_id, n = key.split("_")
            assert members["txt"].decode() == f"image {int(image_id) - 1000} caption {n}"
            assert split_of(json.loads(members["json"])["source"], 0.4) == split


# --------------------------------------------------------------------------- (d) img2dataset / webdataset


def _img2dataset(root: Path, n: int = 24, per_tar: int = 10) -> list[str]:
    keys = []
    for t in range(0, n, per_tar):
        members = []
        for i in range(t, min(n, t + per_tar)):
            key = f"{i:09d}"
            keys.append(key)
            w, h = SIZES[i % 5]
            members += [
                (f"{key}.jpg", encoded(noise_image(100 + i, w, h))),
                (f"{key}.txt", f"web caption {i}".encode()),
                (f"{key}.json", json.dumps({"url": f"http://example.com/{i}.jpg", "key": key, "width": w, "height": h}).encode()),
                (f"{key}.exif", b"{}"),
            ]
        tar_with(root / f"{t // per_tar:05d}.tar", members)
    tar_with(root / "99999.tar", [
        ("nocap.jpg", encoded(noise_image(1, 8, 8))),
        ("broken.jpg", b"\xff\xd8 not a jpeg"), ("broken.txt", b"broken"),
        ("onlytext.txt", b"no image"),
        ("labelled.png", encoded(noise_image(2, 32, 32), "PNG")), ("labelled.txt", b"has a label"), ("labelled.cls", b"7"),
    ])
    return keys


def test_wds_reshard_filter_resize(tmp_path):
    keys = _img2dataset(tmp_path / "in")
    stats = prep_wds(tmp_path / "in", tmp_path / "out", cfg(samples_per_shard=8, resolution=16, min_size=30))

    small = {k for k in keys if min(SIZES[int(k) % 5]) < 30}
    assert _nonzero(stats) == {"too_small": len(small), "missing_caption": 1, "missing_image": 1, "corrupt_image": 1}
    samples = wds_samples(tmp_path / "out" / "train")
    assert list(samples) == [k for k in keys if k not in small] + ["labelled"]
    for key, members in samples.items():
        assert set(members) == ({"jpg", "txt", "json", "cls"} if key == "labelled" else {"jpg", "txt", "json"})
        meta = json.loads(members["json"])
        assert (meta["width"], meta["height"]) == (16, 16) and Image.open(io.BytesIO(members["jpg"])).size == (16, 16)
        if key != "labelled":
            i = int(key)
            assert meta["url"] == f"http://example.com/{i}.jpg"  # input metadata carried over
            assert (meta["orig_width"], meta["orig_height"]) == SIZES[i % 5]
            assert members["txt"] == f"web caption {i}".encode()
    assert samples["labelled"]["cls"] == b"7"


def test_wds_reshard_without_resize_keeps_jpeg_bytes_and_mds_matches(tmp_path):
    _img2dataset(tmp_path / "in", n=12)
    prep_wds(tmp_path / "in", tmp_path / "out", cfg(samples_per_shard=5))
    originals = {}
    for tar in sorted((tmp_path / "in").glob("*.tar")):
        originals.update(tar_members(tar))
    samples = wds_samples(tmp_path / "out" / "train")
    assert len(samples) == 13
    for key, members in samples.items():
        if key != "labelled":
            assert members["jpg"] == originals[key]["jpg"]  # no second JPEG generation
    prep_wds(tmp_path / "in", tmp_path / "mds", cfg(samples_per_shard=5, output_format="mds"))
    rows = read_mds(tmp_path / "mds" / "train")
    assert [r["key"] for r in rows] == list(samples)
    assert [r["cls"] for r in rows] == [-1] * 12 + [7]  # -1: the sample has no label


# --------------------------------------------------------------------------- latents


def _pixel_check(samples, dtype) -> None:
    for sample in samples:
        latent = sample.latent
        assert latent is not None and latent.dtype == dtype
        image = pixels(sample.image)
        assert latent.shape == (3, image.shape[0], image.shape[1])
        # The pixels tokenizer is x / 127.5 - 1: inverting it must give the stored pixels back exactly.
        restored = np.round((latent.astype(np.float32) + 1.0) * 127.5).astype(np.uint8).transpose(1, 2, 0)
        assert np.array_equal(restored, image), sample.key


def test_latents_for_wds_decode_back_to_pixels(tmp_path):
    make_folder(tmp_path / "raw", 12)  # mixed sizes: batches are grouped by size
    prep_folder(tmp_path / "raw", tmp_path / "data", cfg(image_format="png", samples_per_shard=5))
    stats = precompute_latents(tmp_path / "data" / "train", tmp_path / "lat", "pixels", batch_size=2, progress=False)
    assert stats["samples"] == 12 and stats["shards_written"] == 3 and stats["dtype"] == "float16"
    assert sum(stats["latent_shapes"].values()) == 12 and "3x32x32" in stats["latent_shapes"]
    originals = wds_samples(tmp_path / "data" / "train")
    for name, samples in iter_shards(tmp_path / "lat"):
        _pixel_check(samples, np.float16)
    for key, members in wds_samples(tmp_path / "lat").items():
        assert set(members) == {"png", "txt", "json", "latent.npy"}
        assert {k: v for k, v in members.items() if k != "latent.npy"} == originals[key]  # other members unchanged
    again = precompute_latents(tmp_path / "data" / "train", tmp_path / "lat", "pixels", batch_size=2, progress=False)
    assert again["shards_written"] == 0 and again["shards_skipped"] == 3

    precompute_latents(tmp_path / "data" / "train", tmp_path / "lat32", "pixels", dtype="float32", progress=False)
    for _, samples in iter_shards(tmp_path / "lat32"):
        for sample in samples:
            expected = pixels(sample.image).transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
            assert sample.latent.dtype == np.float32 and np.array_equal(sample.latent, expected)


def test_latents_for_mds_add_a_latent_column(tmp_path):
    paths = _manifest_images(tmp_path / "data", 6)
    (tmp_path / "data" / "m.csv").write_text("image,caption,label\n" + "".join(
        f"imgs/{p.name},cap {i},{i}\n" for i, p in enumerate(paths)))
    prep_manifest(tmp_path / "data" / "m.csv", tmp_path / "mds", cfg(output_format="mds", image_format="png"))
    stats = precompute_latents(tmp_path / "mds" / "train", tmp_path / "lat", progress=False)
    assert stats["output_format"] == "mds" and stats["samples"] == 6
    rows = read_mds(tmp_path / "lat")
    assert [r["cls"] for r in rows] == list(range(6))
    for _, samples in iter_shards(tmp_path / "lat"):
        _pixel_check(samples, np.float16)
    with pytest.raises(ValueError, match="input directory"):
        precompute_latents(tmp_path / "lat", tmp_path / "lat", progress=False)


# --------------------------------------------------------------------------- CLI


def _run(argv: list[str]) -> int:
    from mmtrain import cli

    return cli.main(argv)


def test_cli_subcommands(tmp_path, capsys):
    make_folder(tmp_path / "raw", 12)
    assert _run(["prep", "folder", str(tmp_path / "raw"), "--out", str(tmp_path / "f"), "--resolution", "16",
                 "--val-fraction", "0.25", "--samples-per-shard", "4", "--workers", "2", "--quiet"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("prep folder: kept 12 of 12") and line.endswith(f"(stats: {tmp_path / 'f' / 'stats.json'})")
    stats = json.loads((tmp_path / "f" / "stats.json").read_text())
    assert stats["options"]["resolution"] == 16 and stats["run"]["workers"] == 2

    paths = _manifest_images(tmp_path / "m", 4)
    (tmp_path / "m" / "m.csv").write_text("file,text,y\n" + "".join(f"imgs/{p.name},c {i},{i}\n" for i, p in enumerate(paths)))
    assert _run(["prep", "manifest", str(tmp_path / "m" / "m.csv"), "--out", str(tmp_path / "mo"), "--format", "mds",
                 "--image-column", "file", "--caption-column", "text", "--label-column", "y", "--image-format", "png",
                 "--quiet"]) == 0
    assert [r["cls"] for r in read_mds(tmp_path / "mo" / "train")] == [0, 1, 2, 3]
    assert capsys.readouterr().out.startswith("prep manifest: kept 4 of 4")

    (tmp_path / "c" / "train2017").mkdir(parents=True)
    (tmp_path / "c" / "captions.json").write_text(json.dumps(_coco(tmp_path / "c")))
    assert _run(["prep", "coco", str(tmp_path / "c" / "captions.json"), "--images", str(tmp_path / "c" / "train2017"),
                 "--out", str(tmp_path / "co"), "--all-captions", "--quiet"]) == 0
    # 18 captions kept; 3 entries dropped while listing count as candidates too.
    assert "kept 18 of 21" in capsys.readouterr().out

    _img2dataset(tmp_path / "w", n=12)
    assert _run(["prep", "wds", str(tmp_path / "w" / "{00000..00001}.tar"), "--out", str(tmp_path / "wo"),
                 "--shard-size", "16KiB", "--min-caption-words", "3", "--quiet"]) == 0
    wo = json.loads((tmp_path / "wo" / "stats.json").read_text())
    assert wo["kept"] == 12 and wo["options"]["shard_size"] == 16384
    assert all(os.path.getsize(tmp_path / "wo" / "train" / n) <= 16384 for n in wo["splits"]["train"]["shard_files"])

    assert _run(["prep", "latents", str(tmp_path / "f" / "train"), "--out", str(tmp_path / "lat"), "--dtype", "float32",
                 "--batch-size", "3", "--quiet"]) == 0
    assert "latent shapes 3x16x16 float32" in capsys.readouterr().out
    assert file_bytes(tmp_path / "lat").keys() >= set(stats["splits"]["train"]["shard_files"])


def test_cli_bad_input_exits_2_with_the_reason(tmp_path, capsys):
    assert _run(["prep", "folder", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "nowhere" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _run(["prep", "folder", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "no images" in capsys.readouterr().err
    assert _run(["prep", "folder", str(tmp_path), "--out", str(tmp_path / "o"), "--resolution", "8",
                 "--resize-mode", "none", "--quiet"]) == 2
    assert "resolution" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(["prep", "wds", "x", "--out", "y", "--shard-size", "lots"])
