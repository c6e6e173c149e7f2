"""Launching with submitit: the sbatch script (golden file), rendezvous from Slurm's variables,
submission, and preemption / time limits on submitit's local executor with real DeepSpeed ranks."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, tiny_overrides

from mmtrain import cli
from mmtrain.components.checkpoint import latest_tag
from mmtrain.config import ConfigError, load_config
from mmtrain.launch.job import rendezvous_env
from mmtrain.launch.registry import read_events
from mmtrain.launch.submit import parse_time

CONFIG = str(REPO / "configs" / "tiny.yaml")
GOLDEN = Path(__file__).parent / "golden" / "launch_slurm_2x8.sbatch"
# no --cpus-per-task / --mem: their defaults, data.num_workers + 2 = 8 and 0 (all of a GPU node's memory), show
SLURM_FLAGS = ["--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time", "12:00",
               "--account", "proj", "--qos", "high", "--constraint", "a100", "--exclusive",
               "launch.setup=[source /opt/mmtrain/.venv/bin/activate]", "data.num_workers=6"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def normalise(script: str, run_dir: Path) -> str:
    return script.replace(str(run_dir.absolute()), "{RUN_DIR}").replace(shlex.quote(sys.executable), "{PYTHON}")


def check_golden(text: str) -> None:
    if os.environ.get("MMTRAIN_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "sbatch script changed; if intended, rerun with MMTRAIN_UPDATE_GOLDEN=1"


# --------------------------------------------------------------------------- config


def test_time_formats():
    assert parse_time("12:00") == 720  # hours:minutes
    assert parse_time("01:30:30") == 91  # seconds round up
    assert parse_time("2-00:30") == 2 * 24 * 60 + 30
    assert parse_time("90") == 90
    for bad in ("12:75", "soon", "0", "00:00"):
        with pytest.raises(ValueError, match="launch.time"):
            parse_time(bad)


def test_launch_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"launch.nodes=2: cluster 'local' runs on this machine"):
        load_config(CONFIG, ["launch.cluster=local", "launch.nodes=2"])
    with pytest.raises(ConfigError, match="launch.cluster: expected one of slurm, local, debug"):
        load_config(CONFIG, ["launch.cluster=k8s"])
    with pytest.raises(ConfigError, match="launch.time"):
        load_config(CONFIG, ["launch.time=tomorrow"])
    assert load_config(CONFIG, ["launch.time='1-00:00'"]).launch.timeout_min == 1440
    with pytest.raises(ConfigError, match=r"launch.mem: expected auto, 0 \(all of a node's memory\), a size such as "
                                          r"400G .* got 'lots'"):
        load_config(CONFIG, ["launch.mem=lots"])


def test_rendezvous_from_slurm_variables(monkeypatch):
    """What srun gives rank 9 of a 2-node x 8-task job: no hostfile, no ssh, same port on every rank."""
    from submitit.slurm.slurm import SlurmJobEnvironment

    monkeypatch.delenv("MASTER_PORT", raising=False)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NODEID": "1"}
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    env = rendezvous_env(SlurmJobEnvironment())
    assert {k: env[k] for k in ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK")} == {
        "MASTER_ADDR": "gpu003", "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8", "NODE_RANK": "1"}
    port = env["MASTER_PORT"]
    assert 20000 <= int(port) < 60000
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_NODEID", "0")
    env0 = rendezvous_env(SlurmJobEnvironment())
    assert env0["RANK"] == "0" and env0["MASTER_PORT"] == port and env0["MASTER_ADDR"] == "gpu003"
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    assert rendezvous_env(SlurmJobEnvironment())["MASTER_PORT"] != port  # another job, another port


# --------------------------------------------------------------------------- Slurm script


def test_sbatch_script_matches_golden_file(synthetic_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli.main(["launch", CONFIG, *SLURM_FLAGS, "--dry-run", *tiny_overrides(synthetic_data, run_dir)]) == 0
    check_golden(normalise(capsys.readouterr().out, run_dir))
    assert not run_dir.exists()  # a dry run writes nothing


def test_cpus_and_memory_per_task_default_from_the_loader_and_gpus_and_can_be_set(synthetic_data, tmp_path, capsys):
    from mmtrain.launch.submit import LaunchConfig, sbatch_parameters

    assert {k: v for k, v in sbatch_parameters(LaunchConfig(), 8, num_workers=6).items() if k in ("cpus_per_task", "mem")} == {
        "cpus_per_task": 8, "mem": "0"}  # data.num_workers + 2; all of a GPU node's memory
    cpu_only = sbatch_parameters(LaunchConfig(gpus_per_node=0), 2, num_workers=0)
    assert cpu_only["cpus_per_task"] == 2 and "mem" not in cpu_only and "gpus_per_node" not in cpu_only
    assert "mem" not in sbatch_parameters(LaunchConfig(mem=""), 8, num_workers=1)  # "" = Slurm's default
    # set on the command line: those win, and the script shows them
    assert cli.main(["launch", CONFIG, *SLURM_FLAGS, "--cpus-per-task", "12", "--mem", "400G", "--dry-run",
                     *tiny_overrides(synthetic_data, tmp_path / "run")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "#SBATCH --cpus-per-task=12" in lines and "#SBATCH --mem=400G" in lines


def test_slurm_submission_sends_that_script(synthetic_data, tmp_path, monkeypatch, capsys):
    """The real submission path up to `sbatch`, which does not exist here: a stand-in records
    the script it is given and answers like sbatch does."""
    bin_dir, record = tmp_path / "bin", tmp_path / "submitted.sh"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit only checks that srun exists
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {record}\necho "Submitted batch job 4242"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    run_dir = tmp_path / "run"
    assert cli.main(["launch", CONFIG, *SLURM_FLAGS, *tiny_overrides(synthetic_data, run_dir)]) == 0
    assert "submitted job 4242 (slurm: 2 node(s) x 8 ranks)" in capsys.readouterr().out
    check_golden(normalise(record.read_text(), run_dir))
    # the pickled job holds the resolved config, with the run dir made absolute
    from submitit.core.utils import DelayedSubmission

    job = DelayedSubmission.load(run_dir / "logs" / "4242" / "4242_submitted.pkl")
    assert job.function.config["train"]["run_dir"] == str(run_dir.absolute())
    assert job.function.config["launch"]["nodes"] == 2 and job.function.config["launch"]["qos"] == "high"
    assert [(e["event"], e["job_id"], e["cluster"]) for e in read_events(run_dir)] == [("submitted", "4242", "slurm")]
    assert cli.main(["jobs", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "4242" in out and "slurm" in out and "PENDING" in out and "latest checkpoint: none" in out


# --------------------------------------------------------------------------- local executor: real ranks


def _task_pid(controller_pid: str, rank: int) -> int:
    """The process of one rank: a child of submitit's local controller."""
    kids = subprocess.run(["pgrep", "-P", controller_pid], capture_output=True, text=True).stdout.split()
    for pid in kids:
        if f"SUBMITIT_LOCAL_GLOBALID={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return int(pid)
    raise AssertionError(f"no rank {rank} under controller {controller_pid} (children {kids})")


