"""Launching on a real Slurm: a one-node cluster (munge, slurmctld, slurmd; tests/slurm_cluster.py)
started once for these tests, and every way in: ``mmtrain launch --cluster slurm`` (submitit) and
``sbatch slurm/train.sbatch`` (plain sbatch + srun), with real signals from Slurm.

The cluster keeps no accounting, like many: ``sacct`` answers with an error, and states come from
``scontrol``. Besides this machine's partition (``debug``, 2 CPUs, no GPU) it has a GPU partition
whose nodes are down, so that what a GPU cluster would be asked can be submitted and read back.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shlex
import subprocess
import sys
import time
from pathlib import Path


from conftest import REPO, UNINTERRUPTED_STEPS, assert_same_training, tiny_overrides, uninterrupted_overrides
from slurm_cluster import GPU_PARTITION, PARTITION

from mmtrain import cli
from mmtrain.launch.registry import read_events

CONFIG = str(REPO / "configs" / "tiny.yaml")
GOLDEN = Path(__file__).parent / "golden" / "launch_slurm_2x8.sbatch"
# a GPU cluster's submission, the golden file's: 2 nodes x 8 GPUs on the GPU partition
GPU_FLAGS = ["--nodes", "2", "--gpus-per-node", "8", "--partition", GPU_PARTITION, "--time", "12:00",
             "--account", "proj", "--qos", "high", "--constraint", "a100", "--exclusive",
             "launch.setup=[source /opt/mmtrain/.venv/bin/activate]", "data.num_workers=6"]
JOB_VARS = ("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK")


# wandb's own service process gets Slurm's TERM too: the preempted runs keep it on (configs/tiny.yaml
# turns it off), so a broken wandb connection must still leave a saved, `preempted` run
WANDB = "logging.wandb=true"

def client_env(cluster, tmp_path: Path) -> dict[str, str]:
    """The environment of a user on the login node: this cluster's SLURM_CONF, no job's variables,
    and ``mmtrain`` on PATH (what slurm/train.sbatch runs)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "mmtrain"
    exe.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m mmtrain.cli "$@"\n')
    exe.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(JOB_VARS)}
    return {**env, **cluster.env(), "PATH": f"{bin_dir}:{env['PATH']}", "MMTRAIN": str(exe)}


def mmtrain_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmtrain.cli", *args]


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def last_step(run_dir: Path) -> int:
    records = metrics(run_dir)
    return records[-1]["step"] if records else 0


def job_events(run_dir: Path, job_id: str) -> list[dict]:
    return [e for e in read_events(run_dir) if e["job_id"] == str(job_id)]


def wait_until(condition, timeout: float, what: str, context=lambda: "") -> None:
    end = time.time() + timeout
    while not condition():
        if time.time() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{context()}")
        time.sleep(0.05)


def run_started(run_dir: Path, job_id: str, run: int) -> dict | None:
    starts = [e for e in job_events(run_dir, job_id) if e["event"] == "started"]
    return starts[run - 1] if len(starts) >= run else None


def trained_in_run(run_dir: Path, job_id: str, run: int, steps: int) -> bool:
    """Run ``run`` of the job started and logged ``steps`` steps past where it resumed."""
    start = run_started(run_dir, job_id, run)
    return start is not None and last_step(run_dir) >= start["step"] + steps


def assert_like_uninterrupted(run_dir: Path, uninterrupted: Path) -> None:
    """Every step once, with the samples, losses, weights and EMA of the run that never stopped."""
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, UNINTERRUPTED_STEPS + 1))
    assert_same_training(run_dir, uninterrupted)


def read_logs(paths: list[Path]) -> list[str]:
    return [p.read_text(errors="replace") if p.exists() else "" for p in paths]


