"""The training engine on real 2-rank DeepSpeed runs: EMA under ZeRO-3, export, interrupted
saves, NaN stops, dead ranks, world-size changes, CPU offload."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from pathlib import Path

from conftest import REPO, tiny_overrides, train_side_by_side, uninterrupted_overrides

from mmtrain import cli
from mmtrain.components.checkpoint import latest_tag, load_model_state
from mmtrain.components.ema import consolidate

CONFIG = str(REPO / "configs" / "tiny.yaml")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def initial_weights(run_dir: Path) -> dict:
    """The weights every rank starts from: the model built under the run's seed."""
    from mmtrain.config import load_config
    from mmtrain.models import build_model
    from mmtrain.tokenize.build import build_image_tokenizer
    from mmtrain.tokenize.text import TextTokenizer

    cfg = load_config(run_dir / "config.yaml")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.data.image_size, TextTokenizer.from_file(run_dir / "tokenizer" / "text.model"),
                        build_image_tokenizer(cfg.tokenizer.image))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def zero3_ema_runs(synthetic_data, tmp_path_factory) -> dict[str, Path]:
    """The run of each precision that the test below checks, trained side by side (independent runs)."""
    root = tmp_path_factory.mktemp("zero3_ema")
    argvs = {precision: ["train", CONFIG, *tiny_overrides(
        synthetic_data, root / precision / "run", "train.steps=4", "checkpoint.every_steps=1", "checkpoint.keep_last=10",
        "ema.decay=0.6", "ema.warmup=false", "logging.log_every=2", f"train.precision={precision}",
        "logging.sample_every=2", "logging.sample_count=2")] for precision in ("fp32", "bf16")}
    codes = train_side_by_side(*argvs.values())
    return {precision: root / precision / "run" for precision, code in zip(argvs, codes) if code == 0}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero3_ema_is_the_ema_of_the_weights_and_exports_for_sampling(zero3_ema_runs, tmp_path, precision, capsys):
    """Each rank keeps its shard of the EMA; consolidated it equals the EMA computed from the
    fp32 weights of every step (bf16: of the fp32 master weights). Export -> sample without DeepSpeed."""
    assert precision in zero3_ema_runs, f"training the {precision} run failed"
    run_dir = zero3_ema_runs[precision]
    ema = initial_weights(run_dir)
    if precision == "bf16":  # DeepSpeed's fp32 master weights start from the bf16 model
        ema = {k: v.bfloat16().float() for k, v in ema.items()}
    for step in range(1, 5):
        weights, meta = load_model_state(run_dir, f"step{step:08d}")
        assert meta["step"] == step
        if precision == "bf16":  # the fp32 masters, not their bf16 rounding
            assert any(bool((w.bfloat16().float() != w).any()) for w in weights.values())
        ema = {k: 0.6 * ema[k] + 0.4 * weights[k].float() for k in ema}
    sharded = consolidate(run_dir / "checkpoints" / "step00000004")
    assert set(sharded) == set(ema)
    for k in ema:
        torch.testing.assert_close(sharded[k], ema[k], rtol=1e-5, atol=1e-6)
    records = read_metrics(run_dir)
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in records)
    assert "mfu" not in records[0]  # no GPU, no peak to divide by
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step00000002.png", "step00000004.png"]

    out = tmp_path / "export"
    assert cli.main(["export", str(run_dir), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "ema.safetensors", "export.json", "model.safetensors", "tokenizer"]
    from mmtrain.inference import load_model_dir

    model_run = load_model_dir(out, weights="model")
    ema_run = load_model_dir(out)  # auto: the EMA
    assert model_run.step == ema_run.step == 4
    for k, v in model_run.model.state_dict().items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0)
        torch.testing.assert_close(ema_run.model.state_dict()[k], sharded[k], rtol=0, atol=0)
    assert cli.main(["export", str(run_dir), "--out", str(out)]) == 2  # refuses to overwrite
    assert "exists and is not empty" in capsys.readouterr().err
    # a fresh process, no DeepSpeed: sample from the export
    code = "import sys; sys.modules['deepspeed'] = None; from mmtrain.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "sample", str(out), "--prompt", "a red circle", "--num-per-prompt", "2",
                           "--out", str(tmp_path / "grid.png")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the export samples what the run's own checkpoint samples (its EMA, the same seed): the same pixels
    assert cli.main(["sample", str(run_dir), "--prompt", "a red circle", "--num-per-prompt", "2",
                     "--out", str(tmp_path / "grid_run.png")]) == 0
    exported, from_run = (np.asarray(Image.open(tmp_path / name)) for name in ("grid.png", "grid_run.png"))
    assert exported.std() > 0 and np.array_equal(exported, from_run)


