"""Generation and captioning evaluation: torch-fidelity metrics on real features, the ADM
reference format, CLIP score through open_clip, missing weights, reports, and ranks."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import REPO, tiny_overrides

from mmtrain import cli
from mmtrain.eval.features import InceptionFeatures, MetricUnavailable, TinyRandomFeatures, extract_features
from mmtrain.eval.fidelity import fidelity_metrics, read_reference_stats, write_reference_stats
from mmtrain.data.sources import iter_samples


def fid_directly(generated: np.ndarray, real: np.ndarray) -> float:
    """FID of two uint8 image sets (N, H, W, 3) by torch-fidelity's own functions on the
    tiny_random features: what an eval command run with eval.feature_extractor=tiny_random on
    these images must report, whatever path its images and reference statistics took."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    net = TinyRandomFeatures()
    stats = [fid_features_to_statistics(extract_features(net, images)["pool"].double()) for images in (generated, real)]
    return fid_statistics_to_metric(*stats, verbose=False)[KEY_METRIC_FID]


def saved_samples(out: Path, tag: str) -> np.ndarray:
    """The images an eval generate run with eval.save_samples=true scored for one setting."""
    return np.load(out / "samples" / f"{tag}.npz")["arr_0"]


def shifted(images: np.ndarray, amount: int) -> np.ndarray:
    """Brighter by ``amount`` and with a little noise: the same scenes, another distribution."""
    noise = np.random.default_rng(0).integers(-8, 9, images.shape)
    return np.clip(images.astype(int) + amount + noise, 0, 255).astype(np.uint8)


def test_fid_self_is_zero_and_grows_with_the_shift(val_images, tmp_path):
    net = TinyRandomFeatures()
    real = extract_features(net, val_images)
    ref = write_reference_stats(tmp_path / "ref.npz", val_images, real, {"extractor": net.id})
    same, _ = fidelity_metrics(real, ref, ["fid", "kid", "prc", "isc"], kid_subset_size=16)
    assert abs(same["fid"]) < 1e-6 and abs(same["sfid"]) < 1e-6
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert same["isc_mean"] > 1.0  # the 10 random logits are not constant
    fids = []
    for amount in (20, 60):
        values, _ = fidelity_metrics(extract_features(net, shifted(val_images, amount)), ref, ["fid", "kid"], kid_subset_size=16)
        fids.append(values["fid"])
        assert values["kid_mean"] > same["kid_mean"]
    assert 1e-3 < fids[0] < fids[1], fids


def test_reference_file_is_adm_format_and_checked(val_images, tmp_path):
    net = TinyRandomFeatures()
    real = extract_features(net, val_images)
    path = tmp_path / "ref.npz"
    write_reference_stats(path, val_images, real, {"extractor": net.id, "num_images": len(val_images)})
    with np.load(path) as npz:
        assert {"arr_0", "mu", "sigma", "mu_s", "sigma_s"} <= set(npz.files)
        assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == val_images.shape
        assert npz["mu"].dtype == np.float64 and npz["sigma"].shape == (256, 256)
        np.testing.assert_allclose(npz["mu"], real["pool"].double().mean(0).numpy(), rtol=1e-6)
        # an ADM reference batch: the statistics and the images, nothing of mmtrain's
        np.savez(tmp_path / "adm.npz", **{k: npz[k] for k in ("arr_0", "mu", "sigma", "mu_s", "sigma_s")})
    ours = read_reference_stats(path, net.id, lambda images: extract_features(net, images)["pool"])
    adm = read_reference_stats(tmp_path / "adm.npz", net.id, lambda images: extract_features(net, images)["pool"])
    torch.testing.assert_close(adm.pool, ours.pool)  # KID / precision-recall features recomputed from arr_0
    assert adm.meta == {"source": "ADM reference batch"}
    fake = extract_features(net, shifted(val_images, 40))
    assert fidelity_metrics(fake, ours, ["fid"])[0] == fidelity_metrics(fake, adm, ["fid"])[0]

    with pytest.raises(ValueError, match=r"ref\.npz.*feature extractor 'tiny_random:0'.*'inception"):
        read_reference_stats(path, "inception-v3-compat:w.pth:1", lambda images: None)
    np.savez(tmp_path / "bad.npz", arr_0=val_images)
    with pytest.raises(ValueError, match=r"bad\.npz: expected keys 'mu' and 'sigma'"):
        read_reference_stats(tmp_path / "bad.npz", net.id, lambda images: None)


