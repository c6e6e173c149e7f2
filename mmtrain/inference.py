"""Load a trained (or converted) model on one process and use it: condition -> image,
image -> text, and in-context editing.

A loaded run lives on one device (``--device``: this rank's GPU when there is one) and
computes in one dtype (``--dtype``): bf16/fp16 run the model and the VAE under autocast
with the weights and the diffusion chain kept in fp32, so the numbers stay close to fp32.
The sampling noise is drawn on the CPU from per-batch seeds and copied over, so a GPU
draws the same noise as a CPU and any split of batches across ranks does too."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from mmtrain.components.checkpoint import checkpoint_root, load_model_state, resolve_tag
from mmtrain.components.ema import consolidate as consolidate_ema
from mmtrain.components.ema import has_ema
from mmtrain.config import Config, SampleConfig, load_config
from mmtrain.data.images import decode_image
from mmtrain.models import Condition, Model, build_model, captioning_families, document_families, family
from mmtrain.models.diffusion import build_diffusion
from mmtrain.tokenize.build import build_image_tokenizer
from mmtrain.tokenize.image import ImageTokenizer, patchify, pil_to_tensor, tensor_to_pil, unpatchify
from mmtrain.tokenize.run_text import AnyTextTokenizer, load_text_tokenizer, run_text_tokenizer_path

log = logging.getLogger("mmtrain.inference")


@dataclass
class LoadedRun:
    cfg: Config
    model: Model
    text_tok: AnyTextTokenizer | None  # None in class mode; sentencepiece or Hugging Face (same interface)
    image_tok: ImageTokenizer | None  # None when its kind is not available here (tokens only)
    step: int
    checkpoint: str

    image_tok_error: str = ""
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32  # compute dtype: autocast below fp32, weights stay as loaded
    prompts_cut_reported: bool = False  # the one warning of a command about prompts longer than model.max_text_len

    def placement(self) -> dict:
        """Where the numbers were computed, for reports: device type and compute dtype."""
        return {"device": self.device.type, "dtype": {v: k for k, v in DTYPES.items()}[self.dtype]}

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def require_image_tokenizer(self) -> ImageTokenizer:
        if self.image_tok is None:
            raise ValueError(f"tokenizer.image.kind={self.cfg.tokenizer.image.kind!r} of {self.checkpoint} is not available "
                             f"({self.image_tok_error}); images cannot be encoded or decoded (set tokenizer.image in its config.yaml)")
        return self.image_tok


def _image_tokenizer_or_error(cfg: Config) -> tuple[ImageTokenizer | None, str]:
    """A converted model can sample tokens without its VAE; the reason is kept for when pixels are asked for."""
    try:
        return build_image_tokenizer(cfg.tokenizer.image), ""
    except (ValueError, FileNotFoundError) as exc:
        return None, str(exc)


WEIGHTS = ("auto", "ema", "model")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def place(run: LoadedRun, device: str | torch.device | None = None, dtype: str = "fp32") -> LoadedRun:
    """Move the model and the image tokenizer to ``device`` (None/``auto``: this rank's GPU
    when CUDA is available, else the CPU) and compute in ``dtype`` (fp32, bf16, fp16)."""
    from mmtrain.distributed import resolve_device

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    run.device = device if isinstance(device, torch.device) else resolve_device(device)
    run.dtype = DTYPES[dtype]
    run.model.to(run.device)
    if run.image_tok is not None:
        run.image_tok.to(run.device)
    return run


def _check_weights(weights: str) -> None:
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: expected one of {WEIGHTS} (auto = the EMA when there is one)")


def load_model_dir(path: str | Path, weights: str = "auto", device: str | torch.device | None = "cpu",
                   dtype: str = "fp32") -> LoadedRun:
    """A model directory: ``config.yaml`` + ``model.safetensors`` (+ ``ema.safetensors``), as
    ``mmtrain convert`` and ``mmtrain export`` write. ``weights``: ``auto`` takes the EMA when
    the directory has one, ``ema`` requires it, ``model`` takes the trained weights."""
    import json

    from safetensors.torch import load_file

    _check_weights(weights)
    path = Path(path)
    for name in ("config.yaml", "model.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: not a model directory (no {name})")
    file = path / "model.safetensors"
    if weights == "ema" or (weights == "auto" and (path / "ema.safetensors").is_file()):
        file = path / "ema.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: this model directory has no EMA weights (use weights=model)")
    cfg = load_config(path / "config.yaml")
    text_tok = None
    if cfg.model.condition == "text":
        text_tok = load_text_tokenizer(run_text_tokenizer_path(path))
    state = load_file(str(file))
    image_tok, image_tok_error = _image_tokenizer_or_error(cfg)
    model = _build_for_state(cfg, text_tok, image_tok, state)
    model.load_state_dict(state, strict=True)
    info = path / "export.json"
    step = json.loads(info.read_text())["step"] if info.is_file() else 0
    return place(LoadedRun(cfg, model.eval(), text_tok, image_tok, step, str(file), image_tok_error), device, dtype)


def _build_for_state(cfg: Config, text_tok, image_tok, state: dict) -> Model:
    if image_tok is not None:
        return build_model(cfg.model, cfg.data.image_size, text_tok, image_tok)
    # no image tokenizer: the latent geometry comes from the weights
    fam = family(cfg.model)
    channels, size = fam.latent_geometry(cfg.model, state)
    return fam.build(cfg.model, latent_channels=channels, latent_size=size)


def load_run(run_dir: str | Path, tag: str | None = None, weights: str = "auto", device: str | torch.device | None = "cpu",
             dtype: str = "fp32") -> LoadedRun:
    """Model weights from the run's newest intact DeepSpeed checkpoint (or ``tag``: a step or a tag,
    see :func:`resolve_tag`), with its config and tokenizers; or a model directory written by
    ``mmtrain convert`` / ``mmtrain export`` (which has no steps to choose). ``weights``: see
    :func:`load_model_dir` (``auto`` = the EMA when the checkpoint has one); ``device``,
    ``dtype``: see :func:`place`."""
    _check_weights(weights)
    run_dir = Path(run_dir)
    if (run_dir / "model.safetensors").is_file() and not (run_dir / "checkpoints").is_dir():
        if tag not in (None, ""):
            raise ValueError(f"{run_dir} is a model directory (one set of weights): it has no --step {tag} to choose")
        return load_model_dir(run_dir, weights, device, dtype)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no config.yaml); pass the train.run_dir of a training run")
    cfg = load_config(run_dir / "config.yaml")
    tag = resolve_tag(run_dir, tag)
    state, meta = load_model_state(run_dir, tag)
    ckpt = checkpoint_root(run_dir) / tag
    if weights == "ema" or (weights == "auto" and has_ema(ckpt)):
        state = consolidate_ema(ckpt)  # raises naming the folder when the run kept no EMA
    text_tok = None
    if cfg.model.condition == "text":
        text_tok = load_text_tokenizer(run_text_tokenizer_path(run_dir))
        text_tok.check_matches(meta["tokenizer_fingerprint"], where=f"checkpoint step {meta['step']} of {run_dir}")
    image_tok = build_image_tokenizer(cfg.tokenizer.image)
    model = build_model(cfg.model, cfg.data.image_size, text_tok, image_tok)
    model.load_state_dict(state, strict=True)
    model.eval()
    return place(LoadedRun(cfg, model, text_tok, image_tok, meta["step"], str(run_dir / "checkpoints")), device, dtype)


def _condition_batch(run: LoadedRun, conditions: list) -> Condition:
    """Prompts (text mode) or class labels (class mode) -> the sampler's condition, on the run's device."""
    if run.cfg.model.condition == "class":
        labels = [int(c) for c in conditions]
        bad = [c for c in labels if not 0 <= c < run.cfg.model.num_classes]
        if bad:
            raise ValueError(f"class labels {bad} outside [0, {run.cfg.model.num_classes}) (model.num_classes)")
        return Condition(labels=torch.tensor(labels).to(run.device))
    prompts, limit, cut = [str(c) for c in conditions], run.cfg.model.max_text_len, []
    text, text_len = run.text_tok.encode_batch(prompts, limit, cut=cut)
    if cut and not run.prompts_cut_reported:
        run.prompts_cut_reported = True
        row, tokens = max(cut, key=lambda c: c[1])
        shown = prompts[row] if len(prompts[row]) <= 60 else prompts[row][:57] + "..."
        log.warning("prompt %r is %d tokens; model.max_text_len=%d keeps the first %d (%d of %d prompt(s) of this batch "
                    "cut; reported once)", shown, tokens, limit, limit, len({prompts[r] for r, _ in cut}), len(set(prompts)))
    return Condition(text=text.to(run.device), text_len=text_len.to(run.device))


def _sampler_kwargs(run: LoadedRun, sample: SampleConfig) -> dict:
    flow = {}
    if run.cfg.diffusion.process == "rectified_flow":
        flow = dict(sampler=sample.flow_sampler, drift_scale=sample.sde_drift_scale, noise_scale=sample.sde_noise_scale)
    return dict(ar_steps=sample.ar_steps, cfg_scale=sample.cfg_scale, cfg_schedule=sample.cfg_schedule,
                cfg_interval=tuple(sample.cfg_interval), clip_x0=sample.clip_x0, flow_options=flow)


def batch_generator(seed: int, batch_index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The noise of batch ``batch_index``, drawn on ``device`` (the model's: no copy, no wait
    per diffusion step): batches drawn on different ranks, or in another order, get the same
    noise as in one sequential run on that kind of device."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch_index)


def generate_tokens(run: LoadedRun, conditions: list, sample: SampleConfig, batch_size: int = 16,
                    first_batch: int = 0) -> torch.Tensor:
    """Image tokens (N, L, P, raster order) for prompts or class labels; the conditions are
    batches ``first_batch``, ``first_batch + 1``, ... of ``batch_size``."""
    diffusion = build_diffusion(run.cfg.diffusion, sample.diffusion_steps)
    out = []
    for b, i in enumerate(range(0, len(conditions), batch_size), start=first_batch):
        cond = _condition_batch(run, conditions[i:i + batch_size])
        with run.autocast():
            out.append(family(run.model).sample_image_tokens(run.model, diffusion, cond,
                                                             generator=batch_generator(sample.seed, b, run.device),
                                                             **_sampler_kwargs(run, sample)).float())
    return torch.cat(out)


def tokens_to_images(run: LoadedRun, tokens: torch.Tensor) -> list[Image.Image]:
    image_tok = run.require_image_tokenizer()
    latent = run.model.latent_size
    latents = unpatchify(tokens.float().to(run.device), run.cfg.model.patch_size, latent, latent)
    with torch.no_grad(), run.autocast():
        return tensor_to_pil(image_tok.decode(latents))


def images_to_tokens(run: LoadedRun, images: list[Image.Image]) -> torch.Tensor:
    image_tok = run.require_image_tokenizer()
    size = run.cfg.data.image_size
    # the pixels training saw: square by the run's data.resize_mode, as the loader makes them
    images = [Image.fromarray(decode_image(im, size, run.cfg.data.resize_mode, where="input image")) for im in images]
    with torch.no_grad(), run.autocast():
        return patchify(image_tok.encode(pil_to_tensor(images).to(run.device)).float(), run.cfg.model.patch_size)


def generate_images(run: LoadedRun, conditions: list, sample: SampleConfig, batch_size: int = 16,
                    first_batch: int = 0) -> list[Image.Image]:
    return tokens_to_images(run, generate_tokens(run, conditions, sample, batch_size, first_batch))


def region_token_mask(run: LoadedRun, box: tuple[float, float, float, float]) -> torch.Tensor:
    """Tokens (L,) whose patch centre lies inside ``box`` = (x0, y0, x1, y1) in [0, 1] image fractions: True = regenerate."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(f"edit region {box}: expected x0 < x1 and y0 < y1, all within [0, 1]")
    grid = run.model.grid
    centres = (torch.arange(grid) + 0.5) / grid
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    inside = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
    if not inside.any():
        raise ValueError(f"edit region {box} covers no token centre of the {grid}x{grid} token grid; make it larger")
    return inside.flatten()