@pytest.fixture(scope="module")
def bf16_runs(synthetic_data, tmp_path_factory) -> dict[int, Path]:
    """The bf16 run of each ZeRO stage that the test below checks, trained side by side (independent runs)."""
    root = tmp_path_factory.mktemp("bf16_stages")
    argvs = {stage: ["train", CONFIG, *tiny_overrides(
        synthetic_data, root / f"zero{stage}" / "run", "train.steps=3", "checkpoint.every_steps=1", "checkpoint.keep_last=10",
        "ema.decay=0.6", "ema.warmup=false", "logging.log_every=3", "train.precision=bf16",
        f"train.zero_stage={stage}")] for stage in (0, 1, 2)}
    codes = train_side_by_side(*argvs.values())
    return {stage: root / f"zero{stage}" / "run" for stage, code in zip(argvs, codes) if code == 0}


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_bf16_export_and_ema_hold_the_fp32_master_weights(bf16_runs, tmp_path, zero_stage):
    """bf16 at ZeRO-0/1/2: the module DeepSpeed saves is bf16; export and the EMA use the fp32
    master weights the optimizer updates (the module's bf16 weights are exactly their rounding)."""
    assert zero_stage in bf16_runs, f"training the ZeRO-{zero_stage} run failed"
    run_dir = bf16_runs[zero_stage]
    ema = {k: v.bfloat16().float() for k, v in initial_weights(run_dir).items()}  # the masters start from the bf16 model
    for step in range(1, 4):
        weights, _ = load_model_state(run_dir, f"step{step:08d}")
        module = torch.load(run_dir / "checkpoints" / f"step{step:08d}" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        assert set(weights) == set(module) and all(v.dtype == torch.bfloat16 for v in module.values())
        for k, w in weights.items():
            assert w.dtype == torch.float32 and torch.equal(w.bfloat16(), module[k]), k
        finer = [k for k, w in weights.items() if bool((w.bfloat16().float() != w).any())]
        assert len(finer) > len(weights) // 2  # trained weights carry bits that bf16 cannot hold
        ema = {k: 0.6 * ema[k] + 0.4 * weights[k] for k in ema}
    sharded = consolidate(run_dir / "checkpoints" / "step00000003")
    assert set(sharded) == set(ema)
    for k in ema:
        torch.testing.assert_close(sharded[k], ema[k], rtol=1e-5, atol=1e-6)
    out = tmp_path / "export"
    assert cli.main(["export", str(run_dir), "--out", str(out)]) == 0
    from safetensors.torch import load_file

    exported = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(exported[k], weights[k]) for k in weights)


KILL_IN_SAVE = '''
import os
if os.environ.get("RANK") == "1":
    from mmtrain.components import ema as _ema
    _save = _ema.ShardedEMA.save
    def _save_then_die(self, ckpt_dir):
        if str(ckpt_dir).endswith("step00000004"):
            os.kill(os.getpid(), 9)  # killed after DeepSpeed wrote its shards, before the EMA and the barrier
        _save(self, ckpt_dir)
    _ema.ShardedEMA.save = _save_then_die
'''


