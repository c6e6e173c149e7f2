"""Documents in shards (issue 34 item 1): both layouts round trip through the one reader and the
one writer, the sidecar index locates a document's members, documents split at segment boundaries,
malformed documents fail naming shard and key, undecodable images are left out and counted, pairs
are documents, and ``prep documents-wds`` re-writes a multi-image webdataset (local and to/from S3)."""
from __future__ import annotations

import io
import json
import os
import re

import pytest
from PIL import Image

from mmtrain import cli
from mmtrain.data.documents import (DocImage, Document, MissingImage, from_wds_members, pair_document,
                                    split_document, to_wds_members, write_document_shards)
from mmtrain.data.errors import ShardDataError
from mmtrain.data.index import SPAN, sidecar_path
from mmtrain.data.shards import ShardWriter, write_shards
from mmtrain.data.sources import iter_documents, open_source


def image(color: tuple[int, int, int], fmt: str = "png", size: tuple[int, int] = (24, 16)) -> DocImage:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG" if fmt == "png" else "JPEG")
    return DocImage(data=buffer.getvalue(), ext=fmt)


def documents() -> list[Document]:
    """Five documents: images first, last, adjacent, text only, per-image metadata on some."""
    red, green = image((255, 0, 0)), image((0, 255, 0), "jpg")
    blue = DocImage(image((0, 0, 255)).data, "png", {"url": "http://x/b.png", "sim": 0.3})
    return [
        Document("doc0", ["A cat.", red, "It sits.", green], {"url": "http://a"}),
        Document("doc1", [blue, green, "Two images, then text."], {}),
        Document("doc2", ["Only text here."], {"lang": "en"}),
        Document("doc3", [red], {}),
        Document("doc4", ["x", blue, "y", red, "z"], {"url": "http://e"}),
    ]


def as_tuples(docs: list[Document]) -> list[tuple]:
    return [(d.key, [(s.data, s.ext, s.meta) if isinstance(s, DocImage) else s for s in d.segments], d.meta)
            for d in docs]


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_round_trip(tmp_path, fmt):
    """Same documents, in order, images byte-identical, through write_document_shards and the one reader."""
    docs = documents()
    stats = write_document_shards(docs, tmp_path / "out", fmt=fmt, samples_per_shard=2)
    assert stats["documents"] == stats["documents_in"] == 5 and stats["images"] == 7 and stats["text_segments"] == 7
    assert stats["splits"]["train"]["shards"] == 3
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["documents"] == 5
    assert as_tuples(list(iter_documents(tmp_path / "out" / "train"))) == as_tuples(docs)
    source = open_source(str(tmp_path / "out" / "train"))
    assert source.holds_documents and len(source) == 5
    assert as_tuples([source.read_document(4), source.read_document(1)]) == as_tuples([docs[4], docs[1]])
    with pytest.raises(ShardDataError, match="holds documents"):
        source.validate(need_image=True, need_latent=False)  # the pair loader refuses it by name
    source.close()


def test_wds_layout_and_index(tmp_path):
    """KEY.json holds parallel texts/images lists naming the members; the sidecar records each sample's span."""
    write_document_shards(documents()[:1] + documents()[4:], tmp_path, samples_per_shard=10)
    shard = str(tmp_path / "train" / "shard-000000.tar")
    samples = {}
    from mmtrain.data.tar import read_tar_samples

    for key, members in read_tar_samples(shard):
        samples[key] = members
    assert sorted(samples["doc0"]) == ["0.png", "1.jpg", "json"]
    obj = json.loads(samples["doc0"]["json"])
    assert obj == {"texts": ["A cat.", None, "It sits.", None], "images": [None, "0.png", None, "1.jpg"],
                   "meta": {"url": "http://a"}}
    assert json.loads(samples["doc4"]["json"])["meta"]["images"] == [None, {"url": "http://x/b.png", "sim": 0.3},
                                                                    None, {}, None]
    side = json.loads(open(sidecar_path(shard)).read())
    assert all(o >= 0 for o in side["offsets"][SPAN]) and all(o < 0 for o in side["offsets"]["image"])
    # a sidecar from before spans were indexed: pairs would still read; a document asks for `prep index`
    del side["offsets"][SPAN], side["sizes"][SPAN]
    open(sidecar_path(shard), "w").write(json.dumps(side))
    with pytest.raises(ShardDataError, match=r"doc0.*mmtrain prep index"):
        open_source(shard).read_document(0)


