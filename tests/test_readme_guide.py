"""README's guide, run as written: the ``bash`` block after ``<!-- guide`` in README.md, command by
command, in a fresh directory holding what a user brings (a folder of captioned photos, a VAE
folder), at tiny sizes.

The only changes to the commands are the size overrides below, each a README substring and its
replacement; a substring README no longer contains fails the test, so README and code cannot
drift apart unnoticed. Before each command every path it names that is not an output must exist
(so each step reads what an earlier one wrote, or what the user brought), and after it every
output it names must exist.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mmtrain import cli
from mmtrain.data.synthetic import SyntheticConfig, generate_sample

ROOT = Path(__file__).resolve().parents[1]
MMTRAIN = str(Path(sys.executable).with_name("mmtrain"))
TINY_MODEL = ("model.hidden_size=32 model.depth=1 model.num_heads=2 model.patch_size=2 model.max_text_len=32 "
              "data.image_size=32 data.num_workers=0 train.steps=2 train.nproc_per_node=1 train.micro_batch_size=4 "
              "train.precision=fp32 checkpoint.every_steps=1 logging.progress=false logging.wandb=false sample.ar_steps=2")
TINY_SAMPLING = "--set diffusion_steps=2"
# README substring -> what the test runs instead (sizes only)
SIZE_OVERRIDES = {
    "--resolution 256": "--resolution 32",
    "--val-fraction 0.05": "--val-fraction 0.25",
    "tokenizer.image.path=weights/sd-vae": f"tokenizer.image.path=weights/sd-vae {TINY_MODEL}",
    '--out bicycle.png': f"--out bicycle.png {TINY_SAMPLING}",
    "eval caption runs/photos --num 500": "eval caption runs/photos --num 4",
    "--num 1000 --cfg 1,3 --ar-steps 1,4": f"--num 4 --cfg 1,3 --ar-steps 1,2 {TINY_SAMPLING}",
}
OUTPUT_OPTIONS = ("--out",)
OUTPUT_KEYS = ("train.run_dir",)
NUM_PHOTOS = 24


def guide_commands(readme: str) -> list[str]:
    """The commands of the bash block that follows ``<!-- guide`` (continuation lines joined)."""
    marker = readme.index("<!-- guide")
    block = re.search(r"```bash\n(.*?)```", readme[marker:], re.S)
    assert block, "README: no ```bash block after the <!-- guide --> marker"
    text = block.group(1).replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def paths_named(argv: list[str]) -> tuple[list[str], list[str]]:
    """(inputs, outputs): every argument or ``key=value`` value that is a relative path with a '/'."""
    inputs, outputs = [], []
    for i, arg in enumerate(argv):
        key, value = arg.split("=", 1) if "=" in arg and not arg.startswith("-") else ("", arg)
        if "/" not in value or value.startswith("-") or "://" in value or " " in value:
            continue
        is_output = (i > 0 and argv[i - 1] in OUTPUT_OPTIONS) or key in OUTPUT_KEYS
        (outputs if is_output else inputs).append(value)
    return inputs, outputs


def write_photos(folder: Path) -> None:
    """Captioned photos as a user has them: JPEG and PNG, several sizes, none of them square."""
    folder.mkdir()
    cfg = SyntheticConfig(image_size=48)
    sizes = [(48, 36), (40, 56), (64, 48), (36, 52)]
    for i in range(NUM_PHOTOS):
        s = generate_sample(i, cfg)
        image = s["image"].resize(sizes[i % len(sizes)], Image.BICUBIC)
        name = f"photo_{i:03d}"
        image.save(folder / f"{name}.{'jpg' if i % 2 else 'png'}")
        (folder / f"{name}.txt").write_text(s["caption"] + "\n")


def write_sd_vae(folder: Path) -> None:
    """A diffusers AutoencoderKL folder with the SD VAE's architecture (random weights), as
    ``save_pretrained`` writes it: what a user downloads as sd-vae-ft-mse."""
    import torch

    from mmtrain.tokenize.convert_vae import KNOWN_ARCHES, build_vae, ldm_vae_config

    torch.manual_seed(0)
    build_vae(ldm_vae_config(**KNOWN_ARCHES["sd_vae"])).save_pretrained(str(folder), safe_serialization=True)


def test_readme_guide_runs_command_by_command(tmp_path: Path, monkeypatch, capfd) -> None:
    readme = (ROOT / "README.md").read_text()
    guide = "\n".join(guide_commands(readme))
    for old in SIZE_OVERRIDES:
        assert old in guide, f"README's guide no longer says {old!r}: update SIZE_OVERRIDES in {__file__}"
    commands = guide_commands(readme)
    assert [shlex.split(c)[1] for c in commands][:3] == ["prep", "tokenizer", "train"], commands
    os.symlink(ROOT / "configs", tmp_path / "configs")
    os.symlink(ROOT / "tokenizers", tmp_path / "tokenizers")
    write_photos(tmp_path / "photos")
    write_sd_vae(tmp_path / "weights" / "sd-vae")
    # `mmtrain` on PATH as for the user, but not the rest of the venv's bin: its pip `ninja` (another
    # version than the system's, which the rest of the suite and `make` find) would make torch rebuild
    # DeepSpeed's shared-memory op (~30 s on 2 cores) here and again in the next test that trains
    user_bin = tmp_path / "user_bin"
    user_bin.mkdir()
    (user_bin / "mmtrain").symlink_to(MMTRAIN)
    env = dict(os.environ, PATH=f"{user_bin}:{os.environ['PATH']}", MMTRAIN_CACHE_DIR=str(tmp_path / "cache"))
    monkeypatch.setenv("MMTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    timings: list[str] = []
    for command in commands:
        for old, new in SIZE_OVERRIDES.items():
            command = command.replace(old, new)
        argv = shlex.split(command)
        assert argv[0] == "mmtrain", command
        inputs, outputs = paths_named(argv)
        for path in inputs:
            assert (tmp_path / path).exists(), f"{command}: names {path}, which no earlier command wrote"
        started = time.perf_counter()
        if argv[1] == "train":  # starts its ranks with torchrun: a process of its own, as for the user
            proc = subprocess.run([MMTRAIN, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            code, out = proc.returncode, proc.stdout + proc.stderr
        else:  # the same entry point in this process: the suite saves an interpreter start per command
            capfd.readouterr()
            code = cli.main(argv[1:])
            out = "".join(capfd.readouterr())
        timings.append(f"{time.perf_counter() - started:5.1f} s  {command}")
        assert code == 0, f"{command}\nexit {code}\n{out[-4000:]}"
        assert "Traceback" not in out, f"{command}\n{out[-4000:]}"
        for path in outputs:  # a folder or file, or a prefix (`tokenizer train --out DIR/text` -> text.model)
            out_path = tmp_path / path
            assert out_path.exists() or any(out_path.parent.glob(out_path.name + ".*")), f"{command}: did not write {path}"
    print("\n".join(timings))
    # what the last steps wrote is what README says they write
    with Image.open(tmp_path / "bicycle.png") as im:
        assert im.width >= 32 and np.asarray(im.convert("L")).std() > 0
    assert (tmp_path / "models/photos/model.safetensors").is_file()
    assert sorted(p.parent.name for p in (tmp_path / "runs/photos/eval").glob("step*/*/metrics.json")) == ["caption", "generate"]