def interrupt_twice(cluster, run_dir: Path, job_id: str, logs: list[Path], context) -> str:
    """What a long job meets: the time limit (USR2 to the job's tasks, as ``--signal=USR2@120``
    sends it) in its first run, a preemption (``scontrol requeue``: TERM to every process of the
    job, KILL ``KillWait`` later) in its second; each once training logged 3 steps past where that
    run resumed. Returns what the preempted run wrote in ``logs`` between its TERM and the next
    run's start."""
    wait_until(lambda: trained_in_run(run_dir, job_id, 1, 3), 240, "run 1 to train 3 steps", context)
    cluster.run("scancel", "--signal=USR2", job_id)
    wait_until(lambda: trained_in_run(run_dir, job_id, 2, 3), 240, "run 2 to train 3 steps", context)
    before = read_logs(logs)
    cluster.run("scontrol", "requeue", job_id)
    wait_until(lambda: any(e["event"] == "preempted" for e in job_events(run_dir, job_id)), 120, "the preempted event",
               context)
    wait_until(lambda: run_started(run_dir, job_id, 3) is not None, 240, "run 3 to start", context)
    return "".join(after[len(b):] for after, b in zip(read_logs(logs), before))


def assert_interrupted_history(events: list[dict], last: str) -> None:
    """USR2 in run 1 (requeued), TERM in run 2 (preempted), then run 3 ends with ``last``."""
    names = [e["event"] for e in events if e["event"] != "submitted"]
    assert names == ["started", "requeued", "started", "preempted", "started", last], events
    starts = [e for e in events if e["event"] == "started"]
    ends = [e for e in events if e["event"] in ("requeued", "preempted", last)]
    # each save in the middle of training (3 steps past the run's start at least), each run resumed from the last
    assert [s["step"] for s in starts] == [0, ends[0]["step"], ends[1]["step"]]
    assert all(end["step"] >= start["step"] + 3 for start, end in zip(starts, ends))
    assert [e.get("signal") for e in ends[:2]] == ["SIGUSR2", "SIGTERM"]


def run_as_user(env: dict, cwd: Path, *args: str) -> tuple[int, str]:
    """(exit code, stdout) of `mmtrain ARGS` as the user with ``env`` runs it in ``cwd`` (this
    cluster's SLURM_CONF, no job's variables: what its sbatch and scontrol calls see), run in this
    process: the same command without an interpreter start and torch import (~2 s) per call."""
    saved, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = cli.main(list(args))
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved)
    return code, out.getvalue()


def jobs_table(run_dir: Path, env: dict) -> dict[str, list[str]]:
    code, stdout = run_as_user(env, run_dir, "jobs", str(run_dir))
    assert code == 0, stdout
    rows = {line.split()[0]: line.split() for line in stdout.splitlines()[1:] if line.split()[0].isdigit()}
    return rows | {"latest": [stdout.splitlines()[-1]]}


# --------------------------------------------------------------------------- submission