def test_split_at_segment_boundaries():
    red = image((255, 0, 0))
    doc = Document("k", ["one two three", red, "four five", red, red, "six seven eight nine", red], {"u": 1})
    parts = split_document(doc, max_images=2, max_text_tokens=5)
    assert [p.key for p in parts] == ["k", "k_1"]
    assert [p.segments for p in parts] == [["one two three", red, "four five", red], [red, "six seven eight nine", red]]
    assert [p.meta for p in parts] == [{"u": 1, "part": 0, "parts": 2}, {"u": 1, "part": 1, "parts": 2}]
    assert split_document(doc, 0, 0) == [doc]
    # a text span over the budget alone is not cut inside: it becomes a part of its own
    long = Document("l", ["a b c d e f g", red], {})
    assert [p.segments for p in split_document(long, 0, 3)] == [["a b c d e f g"], [red]]
    # a custom counter (e.g. the run's sentencepiece model)
    assert len(split_document(doc, 0, 100, count_tokens=lambda t: 100)) == 3


def test_split_through_writer_keeps_parts_together(tmp_path):
    docs = [Document(f"d{i}", ["t", image((i, 0, 0)), "u", image((0, i, 0))], {}) for i in range(20)]
    stats = write_document_shards(docs, tmp_path, max_images=1, val_fraction=0.5, split_seed=3)
    assert stats["documents_in"] == 20 and stats["documents"] == 40 and stats["documents_split"] == 20
    keys = {s: [d.key for d in iter_documents(tmp_path / s)] for s in ("train", "val")}
    assert keys["train"] and keys["val"] and len(keys["train"]) + len(keys["val"]) == 40
    for key in keys["val"]:
        assert key.split("_")[0] not in {k.split("_")[0] for k in keys["train"]}
    again = write_document_shards(docs, tmp_path / "again", max_images=1, val_fraction=0.5, split_seed=3)
    assert again["splits"]["val"]["documents"] == stats["splits"]["val"]["documents"]


def test_keys_stay_unique_when_a_split_part_meets_a_document_of_its_name(tmp_path):
    """Splitting "a" makes "a" and "a_1"; a source document already named "a_1" (and a key that
    comes twice) is written under a free key, counted, its original key kept in its meta."""
    docs = [Document("a", ["t", image((1, 0, 0)), "u", image((2, 0, 0))], {}),
            Document("a_1", ["v", image((3, 0, 0))], {}), Document("b", ["w"], {}), Document("b", ["x"], {})]
    stats = write_document_shards(docs, tmp_path, max_images=1)
    written = {d.key: d for d in iter_documents(tmp_path / "train")}
    assert sorted(written) == ["a", "a_1", "a_1_dup1", "b", "b_dup1"]
    assert stats["documents_renamed"] == 2 and stats["documents"] == 5
    assert written["a_1_dup1"].meta["original_key"] == "a_1" and written["a_1_dup1"].segments[0] == "v"
    assert written["b_dup1"].segments == ["x"] and written["b_dup1"].meta["original_key"] == "b"


def test_a_one_image_document_stored_as_key_jpg_reads_as_a_document(tmp_path):
    """Energon's layout lets a one-image document name its image member KEY.jpg: the source is
    still read as documents (no KEY.txt decides it), not as a pair source missing its captions."""
    red = image((255, 0, 0), "jpg")
    with ShardWriter(tmp_path) as writer:
        for k in range(2):
            writer.write({"__key__": f"d{k}", "json": json.dumps({"texts": [f"text {k}", None], "images": [None, "jpg"]}).encode(),
                          "jpg": red.data})
    source = open_source(str(tmp_path))
    assert source.holds_documents
    docs = list(iter_documents(tmp_path))
    assert [d.segments[0] for d in docs] == ["text 0", "text 1"] and all(d.images[0].data == red.data for d in docs)


def write_raw(directory, key: str, members: dict[str, bytes]) -> str:
    with ShardWriter(directory) as writer:
        writer.write({"__key__": key, **members})
    return writer.shards[0]["name"]


@pytest.mark.parametrize("doc_json, match", [
    ({"texts": ["a", None], "images": [None, "1.jpg"]}, r"images\[1\] names member '1.jpg'"),
    ({"texts": ["a", None], "images": [None]}, "'texts' has 2 entries and 'images' 1"),
    ({"texts": ["a", None], "images": [None, None]}, r"segment 1: .* both null"),
    ({"texts": ["a"], "images": [None], "meta": []}, "'meta' is a list"),
])
def test_bad_document_names_shard_and_key(tmp_path, doc_json, match):
    name = write_raw(tmp_path, "bad7", {"json": json.dumps(doc_json).encode(), "0.jpg": image((1, 2, 3), "jpg").data})
    with pytest.raises(ShardDataError, match=match) as info:
        list(iter_documents(tmp_path))
    assert name in str(info.value) and "bad7" in str(info.value)
    with pytest.raises(ShardDataError, match=match):
        from_wds_members("bad7", {"json": json.dumps(doc_json).encode(), "0.jpg": b"x"}, "here")


