"""Tests for mmtrain.data.prep: raw datasets -> webdataset tar / MDS shards, on real files.

Every dataset here is generated on the fly with PIL (tiny noise images, each
seed distinct), written to real folders, CSV/JSONL/COCO files and tars, and
read back from the real shards (tarfile, our readers, streaming.StreamingDataset).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmtrain.data.prep import (
    DROP_REASONS,
    PrepConfig,
    prep_folder,
)
from mmtrain.data.sources import iter_shards
from mmtrain.data.prep.split import split_of
from mmtrain.data.shards import list_shards
from mmtrain.data.sources import iter_samples

# --------------------------------------------------------------------------- data


def noise_image(seed: int, width: int, height: int) -> Image.Image:
    """Random RGB pixels: every seed gives a distinct image (no accidental duplicates)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def save(image: Image.Image, path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


SIZES = [(32, 32), (48, 24), (24, 40), (40, 40), (64, 32)]


def make_folder(root: Path, n: int = 20, start: int = 0) -> dict[str, dict]:
    """``n`` captioned PNGs in ``root`` and ``root/sub``; returns {expected key: info}."""
    info = {}
    for i in range(start, start + n):
        sub = "sub/" if i % 3 == 0 else ""
        w, h = SIZES[i % len(SIZES)]
        # compress_level=1: not PIL's default, so a re-encoded copy has different bytes.
        path = save(noise_image(i, w, h), root / f"{sub}img{i:03d}.png", compress_level=1)
        caption = f"a photo of thing number {i}"
        path.with_suffix(".txt").write_text(caption + "\n")
        info[f"{sub.replace('/', '_')}img{i:03d}"] = {"size": (w, h), "caption": caption, "path": path,
                                                      "rel": f"{sub}img{i:03d}.png"}
    return info


def tar_with(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return path


def encoded(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def tar_members(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} of one tar, in file order."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def wds_samples(directory: Path) -> dict[str, dict[str, bytes]]:
    """All samples of a shard directory, in shard order."""
    out: dict[str, dict[str, bytes]] = {}
    for path in list_shards(directory):
        out.update(tar_members(Path(path)))
    return out


def keys_by_shard(source) -> dict[str, list[str]]:
    return {name: [s.key for s in samples] for name, samples in iter_shards(source)}


def file_bytes(directory: Path) -> dict[str, bytes]:
    """Every visible file's bytes, for byte-identical comparisons."""
    return {n: (directory / n).read_bytes() for n in sorted(os.listdir(directory)) if not n.startswith(".")}


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def cfg(**kw) -> PrepConfig:
    kw.setdefault("samples_per_shard", 8)
    return PrepConfig(progress=False, **kw)


def read_mds(directory: Path) -> list[dict]:
    """All rows of an MDS directory through streaming's own dataset class."""
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(directory), shuffle=False, batch_size=1)
    return [ds[i] for i in range(len(ds))]


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"samples_per_shard": 0}, "samples_per_shard"),
    ({"output_format": "parquet"}, "output_format"),
    ({"image_format": "gif"}, "image_format"),
    ({"resize_mode": "none", "resolution": 64}, "resolution"),
    ({"max_aspect": 0.5}, "max_aspect"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"min_caption_words": 5, "max_caption_words": 2}, "max_caption_words"),
    ({"prefix": "a/b"}, "prefix"),
    ({"workers": 0}, "workers"),
])
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PrepConfig(**kwargs).validate()


# --------------------------------------------------------------------------- (a) folder