def edit_image(run: LoadedRun, image: Image.Image, regenerate: torch.Tensor, condition, sample: SampleConfig,
               num: int = 4) -> list[Image.Image]:
    """Zero-shot in-context editing: keep the tokens outside ``regenerate`` (L,) as clean context
    and generate the others under ``condition`` (a prompt or class label). Inpainting is a
    region inside the image, outpainting the region around it."""
    diffusion = build_diffusion(run.cfg.diffusion, sample.diffusion_steps)
    gen = torch.Generator(device=run.device).manual_seed(sample.seed)
    known = images_to_tokens(run, [image]).expand(num, -1, -1)
    cond = _condition_batch(run, [condition] * num)
    with run.autocast():
        tokens = family(run.model).sample_image_tokens(run.model, diffusion, cond, generator=gen, known_tokens=known,
                                                       known_mask=~regenerate.bool(), **_sampler_kwargs(run, sample))
    return tokens_to_images(run, tokens.float())


def caption_images(run: LoadedRun, images: list[Image.Image], sample: SampleConfig, top_p: float = 0.0, batch_size: int = 32) -> list[str]:
    if run.cfg.model.condition != "text":
        raise ValueError("captioning needs a text model (model.condition=text); this model is class-conditional")
    model_family = family(run.model)
    if not model_family.captions:
        able = " or ".join(f"model.family={name}" for name in captioning_families())
        raise ValueError(f"captioning needs {able} (one model reads and writes text); "
                         f"this is a {model_family.name} model, which only generates images")
    gen = torch.Generator(device=run.device).manual_seed(sample.seed)
    captions: list[str] = []
    for i in range(0, len(images), batch_size):
        tokens = images_to_tokens(run, images[i:i + batch_size])
        with run.autocast():
            ids = model_family.caption_ids(run.model, tokens, sample.max_caption_len, gen, top_p=top_p)
        captions += [run.text_tok.decode(x) for x in ids]
    return captions