def _wait(condition, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while not condition():
        if time.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _running(pid: str) -> bool:
    try:
        return b"submitit" in Path(f"/proc/{pid}/cmdline").read_bytes()  # empty once a zombie
    except OSError:
        return False


def test_preempted_job_saves_requeues_and_matches_an_uninterrupted_run(synthetic_data, tmp_path, capsys):
    steps = 40

    def overrides(run_dir):
        return tiny_overrides(synthetic_data, run_dir, f"train.steps={steps}", "logging.log_every=1",
                              "checkpoint.every_steps=1000")

    straight, run_dir = tmp_path / "straight", tmp_path / "run"
    assert cli.main(["train", CONFIG, *overrides(straight)]) == 0
    assert cli.main(["launch", CONFIG, "--cluster", "local", *overrides(run_dir)]) == 0
    job_id = read_events(run_dir)[0]["job_id"]
    _wait(lambda: (run_dir / "metrics.jsonl").is_file() and len(read_metrics(run_dir)) >= 3, 300, "step 3")
    # preemption signal to rank 1 only: rank 0 must learn of it too (a ZeRO-3 save is collective)
    os.kill(_task_pid(job_id, 1), signal.SIGUSR2)
    _wait(lambda: not _running(job_id), 300, "the job to end")

    events = read_events(run_dir)
    assert [e["event"] for e in events] == ["submitted", "started", "requeued", "started", "finished"], events
    saved = events[2]["step"]
    assert 3 <= saved < steps and events[1]["step"] == 0 and events[3]["step"] == saved and events[4]["step"] == steps
    # the signal-time checkpoint exists (the schedule alone saves only at the end) and was resumed from
    assert (run_dir / "checkpoints" / f"step{saved:08d}" / "meta.json").is_file()
    logs = run_dir / "logs" / job_id
    assert f"SIGUSR2: saved step {saved} of {steps}" in (logs / f"{job_id}_1_log.err").read_text()
    assert f"resumed from step{saved:08d}" in (logs / f"{job_id}_0_log.err").read_text()
    assert all((logs / f"{job_id}_{r}_log.{ext}").is_file() for r in (0, 1) for ext in ("out", "err"))
    # `mmtrain launch` checked before submitting; the ranks of the job do not check again
    assert not any("preflight" in (logs / f"{job_id}_{r}_log.{ext}").read_text() for r in (0, 1) for ext in ("out", "err"))

    # every step once, with the samples and losses of the uninterrupted run
    a, b = read_metrics(run_dir), read_metrics(straight)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    assert [r["data_hash"] for r in a] == [r["data_hash"] for r in b]
    assert [r["samples_seen"] for r in a] == [r["samples_seen"] for r in b]
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5)

    capsys.readouterr()
    assert cli.main(["jobs", str(run_dir)]) == 0
    row = next(l for l in capsys.readouterr().out.splitlines() if l.startswith(job_id)).split()
    assert row[1:5] == ["local", "COMPLETED", "2", str(steps)]