def test_inception_from_a_local_weights_file(val_images, tmp_path):
    """torch-fidelity's FID Inception loaded from a path (random weights: none can be downloaded here)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Untrained(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True):
            return None

    torch.save({}, tmp_path / "empty.pth")
    torch.manual_seed(0)
    weights = tmp_path / "inception.pth"
    torch.save(Untrained("x", ["2048"], feature_extractor_weights_path=str(tmp_path / "empty.pth")).state_dict(), weights)
    with pytest.raises(MetricUnavailable, match=str(tmp_path / "nothere.pth")):
        InceptionFeatures(tmp_path / "nothere.pth")
    net = InceptionFeatures(weights)
    feats = extract_features(net, val_images[:6])
    assert feats["pool"].shape == (6, 2048) and feats["logits"].shape == (6, 1008)
    assert feats["spatial"].shape == (6, 17 * 17 * 7)  # ADM's sFID features
    again = extract_features(net, val_images[:6], batch_size=4)
    torch.testing.assert_close(again["pool"], feats["pool"], rtol=1e-4, atol=1e-5)


TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> dict:
    import open_clip

    root = tmp_path_factory.mktemp("clip")
    config = root / "mmtrain-tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    model = open_clip.create_model("mmtrain-tiny-clip", pretrained=None)
    torch.save(model.state_dict(), root / "tiny_clip.pt")
    return {"config": str(config), "weights": root / "tiny_clip.pt", "model": model}


def test_clip_score_with_a_local_checkpoint(tiny_clip, val_images, tmp_path):
    import open_clip

    from mmtrain.eval.clip_score import ClipScorer

    scorer = ClipScorer("mmtrain-tiny-clip", tiny_clip["weights"], tiny_clip["config"])
    images = [Image.fromarray(a) for a in val_images[:4]]
    prompts = ["a red circle", "a blue square", "two green triangles", "a small yellow circle"]
    scores = scorer.scores(images, prompts)
    model, tok = tiny_clip["model"].eval(), open_clip.get_tokenizer("mmtrain-tiny-clip")
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(torch.stack([scorer.preprocess(im) for im in images])), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tok(prompts)), dim=-1)
    torch.testing.assert_close(scores, 100 * (img * txt).sum(-1).clamp(min=0))
    with pytest.raises(MetricUnavailable, match=f"CLIP weights not found at {tmp_path / 'none.bin'}"):
        ClipScorer("mmtrain-tiny-clip", tmp_path / "none.bin", tiny_clip["config"])


# --------------------------------------------------------------------------- the commands


def untrained_model_dir(synthetic_data, out: Path, *overrides: str) -> Path:
    """An untrained tiny model in the layout of `mmtrain export` (no training needed to test eval)."""
    from safetensors.torch import save_file

    from mmtrain.config import load_config, save_config
    from mmtrain.models import build_model
    from mmtrain.tokenize.build import build_image_tokenizer
    from mmtrain.tokenize.text import TextTokenizer

    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(REPO / "configs" / "tiny.yaml", tiny_overrides(synthetic_data, out / "run", *overrides))
    torch.manual_seed(0)
    text_tok = TextTokenizer.from_file(synthetic_data["tokenizer"]) if cfg.model.condition == "text" else None
    model = build_model(cfg.model, cfg.data.image_size, text_tok, build_image_tokenizer(cfg.tokenizer.image))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    save_config(cfg, out / "config.yaml")
    (out / "tokenizer").mkdir()
    for suffix in (".model", ".json"):
        shutil.copy(Path(synthetic_data["tokenizer"]).with_suffix(suffix), out / "tokenizer" / f"text{suffix}")
    return out


@pytest.fixture(scope="module")
def model_dir(synthetic_data, tmp_path_factory):
    return untrained_model_dir(synthetic_data, tmp_path_factory.mktemp("model"))


def test_eval_generate_class_conditional(synthetic_data, val_images, tmp_path):
    """Class labels from the shards' cls field; prompt-based metrics are reported as not applicable."""
    model = untrained_model_dir(synthetic_data, tmp_path / "model", "model.condition=class", "model.num_classes=18")
    out = tmp_path / "gen"
    assert cli.main(["eval", "generate", str(model), "--num", "4", "--out", str(out), "--set", "eval.feature_extractor=tiny_random",
                     "--set", f"eval.stats_cache={tmp_path / 'cache'}", "--set", "eval.save_samples=true"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    (row,) = report["settings"]
    # the first 4 val images are the reference (eval.ref_images 0 = --num)
    assert row["fid"] == pytest.approx(fid_directly(saved_samples(out, row["tag"]), val_images[:4]), rel=1e-6)
    assert report["unavailable"]["clip"].startswith("class-conditional model") and "attributes" in report["unavailable"]
    labels = [str(s["label"]) for _, s in zip(range(4), iter_samples(synthetic_data["val"]))]
    assert all(f"<figcaption>{label}</figcaption>" in (out / "report.html").read_text() for label in labels)
    assert cli.main(["eval", "caption", str(model), "--num", "2", "--out", str(tmp_path / "cap")]) == 2


def test_eval_generate_sweep_reports_missing_weights(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MMTRAIN_WEIGHTS", str(tmp_path / "weights"))
    out = tmp_path / "gen"
    assert cli.main(["eval", "generate", str(model_dir), "--num", "6", "--cfg", "1,3", "--ar-steps", "1,2", "--out", str(out),
                     "--set", "eval.batch_size=4", "--set", f"eval.stats_cache={tmp_path / 'cache'}"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text())
    inception = tmp_path / "weights" / "weights-inception-2015-12-05-6726825d.pth"
    for metric in ("fid", "isc", "kid", "prc"):
        assert report["unavailable"][metric].startswith(f"Inception weights not found at {inception}")
    assert report["unavailable"]["clip"].startswith(f"CLIP weights not found at {tmp_path / 'weights' / 'open_clip_ViT-B-32.bin'}")
    assert f"fid: unavailable: Inception weights not found at {inception}" in printed
    # the rest still ran: one row per setting with attribute accuracy, a plot, images with prompts
    assert [(r["cfg_scale"], r["ar_steps"]) for r in report["settings"]] == [(1.0, 1), (3.0, 1), (1.0, 2), (3.0, 2)]
    assert all("fid" not in r and 0 <= r["attr_exact"] <= 1 for r in report["settings"])
    # the kind of small and large shapes apart, pooled over the shapes of each true size
    assert all({k for k in r if k.startswith("attr_kind_")} == {"attr_kind_small", "attr_kind_large"}
               and all(0 <= r[f"attr_kind_{s}"] <= 1 for s in ("small", "large")) for r in report["settings"])
    assert report["reference_image_accuracy"]["exact"] == 1.0
    assert (out / "metrics_vs_cfg.png").is_file() and not list((tmp_path / "cache").glob("*.npz"))
    html = (out / "report.html").read_text()
    prompt = next(iter_samples(report["eval_set"]))["caption"]
    assert "images/cfg3_S2/000000.png" in html and prompt in html and "Inception weights not found" in html
    assert str(model_dir / "model.safetensors") in html and "hidden_size: 64" in html  # checkpoint and config
    assert len(list((out / "images" / "cfg3_S2").glob("*.png"))) == 6


def test_eval_generate_on_two_ranks_equals_one(model_dir, tiny_clip, tmp_path):
    """Batches split across 2 torchrun ranks and gathered on rank 0 give the one-rank numbers."""
    common = ["--num", "10", "--cfg", "2", "--ar-steps", "2", "--set", "eval.batch_size=3", "--set", "eval.save_samples=true",
              "--set", "eval.feature_extractor=tiny_random", "--set", f"eval.stats_cache={tmp_path / 'cache'}",
              "--set", "eval.clip_model=mmtrain-tiny-clip", "--set", f"eval.clip_model_config={tiny_clip['config']}",
              "--set", f"eval.clip_weights={tiny_clip['weights']}"]
    reports = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        proc = subprocess.run([sys.executable, "-m", "mmtrain.cli", "eval", "generate", str(model_dir), "--out", str(out),
                               "--nproc", str(nproc), *common], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[nproc] = json.loads((out / "metrics.json").read_text())
    one, two = reports[1]["settings"][0], reports[2]["settings"][0]
    assert reports[2]["world_size"] == 2 and reports[2]["unavailable"] == {}
    for key in ("fid", "sfid", "isc_mean", "kid_mean", "precision", "recall", "clip_score", "attr_exact", "attr_color"):
        assert one[key] == pytest.approx(two[key], rel=1e-6, abs=1e-9), key
    a = np.load(tmp_path / "n1" / "samples" / "cfg2_S2.npz")["arr_0"]
    b = np.load(tmp_path / "n2" / "samples" / "cfg2_S2.npz")["arr_0"]
    assert a.shape == (10, 32, 32, 3) and np.array_equal(a, b)
    # the reference statistics were computed once and cached
    assert len(list((tmp_path / "cache").glob("ref_*.npz"))) == 1
    assert reports[1]["reference"]["path"] == reports[2]["reference"]["path"]


def test_eval_caption_scores_with_pycocoevalcap(model_dir, tmp_path):
    from test_caption_metrics import pycocoevalcap_directly

    out = tmp_path / "cap"
    assert cli.main(["eval", "caption", str(model_dir), "--num", "5", "--out", str(out), "--set", "max_caption_len=12"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    refs = {str(i): ex["references"] for i, ex in enumerate(report["examples"])}
    cands = {str(i): ex["caption"] for i, ex in enumerate(report["examples"])}
    # the captions and references the report shows, scored by pycocoevalcap itself, not by mmtrain
    expected = pycocoevalcap_directly(refs, cands)
    assert set(expected) <= set(report["scores"])
    assert {k: report["scores"][k] for k in expected} == pytest.approx(expected, abs=1e-9)
    assert 0 <= report["scores"]["attr_exact"] <= 1
    assert {k for k in report["scores"] if k.startswith("attr_kind_")} == {"attr_kind_small", "attr_kind_large"}
    html = (out / "report.html").read_text()
    assert "images/000004.png" in html and "BLEU-4" in html and report["examples"][0]["references"][0] in html


def test_eval_caption_on_coco_annotations(model_dir, val_images, tmp_path):
    images = tmp_path / "val2017"
    images.mkdir()
    for i in range(3):
        Image.fromarray(val_images[i]).save(images / f"{i:012d}.jpg")
    annotations = {"images": [{"id": 100 + i, "file_name": f"{i:012d}.jpg"} for i in range(3)],
                   "annotations": [{"image_id": 100 + i, "caption": c} for i in range(3) for c in ("a shape", "some shapes")]}
    (tmp_path / "captions.json").write_text(json.dumps(annotations))
    out = tmp_path / "coco"
    assert cli.main(["eval", "caption", str(model_dir), "--coco-annotations", str(tmp_path / "captions.json"),
                     "--coco-images", str(images), "--out", str(out), "--set", "max_caption_len=8"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["num_samples"] == 3 and [e["key"] for e in report["examples"]] == ["100", "101", "102"]
    assert report["examples"][0]["references"] == ["a shape", "some shapes"]
    assert "attributes" in report["unavailable"] and "CIDEr" in report["scores"]
    (images / "000000000001.jpg").unlink()
    assert cli.main(["eval", "caption", str(model_dir), "--coco-annotations", str(tmp_path / "captions.json"),
                     "--coco-images", str(images), "--out", str(out)]) == 2


def test_inference_on_an_explicit_device_in_bf16_stays_close_to_fp32(synthetic_data, val_images, tmp_path, capsys):
    """`--device cpu --dtype bf16`: the same sampler and captioner under bf16 autocast; tokens
    stay within 1% of fp32, greedy captions start the same, reports say where they ran."""
    from safetensors.torch import load_file, save_file

    from mmtrain.config import SampleConfig
    from mmtrain.inference import caption_images, generate_tokens, load_run, tokens_to_images

    model = untrained_model_dir(synthetic_data, tmp_path / "model")
    gen = torch.Generator().manual_seed(1)  # nonzero heads: an untrained model's zero-initialised outputs would hide bf16
    state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in load_file(str(model / "model.safetensors")).items()}
    save_file(state, str(model / "model.safetensors"))
    prompts, sample = ["a red circle", "two blue squares", "a green triangle", "x"], SampleConfig(ar_steps=2, diffusion_steps=5)
    tokens, captions = {}, {}
    for dtype in ("fp32", "bf16"):
        run = load_run(model, device="cpu", dtype=dtype)
        assert run.placement() == {"device": "cpu", "dtype": dtype}
        tokens[dtype] = generate_tokens(run, prompts, sample, batch_size=4)
        captions[dtype] = caption_images(run, tokens_to_images(run, tokens["fp32"]), sample)
    diff = (tokens["fp32"] - tokens["bf16"]).abs()
    assert tokens["bf16"].dtype == torch.float32 and 0 < diff.max()  # bf16 did run
    assert diff.mean() < 0.01 * tokens["fp32"].abs().mean()
    assert all(len(os.path.commonprefix([a, b])) >= 10 for a, b in zip(captions["fp32"], captions["bf16"]))

    assert cli.main(["sample", str(model), "--prompt", "a red circle", "--num-per-prompt", "2", "--out", str(tmp_path / "s.png"),
                     "--device", "cpu", "--dtype", "bf16"]) == 0
    assert cli.main(["caption", str(model), "--shards", synthetic_data["val"], "--num", "2", "--device", "cpu", "--dtype", "bf16"]) == 0
    out = tmp_path / "gen"
    assert cli.main(["eval", "generate", str(model), "--num", "4", "--out", str(out), "--device", "cpu", "--dtype", "bf16",
                     "--set", "eval.feature_extractor=tiny_random", "--set", f"eval.stats_cache={tmp_path / 'cache'}",
                     "--set", "eval.save_samples=true"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    (row,) = report["settings"]
    assert (report["device"], report["dtype"]) == ("cpu", "bf16")
    assert row["fid"] == pytest.approx(fid_directly(saved_samples(out, row["tag"]), val_images[:4]), rel=1e-6)
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert cli.main(["sample", str(model), "--prompt", "x", "--device", "cuda", "--out", str(tmp_path / "c.png")]) == 2
        assert "--device cuda: CUDA is not available" in capsys.readouterr().err
