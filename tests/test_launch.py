"""Launching with submitit: the sbatch script (golden file), rendezvous from Slurm's variables, and
preemption on submitit's local executor with real DeepSpeed ranks. Everything that needs Slurm
itself runs against a real one in tests/test_slurm.py."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, UNINTERRUPTED_STEPS, assert_same_training, tiny_overrides, uninterrupted_overrides

from mmtrain import cli
from mmtrain.config import ConfigError, load_config
from mmtrain.launch.job import rendezvous_env
from mmtrain.launch.registry import read_events
from mmtrain.launch.config import parse_time

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
        pytest.fail(f"rewrote {GOLDEN}: review the diff, then run without MMTRAIN_UPDATE_GOLDEN")
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
    with pytest.raises(ConfigError, match=r"launch.gpus_per_node: expected a number of GPUs \(0 = none\) or auto, "
                                          r"got 'many'"):
        load_config(CONFIG, ["launch.gpus_per_node=many"])
    assert load_config(CONFIG, ["launch.gpus_per_node=AUTO"]).launch.gpus_per_node == "auto"
    assert load_config(CONFIG, ["launch.gpus_per_node=4"]).launch.gpus == 4


def test_a_record_being_written_is_not_read_yet(tmp_path):
    from mmtrain.launch.registry import record, registry_path

    record(tmp_path, "started", "7", step=0)
    with open(registry_path(tmp_path), "a") as fh:
        fh.write('{"event": "finish')  # another process is half-way through its line
    assert [e["event"] for e in read_events(tmp_path)] == ["started"]


def test_a_local_job_whose_controller_is_still_starting_is_pending_not_ended():
    """Between fork and exec the controller's command line is its parent's: not yet submitit's. A
    `--wait` that read that as "ended" returned at once (seen under load)."""
    from mmtrain.launch.registry import job_state

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # alive, not submitit
    try:
        assert job_state("local", str(proc.pid), [{"event": "submitted"}]) == "PENDING"
        assert job_state("local", str(proc.pid), [{"event": "submitted"}, {"event": "finished"}]) == "COMPLETED"
    finally:
        proc.kill()
        proc.wait()
    assert job_state("local", str(proc.pid), [{"event": "submitted"}]) == "ENDED"


def test_jobs_lists_sbatch_jobs_reads_the_last_step_from_the_metrics_tail_and_explains_states(tmp_path, monkeypatch,
                                                                                              capsys):
    """A job of `sbatch slurm/train.sbatch` records no submission and its steps only when it starts and ends:
    `mmtrain jobs` lists it from its start, its last step from the tail of metrics.jsonl (a large file:
    only the tail is read), and says what each state shown means; no Slurm answers here (STARTED)."""
    from mmtrain.launch import registry, slurm

    monkeypatch.setattr(slurm, "job_state", lambda job_id: None)  # no Slurm here
    run_dir = tmp_path / "run"
    registry.record(run_dir, "submitted", "7", cluster="slurm", logs="run/logs/7")
    registry.record(run_dir, "started", "7", cluster="slurm", step=0)
    registry.record(run_dir, "failed", "7", step=0, rank=0, error="ShardDataError: bad-000000.tar: not a tar")
    registry.record(run_dir, "started", "8", cluster="slurm", step=0, launcher="mmtrain train", logs="run/logs/slurm-8.out")
    with open(run_dir / "metrics.jsonl", "w") as fh:
        for step in range(1, 3001):  # ~150 kB, more than the tail read
            fh.write(json.dumps({"step": step, "time": time.time() - 30, "loss": 1.0, "pad": "x" * 30}) + "\n")
        fh.write('{"step": 3001, "ti')  # being written
    assert registry.last_metrics(run_dir)["step"] == 3000
    assert cli.main(["jobs", str(run_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["7", "slurm", "FAILED", "1", "0", lines[1].split()[5], "run/logs/7"]
    assert lines[2].split() == ["8", "slurm", "STARTED", "1", "3000", "sbatch", "run/logs/slurm-8.out"]
    assert lines[3].startswith("  FAILED: ended with an error") and lines[4].startswith("  STARTED: it recorded its start")
    assert lines[5] == "  job 7 failed: ShardDataError: bad-000000.tar: not a tar"
    assert lines[6].startswith("  job 8: last logged step 3000, 3") and lines[6].endswith(" s ago (" f"{run_dir / 'metrics.jsonl'})")
    assert lines[7] == "latest checkpoint: none"
    # a config and its overrides name the run: what slurm/train.sbatch asks for its log's place
    assert cli.main(["jobs", "--print-run-dir", CONFIG, f"train.run_dir={run_dir}"]) == 0
    assert capsys.readouterr().out == f"{run_dir}\n"
    assert cli.main(["jobs", CONFIG, f"train.run_dir={run_dir}"]) == 0
    assert "STARTED" in capsys.readouterr().out


def test_launch_sh_finds_the_projects_own_mmtrain(tmp_path):
    """From a fresh checkout, without mmtrain on PATH: this checkout's .venv/bin/mmtrain (the dry run of
    test_site_wrapper_adds_the_site_defaults); without that venv, python3 -m mmtrain.cli with the checkout
    on PYTHONPATH; without either, one line saying so."""
    base = {k: v for k, v in os.environ.items() if k not in ("MMTRAIN", "MMTRAIN_SITE", "PYTHONPATH")}
    bare = {**base, "PATH": "/usr/bin:/bin"}  # no mmtrain
    assert not (Path("/usr/bin/mmtrain").exists() or Path("/bin/mmtrain").exists())

    def launch(script: Path, env: dict) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(script), CONFIG, "--help"], env=env, capture_output=True, text=True, timeout=120)

    # a checkout without .venv: the package beside slurm/, run by python3
    checkout = tmp_path / "checkout"
    (checkout / "slurm").mkdir(parents=True)
    (checkout / "slurm" / "launch.sh").write_text((REPO / "slurm" / "launch.sh").read_text())
    (checkout / "mmtrain").symlink_to(REPO / "mmtrain")
    python = tmp_path / "bin" / "python3"
    python.parent.mkdir()
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    out = launch(checkout / "slurm" / "launch.sh", {**bare, "PATH": f"{python.parent}:/usr/bin:/bin"})
    assert out.returncode == 0 and out.stdout.startswith("usage: mmtrain launch "), out.stderr
    python.write_text("#!/bin/sh\nexit 1\n")  # a python3 that cannot import mmtrain
    out = launch(checkout / "slurm" / "launch.sh", {**bare, "PATH": f"{python.parent}:/usr/bin:/bin"})
    assert out.returncode == 127 and out.stdout == ""
    assert out.stderr.startswith(f"slurm/launch.sh: no mmtrain to run: none on PATH, no {checkout}/.venv/bin/mmtrain")


def test_plain_sbatch_jobs_are_requeued_on_the_time_limit_at_most_max_timeouts_times(tmp_path):
    """slurm/train.sbatch's rank 0 counts the job's own time-limit requeues in its history: those of
    other jobs and preemptions (which Slurm requeues itself) do not count."""
    from mmtrain.launch.lifecycle import requeue_after_time_limit
    from mmtrain.launch.registry import record

    for event, job in (("started", "7"), ("requeued", "7"), ("started", "7"), ("preempted", "7"), ("requeued", "8")):
        record(tmp_path, event, job, step=5)
    assert not requeue_after_time_limit(str(tmp_path), "7", max_timeouts=1, step=9, signal="SIGUSR2")
    assert read_events(tmp_path)[-1] | {"time": ""} == {
        "event": "not_requeued", "job_id": "7", "time": "", "step": 9, "signal": "SIGUSR2",
        "reason": "time limit reached 2 times; launch.max_timeouts=1"}
    # one more allowed: `scontrol requeue`, which no Slurm answers here: said so, the saved step kept
    assert not requeue_after_time_limit(str(tmp_path), "7", max_timeouts=2, step=9, signal="SIGUSR2")
    refused = read_events(tmp_path)[-1]
    assert refused["event"] == "not_requeued" and refused["step"] == 9
    assert refused["reason"].startswith("scontrol requeue failed")


def test_what_slurm_refused_is_one_line_naming_the_options():
    """sbatch's words (Slurm 22.05, a cluster without GPUs asked for 8) -> what it said and which options decide it."""
    from mmtrain.launch.slurm import explain_sbatch_error

    said = "sbatch: error: Invalid generic resource (gres) specification\n"
    assert explain_sbatch_error(said, {"gpus_per_node": 8, "partition": "debug"}) == (
        "sbatch refused the job: Invalid generic resource (gres) specification (asked for --gpus-per-node 8)")
    said = ("sbatch: error: invalid partition specified: gpu\n"
            "sbatch: error: Batch job submission failed: Invalid partition name specified\n")
    assert explain_sbatch_error(said, {"partition": "gpu"}) == (
        "sbatch refused the job: invalid partition specified: gpu; Batch job submission failed: Invalid partition name "
        "specified (asked for --partition gpu)")


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
    from mmtrain.launch.config import LaunchConfig
    from mmtrain.launch.submit import sbatch_parameters

    assert {k: v for k, v in sbatch_parameters(LaunchConfig(gpus_per_node=8), 8, num_workers=6).items()
            if k in ("cpus_per_task", "mem")} == {
        "cpus_per_task": 8, "mem": "0"}  # data.num_workers + 2; all of a GPU node's memory
    cpu_only = sbatch_parameters(LaunchConfig(gpus_per_node=0), 2, num_workers=0)
    assert cpu_only["cpus_per_task"] == 2 and "mem" not in cpu_only and "gpus_per_node" not in cpu_only
    assert "mem" not in sbatch_parameters(LaunchConfig(mem="", gpus_per_node=8), 8, num_workers=1)  # "" = Slurm's default
    # set on the command line: those win, and the script shows them
    assert cli.main(["launch", CONFIG, *SLURM_FLAGS, "--cpus-per-task", "12", "--mem", "400G", "--dry-run",
                     *tiny_overrides(synthetic_data, tmp_path / "run")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "#SBATCH --cpus-per-task=12" in lines and "#SBATCH --mem=400G" in lines


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


def test_preempted_job_saves_requeues_and_matches_an_uninterrupted_run(synthetic_data, uninterrupted_run, tmp_path, capsys):
    steps, run_dir = UNINTERRUPTED_STEPS, tmp_path / "run"
    out = tmp_path / "launch.log"
    with open(out, "w") as fh:
        waiting = subprocess.Popen([sys.executable, "-m", "mmtrain.cli", "launch", CONFIG, "--cluster", "local", "--wait",
                                    "--poll-s", "0.5", *uninterrupted_overrides(synthetic_data, run_dir)],
                                   stdout=fh, stderr=subprocess.STDOUT)
    _wait(lambda: (run_dir / "metrics.jsonl").is_file() and len(read_metrics(run_dir)) >= 3, 300, "step 3")
    job_id = read_events(run_dir)[0]["job_id"]
    # preemption signal to rank 1 only: rank 0 must learn of it too (a ZeRO-3 save is collective)
    os.kill(_task_pid(job_id, 1), signal.SIGUSR2)
    assert waiting.wait(300) == 0, out.read_text()[-3000:]
    # --wait followed the job through its requeue to the end
    assert out.read_text().strip().splitlines()[-1] == f"job {job_id} finished at step {steps} after 2 run(s)"

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

    # every step once, with the samples, losses, weights and EMA of the uninterrupted run
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, steps + 1))
    assert_same_training(run_dir, uninterrupted_run)

    capsys.readouterr()
    assert cli.main(["jobs", str(run_dir)]) == 0  # in this process: an interpreter start less
    row = next(l for l in capsys.readouterr().out.splitlines() if l.startswith(job_id)).split()
    assert row[1:5] == ["local", "COMPLETED", "2", str(steps)]


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
    if (REPO / ".venv" / "bin" / "mmtrain").is_file():  # as from a fresh checkout: no mmtrain on PATH, this checkout's venv
        env = {**{k: v for k, v in env.items() if k != "MMTRAIN"}, "PATH": "/usr/bin:/bin"}
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