def test_folder_to_wds_schema_and_bad_files_counted(tmp_path):
    raw = tmp_path / "raw"
    info = make_folder(raw, 20)
    (raw / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (raw / "broken.txt").write_text("broken image")
    truncated = encoded(noise_image(999, 40, 40), "PNG")
    (raw / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
    (raw / "truncated.txt").write_text("cut in half")
    save(noise_image(1000, 32, 32), raw / "nocap.png")
    save(noise_image(1001, 32, 32), raw / "empty.png")
    (raw / "empty.txt").write_text("  \n")

    stats = prep_folder(raw, tmp_path / "out", cfg(resolution=16))

    assert stats["kept"] == 20 and stats["candidates"] == 24
    assert set(stats["dropped_by_reason"]) == set(DROP_REASONS)
    dropped = {r: n for r, n in stats["dropped_by_reason"].items() if n}
    assert dropped == {"corrupt_image": 2, "missing_caption": 1, "empty_caption": 1}
    assert any(line.startswith("broken (broken.jpg)") for line in stats["drop_examples"]["corrupt_image"])
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == json.loads(json.dumps(stats))
    # Originals whose header was read: the 20 kept + the truncated PNG (caption checks come first).
    assert stats["resolution_histogram"] == {"0-63": 21}
    shards = list_shards(tmp_path / "out" / "train")
    assert [os.path.basename(p) for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]

    samples = wds_samples(tmp_path / "out" / "train")
    assert set(samples) == set(info)
    for key, members in samples.items():
        assert set(members) == {"jpg", "txt", "json"}, key
        assert members["txt"].decode() == info[key]["caption"]
        meta = json.loads(members["json"])
        assert meta["source"] == info[key]["rel"]
        assert (meta["width"], meta["height"]) == (16, 16)
        assert (meta["orig_width"], meta["orig_height"]) == info[key]["size"]
        with Image.open(io.BytesIO(members["jpg"])) as im:
            assert im.format == "JPEG" and im.size == (16, 16)
    # The existing shard reader (used by training) reads prep output unchanged.
    decoded = list(iter_samples(tmp_path / "out" / "train"))
    assert sorted(s["key"] for s in decoded) == sorted(info)
    assert all(s["image"].size == (16, 16) and s["attributes"]["source"] for s in decoded)


def test_png_output_is_lossless_and_passes_source_bytes_through(tmp_path):
    info = make_folder(tmp_path / "raw", 10)
    prep_folder(tmp_path / "raw", tmp_path / "out", cfg(image_format="png"))
    samples = wds_samples(tmp_path / "out" / "train")
    for key, members in samples.items():
        # Nothing to change (PNG, RGB, no resize): the stored bytes are the source file's.
        assert members["png"] == info[key]["path"].read_bytes(), key
    prep_folder(tmp_path / "raw", tmp_path / "out2", cfg(image_format="png", passthrough=False))
    for key, members in wds_samples(tmp_path / "out2" / "train").items():
        assert members["png"] != info[key]["path"].read_bytes()  # re-encoded...
        assert np.array_equal(pixels(members["png"]), pixels(info[key]["path"].read_bytes())), key  # ...losslessly


def test_exif_orientation_is_applied(tmp_path):
    raw = tmp_path / "raw"
    image = noise_image(7, 40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    save(image, raw / "rotated.jpg", exif=exif.tobytes(), quality=95).with_suffix(".txt").write_text("turned")
    save(image, raw / "upright.jpg", quality=95).with_suffix(".txt").write_text("as is")
    prep_folder(raw, tmp_path / "out", cfg(dedup=False))
    samples = wds_samples(tmp_path / "out" / "train")
    rotated = Image.open(io.BytesIO(samples["rotated"]["jpg"]))
    assert rotated.size == (20, 40) and rotated.getexif().get(0x0112) is None
    meta = json.loads(samples["rotated"]["json"])
    assert (meta["width"], meta["height"], meta["orig_width"], meta["orig_height"]) == (20, 40, 20, 40)
    assert samples["upright"]["jpg"] == (raw / "upright.jpg").read_bytes()  # nothing to fix: passed through


@pytest.mark.parametrize(("mode", "expected"), [
    ("center_crop", {(32, 32): (16, 16), (48, 24): (16, 16), (24, 40): (16, 16)}),
    ("keep_aspect", {(32, 32): (16, 16), (48, 24): (32, 16), (24, 40): (16, 27)}),
])
def test_resize_modes(tmp_path, mode, expected):
    info = make_folder(tmp_path / "raw", 3)
    prep_folder(tmp_path / "raw", tmp_path / "out", cfg(resolution=16, resize_mode=mode, image_format="png"))
    for key, members in wds_samples(tmp_path / "out" / "train").items():
        size = Image.open(io.BytesIO(members["png"])).size
        assert size == expected[info[key]["size"]], key
        meta = json.loads(members["json"])
        assert (meta["width"], meta["height"]) == size


def test_folder_to_mds_matches_wds(tmp_path):
    make_folder(tmp_path / "raw", 20)
    prep_folder(tmp_path / "raw", tmp_path / "wds", cfg(image_format="png", val_fraction=0.25))
    stats = prep_folder(tmp_path / "raw", tmp_path / "mds", cfg(image_format="png", val_fraction=0.25, output_format="mds"))
    for split in ("train", "val"):
        directory = tmp_path / "mds" / split
        assert (directory / "index.json").is_file()
        assert not [n for n in os.listdir(directory) if n.startswith(".")]  # no temp dirs left
        rows = read_mds(directory)
        assert len(rows) == stats["splits"][split]["samples"] > 0
        wds = wds_samples(tmp_path / "wds" / split)
        assert [r["key"] for r in rows] == list(wds)
        for row in rows:
            assert row["image"] == wds[row["key"]]["png"]
            assert row["caption"] == wds[row["key"]]["txt"].decode()
            assert row["json"] == json.loads(wds[row["key"]]["json"])
            assert "cls" not in row  # no labels in a folder source


# --------------------------------------------------------------------------- filters, dedup


def test_filters_and_duplicates_drop_exactly_the_right_samples(tmp_path):
    raw = tmp_path / "raw"
    make_folder(raw, 12)
    save(noise_image(500, 10, 30), raw / "small.png").with_suffix(".txt").write_text("a small picture here")
    save(noise_image(501, 80, 20), raw / "wide.png").with_suffix(".txt").write_text("a wide picture here")
    save(noise_image(502, 32, 32), raw / "terse.png").with_suffix(".txt").write_text("cat")
    save(noise_image(503, 32, 32), raw / "verbose.png").with_suffix(".txt").write_text(" ".join(["word"] * 12))
    # Lossless copies of img001 (same pixels, other files) in later chunks and another folder,
    # and a JPEG copy whose pixels differ (not an exact duplicate).
    original = Image.open(raw / "img001.png")
    save(original, raw / "zz" / "copy1.png").with_suffix(".txt").write_text("the same image again")
    original.save(raw / "zz" / "copy2.webp", lossless=True)
    (raw / "zz" / "copy2.txt").write_text("same pixels as webp")
    original.save(raw / "zz" / "lossy.jpg", quality=50)
    (raw / "zz" / "lossy.txt").write_text("a lossy copy of it")

    stats = prep_folder(raw, tmp_path / "out", cfg(min_size=16, max_aspect=3.0, min_caption_words=2,
                                                   max_caption_words=8, samples_per_shard=5))
    dropped = {r: n for r, n in stats["dropped_by_reason"].items() if n}
    assert dropped == {"too_small": 1, "bad_aspect": 1, "caption_too_short": 1, "caption_too_long": 1, "duplicate": 2}
    kept = set(wds_samples(tmp_path / "out" / "train"))
    assert {"small", "wide", "terse", "verbose", "zz_copy1", "zz_copy2"}.isdisjoint(kept)
    assert {"img001", "zz_lossy"} <= kept and len(kept) == 13
    assert all("'img001'" in line for line in stats["drop_examples"]["duplicate"])

    stats = prep_folder(raw, tmp_path / "nodedup", cfg(dedup=False))
    assert stats["dropped_by_reason"]["duplicate"] == 0 and stats["kept"] == 19


# --------------------------------------------------------------------------- split, workers


def test_split_is_deterministic_disjoint_and_independent_of_workers(tmp_path):
    info = make_folder(tmp_path / "raw", 40)
    stats1 = prep_folder(tmp_path / "raw", tmp_path / "w1", cfg(val_fraction=0.3, resolution=16))
    stats2 = prep_folder(tmp_path / "raw", tmp_path / "w2", cfg(val_fraction=0.3, resolution=16, workers=2))
    train = set(wds_samples(tmp_path / "w1" / "train"))
    val = set(wds_samples(tmp_path / "w1" / "val"))
    assert train.isdisjoint(val) and train | val == set(info)
    assert val == {k for k in info if split_of(info[k]["rel"], 0.3) == "val"}
    # split_of sends the asked fraction to val: 30% of 10 000 names within 1.5 points (3.3 sigma)
    assert abs(sum(split_of(f"g{i}", 0.3) == "val" for i in range(10_000)) / 10_000 - 0.3) < 0.015
    assert {split_of(f"g{i}", 0.0) for i in range(1000)} == {"train"}
    for split in ("train", "val"):
        # Same samples, same shards, same bytes, whatever the worker count.
        assert file_bytes(tmp_path / "w1" / split) == file_bytes(tmp_path / "w2" / split)
        assert stats1["splits"][split] == stats2["splits"][split]
    # The split is per sample: other shard sizes or a grown dataset keep every old assignment.
    make_folder(tmp_path / "raw", 10, start=40)
    prep_folder(tmp_path / "raw", tmp_path / "grown", cfg(val_fraction=0.3, samples_per_shard=5))
    assert val <= set(wds_samples(tmp_path / "grown" / "val"))
    assert train <= set(wds_samples(tmp_path / "grown" / "train"))


# --------------------------------------------------------------------------- resume


def _dataset_with_duplicates(raw: Path) -> None:
    make_folder(raw, 30)
    Image.open(raw / "img004.png").save(raw / "zz_dup.png")  # duplicate of a chunk-0 image, late in the order
    (raw / "zz_dup.txt").write_text("duplicate in a later chunk")
    (raw / "img007.png").write_bytes(b"garbage")  # corrupt


def test_resume_rewrites_only_the_missing_shard(tmp_path):
    raw = tmp_path / "raw"
    _dataset_with_duplicates(raw)
    options = cfg(val_fraction=0.2, resolution=16)
    clean = prep_folder(raw, tmp_path / "clean", options)
    out = tmp_path / "out"
    first = prep_folder(raw, out, options)
    assert first["run"]["chunks_written"] == first["run"]["chunks_total"] >= 4
    train = out / "train"
    before = {n: os.stat(train / n).st_mtime_ns for n in os.listdir(train)}
    os.remove(train / "shard-000000.tar")  # holds img004, which the late duplicate is checked against
    (train / ".shard-000001.tar.tmp").write_bytes(b"half a shard from a killed run")
    with open(train / "shard-000002.tar", "r+b") as f:  # outside damage: truncated final shard
        f.truncate(1000)

    again = prep_folder(raw, out, options)

    assert again["run"]["chunks_written"] == 2
    assert again["run"]["chunks_skipped"] == again["run"]["chunks_total"] - 2
    after = {n: os.stat(train / n).st_mtime_ns for n in os.listdir(train)}
    rewritten = {"shard-000000.tar", "shard-000002.tar"}
    untouched = set(before) - rewritten - {n + ".index.json" for n in rewritten}
    assert {n: after[n] for n in untouched} == {n: before[n] for n in untouched}
    assert not [n for n in os.listdir(train) if n.startswith(".")]  # stale temp removed
    for split in ("train", "val"):
        assert file_bytes(out / split) == file_bytes(tmp_path / "clean" / split)
    for field in ("kept", "dropped_by_reason", "splits", "resolution_histogram", "caption_length_histogram"):
        assert again[field] == clean[field], field
    assert again["dropped_by_reason"]["duplicate"] == 1 and again["dropped_by_reason"]["corrupt_image"] == 1
    progress = json.loads((out / "progress.json").read_text())
    assert progress["complete"] and [r["chunks_written"] for r in progress["runs"]] == [first["run"]["chunks_total"], 2]
    assert prep_folder(raw, out, options)["run"]["chunks_written"] == 0
    # Only the worker count changed: still the same run, nothing redone.
    assert prep_folder(raw, out, cfg(val_fraction=0.2, resolution=16, workers=2))["run"]["chunks_written"] == 0


def test_resume_after_a_lost_chunk_record(tmp_path):
    raw = tmp_path / "raw"
    _dataset_with_duplicates(raw)
    options = cfg(resolution=16)
    prep_folder(raw, tmp_path / "clean", options)
    out = tmp_path / "out"
    stats = prep_folder(raw, out, options)
    # A run killed after renaming the last shard but before saving its record.
    last = stats["run"]["chunks_total"] - 1
    os.remove(out / ".prep" / "chunks" / f"train-{last:06d}.json")
    again = prep_folder(raw, out, options)
    assert again["run"]["chunks_written"] == 1
    assert file_bytes(out / "train") == file_bytes(tmp_path / "clean" / "train")


KILL_SCRIPT = """
import sys
from mmtrain.data.prep import PrepConfig, prep_folder
prep_folder(sys.argv[1], sys.argv[2], PrepConfig(samples_per_shard=4, resolution=96, progress=False))
"""


def test_a_killed_run_leaves_only_complete_shards_and_resumes(tmp_path):
    raw = tmp_path / "raw"
    for i in range(96):
        save(noise_image(i, 160, 128), raw / f"img{i:03d}.png").with_suffix(".txt").write_text(f"big picture {i}")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(raw), str(out)])
    try:
        deadline = time.time() + 60
        while not (out / "train" / "shard-000002.tar").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)  # no cleanup handlers run: a real crash
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed in the middle, not finished before the signal
    finished = list_shards(out / "train")
    assert 3 <= len(finished) < 96 // 4
    for path in finished:  # every shard under a final name is complete
        assert len(tar_members(Path(path))) == 4, path

    again = prep_folder(raw, out, PrepConfig(samples_per_shard=4, resolution=96, progress=False))
    # The newest shard may have been renamed just before its record was saved: that chunk is redone.
    assert again["run"]["chunks_skipped"] >= len(finished) - 1 and again["kept"] == 96
    assert again["run"]["chunks_written"] == again["run"]["chunks_total"] - again["run"]["chunks_skipped"] >= 1
    prep_folder(raw, tmp_path / "clean", PrepConfig(samples_per_shard=4, resolution=96, progress=False))
    assert file_bytes(out / "train") == file_bytes(tmp_path / "clean" / "train")
    assert not [n for n in os.listdir(out / "train") if n.startswith(".")]


