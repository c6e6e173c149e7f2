"""The ``mmtrain`` command: argument parsing and dispatch; the logic it dispatches to is tested with its library module."""
from __future__ import annotations

import pytest

from mmtrain import cli


def _fails(message: str) -> dict:
    raise ValueError(message)


def _finishes() -> dict:
    return {"step": 7, "stopped_by": ""}


def test_a_debug_job_reports_the_error_that_ended_it_in_one_line(tmp_path, monkeypatch):
    """submitit's FailedJobError carries the job's whole traceback; `mmtrain launch --cluster debug`
    prints its last line (mmtrain.launch.submit.run_debug)."""
    import io

    import submitit

    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # the debug executor's post-mortem pdb reads EOF: no session

    from mmtrain.launch.submit import failure_line, run_debug

    executor = submitit.AutoExecutor(folder=tmp_path / "logs", cluster="debug")
    job = executor.submit(_fails, "the shards are gone")
    finished, line = run_debug(job)
    assert not finished and line == f"job {job.job_id} failed: the shards are gone"  # debug re-raises the job's own error
    done = executor.submit(_finishes)
    assert run_debug(done) == (True, f"job {done.job_id} done at step 7")
    # a job run elsewhere (local, Slurm) fails with FailedJobError, the traceback between dashed lines (as submitit writes it)
    from submitit.core.utils import FailedJobError

    trace = 'Traceback (most recent call last):\n  File "x.py", line 1, in f\nValueError: the shards are gone\n'
    exc = FailedJobError(f"Job (task=0) failed during processing with trace:\n----------------------\n{trace}\n"
                         "----------------------\nYou can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n  - e\n  - o")
    assert failure_line(exc) == "ValueError: the shards are gone"


def test_every_subcommand_parses_and_dispatches():
    parser = cli.build_parser()
    for argv, func in ((["prep", "synthetic", "--out", "x", "--num", "3"], None),
                       (["tokenizer", "train", "--out", "t"], cli.cmd_tokenizer_train),
                       (["tokenizer", "estimate-scale", "t.yaml", "--shards", "s"], cli.cmd_tokenizer_estimate_scale),
                       (["tokenizer", "train-vae", "--shards", "s", "--out", "o"], cli.cmd_tokenizer_train_vae),
                       (["train", "c.yaml", "a.b=1"], cli.cmd_train),
                       (["launch", "c.yaml", "--cluster", "debug", "--gpus-per-node", "auto"], cli.cmd_launch),
                       (["jobs", "run"], cli.cmd_jobs),
                       (["sample", "run", "--prompt", "p", "--set", "ar_steps=2"], cli.cmd_sample),
                       (["caption", "run", "a.png"], cli.cmd_caption),
                       (["edit", "run", "a.png", "--region", "0,0,1,1"], cli.cmd_edit),
                       (["convert", "causalfusion-official", "a.pt", "out"], cli.cmd_convert),
                       (["convert", "vae", "a.pt", "out", "--arch", "sd_vae"], cli.cmd_convert_vae),
                       (["eval", "generate", "run", "--cfg", "1,2", "--ar-steps", "1,4"], cli.cmd_eval),
                       (["eval", "caption", "run"], cli.cmd_eval),
                       (["eval", "text", "run", "--file", "t.txt", "--max-len", "64"], cli.cmd_eval_text),
                       (["export", "run", "--out", "o"], cli.cmd_export),
                       (["demo"], cli.cmd_demo)):
        args = parser.parse_args(argv)
        assert callable(args.func) and (func is None or args.func is func), argv
    args = parser.parse_args(["eval", "generate", "run", "--cfg", "1,2", "--ar-steps", "1,4"])
    assert (args.cfg, args.ar_steps) == ([1.0, 2.0], [1, 4])
    assert parser.parse_args(["launch", "c.yaml", "--gpus-per-node", "auto"]).gpus_per_node == "auto"


def test_a_bad_option_value_is_one_error_line_naming_the_key(capsys):
    """Options of `mmtrain launch` go through the launch section's validation: exit code 2, one line."""
    from conftest import REPO

    assert cli.main(["launch", str(REPO / "configs" / "tiny.yaml"), "--cluster", "local", "--nodes", "2", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tiny.yaml: launch.nodes=2: cluster 'local' runs on this machine only" in err[0]
    with pytest.raises(SystemExit):
        cli.main(["launch", str(REPO / "configs" / "tiny.yaml"), "--nodes", "two"])
