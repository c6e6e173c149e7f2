"""Wheels for the GPU machine (``make gpu-wheels``): what ``benchmarks/gpu_check.py`` needs
there beyond that machine's own image.

The GPU machine reaches no package registry and brings its own Python (3.12) and torch,
so mmtrain's other dependencies travel as wheels. This script takes the distributions
the check imports (``ROOTS``, read off ``PYTHONPROFILEIMPORTTIME`` runs of its commands),
adds their requirements as installed in this environment, drops what that machine's
image already holds (``ON_GPU_IMAGE``, from the device tool's KINDS.md) and downloads the
rest at the versions installed here as CPython 3.12 manylinux wheels; a pure-Python sdist
with no wheel (DeepSpeed: its CUDA ops compile there, on first use) is built into a
wheel here. The total must stay under the 64 MiB a device call carries.

    python benchmarks/gpu_wheels.py --out .whl    # then carry .whl (see gpu_check.py)
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement

ROOTS = ["deepspeed", "webdataset", "torch-fidelity"]
# what the GPU image ships (KINDS.md, "Python packages already there"); torch and CUDA are its own
ON_GPU_IMAGE = set("""accelerate aiofiles aiohappyeyeballs aiohttp aiosignal anyio attrs certifi charset-normalizer click cloudpickle
cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cycler cython einops filelock fonttools
frozenlist fsspec h11 h5py hf-xet httpcore httpx huggingface-hub idna imageio iniconfig jinja2 joblib kiwisolver markdown
markdown-it-py markupsafe matplotlib mdurl mpmath msgpack multidict networkx ninja numpy opencv-python-headless packaging pandas
pillow pip pluggy propcache protobuf psutil py-cpuinfo pygments pyparsing pytest python-dateutil pyyaml regex requests rich
safetensors scipy sentencepiece setuptools six sympy tabulate timm tokenizers torch torchvision tqdm transformers triton
typing-extensions urllib3 wheel xxhash yarl zipp""".split())
LIMIT_MIB = 64
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str]) -> dict[str, str]:
    """name -> installed version of ``roots`` and their (non-extra) requirements, minus the GPU image's."""
    out: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = norm(todo.pop())
        if name in out or name in ON_GPU_IMAGE or name.startswith("nvidia-"):
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise SystemExit(f"gpu_wheels: {name} is not installed here (run `make install` first)") from None
        out[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": "", "python_version": "3.12"}):
                todo.append(req.name)
    return out


def fetch(name: str, version: str, out: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(out), f"{name}=={version}"]
    if subprocess.run(cmd, capture_output=True, text=True).returncode == 0:
        return
    # no wheel: build one from the sdist (pure Python packages only; DeepSpeed compiles its ops at run time)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary=:all:", "-d", tmp,
                        f"{name}=={version}"], check=True)
        sdist = next(Path(tmp).iterdir())
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out),
                        str(sdist)], check=True, env={**__import__("os").environ, "DS_BUILD_OPS": "0"})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".whl")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = closure(ROOTS)
    for old in out.glob("*.whl"):  # one version of each: two would stop the install there
        if norm(old.name.split("-")[0]) not in wanted:
            old.unlink()
    for name, version in sorted(wanted.items()):
        have = [w for w in out.glob("*.whl") if norm(w.name.split("-")[0]) == name]
        if any(w.name.split("-")[1] == version for w in have):
            continue
        for w in have:
            w.unlink()
        fetch(name, version, out)
        print(f"{name}=={version}")
    wheels = sorted(out.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels) / 2**20
    (out / "MANIFEST.txt").write_text("".join(f"{w.name}\n" for w in wheels))
    print(f"{len(wheels)} wheels, {total:.1f} MiB in {out} (limit {LIMIT_MIB} MiB)")
    if total > LIMIT_MIB:
        print(f"gpu_wheels: {total:.1f} MiB is over the {LIMIT_MIB} MiB a device call carries", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