def test_mds_resume_rewrites_only_the_missing_shard(tmp_path):
    raw = tmp_path / "raw"
    _dataset_with_duplicates(raw)
    options = cfg(output_format="mds", resolution=16)
    prep_folder(raw, tmp_path / "clean", options)
    out = tmp_path / "out"
    prep_folder(raw, out, options)
    os.remove(out / "train" / "shard.00001.mds")
    (out / "train" / ".tmp-train-000002").mkdir()  # temp dir of a killed chunk
    again = prep_folder(raw, out, options)
    assert again["run"]["chunks_written"] == 1
    assert file_bytes(out / "train") == file_bytes(tmp_path / "clean" / "train")  # shards and index.json
    assert not (out / "train" / ".tmp-train-000002").exists()
    assert [r["key"] for r in read_mds(out / "train")] == [r["key"] for r in read_mds(tmp_path / "clean" / "train")]


def test_changed_options_or_foreign_shards_need_overwrite(tmp_path):
    make_folder(tmp_path / "raw", 10)
    out = tmp_path / "out"
    prep_folder(tmp_path / "raw", out, cfg())
    with pytest.raises(ValueError, match=r"resolution: 0 -> 16.*overwrite"):
        prep_folder(tmp_path / "raw", out, cfg(resolution=16))
    assert len(list_shards(out / "train")) == 2  # the refused run touched nothing
    stats = prep_folder(tmp_path / "raw", out, cfg(resolution=16, overwrite=True))
    assert stats["run"]["chunks_written"] == 2
    prep_folder(tmp_path / "raw", tmp_path / "clean16", cfg(resolution=16))
    assert file_bytes(out / "train") == file_bytes(tmp_path / "clean16" / "train")

    foreign = tmp_path / "foreign"
    tar_with(foreign / "train" / "shard-000000.tar", [("x.txt", b"not ours")])
    with pytest.raises(ValueError, match="did not write"):
        prep_folder(tmp_path / "raw", foreign, cfg())
    assert (foreign / "train" / "shard-000000.tar").is_file()


# --------------------------------------------------------------------------- shard size


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_shard_size_limit_spills_into_more_shards(tmp_path, fmt):
    make_folder(tmp_path / "raw", 20)
    unlimited = prep_folder(tmp_path / "raw", tmp_path / "a", cfg(image_format="png", samples_per_shard=10, output_format=fmt))
    limit = 24 * 1024
    limited = prep_folder(tmp_path / "raw", tmp_path / "b", cfg(image_format="png", samples_per_shard=10,
                                                              shard_size=limit, output_format=fmt))
    assert unlimited["splits"]["train"]["shards"] == 2
    assert limited["splits"]["train"]["shards"] > 2
    sizes = [os.path.getsize(tmp_path / "b" / "train" / n) for n in limited["splits"]["train"]["shard_files"]]
    assert max(sizes) <= limit
    flat = [k for keys in keys_by_shard(tmp_path / "b" / "train").values() for k in keys]
    assert flat == [k for keys in keys_by_shard(tmp_path / "a" / "train").values() for k in keys]
    assert limited["splits"]["train"]["shard_files"][-1].endswith(
        f"{limited['splits']['train']['shards'] - 1:06d}.tar" if fmt == "wds" else f"{limited['splits']['train']['shards'] - 1:05d}.mds")
