"""The GPU acceptance script runs on CPU in the suite (--cpu --quick), so it cannot rot."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO


def test_gpu_check_cpu_quick_smoke(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert set(sections) == {"parity", "host_sync", "train_resume", "inference", "throughput"}
    # host syncs exist only on CUDA: n/a on the CPU, which counts neither way; the others passed
    assert sections["host_sync"]["pass"] is None and "n/a" in sections["host_sync"]["note"]
    assert all(s["pass"] for name, s in sections.items() if name != "host_sync") and report["pass"]
    assert "| host_sync | n/a |" in proc.stdout
    # parity compared two computations (fp32 against float64): they differ, by fp32 rounding
    parity = sections["parity"]
    assert 0 < parity["loss_abs_diff"] <= 1e-5 * parity["loss_float64"] and 0 < parity["grad_max_abs_diff"]
    resume = sections["train_resume"]
    assert resume["resumed_at"] == 1 and resume["max_loss_diff"] == 0 and resume["data_hashes_equal"]
    assert len(sections["inference"]["captions"]) == 4 and sections["inference"]["eval_device"] == "cpu"
    assert sections["host_sync"]["variants"] == ["causalfusion text", "causalfusion class packed", "causalfusion documents",
                                                    "causalfusion llama frozen_text packed", "transdiff text mrar"]
    training = sections["throughput"]["training"]
    assert training and all(r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 for r in training)
    assert all(r["graphs_timed"] == 0 for r in training)  # warm before timing: no compile inside a timed step
    assert {(r["ar_steps"], r["kv_cache"]) for r in sections["throughput"]["sampling"]} == {(1, True), (1, False), (16, True), (16, False)}
    assert "| tiny dit | 0.3M | 8 | sdpa |" in proc.stdout and "### sampling" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_without_cuda_asks_for_cpu(capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    assert gpu_check.main(["--out", "unused.json"]) == 2
    assert "no CUDA device here; run with --cpu" in capsys.readouterr().err
