"""A damaged latest checkpoint (a DeepSpeed file deleted, meta.json deleted, the folder that
``latest`` names deleted): found before any rank starts, training resumes from the newest intact
checkpoint with a warning naming the damaged ones (moved to checkpoints/damaged/), or stops with
one line when none is intact; ``train.resume_from`` and ``--step`` / ``--tag`` choose a step."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, tiny_overrides

from mmtrain import cli
from mmtrain.components import checkpoint
from mmtrain.config import load_config
from mmtrain.errors import ConfigError

CONFIG = str(REPO / "configs" / "tiny.yaml")
MMTRAIN = str(Path(sys.executable).with_name("mmtrain"))


def run_overrides(data: dict, run_dir: Path, *extra: str) -> list[str]:
    # one rank, a checkpoint at every step: four checkpoints for three damages and an intact one
    return tiny_overrides(data, run_dir, "train.steps=4", "checkpoint.every_steps=1", "checkpoint.keep_last=4",
                          "train.nproc_per_node=1", "logging.log_every=1", *extra)


@pytest.fixture(scope="module")
def four_checkpoints(synthetic_data, tmp_path_factory) -> Path:
    """A tiny run with checkpoints at steps 1-4; tests damage copies of it, never the run itself."""
    run_dir = tmp_path_factory.mktemp("four_checkpoints") / "run"
    assert cli.main(["train", CONFIG, *run_overrides(synthetic_data, run_dir)]) == 0
    assert checkpoint.latest_tag(run_dir) == "step00000004"
    return run_dir


def copy_run(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / checkpoint.tag_for_step(step)


def delete_model_states(run: Path, step: int) -> str:
    """Damage (a): one of DeepSpeed's files of the checkpoint deleted."""
    victim = sorted(ckpt(run, step).glob("*_model_states.pt"))[0]
    victim.unlink()
    return victim.name


def delete_meta(run: Path, step: int) -> str:
    """Damage (b): only meta.json deleted."""
    (ckpt(run, step) / "meta.json").unlink()
    return "meta.json is missing"


def delete_folder(run: Path, step: int) -> str:
    """Damage (c): the step folder deleted while ``latest`` names it."""
    shutil.rmtree(ckpt(run, step))
    return "its folder is missing"


DAMAGES = {"deepspeed_file": delete_model_states, "meta_json": delete_meta, "folder": delete_folder}


@pytest.mark.parametrize("damage", DAMAGES)
def test_the_newest_intact_checkpoint_is_chosen_and_the_damaged_one_named_and_moved(four_checkpoints, tmp_path, damage,
                                                                                   synthetic_data, caplog):
    run = copy_run(four_checkpoints, tmp_path)
    what = DAMAGES[damage](run, 4)
    selection = checkpoint.choose_resume(run)
    assert selection.tag == "step00000003"
    assert list(selection.damaged) == ["step00000004"] and what in selection.damaged["step00000004"]
    # the preflight of `mmtrain train` (here --preflight-only, as slurm/train.sbatch runs it) warns and moves it aside
    caplog.clear()
    assert cli.main(["train", CONFIG, "--preflight-only", *run_overrides(synthetic_data, run)]) == 0
    assert f"step00000004 is damaged ({what}" in caplog.text
    assert "using step00000003, the newest intact checkpoint (choose one with train.resume_from=N)" in caplog.text
    assert checkpoint.latest_tag(run) == "step00000003"
    assert not ckpt(run, 4).exists()
    if damage != "folder":  # nothing is deleted: the damaged files wait in checkpoints/damaged/
        assert (run / "checkpoints" / "damaged" / "step00000004").is_dir()
        assert f"to {run / 'checkpoints' / 'damaged' / 'step00000004'}" in caplog.text
    assert checkpoint.choose_resume(run).damaged == {}  # the ranks then find a consistent run


def test_a_checkpoint_cut_short_or_saved_before_manifests_is_verified(four_checkpoints, tmp_path):
    run = copy_run(four_checkpoints, tmp_path)
    assert all(checkpoint.verify(ckpt(run, s)) == "" for s in range(1, 5))
    states = sorted(ckpt(run, 4).glob("*_optim_states.pt"))[0]
    states.write_bytes(states.read_bytes()[:100])  # a file cut short
    assert checkpoint.verify(ckpt(run, 4)).startswith(f"{states.name} has 100 bytes, ")
    (ckpt(run, 3) / checkpoint.MANIFEST).unlink()  # saved by an older mmtrain: the DeepSpeed files its meta implies
    assert checkpoint.verify(ckpt(run, 3)) == ""
    name = delete_model_states(run, 3)
    assert checkpoint.verify(ckpt(run, 3)) == f"{name} missing"
    assert checkpoint.choose_resume(run).tag == "step00000002"
    # `latest` itself deleted: the checkpoints with a manifest were saved completely; the newest intact one resumes
    (run / "checkpoints" / "latest").unlink()
    assert checkpoint.choose_resume(run).tag == "step00000002"
    checkpoint.set_aside(run, checkpoint.choose_resume(run))
    assert checkpoint.latest_tag(run) == "step00000002" and (run / "checkpoints" / "damaged" / "step00000004").is_dir()
    checkpoint.discard_incomplete(run)
    assert ckpt(run, 1).is_dir() and ckpt(run, 2).is_dir()


