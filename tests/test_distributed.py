"""mmtrain.distributed on two real gloo ranks (finite flag, metric sums, preemption, gather),
and the rule that no other module calls torch.distributed collectives."""
from __future__ import annotations

import ast
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import REPO, free_port

from mmtrain import distributed


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    r, world, dev = distributed.init(60)
    result: dict = {"rank": r, "world": world, "device": str(dev)}
    # a NaN on rank 1 only: both ranks see "not all finite"
    loss = torch.tensor(float("nan") if r == 1 else 1.5, device=dev)
    result["finite_one_nan"] = distributed.all_true(torch.isfinite(loss))
    result["finite_all"] = distributed.all_true(torch.isfinite(torch.tensor(2.0, device=dev)))
    result["sums"] = distributed.sum_over_ranks(torch.tensor([1.0 + r, 10.0 * r], device=dev))
    result["maxima"] = distributed.max_over_ranks([float(r), 5.0 - r])
    # preemption: USR2 reaches rank 0 only; both ranks agree to requeue at the same step
    from mmtrain.components.preemption import PreemptionWatch

    watch = PreemptionWatch(stop_on_term=True)
    try:
        result["before_signal"] = watch.agreed()
        if r == 0:
            os.kill(os.getpid(), signal.SIGUSR2)
        if r == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # "stop" on one rank, "requeue" on the other: requeue wins
        result["after_signal"] = watch.agreed()
    finally:
        watch.restore()
    result["gathered"] = distributed.gather_objects({"rank": r, "items": list(range(r + 1))})
    distributed.barrier()
    torch.save(result, Path(out_dir) / f"rank{r}.pt")
    distributed.destroy()


def test_two_gloo_ranks_agree_on_flags_sums_preemption_and_gather(tmp_path):
    mp.start_processes(_rank_main, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r, res in enumerate(results):
        assert (res["rank"], res["world"], res["device"]) == (r, 2, "cpu")
        assert res["finite_one_nan"] is False and res["finite_all"] is True
        assert res["sums"] == [3.0, 10.0]
        assert res["maxima"] == [1.0, 5.0]
        assert res["before_signal"] is None and res["after_signal"] == "requeue"
    assert results[0]["gathered"] == [{"rank": 0, "items": [0]}, {"rank": 1, "items": [0, 1]}]
    assert results[1]["gathered"] is None


def test_one_process_without_a_group_answers_for_itself():
    assert not distributed.is_initialized()
    assert distributed.all_true(torch.tensor(True)) and not distributed.all_true(torch.tensor(False))
    assert distributed.sum_over_ranks(torch.tensor([1.0, 2.0])) == [1.0, 2.0]
    assert distributed.gather_objects("x") == ["x"]
    assert distributed.device() == torch.device("cpu")  # no CUDA here
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device 'tpu'"):
        distributed.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            distributed.resolve_device("cuda")


def test_wait_for_path_sees_a_renamed_directory_and_times_out_naming_what(tmp_path, caplog, monkeypatch):
    """How ranks wait for rank 0 before the process group exists: on the filesystem, no collective."""
    import threading
    import time

    target = tmp_path / "universal-step00000006"
    (tmp_path / ".universal-step00000006").mkdir()
    threading.Timer(0.5, lambda: (tmp_path / ".universal-step00000006").rename(target)).start()
    with caplog.at_level("WARNING", logger="mmtrain.distributed"):
        waited = distributed.wait_for_path(target, timeout_s=30, what="the conversion (a.key=30)", poll_s=0.05, log_every_s=0.2)
    assert 0.4 < waited < 5 and target.is_dir()
    assert "waiting for the conversion (a.key=30)" in caplog.text  # progress is logged while it waits
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"waited \d+ s for the conversion \(a.key=1\), but .*never did not appear"):
        distributed.wait_for_path(tmp_path / "never", timeout_s=1, what="the conversion (a.key=1)", poll_s=0.05)
    assert time.monotonic() - t0 < 3
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert (distributed.launched_rank(), distributed.launched_world_size()) == (3, 8)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert (distributed.launched_rank(), distributed.launched_world_size()) == (0, 1)  # a lone process


COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "gather", "gather_object", "scatter",
               "scatter_object_list", "reduce", "barrier", "all_to_all", "all_to_all_single", "send", "recv",
               "init_process_group", "destroy_process_group", "new_group"}


def _distributed_uses(path: Path) -> list[str]:
    """Imports of torch.distributed (or deepspeed.comm) and calls of collectives on any name bound to it."""
    tree = ast.parse(path.read_text(), str(path))
    names, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in ("torch.distributed", "deepspeed.comm"):
                    names.add(alias.asname or alias.name)
                    found.append(f"{path.name}:{node.lineno} import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module in ("torch.distributed", "deepspeed.comm") or (
                    node.module in ("torch", "deepspeed") and any(a.name in ("distributed", "comm") for a in node.names)):
                found.append(f"{path.name}:{node.lineno} from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            base = ast.unparse(node.func.value)
            if base in names or base in ("dist", "torch.distributed", "deepspeed.comm"):
                found.append(f"{path.name}:{node.lineno} {base}.{node.func.attr}()")
    return found


def test_no_module_but_mmtrain_distributed_calls_torch_distributed():
    owner = REPO / "mmtrain" / "distributed.py"
    assert _distributed_uses(owner)  # the scan sees the real thing
    files = [p for folder in ("mmtrain", "benchmarks", "data_prep", "tokenizers", "slurm") for p in (REPO / folder).rglob("*.py")]
    offenders = [use for p in files if p != owner for use in _distributed_uses(p)]
    assert offenders == []


def test_the_scan_catches_a_direct_collective(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch.distributed as dist\nimport torch\n\ndef f(x):\n    dist.all_reduce(x)\n"
                   "    torch.distributed.barrier()\n")
    assert _distributed_uses(bad) == ["bad.py:1 import torch.distributed", "bad.py:5 dist.all_reduce()",
                                      "bad.py:6 torch.distributed.barrier()"]
