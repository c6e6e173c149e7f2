"""``mmtrain prep folder|manifest|coco|wds|latents|index|documents-wds|obelics|mmc4|text``: argparse wiring for the converters.

Document preps (``documents-wds``; the web-document converters ``obelics`` and ``mmc4``; ``text``, a
text corpus as text-only documents) share
:func:`add_document_options`, :func:`write_documents_from_args` and :func:`documents_summary`
around :func:`mmtrain.data.documents.write_document_shards`.

``mmtrain.cli`` calls :func:`add_prep_subcommands` with its ``prep`` subparsers;
each subcommand sets ``func`` to a handler that returns an exit code and prints
a one-line summary with the stats path. Bad input raises ValueError or
FileNotFoundError, which ``mmtrain.cli.main`` turns into exit code 2.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from mmtrain.data.images import IMAGE_FORMATS, PREP_RESIZE_MODES, RESIZE_MODES
from mmtrain.data.prep.config import OUTPUT_FORMATS, PrepConfig
from mmtrain.units import parse_bytes

def parse_shard_size(text: str) -> int:
    """``--shard-size``: a byte count by :func:`mmtrain.units.parse_bytes` (``512MB``, ``512MiB``)."""
    try:
        return parse_bytes(text, "--shard-size")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--shard-size: ")) from exc


def _add_common(p: argparse.ArgumentParser) -> None:
    d = PrepConfig()
    p.add_argument("--out", required=True, help="output directory or URL (s3://, gs://): writes OUT/train, OUT/val, "
                                               "OUT/stats.json (a URL: staged locally, then uploaded)")
    p.add_argument("--format", dest="output_format", choices=OUTPUT_FORMATS, default=d.output_format,
                   help=f"shard format: webdataset tars or mosaicml-streaming MDS (default {d.output_format})")
    p.add_argument("--samples-per-shard", type=int, default=d.samples_per_shard,
                   help=f"input samples per chunk/shard (default {d.samples_per_shard})")
    p.add_argument("--shard-size", type=parse_shard_size, default=d.shard_size,
                   help="byte limit per shard, e.g. 500MB (10^6) or 512MiB (2^20) (default 0 = none)")
    p.add_argument("--image-format", choices=IMAGE_FORMATS, default=d.image_format,
                   help=f"stored image encoding (default {d.image_format})")
    p.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality, help=f"JPEG quality 1-95 (default {d.jpeg_quality})")
    p.add_argument("--resolution", type=int, default=d.resolution,
                   help="resize the shorter side to this many pixels (default 0 = keep)")
    p.add_argument("--resize-mode", choices=PREP_RESIZE_MODES, default=d.resize_mode,
                   help="center_crop: the central square; resize: squash to a square; keep_aspect: shorter side "
                        f"to --resolution; none (default {d.resize_mode})")
    p.add_argument("--min-size", type=int, default=d.min_size,
                   help="drop images whose shorter side is below this (default 0 = off)")
    p.add_argument("--max-aspect", type=float, default=d.max_aspect,
                   help="drop images with long/short side ratio above this (default 0 = off)")
    p.add_argument("--min-caption-words", type=int, default=d.min_caption_words,
                   help="drop captions with fewer words (default 0 = off)")
    p.add_argument("--max-caption-words", type=int, default=d.max_caption_words,
                   help="drop captions with more words (default 0 = off)")
    p.add_argument("--no-dedup", dest="dedup", action="store_false",
                   help="keep exact duplicates (default: drop images whose decoded pixels equal an earlier one)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="fraction of samples routed to OUT/val by key hash (default 0)")
    p.add_argument("--split-seed", type=int, default=d.split_seed, help=f"salt of the split hash (default {d.split_seed})")
    p.add_argument("--prefix", default=d.prefix, help=f"webdataset shard name prefix (default {d.prefix})")
    p.add_argument("--no-passthrough", dest="passthrough", action="store_false",
                   help="always re-encode images (default: keep source bytes when nothing would change them)")
    p.add_argument("--workers", type=int, default=d.workers, help=f"worker processes (default {d.workers})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier prep in OUT made with other options (default: refuse)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> PrepConfig:
    """The PrepConfig described by the common flags."""
    return PrepConfig(
        output_format=args.output_format, samples_per_shard=args.samples_per_shard, shard_size=args.shard_size,
        image_format=args.image_format, jpeg_quality=args.jpeg_quality, resolution=args.resolution,
        resize_mode=args.resize_mode, min_size=args.min_size, max_aspect=args.max_aspect,
        min_caption_words=args.min_caption_words, max_caption_words=args.max_caption_words, dedup=args.dedup,
        val_fraction=args.val_fraction, split_seed=args.split_seed, prefix=args.prefix,
        passthrough=args.passthrough, workers=args.workers, progress=not args.quiet, overwrite=args.overwrite,
    )


def _summary(kind: str, out: str, stats: dict[str, Any]) -> str:
    splits = ", ".join(f"{name} {s['samples']} in {s['shards']} shards" for name, s in sorted(stats["splits"].items()))
    reasons = ", ".join(f"{r} {n}" for r, n in sorted(stats["dropped_by_reason"].items(), key=lambda kv: -kv[1]) if n)
    dropped = f"dropped {stats['dropped']}" + (f" ({reasons})" if reasons else "")
    return (f"prep {kind}: kept {stats['kept']} of {stats['candidates']} samples ({splits}) to {out}; {dropped}; "
            f"{stats['run']['samples_per_s']:.1f} samples/s (stats: {Path(out) / 'stats.json'})")


def cmd_folder(args: argparse.Namespace) -> int:
    from mmtrain.data.prep.convert import prep_folder

    print(_summary("folder", args.out, prep_folder(args.folder, args.out, config_from_args(args))))
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    from mmtrain.data.prep.convert import prep_manifest

    stats = prep_manifest(args.manifest, args.out, config_from_args(args), image_column=args.image_column,
                          caption_column=args.caption_column, label_column=args.label_column,
                          manifest_format=args.manifest_format)
    print(_summary("manifest", args.out, stats))
    return 0


def cmd_coco(args: argparse.Namespace) -> int:
    from mmtrain.data.prep.convert import prep_coco

    stats = prep_coco(args.annotations, args.out, config_from_args(args), images_dir=args.images,
                      all_captions=args.all_captions)
    print(_summary("coco", args.out, stats))
    return 0


def cmd_wds(args: argparse.Namespace) -> int:
    from mmtrain.data.prep.convert import prep_wds

    print(_summary("wds", args.out, prep_wds(args.shards, args.out, config_from_args(args))))
    return 0


def cmd_latents(args: argparse.Namespace) -> int:
    from mmtrain.data.prep.latents import precompute_latents
    from mmtrain.tokenize.build import VAE_KINDS
    from mmtrain.tokenize.image import image_tokenizer_config

    # the section training reads as tokenizer.image, from a kind or a tokenizer.yaml, the options set over it
    tokenizer = image_tokenizer_config(args.tokenizer, where="--tokenizer", path=args.tokenizer_path,
                                       scale_factor=args.scale_factor, shift_factor=args.shift_factor,
                                       sample_posterior=True if args.sample_posterior else None)
    if tokenizer.kind in VAE_KINDS and not tokenizer.path and not tokenizer.allow_random:
        raise ValueError(f"--tokenizer {args.tokenizer}: a {tokenizer.kind!r} VAE needs its weights: give --tokenizer-path "
                         "(a local diffusers AutoencoderKL folder" + ("" if tokenizer.kind == "vae" else
                                                                    " or an original checkpoint file")
                         + "; never downloaded), or a tokenizer.yaml whose path is set")
    stats = precompute_latents(args.shards, args.out, tokenizer, batch_size=args.batch_size, dtype=args.dtype,
                               device=args.device, output_format=None if args.output_format == "auto" else args.output_format,
                               progress=not args.quiet, overwrite=args.overwrite, image_size=args.image_size,
                               resize_mode=args.resize_mode)
    shapes = ", ".join(stats["latent_shapes"]) or "none"
    print(f"prep latents: {stats['samples']} samples in {stats['shards']} shards to {args.out} "
          f"({stats['shards_written']} written, {stats['shards_skipped']} already done); latent shapes {shapes} "
          f"{args.dtype}; {stats['samples_per_s']:.1f} samples/s (stats: {Path(args.out) / 'stats.json'})")
    return 0


def staged(cmd: Any) -> Any:
    """``cmd`` with ``args.out`` (and the ``args.shards`` list of ``prep wds``) allowed to be URLs: the input
    is downloaded to a staging directory, the output written to one and uploaded when ``cmd`` succeeded.
    (``prep latents`` reads a URL itself, through the shard cache, like the trainer.)"""
    import functools

    from mmtrain.data.staging import stage_input, staged_output
    from mmtrain.data.storage import is_url, store_for

    @functools.wraps(cmd)
    def run(args: argparse.Namespace) -> int:
        url = args.out
        if is_url(url):
            store_for(url).check_writable(url)  # a missing bucket fails now, not after staging everything
        if isinstance(getattr(args, "shards", None), list) and any(is_url(s) for s in args.shards):
            args.shards = [stage_input(s) for s in args.shards]
        with staged_output(url) as local:
            args.out = local
            code = cmd(args)
            if code:
                raise SystemExit(code)  # nothing is uploaded from a failed run
        if is_url(url):
            print(f"uploaded {local} to {url}")
        return code

    return run


def cmd_index(args: argparse.Namespace) -> int:
    """Write the sidecar index of every tar shard of ``args.shards`` (local, or a URL: download, index, upload)."""
    import tempfile

    from mmtrain.data.index import sidecar_path, write_sidecar
    from mmtrain.data.shards import list_shards
    from mmtrain.data.storage import basename, is_url, store_for

    shards = list_shards(args.shards)
    for shard in shards:
        if not is_url(shard):
            write_sidecar(shard)
            continue
        with tempfile.TemporaryDirectory(prefix="mmtrain-index-") as tmp:
            local = os.path.join(tmp, basename(shard))
            store_for(shard).download(shard, local)
            store_for(shard).upload(write_sidecar(local, shard), sidecar_path(shard))
    print(f"prep index: wrote the index of {len(shards)} shard(s) of {args.shards}")
    return 0


def documents_summary(kind: str, out: str, stats: dict[str, Any]) -> str:
    """The one-line summary of a document prep (``write_document_shards``' stats)."""
    splits = ", ".join(f"{name} {s['documents']} in {s['shards']} shards" for name, s in sorted(stats["splits"].items()))
    images = ", ".join(f"{r} {n}" for r, n in stats["dropped_images"].items() if n) or "none"
    docs = ", ".join(f"{r} {n}" for r, n in stats["dropped_documents"].items() if n) or "none"
    return (f"prep {kind}: {stats['documents']} documents from {stats['documents_in']} ({splits}; "
            f"{stats['documents_split']} split) with {stats['images']} images and {stats['text_segments']} text "
            f"segments to {out}; images left out: {images}; documents dropped: {docs} (stats: {Path(out) / 'stats.json'})")


def add_document_options(p: argparse.ArgumentParser, images: bool = True) -> None:
    """The flags of every document prep: output layout, split, sequence budget, and with ``images`` the
    image ones (``--max-images``, ``--min-images``, ``--resolution``, ...; ``prep text`` has none)."""
    p.add_argument("--out", required=True, help="output directory or URL (s3://, gs://): writes OUT/train, OUT/val, "
                                               "OUT/stats.json (a URL: staged locally, then uploaded)")
    p.add_argument("--format", dest="output_format", choices=OUTPUT_FORMATS, default="wds",
                   help="wds: KEY.json + KEY.0.jpg, ... per document; mds: one row per document (default wds)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="documents per shard (default 1000)")
    p.add_argument("--shard-size", type=parse_shard_size, default=0,
                   help="byte limit per shard, e.g. 500MB (10^6) or 512MiB (2^20) (default 0 = none)")
    p.add_argument("--prefix", default="shard", help="webdataset shard name prefix (default shard)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="fraction of documents routed to OUT/val by key hash (default 0)")
    p.add_argument("--split-seed", type=int, default=0, help="salt of the split hash (default 0)")
    where = "segment boundaries" if images else "whitespace"
    p.add_argument("--max-text-tokens", type=int, default=0,
                   help=f"text tokens per sequence: longer documents are split at {where} into KEY, KEY_1, ... (default "
                        "0 = no limit); counted by --tokenizer, else estimated as whitespace-separated words")
    p.add_argument("--tokenizer", default=None,
                   help="the run's text tokenizer, a sentencepiece .model or a Hugging Face tokenizer directory, to "
                        "count --max-text-tokens (default: word estimate)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if not images:
        return
    p.add_argument("--max-images", type=int, default=0,
                   help="images per sequence: longer documents are split at segment boundaries (default 0 = no limit)")
    p.add_argument("--min-images", type=int, default=0, help="drop documents with fewer images (default 0)")
    p.add_argument("--resolution", type=int, default=0,
                   help="resize every image's shorter side to this many pixels and re-encode (default 0 = keep bytes)")
    p.add_argument("--resize-mode", choices=PREP_RESIZE_MODES, default="keep_aspect",
                   help="how --resolution resizes (default keep_aspect: documents keep their images' shapes)")
    p.add_argument("--image-format", choices=IMAGE_FORMATS, default="jpg",
                   help="encoding of resized images (default jpg)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality 1-95 (default 95)")


def text_token_counter(path: str):
    """Tokens of a text span by the run's text tokenizer (``--tokenizer``: a sentencepiece ``.model`` or a
    Hugging Face tokenizer directory, as ``tokenizer.text_model`` takes), without ``<s>``/``</s>``."""
    from mmtrain.tokenize.run_text import load_text_tokenizer

    tok = load_text_tokenizer(path)
    return lambda text: len(tok.encode(text, bos=False, eos=False))


def write_documents_from_args(documents: Any, args: argparse.Namespace, **kwargs: Any) -> dict[str, Any]:
    """``write_document_shards`` with the options of :func:`add_document_options` (the image ones at the
    writer's defaults where the parser has none). ``count_tokens``: the counter of ``--tokenizer``, when
    the caller made it already."""
    from mmtrain.data.documents import ImageOptions, count_words, write_document_shards

    if "count_tokens" not in kwargs:
        kwargs["count_tokens"] = text_token_counter(args.tokenizer) if args.tokenizer else count_words
    image = ImageOptions()
    return write_document_shards(
        documents, args.out, fmt=args.output_format, samples_per_shard=args.samples_per_shard,
        shard_size=args.shard_size, prefix=args.prefix, val_fraction=args.val_fraction, split_seed=args.split_seed,
        max_images=getattr(args, "max_images", 0), max_text_tokens=args.max_text_tokens,
        min_images=getattr(args, "min_images", 0),
        images=ImageOptions(resolution=getattr(args, "resolution", image.resolution),
                            resize_mode=getattr(args, "resize_mode", image.resize_mode),
                            image_format=getattr(args, "image_format", image.image_format),
                            jpeg_quality=getattr(args, "jpeg_quality", image.jpeg_quality)),
        progress=not args.quiet, **kwargs)


def cmd_documents_wds(args: argparse.Namespace) -> int:
    """Re-write document sources (multi-image webdataset in Energon's layout, or document MDS) read through
    the one reader: filter, split to the sequence budget, resize."""
    from mmtrain.data.sources import iter_documents

    def documents():
        for source in args.sources:
            yield from iter_documents(source)

    stats = write_documents_from_args(documents(), args, source={"kind": "documents-wds", "paths": list(args.sources)})
    print(documents_summary("documents-wds", args.out, stats))
    return 0


def cmd_text(args: argparse.Namespace) -> int:
    """A text corpus (.txt lines, .jsonl objects, a .parquet column) -> text-only document shards."""
    from mmtrain.data.documents import count_words
    from mmtrain.data.prep.sources.text import iter_text_documents

    count_tokens = text_token_counter(args.tokenizer) if args.tokenizer else count_words
    documents = iter_text_documents(args.files, args.text_field, args.max_text_tokens, count_tokens)
    stats = write_documents_from_args(documents, args, count_tokens=count_tokens, source={
        "kind": "text", "paths": list(args.files), "text_field": args.text_field})
    print(documents_summary("text", args.out, stats))
    return 0


def _add_fetch_workers(p: argparse.ArgumentParser) -> None:
    from mmtrain.data.prep.fetch import DEFAULT_FETCH_WORKERS

    p.add_argument("--workers", type=int, default=DEFAULT_FETCH_WORKERS,
                   help=f"threads that fetch, read and check images (default {DEFAULT_FETCH_WORKERS}); URL fetches retry "
                        "as shard reads do: MMTRAIN_IO_RETRIES (default 5), MMTRAIN_IO_BACKOFF_S (0.5), "
                        "MMTRAIN_IO_TIMEOUT_S (60)")


def _write_web_documents(kind: str, raws: Any, stats: Any, args: argparse.Namespace, source: dict[str, Any]) -> int:
    """Fetch the images of ``raws`` on ``args.workers`` threads and write the documents; print the summary."""
    from mmtrain.data.prep.fetch import ImageFetcher
    from mmtrain.data.prep.web_documents import resolve_documents

    with ImageFetcher(args.workers) as fetcher:
        result = write_documents_from_args(resolve_documents(raws, fetcher), args, stats=stats, source=source)
    print(documents_summary(kind, args.out, result))
    return 0


def cmd_obelics(args: argparse.Namespace) -> int:
    """OBELICS / OmniCorpus parquet -> document shards (images fetched, read or given inline)."""
    from mmtrain.data.prep.sources.obelics import iter_obelics
    from mmtrain.data.prep.web_documents import new_stats

    stats = new_stats()
    raws = iter_obelics(args.parquet, stats)
    return _write_web_documents("obelics", raws, stats, args, {"kind": "obelics", "paths": list(args.parquet)})


def cmd_mmc4(args: argparse.Namespace) -> int:
    """MMC4 JSON lines -> document shards (images from --images DIR or fetched with --fetch)."""
    from mmtrain.data.prep.sources.mmc4 import iter_mmc4
    from mmtrain.data.prep.web_documents import new_stats

    stats = new_stats()
    raws = iter_mmc4(args.jsonl, stats, images_dir=args.images, fetch=args.fetch, min_sim=args.min_sim,
                     max_images=args.max_images_per_doc)
    source = {"kind": "mmc4", "paths": list(args.jsonl), "images": args.images, "fetch": args.fetch,
              "min_sim": args.min_sim, "max_images_per_doc": args.max_images_per_doc}
    return _write_web_documents("mmc4", raws, stats, args, source)


def add_prep_subcommands(prep_subparsers: Any) -> None:
    """Add ``folder``, ``manifest``, ``coco``, ``wds`` and ``latents`` to ``mmtrain prep``.

    Args:
        prep_subparsers: The object returned by ``prep_parser.add_subparsers(...)``.
    """
    fo = prep_subparsers.add_parser("folder", help="images with same-named .txt captions (recursive)")
    fo.add_argument("folder", help="root folder; jpg/jpeg/png/webp images, caption in IMAGE_STEM.txt")
    _add_common(fo)
    fo.set_defaults(func=staged(cmd_folder))

    ma = prep_subparsers.add_parser("manifest", help="CSV/TSV/JSONL/JSON/parquet table of image paths and captions")
    ma.add_argument("manifest", help="the table; relative image paths resolve against its folder")
    ma.add_argument("--image-column", default="image", help="image path column (default image)")
    ma.add_argument("--caption-column", default="caption", help="caption column (default caption)")
    ma.add_argument("--label-column", default=None,
                    help="integer class label column (default: 'label' if present; '' = no labels)")
    ma.add_argument("--manifest-format", default="auto", choices=["auto", "csv", "tsv", "jsonl", "json", "parquet"],
                    help="table format (default auto: by extension)")
    _add_common(ma)
    ma.set_defaults(func=staged(cmd_manifest))

    co = prep_subparsers.add_parser("coco", help="COCO captions JSON (images + annotations)")
    co.add_argument("annotations", help="e.g. annotations/captions_train2017.json")
    co.add_argument("--images", default=None, help="folder the file_name entries are in (default: the JSON's folder)")
    co.add_argument("--all-captions", action="store_true",
                    help="one sample per caption (default: one per image, first caption as txt, all in json)")
    _add_common(co)
    co.set_defaults(func=staged(cmd_coco))

    wd = prep_subparsers.add_parser("wds", help="existing webdataset/img2dataset shards: re-shard, filter, resize")
    wd.add_argument("shards", nargs="+", help="shard directories, .tar files or brace patterns")
    _add_common(wd)
    wd.set_defaults(func=staged(cmd_wds))

    la = prep_subparsers.add_parser("latents", help="add image-tokenizer latents to prepared shards")
    la.add_argument("shards", help="webdataset shards (dir, .tar, brace pattern) or an MDS directory; local or a URL "
                         "(s3://, gs://, http(s)://), like data.train_shards")
    la.add_argument("--out", required=True, help="output directory or URL (not the input one)")
    la.add_argument("--format", dest="output_format", choices=["auto", *OUTPUT_FORMATS], default="auto",
                    help="output format (default auto: same as the input)")
    la.add_argument("--tokenizer", default="pixels",
                    help="the image tokenizer, as the run's tokenizer.image: a kind (pixels, sd_vae, mar_kl16, vae) or a "
                         "tokenizer.yaml (tokenizers/sd_vae.yaml, or the one `mmtrain tokenizer train-vae` writes); "
                         "the options below override its fields (default pixels)")
    la.add_argument("--tokenizer-path", default=None,
                    help="the VAE: a local diffusers AutoencoderKL folder or (sd_vae, mar_kl16) an original checkpoint "
                         "file (tokenizer.image.path; default: the yaml's, none for a kind)")
    la.add_argument("--scale-factor", type=float, default=None,
                    help="latent scale (tokenizer.image.scale_factor; default: the yaml's, 1.0 for a kind)")
    la.add_argument("--shift-factor", type=float, default=None,
                    help="latent shift (tokenizer.image.shift_factor; default: the yaml's, 0.0 for a kind)")
    la.add_argument("--sample-posterior", action="store_true",
                    help="store a posterior sample instead of its mean (tokenizer.image.sample_posterior; default: the yaml's, off)")
    la.add_argument("--image-size", type=int, default=0,
                    help="resize each image to this square size before encoding, as training does (set it to the "
                         "run's data.image_size; default 0: as stored, the same pixels for shards prepped at that size)")
    la.add_argument("--resize-mode", choices=RESIZE_MODES, default="center_crop",
                    help="how --image-size makes an image square, as data.resize_mode: center_crop (default) or resize")
    la.add_argument("--batch-size", type=int, default=32, help="images per encode call (default 32)")
    la.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored dtype (default float16)")
    la.add_argument("--device", default="auto", help="torch device (default auto: cuda if available)")
    la.add_argument("--overwrite", action="store_true", help="replace an earlier run in OUT made with other settings")
    la.add_argument("--quiet", action="store_true", help="no progress bar")
    la.set_defaults(func=staged(cmd_latents))

    ix = prep_subparsers.add_parser("index", help="write NAME.tar.index.json next to tar shards made by other tools")
    ix.add_argument("shards", help="webdataset shards: a directory, .tar, brace pattern or URL (s3://, gs://, http(s)://)")
    ix.set_defaults(func=cmd_index)

    dw = prep_subparsers.add_parser("documents-wds", help="multi-image webdataset (Energon's interleaved layout: KEY.json "
                                    "texts/images + KEY.0.jpg, ...) or document MDS: re-shard, filter, split, resize")
    dw.add_argument("sources", nargs="+", help="document sources: shard directories, .tar files, brace patterns or MDS "
                    "directories; local or URLs (s3://, gs://, http(s)://, read through the shard cache)")
    add_document_options(dw)
    dw.set_defaults(func=staged(cmd_documents_wds))

    ob = prep_subparsers.add_parser("obelics", help="OBELICS / OmniCorpus parquet web documents (images by URL, bytes "
                                    "or path): one document per row")
    ob.add_argument("parquet", nargs="+", help="parquet files with list columns images and texts (at each index exactly "
                    "one non-null), optional JSON columns metadata and general_metadata")
    add_document_options(ob)
    _add_fetch_workers(ob)
    ob.set_defaults(func=staged(cmd_obelics))

    from mmtrain.data.prep.sources.mmc4 import DEFAULT_MAX_IMAGES, DEFAULT_MIN_SIM

    mc = prep_subparsers.add_parser("mmc4", help="MMC4 JSON-lines web documents: each image before its matched sentence")
    mc.add_argument("jsonl", nargs="+", help="JSON-lines files: text_list, image_info (image_name, raw_url, "
                    "matched_text_index, matched_sim) per line")
    where = mc.add_mutually_exclusive_group(required=True)
    where.add_argument("--images", default=None, help="folder of the images, found by image_name")
    where.add_argument("--fetch", action="store_true", help="fetch each image from its raw_url")
    mc.add_argument("--min-sim", type=float, default=DEFAULT_MIN_SIM,
                    help=f"leave out images whose matched_sim is below this (default {DEFAULT_MIN_SIM}, OpenFlamingo's "
                         "threshold on MMC4; 0 keeps all)")
    mc.add_argument("--max-images-per-doc", type=int, default=DEFAULT_MAX_IMAGES,
                    help=f"keep at most this many images per document, the highest matched_sim first (default "
                         f"{DEFAULT_MAX_IMAGES}, OpenFlamingo's; 0 = no cap); --max-images instead splits documents")
    add_document_options(mc)
    _add_fetch_workers(mc)
    mc.set_defaults(func=staged(cmd_mmc4))

    tx = prep_subparsers.add_parser("text", help="a text corpus as text-only documents (to mix into multimodal training "
                                    "by weight and keep the language ability)")
    tx.add_argument("files", nargs="+", help=".txt (one document per non-empty line), .jsonl (one JSON object per line, "
                    "the document in --text-field) or .parquet (the column --text-field) files")
    tx.add_argument("--text-field", default="text", help="the JSON field / parquet column holding the text (default text)")
    add_document_options(tx, images=False)
    tx.set_defaults(func=staged(cmd_text))