def test_bad_images_left_out_and_counted(tmp_path):
    good = image((9, 9, 9))
    doc = Document("d", ["before", DocImage(b"not an image", "jpg"), "middle", good,
                         MissingImage("image_unfetchable", "http://dead: 404"), "after"], {})
    empty = Document("e", [DocImage(b"junk", "png")], {})
    stats = write_document_shards([doc, empty], tmp_path)
    assert stats["dropped_images"]["image_undecodable"] == 2 and stats["dropped_images"]["image_unfetchable"] == 1
    assert stats["dropped_documents"]["document_empty"] == 1 and stats["documents"] == 1
    assert "'d' segment 1" in stats["drop_examples"]["image_undecodable"][0]
    (back,) = iter_documents(tmp_path / "train")
    assert as_tuples([back]) == as_tuples([Document("d", ["before", "middle", good, "after"], {})])


def test_pairs_are_documents(tmp_path):
    red = image((255, 0, 0))
    draw, caption = pair_document("p0", red, "a red square", True), pair_document("p1", red, "a red square", False)
    assert draw.segments == ["a red square", red] and caption.segments == [red, "a red square"]
    write_document_shards([draw, caption], tmp_path / "docs", fmt="mds")
    assert as_tuples(list(iter_documents(tmp_path / "docs" / "train"))) == as_tuples([draw, caption])
    # an image-caption pair source is not a document source, and says so
    write_shards([{"key": "k", "image": Image.new("RGB", (8, 8)), "caption": "c", "attributes": {}}], tmp_path / "pairs",
                 progress=False)
    assert not open_source(str(tmp_path / "pairs")).holds_documents
    with pytest.raises(ShardDataError, match="image-caption pairs, not documents"):
        list(iter_documents(tmp_path / "pairs"))


def test_members_round_trip_and_key_check():
    doc = documents()[4]
    assert as_tuples([from_wds_members(doc.key, to_wds_members(doc), "w")]) == as_tuples([doc])
    with pytest.raises(ValueError, match="without '.'"):
        to_wds_members(Document("a.b", ["t"], {}))


def test_prep_documents_wds_cli(tmp_path):
    """Energon-layout shards written by another tool (member names of its own) re-written: split and resized."""
    src = tmp_path / "energon"
    with ShardWriter(src) as writer:
        for k in range(3):
            obj = {"texts": [f"story {k}", None, "then", None], "images": [None, "img_a.jpg", None, "b.png"]}
            writer.write({"__key__": f"s{k}", "json": json.dumps(obj).encode(),
                          "img_a.jpg": image((k, 0, 0), "jpg", (40, 20)).data, "b.png": image((0, k, 0), "png").data})
    for name in os.listdir(src):  # other tools write no sidecar: the reader scans the headers, spans included
        if name.endswith(".index.json"):
            os.remove(src / name)
    out = tmp_path / "out"
    assert cli.main(["prep", "documents-wds", str(src), "--out", str(out), "--max-images", "1", "--resolution", "8",
                     "--format", "mds", "--quiet"]) == 0
    docs = list(iter_documents(out / "train"))
    assert [d.key for d in docs] == ["s0", "s0_1", "s1", "s1_1", "s2", "s2_1"]
    assert [len(d.images) for d in docs] == [1] * 6
    assert Image.open(io.BytesIO(docs[0].images[0].data)).size == (16, 8)  # keep_aspect: shorter side 8
    assert docs[0].segments[0::2] == ["story 0", "then"] and len(docs[1].segments) == 1
    stats = json.loads((out / "stats.json").read_text())
    assert stats["documents"] == 6 and stats["documents_split"] == 3 and stats["source"]["kind"] == "documents-wds"


def test_remote_documents(s3_server, tmp_path):
    """prep documents-wds to S3 (staged, uploaded with sidecars), then read back through the shard cache."""
    from storage_servers import BUCKET, restore_env, set_env

    server = s3_server
    old = set_env({**server.env(), "MMTRAIN_IO_BACKOFF_S": "0.01", "MMTRAIN_STAGING_DIR": str(tmp_path / "staging"),
                   "MMTRAIN_CACHE_DIR": str(tmp_path / "cache")})
    try:
        docs = documents()
        write_document_shards(docs, tmp_path / "local", samples_per_shard=2)
        url = f"s3://{BUCKET}/docs"
        assert cli.main(["prep", "documents-wds", str(tmp_path / "local" / "train"), "--out", url,
                         "--samples-per-shard", "2", "--quiet"]) == 0
        source = open_source(f"{url}/train")
        assert source.holds_documents and len(source) == 5
        assert as_tuples([source.read_document(3)]) == as_tuples([docs[3]])
        source.close()
        assert as_tuples(list(iter_documents(f"{url}/train"))) == as_tuples(docs)
        assert any(files for _, _, files in os.walk(tmp_path / "cache"))  # read through the shard cache
    finally:
        restore_env(old)