def test_training_relaunch_on_the_three_damages_resumes_from_the_intact_step(four_checkpoints, tmp_path, synthetic_data):
    """The user's three damages at once, a real `mmtrain train`: latest's folder gone (step 4), meta.json
    of step 3 gone, a DeepSpeed file of step 2 gone -> resumes from step 1, trains and saves steps 2-4 again."""
    run = copy_run(four_checkpoints, tmp_path)
    delete_folder(run, 4)
    delete_meta(run, 3)
    deepspeed_file = delete_model_states(run, 2)
    proc = subprocess.run([MMTRAIN, "train", CONFIG, *run_overrides(synthetic_data, run)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out and "ChildFailedError" not in out
    assert ("step00000004 is damaged (its folder is missing); step00000003 is damaged (meta.json is missing); "
            f"step00000002 is damaged ({deepspeed_file} missing): using step00000001, the newest intact checkpoint") in out, out
    assert "resumed from step00000001: step 1" in out
    assert checkpoint.latest_tag(run) == "step00000004"
    assert sorted(p.name for p in (run / "checkpoints" / "damaged").iterdir()) == ["step00000002", "step00000003"]
    assert all(checkpoint.verify(ckpt(run, s)) == "" for s in range(1, 5))
    # the redone steps are the steps of the undamaged run
    a = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (four_checkpoints / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in a] == [1, 2, 3, 4, 2, 3, 4]
    assert [r["loss"] for r in a[4:]] == pytest.approx([r["loss"] for r in b[1:]], rel=1e-5)


def test_no_intact_checkpoint_stops_with_one_line(four_checkpoints, tmp_path, synthetic_data, capsys):
    run = copy_run(four_checkpoints, tmp_path)
    for step in range(1, 5):
        (delete_model_states, delete_meta)[step % 2](run, step)
    capsys.readouterr()
    assert cli.main(["train", CONFIG, *run_overrides(synthetic_data, run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith(f"mmtrain train: error: no intact checkpoint in {run / 'checkpoints'} (step00000004: ")
    assert err[0].endswith(f"to start this run from scratch, move {run / 'checkpoints'} away (or set a new train.run_dir)")
    assert checkpoint.latest_tag(run) == "step00000004"  # nothing moved, nothing deleted


def test_resume_from_chooses_an_older_step_once(four_checkpoints, tmp_path, synthetic_data, caplog):
    run = copy_run(four_checkpoints, tmp_path)
    with pytest.raises(ConfigError, match="train.resume_from"):
        load_config(CONFIG, run_overrides(synthetic_data, run, "train.resume_from=two"))
    with pytest.raises(checkpoint.CheckpointError, match=r"train.resume_from=7: checkpoint .* does not exist; intact: step 4, 3"):
        checkpoint.choose_resume(run, "7")
    assert cli.main(["train", CONFIG, "--preflight-only", *run_overrides(synthetic_data, run, "train.resume_from=2")]) == 0
    assert "the newer intact checkpoint(s) step00000003, step00000004 move to" in caplog.text
    assert checkpoint.latest_tag(run) == "step00000002"
    assert sorted(p.name for p in (run / "checkpoints" / "set_aside").iterdir()) == ["step00000003", "step00000004"]
    assert checkpoint.choose_resume(run, "step00000002").tag == "step00000002"
    # the run trains on and saves step 4 again; a requeue with the same config resumes from there, not from step 2
    shutil.copytree(run / "checkpoints" / "set_aside" / "step00000004", ckpt(run, 4))
    (run / "checkpoints" / "latest").write_text("step00000004")
    assert checkpoint.choose_resume(run, "2").tag == "step00000004"


def test_sample_and_export_choose_a_step(four_checkpoints, tmp_path, capsys):
    exported = {}
    for step, option in ((2, ["--step", "2"]), (4, ["--tag", "step00000004"]), (4, [])):
        out = tmp_path / f"export{step}{len(option)}"
        assert cli.main(["export", str(four_checkpoints), "--out", str(out), *option]) == 0
        assert json.loads((out / "export.json").read_text())["step"] == step
        exported[step] = load_file(out / "model.safetensors")
    assert any(not torch.equal(exported[2][k], exported[4][k]) for k in exported[4])
    capsys.readouterr()
    assert cli.main(["sample", str(four_checkpoints), "--prompt", "a red circle", "--num-per-prompt", "1", "--step", "1",
                     "--out", str(tmp_path / "s1.png"), "--set", "diffusion_steps=2"]) == 0
    assert "(step 1," in capsys.readouterr().out


def test_sample_on_a_run_whose_latest_is_damaged_says_what_to_do(four_checkpoints, tmp_path, capsys, caplog):
    run = copy_run(four_checkpoints, tmp_path)
    what = delete_model_states(run, 4)
    args = ["--prompt", "a red circle", "--num-per-prompt", "1", "--out", str(tmp_path / "s.png"), "--set", "diffusion_steps=2"]
    assert cli.main(["sample", str(run), *args]) == 0
    assert (f"step00000004 is damaged ({what} missing): using step00000003, the newest intact checkpoint "
            "(choose one with --step N)") in caplog.text
    assert "(step 3," in capsys.readouterr().out
    assert cli.main(["sample", str(run), *args, "--step", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mmtrain sample: error: --step 4: checkpoint {ckpt(run, 4)} is damaged ({what} missing); "
                   "intact: step 3, 2, 1 (e.g. --step 3)"]
    assert cli.main(["export", str(run), "--out", str(tmp_path / "e")]) == 0  # reads, moves nothing
    assert json.loads((tmp_path / "e" / "export.json").read_text())["step"] == 3
    caplog.clear()
    assert cli.main(["export", str(run), "--out", str(tmp_path / "e2"), "--step", "2"]) == 0
    assert json.loads((tmp_path / "e2" / "export.json").read_text())["step"] == 2 and "damaged" not in caplog.text
    assert ckpt(run, 4).is_dir() and checkpoint.latest_tag(run) == "step00000004"
