"""Load a trained run on one process and use it: text -> image, image -> text."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from mmtrain.components.checkpoint import load_model_state
from mmtrain.config import Config, SampleConfig, load_config
from mmtrain.models import build_model
from mmtrain.models.causalfusion import CausalFusion, generate_caption_ids, sample_image_tokens
from mmtrain.models.diffusion import GaussianDiffusion
from mmtrain.tokenize.image import ImageTokenizer, build_image_tokenizer, patchify, pil_to_tensor, tensor_to_pil, unpatchify
from mmtrain.tokenize.text import TextTokenizer


@dataclass
class LoadedRun:
    cfg: Config
    model: CausalFusion
    text_tok: TextTokenizer
    image_tok: ImageTokenizer
    step: int
    checkpoint: str


def load_run(run_dir: str | Path, tag: str | None = None) -> LoadedRun:
    """Model weights from the run's latest (or ``tag``) DeepSpeed checkpoint, with its config and tokenizer."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no config.yaml); pass the train.run_dir of a training run")
    cfg = load_config(run_dir / "config.yaml")
    text_tok = TextTokenizer.from_file(run_dir / "tokenizer" / "text.model")
    state, meta = load_model_state(run_dir, tag)
    text_tok.check_matches(meta["tokenizer_fingerprint"], where=f"checkpoint step {meta['step']} of {run_dir}")
    image_tok = build_image_tokenizer(cfg.tokenizer.image)
    model = build_model(cfg.model, cfg.data.image_size, text_tok, image_tok)
    model.load_state_dict(state, strict=True)
    model.eval()
    return LoadedRun(cfg, model, text_tok, image_tok, meta["step"], str(run_dir / "checkpoints"))


def generate_images(run: LoadedRun, prompts: list[str], sample: SampleConfig, batch_size: int = 16) -> list[Image.Image]:
    diffusion = GaussianDiffusion(run.cfg.diffusion, sample_steps=sample.diffusion_steps)
    gen = torch.Generator().manual_seed(sample.seed)
    latent = run.cfg.data.image_size // run.image_tok.downsample
    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch_size):
        text, text_len = run.text_tok.encode_batch(prompts[i:i + batch_size], run.cfg.model.max_text_len)
        tokens = sample_image_tokens(run.model, text, text_len, diffusion, sample.ar_steps, sample.cfg_scale, gen,
                                     clip_x0=sample.clip_x0)
        latents = unpatchify(tokens.float(), run.cfg.model.patch_size, latent, latent)
        with torch.no_grad():
            images += tensor_to_pil(run.image_tok.decode(latents))
    return images


def caption_images(run: LoadedRun, images: list[Image.Image], sample: SampleConfig, top_p: float = 0.0, batch_size: int = 32) -> list[str]:
    gen = torch.Generator().manual_seed(sample.seed)
    size = run.cfg.data.image_size
    captions: list[str] = []
    for i in range(0, len(images), batch_size):
        chunk = [im.convert("RGB").resize((size, size), resample=3) if im.size != (size, size) else im.convert("RGB")
                 for im in images[i:i + batch_size]]
        with torch.no_grad():
            tokens = patchify(run.image_tok.encode(pil_to_tensor(chunk)), run.cfg.model.patch_size)
        ids = generate_caption_ids(run.model, tokens, sample.max_caption_len, gen, top_p=top_p)
        captions += [run.text_tok.decode(x) for x in ids]
    return captions


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
