"""The web-document converters: OBELICS / OmniCorpus parquet and MMC4 JSON lines, images fetched from a local
HTTP server (one URL dead, one image undecodable), given as bytes or as local paths; malformed rows counted."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from storage_servers import restore_env, set_env, start_http

from mmtrain import cli
from mmtrain.data.documents import DocImage, Document, MissingImage
from mmtrain.data.prep.fetch import ImageFetcher, ImageRef, fetch_image
from mmtrain.data.prep.sources.mmc4 import iter_mmc4
from mmtrain.data.prep.sources.obelics import iter_obelics
from mmtrain.data.prep.web_documents import new_stats, resolve_documents
from mmtrain.data.sources import iter_documents

COLORS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 210), "gray": (128, 128, 128),
          "yellow": (230, 220, 30), "cyan": (20, 210, 220)}


def _png(color: tuple[int, int, int], size: tuple[int, int] = (24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _color(image: DocImage) -> str:
    """The name of the colour nearest to the image's centre pixel (re-encoded JPEGs shift it a little)."""
    pixels = np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB"), dtype=np.int64)
    centre = pixels[pixels.shape[0] // 2, pixels.shape[1] // 2]
    return min(COLORS, key=lambda name: int(np.abs(centre - COLORS[name]).sum()))


def _shape(doc: Document) -> list[str]:
    """Text segments as themselves, images as their colour name, a missing image as its reason."""
    return [s if isinstance(s, str) else f"({s.reason})" if isinstance(s, MissingImage) else f"<{_color(s)}>"
            for s in doc.segments]


def _nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {r: n for r, n in counts.items() if n}


@pytest.fixture
def web(tmp_path):
    """An HTTP server on 127.0.0.1 serving red.png, green.png, ... and broken.jpg (not an image)."""
    root = tmp_path / "www"
    root.mkdir()
    for name, color in COLORS.items():
        (root / f"{name}.png").write_bytes(_png(color))
    (root / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    base, server = start_http(str(root))
    old = set_env({"MMTRAIN_IO_RETRIES": "1", "MMTRAIN_IO_BACKOFF_S": "0.01", "MMTRAIN_IO_TIMEOUT_S": "5"})
    yield base
    restore_env(old)
    server.shutdown()


def _obelics_parquets(root: Path, base: str) -> list[Path]:
    """Two parquet files: web.parquet (images a list<string> column: URLs and a local path, with the malformed rows)
    and bytes.parquet (images a list<binary> column: the encoded images themselves)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "local").mkdir(parents=True, exist_ok=True)
    (root / "local" / "gray.png").write_bytes(_png(COLORS["gray"]))
    rows = [
        # 0: URLs, one of them dead (404); metadata parallel to the items
        {"images": [f"{base}/red.png", None, f"{base}/missing.png", None, f"{base}/green.png"],
         "texts": [None, "first text", None, "second text", None],
         "metadata": json.dumps([{"original_width": 24}, None, {"original_width": 1}, None, {"alt": "green"}]),
         "general_metadata": json.dumps({"url": "https://example.com/doc0"})},
        # 1: unequal lengths -> dropped
        {"images": [f"{base}/red.png", None], "texts": [None, "a", "b"], "metadata": None, "general_metadata": None},
        # 2: text first, a local relative path and an undecodable image
        {"images": [None, "local/gray.png", f"{base}/broken.jpg", None], "texts": ["intro", None, None, "end"],
         "metadata": None, "general_metadata": json.dumps({"url": "https://example.com/doc2"})},
        # 3: both null at index 1 -> dropped
        {"images": [f"{base}/blue.png", None], "texts": [None, None], "metadata": None, "general_metadata": None},
        # 4: both set at index 0 -> dropped
        {"images": [f"{base}/blue.png"], "texts": ["x"], "metadata": None, "general_metadata": None},
        # 5: metadata that is not JSON -> dropped
        {"images": [f"{base}/blue.png"], "texts": [None], "metadata": "{not json", "general_metadata": None},
        # 6: plain, kept whole
        {"images": [None, f"{base}/blue.png"], "texts": ["caption first", None], "metadata": None,
         "general_metadata": None},
    ]
    web = root / "web.parquet"
    pq.write_table(pa.table({
        "images": pa.array([r["images"] for r in rows], type=pa.list_(pa.string())),
        "texts": pa.array([r["texts"] for r in rows], type=pa.list_(pa.string())),
        "metadata": pa.array([r["metadata"] for r in rows], type=pa.string()),
        "general_metadata": pa.array([r["general_metadata"] for r in rows], type=pa.string()),
    }), web)
    inline = root / "bytes.parquet"
    pq.write_table(pa.table({
        "images": pa.array([[_png(COLORS["yellow"]), None, _png(COLORS["cyan"])]], type=pa.list_(pa.binary())),
        "texts": pa.array([[None, "between two inline images", None]], type=pa.list_(pa.string())),
    }), inline)
    return [web, inline]


OBELICS_EXPECTED = {  # key -> segments (images by colour), in output order
    "web-00000000": ["<red>", "first text", "second text", "<green>"],
    "web-00000002": ["intro", "<gray>", "end"],
    "web-00000006": ["caption first", "<blue>"],
    "bytes-00000000": ["<yellow>", "between two inline images", "<cyan>"],
}


def test_obelics_source_places_failures_where_the_images_were(tmp_path, web):
    paths = _obelics_parquets(tmp_path / "data", web)
    stats = new_stats()
    with ImageFetcher(workers=4) as fetcher:
        docs = list(resolve_documents(iter_obelics(paths, stats), fetcher))
    assert [(d.key, _shape(d)) for d in docs] == [
        ("web-00000000", ["<red>", "first text", "(image_unfetchable)", "second text", "<green>"]),
        ("web-00000002", ["intro", "<gray>", "(image_undecodable)", "end"]),
        ("web-00000006", ["caption first", "<blue>"]),
        ("bytes-00000000", ["<yellow>", "between two inline images", "<cyan>"])]
    dead, broken = docs[0].segments[2], docs[1].segments[2]
    assert dead.detail.startswith(f"{paths[0]} row 0 index 2: cannot get {web}/missing.png") and "404" in dead.detail
    assert dead.meta == {"original_width": 1, "source": f"{web}/missing.png"}
    assert broken.detail.startswith(f"{paths[0]} row 2 index 2: {web}/broken.jpg: cannot decode image")
    assert _nonzero(dict(stats.document_drops)) == {"document_bad_metadata": 1, "document_lengths_differ": 1,
                                                    "document_item_empty": 1, "document_item_both": 1}


def test_prep_obelics_cli_round_trip(tmp_path, web):
    paths = _obelics_parquets(tmp_path / "data", web)
    out = tmp_path / "out"
    assert cli.main(["prep", "obelics", *map(str, paths), "--out", str(out), "--workers", "4", "--quiet"]) == 0
    docs = list(iter_documents(out / "train"))
    assert [(d.key, _shape(d)) for d in docs] == list(OBELICS_EXPECTED.items())
    first = docs[0]
    assert first.meta["url"] == "https://example.com/doc0" and first.meta["source"] == f"{paths[0]} row 0"
    assert first.segments[0].meta == {"original_width": 24, "source": f"{web}/red.png"}
    assert first.segments[3].meta["alt"] == "green"
    assert first.segments[0].ext == "png" and first.segments[0].data == _png(COLORS["red"])  # stored as fetched
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["documents_in"], stats["documents"], stats["images"]) == (4, 4, 6)
    assert _nonzero(stats["dropped_documents"]) == {"document_bad_metadata": 1, "document_lengths_differ": 1,
                                                    "document_item_empty": 1, "document_item_both": 1}
    assert _nonzero(stats["dropped_images"]) == {"image_unfetchable": 1, "image_undecodable": 1}
    assert {"document_bad_row", "image_missing_file", "image_below_min_sim"} <= set(stats["dropped_documents"]) | \
        set(stats["dropped_images"])  # every reason listed, zeros included
    examples = stats["drop_examples"]
    assert f"{paths[0]} row 1 (key 'web-00000001'): images has 2 entries, texts 3" in examples["document_lengths_differ"][0]
    assert "row 3" in examples["document_item_empty"][0] and "index 1" in examples["document_item_empty"][0]
    assert "row 4" in examples["document_item_both"][0] and "row 5" in examples["document_bad_metadata"][0]
    assert "row 0 index 2" in examples["image_unfetchable"][0] and "missing.png" in examples["image_unfetchable"][0]
    assert "row 2 index 2" in examples["image_undecodable"][0] and "broken.jpg" in examples["image_undecodable"][0]


def test_prep_obelics_resizes_splits_and_writes_mds(tmp_path, web):
    paths = _obelics_parquets(tmp_path / "data", web)
    out = tmp_path / "mds"
    assert cli.main(["prep", "obelics", str(paths[1]), "--out", str(out), "--format", "mds", "--resolution", "8",
                     "--resize-mode", "center_crop", "--max-images", "1", "--quiet"]) == 0
    docs = list(iter_documents(out / "train"))
    assert [(d.key, _shape(d)) for d in docs] == [("bytes-00000000", ["<yellow>", "between two inline images"]),
                                                  ("bytes-00000000_1", ["<cyan>"])]
    assert all(Image.open(io.BytesIO(im.data)).size == (8, 8) for d in docs for im in d.images)


def test_obelics_whole_file_problems_raise(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        iter_obelics([tmp_path / "nope.parquet"], new_stats())
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "pairs.parquet")
    with pytest.raises(ValueError, match=r"pairs.parquet: no column images, texts"):
        iter_obelics([tmp_path / "pairs.parquet"], new_stats())
    # the CLI: exit code 2 and nothing written
    assert cli.main(["prep", "obelics", str(tmp_path / "pairs.parquet"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert not (tmp_path / "o").exists()


def test_fetch_failures_name_the_place_and_the_reason(web):
    from conftest import free_port

    got = fetch_image(ImageRef(f"{web}/red.png", "here", {"k": 1}))
    assert isinstance(got, DocImage) and got.ext == "png" and got.meta == {"k": 1, "source": f"{web}/red.png"}
    refused = fetch_image(ImageRef(f"http://127.0.0.1:{free_port()}/x.png", "doc 7 index 0"))
    assert isinstance(refused, MissingImage) and refused.reason == "image_unfetchable"
    assert refused.detail.startswith("doc 7 index 0: cannot get http://127.0.0.1:") and "failed 2 times" in refused.detail
    missing = fetch_image(ImageRef("/no/such/file.png", "row 1"))
    assert missing.reason == "image_missing_file" and "/no/such/file.png" in missing.detail
    not_image = fetch_image(ImageRef(b"GIF89a garbage", "row 2"))
    assert not_image.reason == "image_undecodable" and not_image.detail.startswith("row 2: the image bytes: cannot decode")


def _mmc4_jsonl(root: Path, base: str) -> tuple[Path, Path]:
    """docs.jsonl and the folder of its images (the files named by image_name; the same files the server has)."""
    images = root / "images"
    images.mkdir(parents=True)
    for name, color in COLORS.items():
        (images / f"{name}.png").write_bytes(_png(color))

    def info(name: str, index: int, sim: float) -> dict:
        return {"image_name": f"{name}.png", "raw_url": f"{base}/{name}.png", "matched_text_index": index,
                "matched_sim": sim, "face_detections": None}

    docs = [
        {"text_list": ["S0.", "S1.", "S2.", "S3."], "url": "https://example.com/a", "could_have_url_duplicate": 0,
         "image_info": [info("red", 2, 0.30), info("green", 0, 0.10), info("blue", 2, 0.50), info("gray", 3, 0.28)]},
        "not json at all",
        {"text_list": ["T0.", "T1."], "image_info": [info("yellow", 5, 0.9)]},  # index out of range
        {"text_list": ["U0.", "U1.", "U2."], "url": "https://example.com/c",
         "image_info": [info("cyan", 1, 0.4)]},
        {"text_list": "not a list", "image_info": []},
    ]
    path = root / "docs.jsonl"
    path.write_text("\n".join(d if isinstance(d, str) else json.dumps(d) for d in docs) + "\n\n")
    return path, images


MMC4_EXPECTED = {
    # min_sim 0.2 drops green (0.10); max 2 per document keeps blue (0.50) and red (0.30), drops gray (0.28);
    # red and blue both before S2 in image_info order; S0 S1 merged, S2 S3 merged
    "docs-00000001": ["S0. S1.", "<red>", "<blue>", "S2. S3."],
    "docs-00000004": ["U0.", "<cyan>", "U1. U2."],
}


@pytest.mark.parametrize("source", ["images", "fetch"])
def test_prep_mmc4_places_filters_and_caps(tmp_path, web, source):
    path, images = _mmc4_jsonl(tmp_path / "data", web)
    out = tmp_path / "out"
    where = ["--images", str(images)] if source == "images" else ["--fetch"]
    assert cli.main(["prep", "mmc4", str(path), *where, "--out", str(out), "--min-sim", "0.2",
                     "--max-images-per-doc", "2", "--workers", "3", "--quiet"]) == 0
    docs = list(iter_documents(out / "train"))
    assert [(d.key, _shape(d)) for d in docs] == list(MMC4_EXPECTED.items())
    assert docs[0].meta == {"url": "https://example.com/a", "could_have_url_duplicate": 0, "source": f"{path} line 1"}
    red = docs[0].segments[1]
    assert red.meta["matched_sim"] == 0.30 and red.meta["image_name"] == "red.png" and red.meta["matched_text_index"] == 2
    stats = json.loads((out / "stats.json").read_text())
    assert _nonzero(stats["dropped_documents"]) == {"document_bad_row": 3}
    assert _nonzero(stats["dropped_images"]) == {"image_below_min_sim": 1, "image_over_max_images": 1}
    bad = stats["drop_examples"]["document_bad_row"]
    assert bad[0].startswith(f"{path} line 2 (key 'docs-00000002'): ")
    assert bad[1].startswith(f"{path} line 3") and "matched_text_index 5 is not an index of text_list" in bad[1]
    assert bad[2].startswith(f"{path} line 5") and "text_list" in bad[2]
    assert "image_info[1]: matched_sim 0.1000 < --min-sim 0.2" in stats["drop_examples"]["image_below_min_sim"][0]
    assert "image_info[3]" in stats["drop_examples"]["image_over_max_images"][0]
    assert stats["source"]["kind"] == "mmc4"


def test_prep_mmc4_missing_image_file_and_fetch_failures(tmp_path, web):
    path, images = _mmc4_jsonl(tmp_path / "data", web)
    (images / "blue.png").unlink()
    (images / "red.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert cli.main(["prep", "mmc4", str(path), "--images", str(images), "--out", str(out), "--quiet"]) == 0
    docs = list(iter_documents(out / "train"))
    # defaults: --min-sim 0.24 drops green only, 6 per document keeps the rest
    assert [(d.key, _shape(d)) for d in docs] == [("docs-00000001", ["S0. S1.", "S2.", "<gray>", "S3."]),
                                                  ("docs-00000004", ["U0.", "<cyan>", "U1. U2."])]
    stats = json.loads((out / "stats.json").read_text())
    assert _nonzero(stats["dropped_images"]) == {"image_below_min_sim": 1, "image_missing_file": 1, "image_undecodable": 1}
    assert "blue.png" in stats["drop_examples"]["image_missing_file"][0]
    assert f"{path} line 1 image_info[0]" in stats["drop_examples"]["image_undecodable"][0]


def test_mmc4_defaults_and_argument_errors(tmp_path, web):
    from mmtrain.data.prep.sources.mmc4 import DEFAULT_MAX_IMAGES, DEFAULT_MIN_SIM

    path, images = _mmc4_jsonl(tmp_path / "data", web)
    raws = list(iter_mmc4([path], new_stats(), images_dir=str(images)))
    assert (DEFAULT_MIN_SIM, DEFAULT_MAX_IMAGES) == (0.24, 6)
    assert [type(i).__name__ for i in raws[0].items] == ["str", "ImageRef", "ImageRef", "str", "ImageRef", "str"]
    import zipfile

    zipped = tmp_path / "docs.jsonl.zip"  # MMC4's downloads: one JSON-lines file in a zip
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.write(path, "docs.jsonl")
    def sources(docs: list) -> list:
        return [(r.key, [i if isinstance(i, str) else i.source for i in r.items]) for r in docs]

    assert sources(list(iter_mmc4([zipped], new_stats(), images_dir=str(images)))) == sources(raws)
    with pytest.raises(ValueError, match="exactly one of --images DIR"):
        iter_mmc4([path], new_stats())
    with pytest.raises(ValueError, match="exactly one of --images DIR"):
        iter_mmc4([path], new_stats(), images_dir=str(images), fetch=True)
    with pytest.raises(FileNotFoundError, match="--images"):
        iter_mmc4([path], new_stats(), images_dir=str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        iter_mmc4([tmp_path / "nope.jsonl"], new_stats(), fetch=True)
    with pytest.raises(SystemExit):  # argparse: one of --images and --fetch is required
        cli.main(["prep", "mmc4", str(path), "--out", str(tmp_path / "x"), "--quiet"])


def test_fetch_never_sends_the_shard_token():
    """MMTRAIN_HTTP_BEARER_TOKEN is for the shard server; web-document image hosts never see it."""
    import http.server
    import threading

    from mmtrain.data.storage import store_for

    seen: list[str | None] = []
    body = _png(COLORS["red"])

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/red.png"
    old = set_env({"MMTRAIN_HTTP_BEARER_TOKEN": "secret"})
    try:
        assert isinstance(fetch_image(ImageRef(url, "row 0 index 0")), DocImage)
        assert store_for(url).read(url) == body  # the shard store does send it
    finally:
        restore_env(old)
        server.shutdown()
    assert seen == [None, "Bearer secret"]