def continue_documents(run: LoadedRun, prompts: list, sample: SampleConfig, limits, top_p: float = 0.0,
                       temperature: float = 1.0, batch_size: int = 8) -> list[list]:
    """Interleaved generation (:mod:`mmtrain.models.document_sampling`): continue each prompt
    document (its segments: ``str`` text spans and PIL images, in reading order) with text and
    images within ``limits`` (:class:`~mmtrain.models.document_sampling.GenerationLimits`).
    Returns per prompt the generated segments (``str`` or PIL image). Batches of ``batch_size``
    documents share one KV cache each; batch ``b`` draws from :func:`batch_generator` ``(seed, b)``."""
    model_family = family(run.model)
    if run.cfg.model.condition != "text" or not model_family.documents:
        able = " or ".join(f"model.family={name}" for name in document_families())
        raise ValueError(f"interleaved generation needs a text model that reads and writes documents ({able}, "
                         f"model.condition=text); this is model.family={model_family.name}, model.condition={run.cfg.model.condition}")
    diffusion = build_diffusion(run.cfg.diffusion, sample.diffusion_steps)
    kwargs = _sampler_kwargs(run, sample)
    kwargs.pop("use_cache", None)
    out: list[list] = []
    for b, i in enumerate(range(0, len(prompts), batch_size)):
        batch = prompts[i:i + batch_size]
        pictures = [seg for doc in batch for seg in doc if isinstance(seg, Image.Image)]
        rows, docs = 0, []
        for doc in batch:
            segs = []
            for seg in doc:
                if isinstance(seg, Image.Image):
                    segs.append(rows)
                    rows += 1
                else:
                    segs.append(run.text_tok.encode(str(seg), bos=False, eos=False))
            docs.append(segs)
        tokens = images_to_tokens(run, pictures) if pictures else torch.zeros(0, run.model.num_image_tokens, run.model.token_dim)
        with run.autocast():
            generated, drawn = model_family.continue_documents(run.model, diffusion, docs, tokens,
                                                               generator=batch_generator(sample.seed, b, run.device),
                                                               limits=limits, top_p=top_p, temperature=temperature, **kwargs)
        images = tokens_to_images(run, drawn.float()) if drawn.shape[0] else []
        for segs in generated:
            out.append([run.text_tok.decode(v) if kind == "text" else images[v] for kind, v in segs])
    return out


def image_grid(images: list[Image.Image], captions: list[str] | None = None, cols: int = 8, scale: int = 2) -> Image.Image:
    """A PNG-ready grid; when captions are given each cell is labelled underneath (truncated)."""
    from PIL import ImageDraw

    w, h = images[0].size
    w, h = w * scale, h * scale
    label_h = 12 * 3 if captions else 0
    cell_w = max(w, 160) if captions else w
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * cell_w, rows * (h + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        x, y = (i % cols) * cell_w, (i // cols) * (h + label_h)
        grid.paste(im.resize((w, h), resample=0), (x + (cell_w - w) // 2, y))
        if captions:
            words, lines, line = captions[i].split(), [], ""
            for word in words:
                if len(line) + len(word) + 1 > cell_w // 6:
                    lines.append(line)
                    line = word
                else:
                    line = f"{line} {word}".strip()
            lines.append(line)
            for j, text in enumerate(lines[:3]):
                draw.text((x + 2, y + h + j * 12), text, fill=(0, 0, 0))
    return grid