def test_the_golden_script_is_what_slurm_reads(slurm_cluster, synthetic_data, tmp_path, monkeypatch, capsys):
    """`mmtrain launch` of a 2-node x 8-GPU job to the GPU partition: sbatch takes the golden file's
    script, and Slurm's own reading of its #SBATCH lines is the job asked for (its nodes are down,
    so it stays pending, and is cancelled)."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env()["SLURM_CONF"])
    run_dir = tmp_path / "run"
    assert cli.main(["launch", CONFIG, *GPU_FLAGS, *tiny_overrides(synthetic_data, run_dir)]) == 0
    job_id = read_events(run_dir)[0]["job_id"]
    assert f"submitted job {job_id} (slurm: 2 node(s) x 8 ranks, 8 GPU(s) per node)" in capsys.readouterr().out
    script = (run_dir / "logs" / job_id / f"{job_id}_submission.sh").read_text()
    normalised = script.replace(str(run_dir.absolute()), "{RUN_DIR}").replace(shlex.quote(sys.executable), "{PYTHON}")
    assert normalised == GOLDEN.read_text(), "the submitted script differs from tests/golden/launch_slurm_2x8.sbatch"
    fields = dict(item.split("=", 1) for item in
                  slurm_cluster.run("scontrol", "show", "job", "-o", job_id).stdout.split() if "=" in item)
    assert {k: fields[k] for k in ("Partition", "NumNodes", "NumTasks", "CPUs/Task", "TresPerNode", "TimeLimit",
                                   "Features", "OverSubscribe", "Requeue", "Account", "JobName")} == {
        "Partition": GPU_PARTITION, "NumNodes": "2-2", "NumTasks": "16", "CPUs/Task": "8", "TresPerNode": "gres:gpu:8",
        "TimeLimit": "12:00:00", "Features": "a100", "OverSubscribe": "NO", "Requeue": "1", "Account": "proj",
        "JobName": "mmtrain"}
    assert fields["MinMemoryNode"] == "0"  # --mem=0: all of each node's memory
    assert cli.main(["jobs", str(run_dir)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:4] == [job_id, "slurm", "PENDING", "0"]
    slurm_cluster.run("scancel", job_id)


def test_defaults_fit_the_partition_and_a_refusal_is_one_line(slurm_cluster, synthetic_data, tmp_path, monkeypatch,
                                                              capsys):
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env()["SLURM_CONF"])
    overrides = tiny_overrides(synthetic_data, tmp_path / "run")

    def dry_run(*flags: str) -> list[str]:
        assert cli.main(["launch", CONFIG, "--dry-run", *flags, *overrides]) == 0
        return capsys.readouterr().out.splitlines()

    # this machine's partition has no GPUs and 2 CPUs: no GPU request, train.nproc_per_node=2 ranks,
    # and the default data.num_workers + 2 = 2 cores per rank lowered to the 1 each can have
    lines = dry_run()
    assert not any("gpus" in l or "gres" in l or "--mem" in l for l in lines), lines
    assert "#SBATCH --ntasks-per-node=2" in lines and "#SBATCH --cpus-per-task=1" in lines
    assert f"#SBATCH --partition={PARTITION}" not in lines  # the default partition: nothing to set
    # the GPU partition: one rank per GPU, all of each node's memory
    lines = dry_run("--partition", GPU_PARTITION)
    for line in ("--gpus-per-node=8", "--ntasks-per-node=8", "--mem=0", "--cpus-per-task=2"):
        assert f"#SBATCH {line}" in lines, (line, lines)

    # a partition this cluster does not have: named, with those it has, before anything is submitted
    assert cli.main(["launch", CONFIG, "--partition", "a100", *overrides]) == 2
    err = capsys.readouterr().err
    assert "mmtrain launch: error: launch.partition: no partition 'a100' on this cluster (its partitions, * = default: " \
           f"{PARTITION}*, {GPU_PARTITION})" in err
    # GPUs asked for where there are none: Slurm takes the job and would hold it forever; said in one
    # line, which options decide it, and the job cancelled
    assert cli.main(["launch", CONFIG, "--gpus-per-node", "8", *overrides]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = next(l for l in err.splitlines() if l.startswith("mmtrain launch: error: "))
    job_id = line.split("Slurm accepted job ")[1].split()[0]
    assert line == (f"mmtrain launch: error: Slurm accepted job {job_id} but holds it for good (PartitionConfig: the "
                    "partition cannot give what it asks) (asked for --gpus-per-node 8, --tasks-per-node 8, "
                    "--cpus-per-task 1, --mem 0, --nodes 1); cancelled it")
    wait_until(lambda: slurm_cluster.job_state(job_id) == "CANCELLED", 30, f"job {job_id} to be cancelled")
    # a node feature no node has: sbatch refuses; what it said and the option that decides it, in one line
    assert cli.main(["launch", CONFIG, "--constraint", "h100", *overrides]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("Invalid feature specification") == 1
    assert ("mmtrain launch: error: sbatch refused the job: Batch job submission failed: Invalid feature specification "
            "(asked for --constraint h100)") in err


# --------------------------------------------------------------------------- the job's life


def test_launch_survives_time_limits_and_preemption_like_an_uninterrupted_run(slurm_cluster, synthetic_data,
                                                                             uninterrupted_run, tmp_path):
    """`mmtrain launch --wait` (submitit) with launch.max_timeouts=1: time limit -> requeued by mmtrain;
    preemption -> saved, every rank exits 0, recorded `preempted`, requeued by Slurm; time limit
    again -> not requeued. Launched again, the run finishes with the losses of a run that never stopped."""
    env, run_dir = client_env(slurm_cluster, tmp_path), tmp_path / "run"
    args = ["launch", CONFIG, "--cluster", "slurm", "--time", "00:10", "--max-timeouts", "1", "--wait", "--poll-s", "0.5",
            *uninterrupted_overrides(synthetic_data, run_dir, WANDB)]
    out_a = tmp_path / "wait_a.log"
    with open(out_a, "w") as fh:
        waiting = subprocess.Popen(mmtrain_cmd(*args), env=env, cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT)
    wait_until(lambda: (run_dir / "jobs.jsonl").is_file(), 120, "the submission", lambda: out_a.read_text())
    job_a = read_events(run_dir)[0]["job_id"]
    logs = run_dir / "logs" / job_a

    def context() -> str:
        return out_a.read_text() + "".join(read_logs([logs / f"{job_a}_{r}_log.err" for r in (0, 1)]))[-3000:]

    preempted_run = interrupt_twice(slurm_cluster, run_dir, job_a, [logs / f"{job_a}_{r}_log.err" for r in (0, 1)],
                                    context)
    # the time limit again in run 3: launch.max_timeouts=1 requeue was spent in run 1
    wait_until(lambda: trained_in_run(run_dir, job_a, 3, 3), 240, "run 3 to train 3 steps", context)
    slurm_cluster.run("scancel", "--signal=USR2", job_a)
    assert waiting.wait(300) == 1, context()
    said = out_a.read_text()
    events = job_events(run_dir, job_a)
    assert_interrupted_history(events, "not_requeued")
    not_requeued = events[-1]
    assert not_requeued["signal"] == "SIGUSR2" and "timed-out too many times" in not_requeued["reason"]
    assert not_requeued["step"] < UNINTERRUPTED_STEPS

    # the preempted run: both ranks saved and ended well, no error anywhere
    assert preempted_run.count("SIGTERM: saved step") == 2 and "Traceback" not in preempted_run
    assert preempted_run.count("Job completed successfully") == 2  # submitit, each rank
    assert "Exited with exit code" not in preempted_run
    # --wait followed the job through both requeues, then said how it ended, in one line
    assert said.count(f"job {job_a}: RUNNING") == 3 and "PENDING (BeginTime)" in said
    assert said.count("keeps no Slurm accounting") == 1 and "Bypassing sacct" not in said and "Traceback" not in said
    assert said.strip().splitlines()[-1] == (f"job {job_a} not requeued after saving step {not_requeued['step']}: "
                                             f"{not_requeued['reason']} (state TIMEOUT)")

    # launched again: resumes where the time limit stopped it, and finishes
    code, stdout = run_as_user(env, tmp_path, *args)
    assert code == 0, stdout
    job_b = [e["job_id"] for e in read_events(run_dir) if e["event"] == "submitted"][-1]
    assert stdout.strip().splitlines()[-1] == f"job {job_b} finished at step {UNINTERRUPTED_STEPS} after 1 run(s)"
    # (the job may start before `mmtrain launch` recorded its submission)
    assert sorted((e["event"], e.get("step") or 0) for e in job_events(run_dir, job_b)) == [
        ("finished", UNINTERRUPTED_STEPS), ("started", not_requeued["step"]), ("submitted", 0)]
    for rank in (0, 1):  # submitit's record of each rank's return
        outcome, result = pickle.loads((run_dir / "logs" / job_b / f"{job_b}_{rank}_result.pkl").read_bytes())
        assert (outcome, result) == ("success", {"step": UNINTERRUPTED_STEPS, "stopped_by": None})
    assert_like_uninterrupted(run_dir, uninterrupted_run)

    table = jobs_table(run_dir, env)
    assert table[job_a][1:5] == ["slurm", "TIMEOUT", "3", str(not_requeued["step"])]
    assert table[job_b][1:5] == ["slurm", "COMPLETED", "1", str(UNINTERRUPTED_STEPS)]
    assert table["latest"] == [f"latest checkpoint: step{UNINTERRUPTED_STEPS:08d} (of {UNINTERRUPTED_STEPS} planned steps)"]


def test_train_sbatch_survives_time_limits_and_preemption_like_an_uninterrupted_run(slurm_cluster, synthetic_data,
                                                                                   uninterrupted_run, tmp_path):
    """The same under plain `sbatch slurm/train.sbatch` (srun tasks, no submitit), its resources set on
    sbatch's command line for this 2-CPU node: rank 0 requeues the job itself on the time limit, Slurm
    on the preemption, and the third run finishes; recorded like `mmtrain launch` jobs."""
    env, run_dir = client_env(slurm_cluster, tmp_path), tmp_path / "run"
    out = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1",
                          "--time=10", str(REPO / "slurm" / "train.sbatch"), CONFIG,
                          *uninterrupted_overrides(synthetic_data, run_dir, WANDB)],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    # the batch script's log and each rank's are in the run directory; sbatch's --output file says where
    first_lines, batch_log = tmp_path / f"slurm-mmtrain-{job}.out", run_dir / "logs" / f"slurm-mmtrain-{job}.out"

    def context() -> str:
        return "".join(read_logs([first_lines, batch_log]))[-3000:] + slurm_cluster.logs()

    # while it runs, `mmtrain jobs` lists it (it recorded no submission) with the last step it logged
    wait_until(lambda: trained_in_run(run_dir, job, 1, 3), 240, "run 1 to train 3 steps", context)
    row = jobs_table(run_dir, env)[job]
    assert row[1:3] == ["slurm", "RUNNING"] and int(row[4]) >= 3 and row[5:] == ["sbatch", str(batch_log)], row
    preempted_run = interrupt_twice(slurm_cluster, run_dir, job,
                                    [run_dir / "logs" / f"slurm-mmtrain-{job}{task}.out" for task in ("", "-0", "-1")],
                                    context)
    wait_until(lambda: slurm_cluster.job_state(job) in ("COMPLETED", "FAILED"), 240, "the job to end", context)
    assert slurm_cluster.job_state(job) == "COMPLETED", context()
    events = job_events(run_dir, job)
    assert_interrupted_history(events, "finished")
    assert events[-1]["step"] == UNINTERRUPTED_STEPS
    assert all(e.get("launcher") == "mmtrain train" for e in events if e["event"] == "started")
    # the preempted run: both ranks saved; srun reports no task that exited with an error; no traceback
    assert preempted_run.count("SIGTERM: saved step") == 2
    assert "Exited with exit code" not in preempted_run and "Traceback" not in preempted_run
    # the preflight ran once per run, in the batch script, never in the tasks
    assert batch_log.read_text().count("preflight passed") == 3
    assert not any("preflight" in (run_dir / "logs" / f"slurm-mmtrain-{job}-{t}.out").read_text() for t in (0, 1))
    assert first_lines.read_text().count(f"logs in {batch_log} and, per rank,") == 3
    assert "preflight" not in first_lines.read_text()
    # rank 0 said what each run's start-up did, with seconds
    rank0 = (run_dir / "logs" / f"slurm-mmtrain-{job}-0.out").read_text()
    for line in ("start-up: DeepSpeed initialised in ", "start-up: first batch arrived in ", "start-up: first step done in "):
        assert rank0.count(line) == 3, (line, rank0[-3000:])
    assert rank0.count("start-up: checkpoint step") == 2  # runs 2 and 3 resumed
    assert_like_uninterrupted(run_dir, uninterrupted_run)
    assert jobs_table(run_dir, env)[job][1:] == ["slurm", "COMPLETED", "3", str(UNINTERRUPTED_STEPS), "sbatch", str(batch_log)]


def test_a_job_that_fails_or_is_cancelled_is_recorded_as_such(slurm_cluster, synthetic_data, tmp_path):
    """Shards whose images do not decode, with data.max_bad_samples=0: through `mmtrain launch --wait`
    and through train.sbatch, the job fails, and its history, `--wait` and `mmtrain jobs` say so, with
    the error. Beside them, a job that `scancel` ends saves, and is recorded `cancelled`, not
    `preempted`. One rank each, at once."""
    from test_loader import write_tar

    bad = tmp_path / "bad"
    write_tar(bad / "bad-000000.tar", [m for i in range(32) for m in
                                       ((f"k{i:02d}.png", b"\x89PNG not an image"), (f"k{i:02d}.txt", b"a red circle"))])
    env = client_env(slurm_cluster, tmp_path)

    def overrides(run_dir: Path) -> list[str]:
        return tiny_overrides(synthetic_data, run_dir, f"data.train_shards={bad}", "data.max_bad_samples=0",
                              "train.nproc_per_node=1")

    launched, sbatched, cancelled = tmp_path / "launched", tmp_path / "sbatched", tmp_path / "cancelled"
    to_cancel = subprocess.Popen(mmtrain_cmd("launch", CONFIG, "--cluster", "slurm", "--cpus-per-task", "1", "--wait",
                                             "--poll-s", "0.5", *tiny_overrides(synthetic_data, cancelled, "train.steps=400",
                                                                                "train.nproc_per_node=1", "logging.log_every=1")),
                                 env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    waiting = subprocess.Popen(mmtrain_cmd("launch", CONFIG, "--cluster", "slurm", "--cpus-per-task", "1", "--wait",
                                           "--poll-s", "0.5", *overrides(launched)),
                               env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sub = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1",
                          str(REPO / "slurm" / "train.sbatch"), CONFIG, *overrides(sbatched)],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    job_s = sub.stdout.strip().split(";")[0]
    stdout, stderr = waiting.communicate(timeout=600)
    assert waiting.returncode == 1, stdout + stderr
    job = read_events(launched)[0]["job_id"]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"job {job} failed (rank 0, ") and "ShardDataError" in last and str(bad / "bad-000000.tar") in last
    wait_until(lambda: slurm_cluster.job_state(job_s) in ("COMPLETED", "FAILED"), 300, "the sbatch job to end")
    assert slurm_cluster.job_state(job_s) == "FAILED"

    for run_dir, job_id in ((launched, job), (sbatched, job_s)):
        failures = [e for e in job_events(run_dir, job_id) if e["event"] == "failed"]
        assert failures and "ShardDataError" in failures[0]["error"] and "bad-000000.tar" in failures[0]["error"]
        assert jobs_table(run_dir, env)[job_id][1:4] == ["slurm", "FAILED", "1"]

    wait_until(lambda: (cancelled / "jobs.jsonl").is_file(), 120, "the submission to cancel")
    job_c = read_events(cancelled)[0]["job_id"]
    wait_until(lambda: trained_in_run(cancelled, job_c, 1, 3), 300, "3 steps of the job to cancel")
    slurm_cluster.run("scancel", job_c)
    stdout, stderr = to_cancel.communicate(timeout=300)
    assert to_cancel.returncode == 1, stdout + stderr
    ended = job_events(cancelled, job_c)[-1]
    assert (ended["event"], ended["signal"]) == ("cancelled", "SIGTERM") and ended["step"] >= 3
    assert (cancelled / "checkpoints" / f"step{ended['step']:08d}" / "meta.json").is_file()
    assert stderr.strip().splitlines()[-1] == f"job {job_c} cancelled after saving step {ended['step']} (state CANCELLED)"
    assert jobs_table(cancelled, env)[job_c][1:4] == ["slurm", "CANCELLED", "1"]
