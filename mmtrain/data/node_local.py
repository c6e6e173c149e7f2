"""Node-local disk: where a node keeps what only it needs, how much room there is, and whether a path is local.

- :func:`node_local_root`: ``$SLURM_TMPDIR``, else ``$TMPDIR``, else ``/tmp``, plus a
  per-user directory ``mmtrain-USER`` (mode 0700; one that belongs to another user is an
  error, since ``/tmp`` is shared). The default shard cache (``data.cache_dir: auto``,
  and ``MMTRAIN_CACHE_DIR`` unset) is its ``shards`` subdirectory: on a cluster a home
  directory is usually a network filesystem with a quota, shared by every node, while
  ``$SLURM_TMPDIR`` / ``$TMPDIR`` / ``/tmp`` is the node's own disk.
- :func:`auto_cache_limit`: the default ``data.cache_limit``, :data:`AUTO_CACHE_SHARE` of
  what the cache directory's disk has free plus what the cache already holds (so a
  restart on a node whose cache is full computes the same budget).
- :func:`filesystem_of` / :func:`cache_dir_warning`: the filesystem a path is on, from the
  mount table (the longest mount point that contains it), and a warning naming the knob
  when a cache directory is on a network filesystem (or in memory).
- :func:`share_on_node`: one process of a node computes a value (the indexes of remote
  sources: a bucket listing plus one index per shard) and hands it to the node's other
  processes through a file on node-local disk, written under a temp name and renamed.
"""
from __future__ import annotations

import getpass
import hashlib
import logging
import os
import pickle
import re
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from mmtrain.atomic import atomic_writer

logger = logging.getLogger("mmtrain.data")
T = TypeVar("T")

NODE_TMP_VARIABLES: tuple[str, ...] = ("SLURM_TMPDIR", "TMPDIR")  # first one set wins, else /tmp
AUTO = ("", "auto")  # a cache_dir / cache_limit with one of these values is resolved here
AUTO_CACHE_SHARE = 0.5  # default cache limit: this share of (free space + bytes already cached)
# Filesystems whose files live on other machines. FUSE mounts show as "fuse.<program>".
NETWORK_FILESYSTEMS: frozenset[str] = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "panfs", "afs",
    "wekafs", "orangefs", "pvfs2", "ocfs2", "gfs2", "davfs", "9p",
    "fuse.sshfs", "fuse.glusterfs", "fuse.ceph", "fuse.ceph-fuse", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone",
    "fuse.juicefs", "fuse.goofys", "fuse.mountpoint-s3", "fuse.davfs", "fuse.beegfs",
})
MEMORY_FILESYSTEMS: frozenset[str] = frozenset({"tmpfs", "ramfs"})
HANDOFF_WAIT_S = 4 * 3600  # how long a process waits for its node's producer (listing a huge bucket takes long)


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no USER / LOGNAME and no passwd entry (some containers)
        return str(os.getuid())


def private_dir(path: str, knob: str) -> str:
    """``path`` created with mode 0700 if missing; PermissionError naming ``knob`` when it
    belongs to another user (someone else made ``/tmp/mmtrain-USER`` first)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    owner = os.stat(path).st_uid
    if owner != os.getuid():
        raise PermissionError(f"{path} belongs to user id {owner}, not to this user ({os.getuid()}): it cannot "
                              f"hold this user's files; set {knob} to a directory of your own")
    return path


def node_local_root(knob: str = "data.cache_dir") -> str:
    """This user's directory on the node's own disk: ``$SLURM_TMPDIR``, ``$TMPDIR`` or ``/tmp``, then ``mmtrain-USER``."""
    base = next((os.environ[v] for v in NODE_TMP_VARIABLES if os.environ.get(v)), "/tmp")
    return private_dir(os.path.join(os.path.abspath(os.path.expanduser(base)), f"mmtrain-{_user()}"), knob)


def resolve_cache_dir(configured: str, knob: str = "data.cache_dir") -> str:
    """The shard cache directory: ``configured`` (``~`` expanded, made absolute), or for
    ``auto`` / "" the node-local default ``node_local_root()/shards``.

    Resolved on the node that reads the shards (``$SLURM_TMPDIR`` exists only inside the
    job), never when the config is loaded on a login node."""
    if str(configured).strip() in AUTO:
        return os.path.join(node_local_root(knob), "shards")
    return os.path.abspath(os.path.expanduser(configured))


def free_bytes(path: str) -> int:
    """Bytes an unprivileged user may still write on the filesystem of ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def auto_cache_limit(cache_dir: str, cached_bytes: int) -> int:
    """The default ``data.cache_limit``: :data:`AUTO_CACHE_SHARE` of the free space of
    ``cache_dir``'s disk plus the ``cached_bytes`` already in the cache (at least 1 byte,
    so it never reads as "no limit")."""
    return max(1, int(AUTO_CACHE_SHARE * (free_bytes(cache_dir) + cached_bytes)))