def test_time_limit_requeues_up_to_max_timeouts(synthetic_data, tmp_path, capsys):
    """A 1-minute limit: the local controller sends USR2 45 s before it. The first hit is
    requeued (max_timeouts=1), the second is not; both saved."""
    run_dir = tmp_path / "run"
    code = cli.main(["launch", CONFIG, "--cluster", "local", "--time", "1", "--max-timeouts", "1", "--wait",
                     "launch.signal_delay_s=45", *tiny_overrides(synthetic_data, run_dir, "train.steps=100000",
                                                                 "logging.log_every=1000", "checkpoint.every_steps=100000")])
    assert code == 1
    assert "timed-out too many times" in capsys.readouterr().err
    events = read_events(run_dir)
    assert [e["event"] for e in events] == ["submitted", "started", "requeued", "started", "not_requeued"], events
    first, second = events[2]["step"], events[4]["step"]
    assert 0 < first < second and events[3]["step"] == first
    assert latest_tag(run_dir) == f"step{second:08d}"


def test_debug_cluster_runs_in_process(synthetic_data, tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "mmtrain.cli", "launch", CONFIG, "--cluster", "debug",
                          *tiny_overrides(synthetic_data, run_dir, "train.steps=2", "logging.log_every=1")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "done at step 2" in out.stdout
    events = read_events(run_dir)
    assert [(e["event"], e.get("step")) for e in events] == [("submitted", None), ("started", 0), ("finished", 2)]
    assert events[1]["cluster"] == "debug" and events[1]["world_size"] == 1


FAKE_SRUN = """#!/bin/bash
# stands in for srun: the command after srun's options as SLURM_NTASKS tasks on this machine, each
# with the variables srun gives a task, its output in task-RANK.log; exits with the last failure's code
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((t = 0; t < SLURM_NTASKS; t++)); do
    SLURM_PROCID=$t SLURM_LOCALID=$t SLURM_NODEID=0 "$@" > "task-$t.log" 2>&1 &
    pids+=($!)
done
code=0
for p in "${pids[@]}"; do wait "$p" || code=$?; done
exit $code
"""


def test_sbatch_script_checks_once_then_each_srun_task_takes_its_rank_from_slurm(synthetic_data, tmp_path):
    """slurm/train.sbatch as the batch step of a one-node, two-task job: the preflight runs once, in the
    batch script; `srun` (a stand-in that starts the two tasks with srun's variables) runs
    `mmtrain train CONFIG --srun --skip-preflight` in each task, and the two ranks train together."""
    run_dir, bin_dir = tmp_path / "run", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "mmtrain").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m mmtrain.cli "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    env = {**base, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MMTRAIN": str(bin_dir / "mmtrain"),
           "SLURM_JOB_ID": "777", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "2",
           "SLURM_CPUS_PER_TASK": "1", "DS_ACCELERATOR": "cpu"}
    out = subprocess.run(["bash", str(REPO / "slurm" / "train.sbatch"), CONFIG,
                          *tiny_overrides(synthetic_data, run_dir, "train.steps=4", "logging.log_every=2")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    tasks = [(tmp_path / f"task-{r}.log").read_text() if (tmp_path / f"task-{r}.log").exists() else "" for r in (0, 1)]
    assert out.returncode == 0, out.stderr[-3000:] + tasks[0][-3000:] + tasks[1][-3000:]
    batch = out.stdout + out.stderr
    assert batch.count("preflight passed") == 1 and not any("preflight passed" in t for t in tasks)
    # one CPU per task, but tiny.yaml's data.num_workers=0 needs data.num_workers + 2
    assert "this job has --cpus-per-task=1, but each rank runs data.num_workers=0 loader workers" in batch
    assert "--cpus-per-task=2 (data.num_workers + 2)" in batch
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [2, 4]
    assert records[-1]["samples_seen"] == 4 * 8 * 2  # two ranks took part
    assert latest_tag(run_dir) == "step00000004"


def test_only_rank_0_of_a_start_runs_the_preflight():
    def args(*flags: str):
        return cli.build_parser().parse_args(["train", CONFIG, *flags])

    srun = args("--srun")
    assert cli.runs_preflight(srun, {"SLURM_PROCID": "0"}) and not cli.runs_preflight(srun, {"SLURM_PROCID": "3"})
    assert not cli.runs_preflight(args("--srun", "--skip-preflight"), {"SLURM_PROCID": "0"})  # the batch script ran it
    plain = args()  # mmtrain train: checks, then starts the ranks, which run mmtrain.train (no preflight)
    assert cli.runs_preflight(plain, {}) and cli.runs_preflight(plain, {"RANK": "0"})
    assert not cli.runs_preflight(plain, {"RANK": "1"})  # one of torchrun's ranks


def test_site_wrapper_adds_the_site_defaults(synthetic_data, tmp_path):
    site = tmp_path / "site.env"
    site.write_text("PARTITION=big\nACCOUNT=lab\nGPUS_PER_NODE=4\nVENV=/opt/mm/.venv\n")
    env = {**os.environ, "MMTRAIN_SITE": str(site), "MMTRAIN": str(Path(sys.executable).parent / "mmtrain")}
    out = subprocess.run(["bash", str(REPO / "slurm" / "launch.sh"), CONFIG, "--account", "other", "--dry-run",
                          *tiny_overrides(synthetic_data, tmp_path / "run")], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for line in ("#SBATCH --partition=big", "#SBATCH --account=other", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --ntasks-per-node=4", "source /opt/mm/.venv/bin/activate"):
        assert line in out.stdout.splitlines(), (line, out.stdout)


def test_sbatch_template_is_valid_bash():
    out = subprocess.run(["bash", "-n", str(REPO / "slurm" / "train.sbatch")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = (REPO / "slurm" / "train.sbatch").read_text()
    assert "#SBATCH --signal=USR2@120" in text and "#SBATCH --mem=0" in text
    assert 'train "$CONFIG" --preflight-only "$@"' in text and 'train "$CONFIG" --srun --skip-preflight "$@"' in text