def test_an_image_in_a_format_shards_do_not_store_is_re_encoded_and_named_by_its_bytes():
    """A GIF (or a PNG arriving named .jpg) is stored under the extension of the bytes actually written."""
    from mmtrain.data.documents import DocImage, ImageOptions, process_image

    gif, png = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (12, 9), (200, 10, 10)).save(gif, format="GIF")
    Image.new("RGB", (12, 9), (10, 200, 10)).save(png, format="PNG")
    out = process_image(DocImage(data=gif.getvalue(), ext="jpg"), ImageOptions(image_format="png"))
    assert out.ext == "png" and out.data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(out.data)) as im:
        assert im.size == (12, 9) and im.convert("RGB").getpixel((3, 3))[0] > 150
    renamed = process_image(DocImage(data=png.getvalue(), ext="jpg"), ImageOptions())
    assert renamed.ext == "png" and renamed.data == png.getvalue()  # kept as stored, named by its format


def test_prep_text_writes_text_only_documents_from_txt_jsonl_and_parquet(tmp_path, capsys):
    """A text corpus -> text-only documents through the one writer: keys from stem + line / row, blank
    lines skipped, empty text dropped and counted, --max-text-tokens cuts at whitespace into parts;
    MDS holds them too (an empty images column); bad input names the file, the line / row and the field."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmtrain.data.sources import iter_texts

    (tmp_path / "web.txt").write_text("first line doc\n\n  second  \n")
    (tmp_path / "books.jsonl").write_text('{"body": "one two three four five", "id": 1}\n\n{"body": "   "}\n')
    pq.write_table(pa.table({"body": ["a parquet row", "row two"], "n": [1, 2]}), tmp_path / "wiki.parquet")
    files = [str(tmp_path / n) for n in ("web.txt", "books.jsonl", "wiki.parquet")]
    out = tmp_path / "out"
    assert cli.main(["prep", "text", *files, "--out", str(out), "--text-field", "body", "--max-text-tokens", "3",
                     "--quiet"]) == 0
    assert "prep text: 6 documents from 6" in capsys.readouterr().out
    docs = list(iter_documents(out / "train"))
    assert [(d.key, d.segments) for d in docs] == [
        ("web-00000001", ["first line doc"]), ("web-00000003", ["second"]), ("books-00000001", ["one two three"]),
        ("books-00000001_1", ["four five"]), ("wiki-00000000", ["a parquet row"]), ("wiki-00000001", ["row two"])]
    assert docs[0].meta == {"source": f"{files[0]} line 1"} and docs[-1].meta["source"] == f"{files[2]} row 1"
    assert list(iter_texts(out / "train")) == [s for d in docs for s in d.segments]  # what `tokenizer train` reads
    stats = json.loads((out / "stats.json").read_text())
    assert stats["images"] == 0 and stats["dropped_documents"]["document_empty"] == 1
    assert stats["source"] == {"kind": "text", "paths": files, "text_field": "body"}
    assert cli.main(["prep", "text", files[0], "--out", str(tmp_path / "mds"), "--format", "mds", "--quiet"]) == 0
    assert [d.segments for d in iter_documents(tmp_path / "mds" / "train")] == [["first line doc"], ["second"]]
    capsys.readouterr()
    bad = tmp_path / "bad.jsonl"
    for line, error in (('{"text": "ok"}\n{"text": "cut\n', r"bad\.jsonl line 2: not a JSON object"),
                        ('{"text": "ok"}\n\n{"txt": "x"}\n', r"bad\.jsonl line 3: no field 'text' \(--text-field\)"),
                        ('{"text": 7}\n', r"bad\.jsonl line 1: field 'text' is a int, expected a string")):
        bad.write_text(line)
        assert cli.main(["prep", "text", str(bad), "--out", str(tmp_path / "x"), "--quiet"]) == 2
        assert re.search(error, capsys.readouterr().err), error
    assert cli.main(["prep", "text", files[2], "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "wiki.parquet: no column 'text' (--text-field); columns: ['body', 'n']" in capsys.readouterr().err