def _unescape_mount(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash in paths as octal escapes (\040 ...)
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def filesystem_of(path: str, mounts: str | None = None) -> tuple[str, str]:
    """(mount point, filesystem type) of ``path``: the longest mount point of the mount table
    that contains it (the later line wins on a tie: it was mounted over the earlier one).

    ``mounts``: the text of a mount table in ``/proc/mounts`` format; None reads
    ``/proc/mounts`` (and resolves symlinks in ``path`` first). ("", "") when unknown."""
    if mounts is None:
        try:
            with open("/proc/mounts", encoding=sys.getfilesystemencoding(), errors="surrogateescape") as fh:
                mounts = fh.read()
        except OSError:
            return "", ""
        path = os.path.realpath(path)
    best = ("", "")
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point, fstype = _unescape_mount(parts[1]), parts[2]
        prefix = point.rstrip("/") + "/"
        if (path == point or path.startswith(prefix)) and len(point) >= len(best[0]):
            best = (point, fstype)
    return best


def cache_dir_warning(cache_dir: str, knob: str = "data.cache_dir", mounts: str | None = None) -> str:
    """Why ``cache_dir`` is a poor place for shard copies ("" when it is node-local disk):
    a network filesystem (every node downloads into shared storage, usually against a
    quota) or memory (tmpfs: the copies take RAM)."""
    point, fstype = filesystem_of(cache_dir, mounts)
    if fstype in NETWORK_FILESYSTEMS:
        return (f"{knob} {cache_dir} is on a network filesystem ({fstype} mounted at {point}): every node copies "
                f"shards into shared storage, usually against a quota; set {knob} to node-local disk (the default, "
                "auto: $SLURM_TMPDIR, else $TMPDIR, else /tmp)")
    if fstype in MEMORY_FILESYSTEMS:
        return (f"{knob} {cache_dir} is in memory ({fstype} mounted at {point}): shard copies take the node's RAM; "
                f"set {knob} to node-local disk, or bound it with data.cache_limit")
    return ""


def _handoff_path(key: str) -> str:
    name = hashlib.sha1(key.encode()).hexdigest()[:24]
    return os.path.join(private_dir(os.path.join(node_local_root(), "handoff"), "data.cache_dir"), f"{name}.pkl")


def share_on_node(key: str, produce: Callable[[], T], *, producer: bool, barrier: Callable[[], None],
                  wait_s: float = HANDOFF_WAIT_S) -> T:
    """``produce()`` run by one process of each node (``producer``: local rank 0), its result
    handed to the node's other processes through a file on node-local disk.

    Every process of the job calls this with the same ``key`` (it names the value and this
    start, e.g. the sources and the rendezvous address); ``barrier`` synchronises all of
    them. The producer first removes a stale file of that name, and nobody looks for the
    file before the first barrier, so a reader never gets an earlier start's value. The
    producer then writes the value (or the exception ``produce`` raised, which the readers
    raise too) under a temp name and renames it; readers poll for it on the filesystem,
    not in a collective, so producing may take longer than the process group's timeout.
    After the second barrier (every reader has it) the producer deletes the file.

    The file is a pickle: it is written and read only by this user's processes of this
    start, in a 0700 directory of this user (see :func:`private_dir`)."""
    path = _handoff_path(key)
    if producer:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
    barrier()
    if producer:
        try:
            value = produce()
        except Exception as exc:
            _write_handoff(path, {"error": exc})
            raise
        _write_handoff(path, {"value": value})
    else:
        record = _read_handoff(path, wait_s)
        if "error" in record:
            raise record["error"]
        value = record["value"]
    barrier()
    if producer:
        os.remove(path)
    return value


def _write_handoff(path: str, record: dict) -> None:
    try:
        with atomic_writer(path) as fh:  # streamed: the index arrays of a large dataset are large
            pickle.dump(record, fh, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError):
        if "error" not in record:
            raise
        exc = record["error"]  # an exception that does not pickle travels as its text
        with atomic_writer(path) as fh:
            pickle.dump({"error": RuntimeError(f"{type(exc).__name__}: {exc}")}, fh)


def _read_handoff(path: str, wait_s: float) -> dict:
    start = time.monotonic()
    delay, next_note = 0.05, 600.0
    while True:
        try:
            with open(path, "rb") as fh:
                return pickle.load(fh)
        except FileNotFoundError:
            pass
        waited = time.monotonic() - start
        if waited > wait_s:
            raise TimeoutError(f"waited {waited:.0f} s (node_local.HANDOFF_WAIT_S) for local rank 0 of this node to "
                               f"write {path}: did it fail? see its log")
        if waited > next_note:
            logger.warning("still waiting for local rank 0 of this node to index the data sources (%.0f s)", waited)
            next_note += 600.0
        time.sleep(delay)
        delay = min(1.0, delay * 2)
