"""Shards in object storage: a real S3-compatible server (moto, credentials checked) and a real HTTP
server on 127.0.0.1, with a fault-injecting proxy in front of either; prep writes to the bucket, the
loader streams through a bounded cache, a 2-rank ZeRO-3 run is killed mid-epoch and resumed."""
from __future__ import annotations

import dataclasses
import io
import getpass
import json
import os
import pickle
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, assert_same_training, tiny_overrides
from storage_servers import BUCKET, Faults, restore_env, set_env, start_fault_proxy, start_http

from mmtrain import cli
from mmtrain.components.data import DataConfig, build_train_loader, check_cache_limit, open_sources, shard_cache_for
from mmtrain.data import storage
from mmtrain.data.cache import CacheFullError, RemoteFile, ShardCache
from mmtrain.data import node_local
from mmtrain.data.node_local import (NETWORK_FILESYSTEMS, cache_dir_warning, filesystem_of, node_local_root,
                                     resolve_cache_dir, share_on_node)
from mmtrain.data.order import StreamOrder

S3 = f"s3://{BUCKET}"
CONFIG = str(REPO / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def s3(s3_server, tmp_path_factory):
    server = s3_server
    scratch = tmp_path_factory.mktemp("s3env")
    old = set_env({**server.env(), "MMTRAIN_IO_BACKOFF_S": "0.01", "MMTRAIN_STAGING_DIR": str(scratch / "staging"),
                   "MMTRAIN_CACHE_DIR": str(scratch / "default_cache")})
    yield server
    restore_env(old)


@pytest.fixture(scope="module")
def bucket(s3, tmp_path_factory):
    """prep writes the same 200 samples to the bucket twice: as 8 webdataset shards and as MDS shards;
    ``local_*`` are local copies of the bucket's bytes (for comparison), ``local_root`` holds both."""
    from mmtrain.data.staging import stage_input

    local_prep = tmp_path_factory.mktemp("local_prep")
    for out in (f"{S3}/syn", str(local_prep / "syn")):
        assert cli.main(["prep", "synthetic", "--out", out, "--num", "200", "--samples-per-shard", "25", "--quiet"]) == 0
    assert cli.main(["prep", "wds", f"{S3}/syn", "--out", f"{S3}/mds", "--format", "mds", "--shard-size", "60KB",
                     "--no-dedup", "--workers", "1", "--quiet"]) == 0
    listed = storage.store_for(S3).sizes(S3)
    local_wds, local_mds = stage_input(f"{S3}/syn"), stage_input(f"{S3}/mds/train")
    assert os.path.dirname(local_wds) == os.path.dirname(local_mds)
    return {"wds": f"{S3}/syn", "mds": f"{S3}/mds/train", "local_wds": local_wds, "local_mds": local_mds,
            "local_root": os.path.dirname(local_wds), "local_prep": str(local_prep / "syn"), "listed": listed}


def data_cfg(paths: list[str], cache: Path, **kw) -> DataConfig:
    return DataConfig(sources=[{"path": p} for p in paths], num_workers=kw.pop("num_workers", 0),
                      index_cache="", cache_dir=str(cache), **kw)


def epoch(cfg: DataConfig, n: int, micro: int = 16, rank: int = 0, world: int = 1, start: int = 0, seed: int = 0,
          stats: dict | None = None):
    """The first ``n`` batches (keys, pixels, substituted, io) this rank reads; ``stats`` gets the cache's peak."""
    loader = build_train_loader(cfg, micro, rank, world_size=world, seed=seed, start_sample=start)
    out = []
    for _, batch in zip(range(n), loader):  # range first: zip would otherwise build one batch more
        out.append((batch.keys, batch.pixels.numpy(), batch.substituted, batch.io))
    prefetcher = loader.dataset.prefetcher
    if prefetcher is not None:
        prefetcher.wait()  # downloads still in flight would race the counters read next
        if stats is not None:
            stats["peak_bytes"] = prefetcher.cache.peak_bytes
    return out


def source_shard_sizes(bucket: dict) -> list[int]:
    """Bytes of each shard of the two training sources, largest first."""
    return sorted((n for u, n in bucket["listed"].items()
                   if u.startswith(bucket["wds"] + "/") and u.endswith(".tar")
                   or u.startswith(bucket["mds"] + "/") and u.endswith(".mds")), reverse=True)


# --------------------------------------------------------------------------- prep into the bucket


def test_prep_writes_shards_with_their_indexes_to_the_bucket(bucket):
    names = sorted(u.removeprefix(f"{S3}/") for u in bucket["listed"])
    tars = [n for n in names if n.startswith("syn/") and n.endswith(".tar")]
    assert len(tars) == 8 and all(f"{t}.index.json" in names for t in tars) and "syn/stats.json" in names
    side = json.loads(storage.read_bytes(f"{S3}/{tars[0]}.index.json"))
    assert len(side["keys"]) == 25 and side["size"] == bucket["listed"][f"{S3}/{tars[0]}"] and len(side["sha256"]) == 64
    index = json.loads(storage.read_bytes(f"{bucket['mds']}/index.json"))
    assert len(index["shards"]) >= 3 and all("sha1" in s["raw_data"]["hashes"] for s in index["shards"])
    assert sum(s["samples"] for s in index["shards"]) == 200
    # the bucket holds byte-identical copies of what prep writes locally
    local = Path(bucket["local_prep"])
    assert storage.read_bytes(f"{S3}/{tars[3]}") == (local / Path(tars[3]).name).read_bytes()


# --------------------------------------------------------------------------- order and cache units


def test_window_order_reads_one_window_at_a_time_and_is_a_permutation():
    shards = [np.repeat(np.arange(8), 25), np.repeat(np.arange(5), 40)]
    order = StreamOrder([200, 200], [1.0, 1.0], shards=shards, window=3, seed=7)
    src, idx, _ = order.lookup(np.arange(400))
    glob = order.shard_of_sample[order.starts[src] + idx]
    assert sorted(order.starts[src] + idx) == list(range(400))  # every sample once per epoch
    starts, perm = order._epoch(0)[1], order._epoch(0)[2]
    for w, first in enumerate(starts):
        last = starts[w + 1] if w + 1 < len(starts) else 400
        assert set(glob[first:last]) == set(perm[3 * w:3 * w + 3])  # window w reads its 3 shards only
        current, following = order.window_shards(int(first))
        assert list(current) == list(perm[3 * w:3 * w + 3])
        assert list(following) == (list(perm[3 * w + 3:3 * w + 6]) if w + 1 < len(starts) else list(order._epoch(1)[2][:3]))
    assert len(starts) == 5 and not np.array_equal(order._epoch(0)[2], order._epoch(1)[2])  # 13 shards; epochs reshuffle
    # samples are mixed within a window, not read shard by shard
    assert len(set(glob[starts[0]:starts[0] + 10])) > 1
    with pytest.raises(ValueError, match="shuffle_window: shard windows need data.mode: epoch"):
        StreamOrder([200], [1.0], mode="resampled", shards=shards[:1], window=2)


def test_shard_cache_evicts_least_recently_used_within_its_limit(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    for i in range(5):
        (root / f"f{i}.bin").write_bytes(bytes([i]) * 1000)
    base, server = start_http(str(root))
    try:
        cache = ShardCache(str(tmp_path / "cache"), limit=3000)
        before = storage.io_snapshot()
        files = [RemoteFile(f"{base}/f{i}.bin", 1000) for i in range(5)]
        for f in files[:3]:
            assert Path(cache.get(f)).read_bytes() == open(root / Path(f.url).name, "rb").read()
        cache.get(files[0])  # a hit, and f0 is now the most recently used
        cache.pin([files[1].url])
        cache.get(files[3])  # evicts f2: f1 is pinned, f0 was used last
        assert sorted(p.name.split("-", 1)[1] for p in (tmp_path / "cache").glob("*.bin")) == ["f0.bin", "f1.bin", "f3.bin"]
        d = storage.io_snapshot() - before
        assert (d["cache_hits"], d["cache_misses"], d["shard_downloads"], d["cache_evictions"], d["bytes_fetched"]) == \
            (1, 4, 4, 1, 4000)
        assert cache.used_bytes() <= 3000
        cache.pin([files[0].url, files[1].url, files[3].url])  # all three cached files are needed now
        with pytest.raises(CacheFullError, match="data.cache_limit=3000 bytes cannot hold"):
            cache.get(files[4])
    finally:
        server.shutdown()


# --------------------------------------------------------------------------- the loader over the bucket


def test_loader_streams_s3_and_http_through_a_bounded_cache_like_local_disk(bucket, tmp_path):
    """One epoch from s3 (wds + MDS) with a cache smaller than the dataset: the same batches as from
    local disk, the cache never above its limit, every shard fetched once; the same over HTTP."""
    sizes = source_shard_sizes(bucket)
    limit = sum(sizes[:5])  # two windows of 2 shards, and one to spare
    assert limit < sum(sizes)
    local = epoch(data_cfg([bucket["local_wds"], bucket["local_mds"]], tmp_path / "unused", shuffle_window=2), 25)
    before, stats = storage.io_snapshot(), {}
    remote = epoch(data_cfg([bucket["wds"], bucket["mds"]], tmp_path / "cache", shuffle_window=2,
                            cache_limit=str(limit)), 25, stats=stats)
    d = storage.io_snapshot() - before
    assert [b[0] for b in remote] == [b[0] for b in local]
    assert all(np.array_equal(r[1], l[1]) for r, l in zip(remote, local))
    assert sorted(k for b in remote for k in b[0]) == sorted(f"{s}:{i:08d}" for s in (0, 1) for i in range(200))
    assert 0 < stats["peak_bytes"] <= limit and d["cache_evictions"] > 0
    assert sum(p.stat().st_size for p in (tmp_path / "cache").iterdir() if p.is_file()) <= limit
    # each shard downloaded once (by the prefetch, ahead of its window), plus at most the next epoch's first window
    assert len(sizes) <= d["shard_downloads"] <= len(sizes) + 2
    assert d["cache_hits"] + d["cache_misses"] == len(sizes)  # one read opens each shard once
    assert sum(b[3].get("bytes_fetched", 0) for b in remote) <= d["bytes_fetched"]  # Batch.io carries the counts

    # the same bytes over plain HTTP: a static server for the local copy, shards named by brace pattern
    base, server = start_http(bucket["local_root"])
    wds_dir, mds_dir = Path(bucket["local_wds"]).name, Path(bucket["local_mds"]).name
    try:
        http_cfg = data_cfg([f"{base}/{wds_dir}/shard-{{000000..000007}}.tar", f"{base}/{mds_dir}"], tmp_path / "http_cache",
                            shuffle_window=2, cache_limit=str(limit))
        over_http = epoch(http_cfg, 25)
        assert [b[0] for b in over_http] == [b[0] for b in local]
    finally:
        server.shutdown()


def test_world_size_change_and_resume_see_the_same_stream_from_s3(bucket, tmp_path):
    cfg = data_cfg([bucket["wds"], bucket["mds"]], tmp_path / "cache", shuffle_window=2)
    one = epoch(cfg, 6, micro=16)
    two = [epoch(cfg, 6, micro=8, rank=r, world=2) for r in (0, 1)]
    assert [b[0] for b in one] == [a[0] + b[0] for a, b in zip(*two)]
    resumed = epoch(cfg, 2, micro=16, start=4 * 16)
    assert [b[0] for b in resumed] == [b[0] for b in one[4:]]
    # two dataloader workers (each with its own prefetch threads and S3 client after the fork): same batches
    assert [b[0] for b in epoch(dataclasses.replace(cfg, num_workers=2), 6, micro=16)] == [b[0] for b in one]


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("kind,every", [("503", 3), ("drop", 4), ("truncate", 3)])
def test_transient_faults_are_retried_and_counted_and_change_nothing(bucket, s3, tmp_path, kind, every):
    clean = epoch(data_cfg([bucket["wds"], bucket["mds"]], tmp_path / "clean", shuffle_window=2), 25)
    faults = Faults(every=every, kind=kind)
    proxy, server = start_fault_proxy(s3.endpoint, faults)
    old = set_env({"S3_ENDPOINT_URL": proxy})
    try:
        before = storage.io_snapshot()
        faulty = epoch(data_cfg([bucket["wds"], bucket["mds"]], tmp_path / "faulty", shuffle_window=2), 25)
        d = storage.io_snapshot() - before
    finally:
        restore_env(old)
        server.shutdown()
    assert faults.injected > 0 and d["retries"] == faults.injected  # every injected fault cost one counted retry
    assert [b[0] for b in faulty] == [b[0] for b in clean]
    assert all(np.array_equal(f[1], c[1]) for f, c in zip(faulty, clean)) and not any(b[2] for b in faulty)


def test_http_short_reads_are_retried(bucket, tmp_path):
    base, server = start_http(bucket["local_root"])
    faults = Faults(every=2, kind="truncate")
    proxy, proxy_server = start_fault_proxy(base, faults)
    try:
        before = storage.io_snapshot()
        got = epoch(data_cfg([f"{proxy}/{Path(bucket['local_wds']).name}/shard-{{000000..000007}}.tar"], tmp_path / "c", shuffle_window=2), 12)
        d = storage.io_snapshot() - before
    finally:
        proxy_server.shutdown()
        server.shutdown()
    assert faults.injected > 0 and d["retries"] == faults.injected
    keys = [k for b in got for k in b[0]]
    assert len(set(keys)) == len(keys) == 192 and not any(b[2] for b in got)  # 192 distinct samples, none replaced


def test_missing_shard_and_denied_request_fail_before_training_naming_the_url(bucket, s3, synthetic_data, tmp_path, capfd):
    client = s3.client()
    for key in [u.removeprefix(f"{S3}/") for u in bucket["listed"] if "/syn/" in u]:
        client.copy_object(Bucket=BUCKET, Key=key.replace("syn/", "holed/"), CopySource={"Bucket": BUCKET, "Key": key})
    client.delete_object(Bucket=BUCKET, Key="holed/shard-000003.tar")
    client.delete_object(Bucket=BUCKET, Key="holed/shard-000005.tar.index.json")
    run = tmp_path / "run"

    def train(source: str) -> str:
        capfd.readouterr()
        code = cli.main(["train", CONFIG, *tiny_overrides(synthetic_data, run, f"data.train_shards={source}")])
        assert code == 2
        assert not run.joinpath("metrics.jsonl").exists()  # nothing trained
        return capfd.readouterr().err

    assert f"{S3}/holed/shard-000003.tar" in train(f"{S3}/holed/shard-{{000000..000007}}.tar")
    err = train(f"{S3}/holed")  # listed: shard 3 is not there, shard 5 has lost its index
    assert f"shard {S3}/holed/shard-000005.tar has no index {S3}/holed/shard-000005.tar.index.json" in err
    assert "mmtrain prep index" in err
    assert cli.main(["prep", "index", f"{S3}/holed/shard-000005.tar"]) == 0  # downloads, indexes, uploads the index
    from mmtrain.data.sources import open_source

    mended = open_source(f"{S3}/holed/shard-{{000004..000005}}.tar", shard_cache=ShardCache(str(tmp_path / "c")))
    assert len(mended) == 50 and mended.read(49, want_image=False).key == "00000149"  # shard 5 holds 125..149
    assert f"{S3}/nothing-here" in train(f"{S3}/nothing-here/shard-000000.tar")
    old = set_env({"AWS_SECRET_ACCESS_KEY": "wrong"})
    try:
        err = train(bucket["wds"])
    finally:
        restore_env(old)
    assert "access denied (SignatureDoesNotMatch)" in err and f"{S3}/syn" in err
    old = set_env({"AWS_ACCESS_KEY_ID": "AKIANOBODY"})
    try:
        assert "access denied (InvalidAccessKeyId)" in train(bucket["mds"])
    finally:
        restore_env(old)


def test_corrupt_shard_is_fetched_once_more_then_skipped_with_exact_accounting(bucket, s3, tmp_path):
    client = s3.client()
    for key in [u.removeprefix(f"{S3}/") for u in bucket["listed"] if "/syn/" in u]:
        client.copy_object(Bucket=BUCKET, Key=key.replace("syn/", "rotten/"), CopySource={"Bucket": BUCKET, "Key": key})
    good = storage.read_bytes(f"{S3}/rotten/shard-000002.tar")
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF  # same size, one flipped byte: only the sha256 of the index sees it
    client.put_object(Bucket=BUCKET, Key="rotten/shard-000002.tar", Body=bytes(bad))
    cfg = data_cfg([f"{S3}/rotten"], tmp_path / "cache", shuffle_window=2)
    before = storage.io_snapshot()
    batches = epoch(cfg, 12, micro=16)  # 192 of the 200 positions
    d = storage.io_snapshot() - before
    assert (d["corrupt_refetches"], d["corrupt_shards"]) == (1, 1)
    keys = [k for b in batches for k in b[0]]
    src, idx, _ = build_train_loader(cfg, 16, 0, world_size=1, seed=0, start_sample=0).dataset.order.lookup(np.arange(192))
    rotten = {i for i in range(50, 75)}  # shard 2 holds samples 50..74
    expected = sum(int(i) in rotten for i in idx)
    assert expected > 0 and sum(b[2] for b in batches) == expected  # every position of the shard was substituted
    assert len(keys) == 192 and not any(int(k.split(":")[1]) in rotten for k in keys)
    # elsewhere the batches are the clean ones
    clean = [k for b in epoch(data_cfg([bucket["wds"]], tmp_path / "c2", shuffle_window=2), 12) for k in b[0]]
    assert [a for a, b in zip(keys, clean) if int(b.split(":")[1]) not in rotten] == \
        [b for b in clean if int(b.split(":")[1]) not in rotten]


def test_full_cache_disk_and_too_small_limit_are_clear_errors(bucket, tmp_path, monkeypatch):
    cfg = data_cfg([bucket["wds"]], tmp_path / "small", shuffle_window=2, cache_limit="100KB")
    with pytest.raises(ValueError, match=r"data.cache_limit='100KB' \(100000 bytes\) is too small: two windows of "
                                         r"data.shuffle_window=2 shards need up to \d+ bytes"):
        build_train_loader(cfg, 16, 0, world_size=1, seed=0, start_sample=0)
    cache = ShardCache(str(tmp_path / "full"))
    url = f"{bucket['wds']}/shard-000000.tar"
    size = bucket["listed"][url]
    # the download's temp file is /dev/full: the kernel answers ENOSPC, as on a full disk
    os.symlink("/dev/full", f"{cache.local_path(url)}.{os.getpid()}.part")
    with pytest.raises(CacheFullError, match=f"data.cache_dir {tmp_path / 'full'}: the disk is full while downloading {url}"):
        cache.get(RemoteFile(url, size))
    assert not os.path.exists(cache.local_path(url))

    # data.cache_limit=auto: measured on this disk (plenty here), then as if the disk were nearly full
    auto = data_cfg([bucket["wds"]], tmp_path / "auto", shuffle_window=2)
    sources = open_sources(auto)
    cache = sources[0].shard_files.cache
    assert auto.cache_limit == "auto" and cache.limit > 2 * max(source_shard_sizes(bucket))
    check_cache_limit(auto, sources)
    cache.limit = 1000
    with pytest.raises(ValueError, match=r"data.cache_limit=auto \(1000 bytes: 50% of the free space of data.cache_dir "
                                         f"{tmp_path / 'auto'}, plus what it holds\\) is too small: two windows"):
        check_cache_limit(auto, sources)


# --------------------------------------------------------------------------- node-local disk

MOUNTS = r"""sysfs /sys sysfs rw,nosuid 0 0
/dev/nvme0n1p1 / ext4 rw,relatime 0 0
tmpfs /tmp tmpfs rw,nosuid,nodev 0 0
/dev/nvme1n1 /local xfs rw,relatime 0 0
home.example.org:/export/home /home nfs4 rw,vers=4.2 0 0
10.0.0.1@o2ib:/scratch /scratch lustre rw,flock 0 0
gpfs0 /gpfs gpfs rw 0 0
u@host:/data /home/u/sshfs\040mount fuse.sshfs rw,nosuid 0 0
/dev/nvme1n1p2 /home/u/fast ext4 rw 0 0
server:/a /mnt/x nfs rw 0 0
/dev/sdb1 /mnt/x ext4 rw 0 0
"""


def test_cache_dir_filesystem_comes_from_the_longest_mount_point_and_a_network_one_is_named():
    assert filesystem_of("/home/u/.cache/mmtrain/shards", MOUNTS) == ("/home", "nfs4")
    assert filesystem_of("/home/u/fast/cache", MOUNTS) == ("/home/u/fast", "ext4")  # the longer mount point
    assert filesystem_of("/home/u/sshfs mount/c", MOUNTS) == ("/home/u/sshfs mount", "fuse.sshfs")  # \040: a space
    assert filesystem_of("/homework/c", MOUNTS) == ("/", "ext4")  # /home is a prefix of the name, not a parent
    assert filesystem_of("/mnt/x/c", MOUNTS) == ("/mnt/x", "ext4")  # mounted over the nfs one: the later line
    assert filesystem_of("/local", MOUNTS) == ("/local", "xfs")
    for path, fstype, point in (("/home/u/c", "nfs4", "/home"), ("/scratch/u/c", "lustre", "/scratch"),
                                ("/gpfs/p/c", "gpfs", "/gpfs"), ("/home/u/sshfs mount/c", "fuse.sshfs", "/home/u/sshfs mount")):
        assert cache_dir_warning(path, mounts=MOUNTS).startswith(
            f"data.cache_dir {path} is on a network filesystem ({fstype} mounted at {point})")
    assert "set data.cache_dir to node-local disk" in cache_dir_warning("/home/u/c", mounts=MOUNTS)
    assert cache_dir_warning("/home/u/c", "MMTRAIN_CACHE_DIR", MOUNTS).startswith("MMTRAIN_CACHE_DIR /home/u/c is on a")
    assert cache_dir_warning("/tmp/mmtrain-u/shards", mounts=MOUNTS).startswith(
        "data.cache_dir /tmp/mmtrain-u/shards is in memory (tmpfs mounted at /tmp)")
    assert cache_dir_warning("/local/job/mmtrain-u/shards", mounts=MOUNTS) == ""
    assert cache_dir_warning("/home/u/fast/c", mounts=MOUNTS) == ""


def test_real_mount_table_places_a_local_tmp_dir_on_local_disk(tmp_path):
    point, fstype = filesystem_of(str(tmp_path))
    assert fstype and fstype not in NETWORK_FILESYSTEMS
    df = subprocess.run(["df", "--output=fstype,target", str(tmp_path)], capture_output=True, text=True)
    if df.returncode == 0:  # GNU df reads the same table: the same answer
        assert df.stdout.splitlines()[-1].split() == [fstype, point]
    assert "network filesystem" not in cache_dir_warning(str(tmp_path))


def test_default_cache_is_on_node_local_disk_with_a_limit_from_its_free_space(tmp_path, monkeypatch, caplog):
    job_tmp, tmp, user = tmp_path / "job", tmp_path / "tmp", f"mmtrain-{getpass.getuser()}"
    monkeypatch.setenv("SLURM_TMPDIR", str(job_tmp))
    monkeypatch.setenv("TMPDIR", str(tmp))
    assert resolve_cache_dir("auto") == str(job_tmp / user / "shards")
    assert (job_tmp / user).stat().st_mode & 0o777 == 0o700  # /tmp is shared: this user's only
    monkeypatch.delenv("SLURM_TMPDIR")
    assert resolve_cache_dir("") == str(tmp / user / "shards")
    monkeypatch.delenv("TMPDIR")
    assert resolve_cache_dir("auto") == f"/tmp/{user}/shards"
    assert resolve_cache_dir("~/x") == os.path.expanduser("~/x")

    monkeypatch.setenv("TMPDIR", str(tmp))
    cfg = DataConfig()
    assert (cfg.cache_dir, cfg.cache_limit, cfg.cache_limit_bytes) == ("auto", "auto", None)
    cache = shard_cache_for(cfg)
    st = os.statvfs(cache.dir)
    assert cache.dir == str(tmp / user / "shards")
    assert abs(cache.limit - st.f_bavail * st.f_frsize // 2) < 256 << 20  # half the free space (other writers aside)
    (Path(cache.dir) / "0123456789abcdef-old.tar").write_bytes(b"x" * (1 << 20))  # a shard of an earlier run
    assert abs(shard_cache_for(cfg).limit - cache.limit) < 256 << 20  # counted as room: the same budget
    assert shard_cache_for(cfg, on_this_node=False).limit == 0  # a login node does not measure its own disk
    assert shard_cache_for(DataConfig(cache_limit="1GiB")).limit == 1 << 30
    assert shard_cache_for(DataConfig(cache_limit=0)).limit == 0  # no limit
    with pytest.raises(ValueError, match="cache_limit: expected auto .* or 0 \\(no limit\\), got 'lots'"):
        DataConfig(cache_limit="lots")


@pytest.mark.skipif(os.getuid() != 0, reason="making a directory another user's needs root")
def test_a_node_local_directory_of_another_user_is_refused(tmp_path, monkeypatch):
    taken = tmp_path / f"mmtrain-{getpass.getuser()}"
    taken.mkdir()
    os.chown(taken, 4242, 4242)
    monkeypatch.delenv("SLURM_TMPDIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    with pytest.raises(PermissionError, match=f"{taken} belongs to user id 4242.*set data.cache_dir to a directory of your own"):
        resolve_cache_dir("auto")


def test_one_process_per_node_produces_and_the_others_read_its_file(tmp_path, monkeypatch):
    """share_on_node with two threads as the two processes of a node, a threading barrier as the
    process group's: one produces, both get the value; a stale file of the same name is never read;
    the producer's error is raised by both."""
    monkeypatch.delenv("SLURM_TMPDIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    key = "sources of start 2"
    stale = Path(node_local._handoff_path(key))
    stale.write_bytes(pickle.dumps({"value": "left by an earlier start"}))
    produced, got, errors = [], {}, {}

    def produce():
        time.sleep(0.3)  # the reader is polling by now
        produced.append(1)
        return {"offsets": np.arange(5)}

    def fail():
        raise FileNotFoundError("s3://b/shard-000003.tar: no such object")

    class Refused(Exception):  # a local class: it cannot be pickled, so its text travels
        pass

    def refuse():
        raise Refused("denied")

    def process(local_rank: int, make) -> None:
        try:
            got[local_rank] = share_on_node(key, make, producer=local_rank == 0, barrier=barrier.wait)
        except Exception as exc:
            errors.setdefault(make.__name__, {})[local_rank] = (type(exc).__name__, str(exc))

    for make in (produce, fail, refuse):
        barrier = threading.Barrier(2, timeout=60)
        threads = [threading.Thread(target=process, args=(r, make)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert produced == [1] and np.array_equal(got[1]["offsets"], np.arange(5)) and got[0] is not got[1]
    missing = ("FileNotFoundError", "s3://b/shard-000003.tar: no such object")
    assert errors == {"fail": {0: missing, 1: missing},
                      "refuse": {0: ("Refused", "denied"), 1: ("RuntimeError", "Refused: denied")}}
    assert (stale.parent.stat().st_mode & 0o777) == 0o700


# --------------------------------------------------------------------------- training, eval and tokenizer from the bucket


KILL_AT_BATCH = '''
import os
if os.environ.get("RANK") == "1":
    from mmtrain.components import data as _data
    _make = _data.SampleStream.make_batch
    _count = [0]
    def _make_then_die(self, positions):
        _count[0] += 1
        if _count[0] == 6:
            os.kill(os.getpid(), 9)  # preempted mid-epoch, in step 6, after the step-4 checkpoint
        return _make(self, positions)
    _data.SampleStream.make_batch = _make_then_die
'''


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_zero3_run_from_s3_killed_mid_epoch_resumes_exactly_and_eval_and_tokenizer_read_the_bucket(
        bucket, s3, synthetic_data, tmp_path, monkeypatch, capfd):
    limit = sum(source_shard_sizes(bucket)[:5])
    sources = json.dumps([{"path": bucket["wds"]}, {"path": bucket["mds"]}])

    def overrides(run: Path, *extra: str) -> list[str]:
        return tiny_overrides(synthetic_data, run, f"data.sources={sources}", "data.shuffle_window=2",
                              f"data.cache_dir={tmp_path / 'node_cache'}", f"data.cache_limit={limit}",
                              "logging.log_every=2", "checkpoint.every_steps=4", "train.steps=8", *extra)

    # the uninterrupted run's requests pass a proxy that records them: how often is each index read?
    seen = Faults()
    proxy, proxy_server = start_fault_proxy(s3.endpoint, seen)
    monkeypatch.setenv("S3_ENDPOINT_URL", proxy)
    (tmp_path / "node_tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "node_tmp"))  # where the node's ranks hand the indexes over
    try:
        one_open = len(seen.seen)
        open_sources(DataConfig(sources=json.loads(sources), index_cache="", cache_dir=str(tmp_path / "node_cache")))
        listings_per_open = sum("list-type=2" in p for _, p in seen.seen[one_open:])
        del seen.seen[:]
        straight = tmp_path / "straight"
        assert cli.main(["train", CONFIG, *overrides(straight)]) == 0
    finally:
        proxy_server.shutdown()
        monkeypatch.setenv("S3_ENDPOINT_URL", s3.endpoint)
    index_gets = Counter(p for m, p in seen.seen if m == "GET" and p.endswith("index.json"))
    indexes = [f"/{BUCKET}/syn/shard-{i:06d}.tar.index.json" for i in range(8)] + [f"/{BUCKET}/mds/train/index.json"]
    # the preflight (this process) reads each index once, then local rank 0 of the one node; rank 1 reads none
    assert index_gets == {p: 2 for p in indexes}
    # one listing per source and open (detecting the format and indexing share it), and two opens in all
    assert listings_per_open == 2 and sum("list-type=2" in p for _, p in seen.seen) == 2 * listings_per_open
    handoff = Path(node_local_root()) / "handoff"
    assert handoff.parent.parent == tmp_path / "node_tmp"
    assert handoff.is_dir() and not list(handoff.iterdir())  # the handoff file is gone once every rank has it
    run = tmp_path / "run"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_AT_BATCH)
    monkeypatch.setenv("PYTHONPATH", f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    shutil.rmtree(tmp_path / "node_cache")  # the killed run starts cold, like a fresh node
    assert cli.main(["train", CONFIG, *overrides(run)]) != 0
    assert [r["step"] for r in read_metrics(run)] == [2, 4]
    monkeypatch.delenv("PYTHONPATH")
    capfd.readouterr()
    assert cli.main(["train", CONFIG, *overrides(run)]) == 0
    assert "resumed from step00000004: step 4" in capfd.readouterr().err
    a, b = read_metrics(run), read_metrics(straight)
    assert [r["step"] for r in a] == [2, 4, 6, 8] and len({r["data_hash"] for r in a}) == 4
    assert_same_training(run, straight)
    assert [r["samples_seen"] for r in a] == [32, 64, 96, 128]  # mid-epoch: the epoch holds 400
    assert sum(r["data/shard_downloads"] for r in b) > 0 and sum(r["data/cache_hits"] for r in b) > 0
    assert sum(r["data/substituted"] for r in a + b) == 0
    cached = sum(p.stat().st_size for p in (tmp_path / "node_cache").iterdir() if p.is_file())
    assert cached <= limit

    # eval and tokenizer training read the bucket
    out = tmp_path / "eval"
    assert cli.main(["eval", "caption", str(straight), "--shards", bucket["mds"], "--num", "6", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["num_samples"] == 6 and "CIDEr" in report["scores"]
    assert cli.main(["tokenizer", "train", "--shards", bucket["wds"], "--shards", bucket["mds"],
                     "--out", str(tmp_path / "tok" / "text"), "--vocab-size", "64", "--quiet"]) == 0
    from mmtrain.tokenize.text import TextTokenizer

    tok = TextTokenizer.from_file(tmp_path / "tok" / "text.model")
    assert tok.decode(tok.encode("a large red circle", bos=False, eos=False)) == "a large red circle"


def test_gs_and_other_fsspec_schemes_go_through_one_small_store(tmp_path):
    """gs:// uses FsspecStore over gcsfs; no GCS here, so the same code runs over fsspec's memory filesystem."""
    store = storage.FsspecStore("memory")
    store.write("memory://mmtrain/shards/a.tar", b"abc" * 100)
    store.write("memory://mmtrain/shards/b.tar", b"x")
    assert store.read("memory://mmtrain/shards/a.tar") == b"abc" * 100 and store.size("memory://mmtrain/shards/b.tar") == 1
    assert store.sizes("memory://mmtrain/shards") == {"memory://mmtrain/shards/a.tar": 300, "memory://mmtrain/shards/b.tar": 1}
    assert store.download("memory://mmtrain/shards/a.tar", str(tmp_path / "a.tar"), 300) == 300
    assert (tmp_path / "a.tar").read_bytes() == b"abc" * 100
    with pytest.raises(FileNotFoundError, match="memory://mmtrain/shards/nope.tar: no such object"):
        store.read("memory://mmtrain/shards/nope.tar")


def test_every_shards_command_reads_an_mds_directory_and_an_s3_prefix(bucket, synthetic_data, tmp_path, capsys):
    """caption, tokenizer train, estimate-scale and train-vae read samples through the one reader
    (mmtrain.data.sources.iter_samples): a local directory and an s3:// prefix holding the same
    shards (MDS, and webdataset) give the same samples, pixels and numbers."""
    import yaml
    from test_eval import untrained_model_dir

    model = untrained_model_dir(synthetic_data, tmp_path / "model")
    results = {}
    sources = {"local_mds": bucket["local_mds"], "s3_mds": bucket["mds"], "local_wds": bucket["local_wds"], "s3_wds": bucket["wds"]}
    for name, shards in sources.items():
        out = tmp_path / name
        capsys.readouterr()
        assert cli.main(["caption", str(model), "--shards", shards, "--num", "3"]) == 0
        captioned = [line.split("\t") for line in capsys.readouterr().out.splitlines() if "\t" in line]
        assert cli.main(["tokenizer", "train", "--shards", shards, "--out", str(out / "tok" / "text"), "--vocab-size", "64",
                         "--quiet"]) == 0
        sentences = json.loads((out / "tok" / "text.json").read_text())["num_training_sentences"]
        capsys.readouterr()
        assert cli.main(["tokenizer", "estimate-scale", str(REPO / "tokenizers" / "small_vae.yaml"), "--shards", shards,
                         "--num", "8", "--image-size", "32"]) == 0
        scale = json.loads(capsys.readouterr().out)["scale_factor"]
        assert cli.main(["tokenizer", "train-vae", "--shards", shards, "--out", str(out / "vae"), "--steps", "2",
                         "--batch-size", "4", "--image-size", "32", "--quiet"]) == 0
        vae = yaml.safe_load((out / "vae" / "tokenizer.yaml").read_text())
        results[name] = {"captioned": captioned, "sentences": sentences, "scale": scale, "vae_scale": vae["scale_factor"]}
    assert {r["sentences"] for r in results.values()} == {200} and results["local_mds"]["scale"] > 0
    assert len({tuple(k for k, _ in r["captioned"]) for r in results.values()}) == 1  # the same samples, in order
    # same bytes in (prep re-encoded the MDS copy's images as JPEG): the same captions, the same
    # measured scale, the same trained VAE
    assert results["local_mds"] == results["s3_mds"] and results["local_wds"] == results["s3_wds"]


def test_prep_latents_reads_an_mds_prefix_like_its_local_copy(bucket, tmp_path):
    """prep latents takes every source the trainer takes: the bucket's MDS prefix, read through the
    shard cache, gives the latents its local copy gives (resized to --image-size on both)."""
    from mmtrain.data.sources import iter_shards

    for name, source in (("s3", bucket["mds"]), ("local", bucket["local_mds"])):
        assert cli.main(["prep", "latents", source, "--out", str(tmp_path / name), "--tokenizer", "pixels",
                         "--device", "cpu", "--image-size", "16", "--quiet"]) == 0
    s3, local = ([(s.key, s.latent) for _, samples in iter_shards(tmp_path / name) for s in samples]
                 for name in ("s3", "local"))
    assert len(s3) == 200 and [k for k, _ in s3] == [k for k, _ in local]
    assert all(a.shape == (3, 16, 16) and np.array_equal(a, b) for (_, a), (_, b) in zip(s3, local))


def test_prep_latents_reads_from_and_writes_to_the_bucket(bucket, tmp_path):
    from mmtrain.data.sources import open_source

    assert cli.main(["prep", "latents", bucket["wds"], "--out", f"{S3}/latents", "--tokenizer", "pixels",
                     "--device", "cpu", "--quiet"]) == 0
    source = open_source(f"{S3}/latents", shard_cache=ShardCache(str(tmp_path / "cache")))
    assert len(source) == 200 and len(source.shards) == 8
    raw = source.read(7, want_image=False, want_latent=True)
    assert raw.key == "00000007" and raw.latent.shape == (3, 32, 32)
    # the pixels tokenizer is x / 127.5 - 1: inverted, sample 7's latent is sample 7's image
    image = open_source(bucket["wds"], shard_cache=ShardCache(str(tmp_path / "cache"))).read(7, want_image=True).image
    with Image.open(io.BytesIO(image)) as im:
        expected = np.asarray(im.convert("RGB"))
    restored = np.round((raw.latent.astype(np.float32) + 1.0) * 127.5).astype(np.uint8).transpose(1, 2, 0)
    assert np.array_equal(restored, expected)


# --------------------------------------------------------------------------- a bucket that does not exist


def test_prep_to_a_missing_bucket_fails_before_staging_and_says_to_create_it(s3, tmp_path, capsys, monkeypatch):
    from mmtrain import cli
    from mmtrain.data.sources import detect_format

    staging = tmp_path / "staging"
    monkeypatch.setenv("MMTRAIN_STAGING_DIR", str(staging))
    rc = cli.main(["prep", "synthetic", "--out", "s3://no-such-bucket/shapes", "--num", "10", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "bucket 'no-such-bucket' does not exist" in err[0] and "aws s3 mb s3://no-such-bucket" in err[0], err
    assert not staging.exists()  # nothing was staged
    # a prefix whose train/ holds the shards (prep folder --out s3://.../photos): the hint names it
    storage.write_bytes(f"s3://{BUCKET}/photos/train/shard-000000.tar", b"x")
    with pytest.raises(FileNotFoundError, match=rf"use s3://{BUCKET}/photos/train for data\.train_shards"):
        detect_format(f"s3://{BUCKET}/photos")