def test_checkpoint_killed_mid_write_keeps_latest_on_the_previous_one(synthetic_data, tmp_path, monkeypatch, capfd):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(synthetic_data, run_dir, "train.steps=6", "checkpoint.every_steps=2", "logging.log_every=2")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_IN_SAVE)
    monkeypatch.setenv("PYTHONPATH", f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    assert cli.main(["train", CONFIG, *overrides]) != 0
    assert latest_tag(run_dir) == "step00000002"
    partial = run_dir / "checkpoints" / "step00000004"
    assert partial.is_dir() and not (partial / "ema" / "rank00001.safetensors").exists()  # half written, not named by latest

    monkeypatch.delenv("PYTHONPATH")
    capfd.readouterr()
    assert cli.main(["train", CONFIG, *overrides]) == 0
    err = capfd.readouterr().err
    assert "removed unfinished checkpoint(s) ['step00000004']" in err
    assert "resumed from step00000002: step 2" in err
    assert latest_tag(run_dir) == "step00000006"
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [2, 4, 4, 6]  # step 4 logged before the kill and again after the resume
    assert records[1]["loss"] == pytest.approx(records[2]["loss"], rel=1e-6)  # ... redone from step 2 identically
    assert records[1]["data_hash"] == records[2]["data_hash"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(synthetic_data, tmp_path, capfd):
    run_dir = tmp_path / "run"
    # lr 1e30: the first AdamW step moves every weight by ~1e30, the second forward overflows
    overrides = tiny_overrides(synthetic_data, run_dir, "train.steps=6", "checkpoint.every_steps=1",
                               "optim.lr=1e30", "optim.warmup_steps=0", "logging.log_every=1")
    assert cli.main(["train", CONFIG, *overrides]) != 0
    err = capfd.readouterr().err
    assert "non-finite loss at step 2" in err
    assert f"Last good checkpoint: {run_dir / 'checkpoints' / 'step00000001'}" in err
    assert latest_tag(run_dir) == "step00000001"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step*")) == ["step00000001"]


def test_a_dead_rank_ends_the_job_with_an_error(synthetic_data, tmp_path):
    import psutil

    run_dir = tmp_path / "run"
    overrides = tiny_overrides(synthetic_data, run_dir, "train.steps=100000", "checkpoint.every_steps=100000",
                               "logging.log_every=1", "train.dist_timeout_s=60")
    job = subprocess.Popen([sys.executable, "-m", "mmtrain.cli", "train", CONFIG, *overrides],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 2):
            assert job.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.5)
        def is_rank_1(p: psutil.Process) -> bool:
            try:
                return "mmtrain.train" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"
            except (psutil.ZombieProcess, psutil.NoSuchProcess):  # short-lived helpers (compile workers) come and go
                return False

        ranks = [p for p in psutil.Process(job.pid).children(recursive=True) if is_rank_1(p)]
        assert len(ranks) == 1
        t0 = time.time()
        ranks[0].kill()
        code = job.wait(timeout=90)
        assert code != 0
        assert time.time() - t0 < 60  # the launcher tears the job down; nobody waits out a collective
    finally:
        # the ranks run in sessions of their own (torchrun), so a failed test kills them by name, not by group
        try:
            leftovers = psutil.Process(job.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            leftovers = []
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        for p in leftovers:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


SLOW_CONVERSION = '''
import os, sys, time
# at site import sys.argv is ["-m", ...]; orig_argv holds the module name
if "deepspeed.checkpoint.ds_to_universal" in getattr(sys, "orig_argv", []):
    open(os.path.join(os.environ["MMTRAIN_TEST_SLOW_DIR"], "conversion_slowed"), "w").close()
    time.sleep(float(os.environ["MMTRAIN_TEST_SLOW_S"]))
'''


def test_resume_on_another_world_size_goes_through_a_universal_checkpoint(synthetic_data, tmp_path, monkeypatch, capfd):
    """1 rank x 2 micro-batches for 6 steps, then 2 ranks x 1 micro-batch (the same global batch)
    for 6 more: the same losses as 12 uninterrupted steps on 2 ranks (optimizer state carried
    over). The conversion is slowed by 12 s, past train.dist_timeout_s=8: rank 1 waits for it on the
    filesystem, before any process group exists, so no collective times out. (The tiny run's own
    collectives wait well under 8 s for the other rank; 4 s more than the timeout is enough to show
    that no collective is pending during the conversion.)"""
    common = ("logging.log_every=2", "checkpoint.every_steps=6")
    straight, run_dir = tmp_path / "straight", tmp_path / "run"
    assert train_side_by_side(["train", CONFIG, *tiny_overrides(synthetic_data, straight, *common, "train.steps=12")],
                              ["train", CONFIG, *tiny_overrides(synthetic_data, run_dir, *common, "train.steps=6",
                                                                "train.nproc_per_node=1", "train.grad_accum=2")]) == [0, 0]
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_CONVERSION)
    monkeypatch.setenv("PYTHONPATH", f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("MMTRAIN_TEST_SLOW_DIR", str(hook))
    monkeypatch.setenv("MMTRAIN_TEST_SLOW_S", "12")
    capfd.readouterr()
    assert cli.main(["train", CONFIG, *tiny_overrides(synthetic_data, run_dir, *common, "train.steps=12",
                                                      "train.dist_timeout_s=8")]) == 0
    err = capfd.readouterr().err
    assert (hook / "conversion_slowed").is_file()
    assert "converting step00000006 to a DeepSpeed universal checkpoint" in err
    assert "rank 1: waiting for rank 0 to convert" in err and "train.convert_timeout_s=7200" in err
    assert "(saved on 1 ranks, now 2)" in err
    assert (run_dir / "checkpoints" / "universal-step00000006").is_dir()
    a, b = read_metrics(run_dir), read_metrics(straight)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [2, 4, 6, 8, 10, 12]
    assert [r["samples_seen"] for r in a] == [r["samples_seen"] for r in b]
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=2e-4)
    ema_a = consolidate(run_dir / "checkpoints" / "step00000012")
    ema_b = consolidate(straight / "checkpoints" / "step00000012")
    # atol: the k_norm biases get no gradient (softmax ignores a shift shared by all keys), so
    # Adam turns rounding noise into lr-sized steps there (their EMAs are ~3e-4 and differ by up
    # to 1.9e-4 between the runs); every other entry agrees to ~1e-7
    for k in ema_a:
        np.testing.assert_allclose(ema_a[k].numpy(), ema_b[k].numpy(), rtol=1e-4, atol=5e-4 if "k_norm.bias" in k else 1e-6)


def test_zero_stage_change_on_resume_is_refused_with_instructions(synthetic_data, tmp_path, capfd):
    run_dir = tmp_path / "run"
    assert cli.main(["train", CONFIG, *tiny_overrides(synthetic_data, run_dir, "train.steps=2")]) == 0
    capfd.readouterr()
    assert cli.main(["train", CONFIG, *tiny_overrides(synthetic_data, run_dir, "train.steps=4", "train.zero_stage=2")]) != 0
    err = capfd.readouterr().err
    assert "saved with train.zero_stage=3, this run asks for 2" in err and "mmtrain export" in err


def test_cpu_offload_and_torch_compile_train_like_the_plain_engine(synthetic_data, uninterrupted_run, tmp_path, capfd):
    """ZeRO-3 with optimizer states and parameters on the CPU (DeepSpeed CPU Adam; offload=all
    includes what offload=optimizer does), and with compiled blocks, follow the plain engine's
    losses step by step (the shared uninterrupted run, stopped here at step 6 with its schedule
    unchanged); each setting is seen to take effect: the optimizer DeepSpeed built and where it
    keeps its states, graphs compiled."""
    plain = read_metrics(uninterrupted_run)[:6]
    settings = {"offload_all": "train.offload=all", "compile": "train.compile=true"}
    runs, logs = {}, {}
    for name, setting in settings.items():
        run_dir = tmp_path / name
        assert cli.main(["train", CONFIG, *uninterrupted_overrides(synthetic_data, run_dir, "train.stop_at=6", setting)]) == 0
        runs[name] = read_metrics(run_dir)
        logs[name] = capfd.readouterr().err
        assert [r["step"] for r in runs[name]] == [r["step"] for r in plain] == [1, 2, 3, 4, 5, 6]
        assert [r["data_hash"] for r in runs[name]] == [r["data_hash"] for r in plain]
    assert ("optimizer: DeepSpeedCPUAdam in DeepSpeedZeroOptimizer_Stage3, optimizer states on the CPU, "
            "parameters on the CPU\n") in logs["offload_all"]
    assert "optimizer: AdamW in DeepSpeedZeroOptimizer_Stage3\n" in logs["compile"]
    # compiled graphs ran, and the count settles: the sequence buckets the first two steps reach
    # are all this data meets (measured: 14 after step 1, 25 from step 2 on); one per step would
    # be a recompile per micro-batch
    graphs = [r["compiled_graphs"] for r in runs["compile"]]
    assert graphs[0] >= 1 and graphs[1:] == [graphs[1]] * 5, graphs
    assert all("compiled_graphs" not in r for r in plain + runs["offload_all"])
    # every step's loss (measured: at most 7e-8 apart), so that a changed update shows: the first
    # steps' losses barely see it (a 0.9x learning rate moves step 2's by 7e-4), later ones do
    loss = {name: np.array([r["loss"] for r in records]) for name, records in runs.items()}
    np.testing.assert_allclose(loss["offload_all"], [r["loss"] for r in plain], rtol=1e-6)
    np.testing.assert_allclose(loss["compile"], [r["loss"] for r in plain], rtol=1e-6)
