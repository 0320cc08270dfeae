"""
The plumbing of a run: which process is which, and the output folder. None of it is the method;
train.py calls it in a few lines so that its loop stays the paper's.

    errors      fail: the one-line error of every script (config.fail is this function); interrupted: Ctrl-C
    processes   process_env / setup_distributed / dist_info / cuda_index: who is who under torchrun
                (RANK ...), under SLURM's srun (SLURM_PROCID ...) or alone, and this process's GPU
    the folder  out_dir_lock: one run per folder (flock, released by the OS when the process dies);
                temporary / remove_leftovers: temporary files no other process shares, and those of a killed run
    writes      write_atomic / RunLog / check_writes: a write that fails (disk full, read-only, no
                permission, quota) is one line naming the path, the cause and the size, on every rank,
                and leaves the earlier files as they were
    kept files  keep_checkpoint: numbered checkpoints beside checkpoint.pt (--keep-every, --keep-last)

What happens in each fault, and the test that guards it: docs/faults.md. This file imports no other
file of the project; config.py imports it (tests/test_structure.py).
"""

import atexit
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
from contextlib import contextmanager, suppress

import torch
import torch.distributed as dist
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------
# Errors


def fail(message, prog=None):
    """One-line error for a mistake the user can fix: `PROG: error: MESSAGE`, exit code 2."""
    prog = prog or os.path.basename(sys.argv[0])
    tqdm.write(f"{prog}: error: {message}", file=sys.stderr)  # on its own line below a progress bar
    stop = SystemExit(message)  # str() is the message (for callers and tests) ...
    stop.code = 2  # ... while the process exits with argparse's code for usage errors, printing nothing more
    raise stop


def interrupted(ckpt_path):
    """Ctrl-C (KeyboardInterrupt) ends a run at once with one line, on rank 0, and exit code 130 (128 + SIGINT,
    what a shell reports). Every write is atomic (write_atomic), so the last checkpoint is whole."""
    if dist_info()[0] == 0:
        kept = (f"{ckpt_path} is intact; rerun the same command to resume from it" if os.path.exists(ckpt_path)
                else "no checkpoint was written yet")
        tqdm.write(f"interrupted: {kept} (kill -TERM checkpoints the current step before stopping)", file=sys.stderr)
    raise SystemExit(130)


# ----------------------------------------------------------------------------------------------
# Processes: torchrun, srun, or one process

SLURM_PORTS = (12000, 20000)  # MASTER_PORT under srun: 12000 + job id mod 20000, below Linux's ephemeral ports


def first_host(nodelist):
    """The first host of a SLURM node list: "node[01-04,07]" -> "node01", "a,b" -> "a", "host" -> "host".
    A bracket holds numbers or ranges; the first number of each bracket is the first host's."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]  # a comma outside brackets ends the first entry
    return re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", first)


def process_env(env=os.environ):
    """(rank, world size, local rank) of this process, from the launcher's environment variables.

    torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT). `srun python train.py`
    sets none of them but SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID: with more than one task these are
    copied into torchrun's names, MASTER_ADDR = the first host of the step's node list (task 0 runs
    there) and MASTER_PORT = one derived from the job id unless set, so that every task finds the same
    rendezvous without a wrapper script. srun's own SLURM_STEP_NUM_TASKS wins over the allocation's
    SLURM_NTASKS: `srun -n 2` in a 4-task allocation is a world of 2. No variables: a world of one."""
    if "RANK" not in env:
        tasks = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
        if tasks <= 1 or "SLURM_PROCID" not in env:
            return 0, 1, 0
        if "MASTER_ADDR" not in env:
            nodes = next((env[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if k in env), None)
            if nodes is None:
                fail(f"SLURM_NTASKS={tasks} but no SLURM_JOB_NODELIST to find task 0's host; set MASTER_ADDR")
            env["MASTER_ADDR"] = first_host(nodes)
        env.setdefault("MASTER_PORT", str(SLURM_PORTS[0] + int(env.get("SLURM_JOB_ID", "0")) % SLURM_PORTS[1]))
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=str(tasks), LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
    return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))


def cuda_index(local_rank):
    """This process's GPU: the LOCAL_RANK-th of the node's (RANK counts over all nodes: on node 1 of
    2 x 8 GPUs it is 8..15). A process shown a single GPU (srun --gpus-per-task, CUDA_VISIBLE_DEVICES
    per process) takes that one."""
    count = torch.cuda.device_count()
    if local_rank < count or count == 1:
        return min(local_rank, count - 1)
    fail(f"local rank {local_rank} has no GPU: this node shows {count}; start at most {count} processes per "
         "node (torchrun --nproc_per_node, srun --ntasks-per-node)")


def setup_distributed():
    """Join the process group of torchrun or srun (process_env); returns (rank, world, local rank)."""
    rank, world, local = process_env()
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(cuda_index(local))
        dist.init_process_group(backend, rank=rank, world_size=world)
    return rank, world, local


def dist_info():
    """(rank, world size) of this process; (0, 1) outside torchrun / srun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def leave_group():
    """Every rank, together: a barrier, then the process group's teardown (nothing in a world of one). A
    rank that exits while a peer still works can abort the peer's gloo threads ("terminate called without
    an active exception", exit -6: the held-folder test under two processes, once in a full suite run)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # callers are points every rank reaches, so this cannot hang
        dist.destroy_process_group()


def fail_together(message):
    """fail(message) on every rank at once, for an error all ranks learnt from one from_rank0, after
    leaving the process group (leave_group). train.run ends through leave_group too."""
    leave_group()
    fail(message)


def end_process(code=0):
    """End this process of a multi-process run now, after its process group is destroyed: Python's exit
    hooks (DataLoader workers, multiprocessing's finalizers) run, then os._exit skips the interpreter's
    and C++'s teardown. Why: in torch 2.13 a DistributedDataParallel wrapper leaves references to the gloo
    process group that destroy_process_group does not drop (measured: the Python object's refcount stays
    10 above a DDP-free run's, and the gloo_tcp_loop / pt_gloo_runloop threads still run after it), so
    the group's threads outlive it and race the static destructors at exit. About 1 exit in 80 of a
    finished two-process run then aborted ("terminate called without an active exception", SIGABRT, or
    SIGSEGV): torchrun reported a failed job after a run that had written everything."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def from_rank0(value):
    """Rank 0's value on every rank (one broadcast); the value itself in a world of one."""
    if dist_info()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------------
# The folder: one run at a time

LOCK_NAME = "run.lock"
_lock_fds = []  # lock files this process holds; a forked child (a DataLoader worker) closes its copies


def _close_locks_in_child():
    # flock belongs to the open file, which fork shares: a worker outliving a killed main process
    # would hold the folder. Closing the child's copy leaves the parent's lock in place.
    for fd in _lock_fds:
        os.close(fd)
    _lock_fds.clear()


os.register_at_fork(after_in_child=_close_locks_in_child)


def whoami():
    return f"host {socket.gethostname()}, pid {os.getpid()}"


@contextmanager
def out_dir_lock(out_dir):
    """Hold OUT_DIR for this run: an exclusive flock on OUT_DIR/run.lock, taken by global rank 0 only and
    released when the run ends or its process dies (kill -9 included: the OS drops the lock, so a crashed
    run never blocks the next). A folder another run holds stops every rank with one line naming the
    holder (host and pid, written into the lock file), before anything is read or written."""
    fd, refused = None, None
    _pending.clear()  # a new run in this process (tests, seeds.py) starts with no failed write
    if dist_info()[0] == 0:
        with writing(out_dir):
            os.makedirs(out_dir, exist_ok=True)
            fd = os.open(os.path.join(out_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process starting up"
            os.close(fd)
            fd, refused = None, (f"{out_dir} is in use by another run ({holder}): one folder holds one run; "
                                 "wait for it to end, or pass another --out-dir")
        except OSError as e:  # a file system without flock (some network mounts): run, unguarded
            tqdm.write(f"warning: cannot lock {out_dir} ({os.strerror(e.errno)}); nothing stops a second run "
                       "from writing into it", file=sys.stderr)
            os.close(fd)
            fd = None
        else:
            _lock_fds.append(fd)
            with writing(os.path.join(out_dir, LOCK_NAME)):
                os.ftruncate(fd, 0)
                os.pwrite(fd, (whoami() + "\n").encode(), 0)
            remove_leftovers(out_dir)
    refused = from_rank0(refused)  # the other ranks stop too, instead of waiting for rank 0 forever
    check_writes()
    if refused:
        fail_together(refused)
    try:
        yield
    finally:
        if fd in _lock_fds:
            _lock_fds.remove(fd)
            os.close(fd)  # releases the lock; the file stays (removing it would race with the next run)


def temporary(path):
    """A temporary name beside path that no other process uses (host and pid): two processes never
    write one temporary file, as two runs did with checkpoint.pt.tmp (one renamed it from under the other)."""
    return f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"


def remove_leftovers(out_dir):
    """Remove the temporary files (temporary's names) of a run killed mid-write (kill -9, a node lost):
    called holding the folder's lock, so no live run is writing any of them."""
    for name in os.listdir(out_dir):
        if re.search(r"\.tmp\..+\.\d+$", name):
            with suppress(OSError):
                os.remove(os.path.join(out_dir, name))


# ----------------------------------------------------------------------------------------------
# Writes that fail in one line, on every rank

_pending = []  # rank 0's failed write, until every rank has heard of it (check_writes)
# What a write meets on a full disk, a read-only mount, a folder of another user, an exhausted quota, a
# failing disk or a file size limit; any other error (a bug) keeps its traceback.
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG)


def nbytes(obj):
    """Bytes of the tensors in a (nested) state dict: about the size of its checkpoint file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    return sum(nbytes(v) for v in obj) if isinstance(obj, (list, tuple)) else 0


def free_bytes(path):
    """Free bytes on the disk that holds path (or its nearest existing parent folder); None if unknown."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _size(n):
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def write_error(e, path, size=None):
    """The one-line message for a failed write of `path` (size: bytes it needs, if known), or None when
    e is no write failure. torch's serializer turns the OSError of a full disk into a RuntimeError
    ("[enforce fail at inline_container.cc ...] unexpected pos"); the OSError it swallowed is then in
    e.__context__, and without one the free space names the cause."""
    free = free_bytes(path)
    cause = e
    while cause is not None and not (isinstance(cause, OSError) and cause.errno in WRITE_ERRORS):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        code = cause.errno
    elif isinstance(e, RuntimeError) and re.search("inline_container|PytorchStreamWriter|file write failed", str(e)):
        code = errno.ENOSPC if free is not None and free < (size or 1) else None
    else:
        return None
    why = (f"{os.strerror(code)} ({errno.errorcode.get(code, code)})" if code
           else f"torch could not write it ({str(e).splitlines()[0][:120]})")
    space = ", ".join(([f"it needs about {_size(size)}"] if size else []) + ([f"{_size(free)} free there"] if free is not None else []))
    fix = ("free space there (or raise the quota) or pass --out-dir on another disk" if code in (errno.ENOSPC, errno.EDQUOT)
           else "raise the file size limit (ulimit -f) or pass --out-dir on another disk" if code == errno.EFBIG
           else "make the folder writable or pass another --out-dir")
    return (f"cannot write {path}: {why}{'; ' + space if space else ''}. The files already in the folder are intact; "
            f"{fix}, then rerun the same command (it resumes from the last checkpoint there, if any)")


def report(message):
    """A failed write on rank 0. Alone, the run stops at once; under torchrun the other ranks must stop
    with it, so it waits for the next point where every rank checks (check_writes)."""
    if dist_info()[1] == 1:
        fail(message)
    _pending[:] = _pending or [message]


def write_pending():
    return bool(_pending)


def check_writes():
    """Called by every rank at the same point (after config.json, in every checkpoint save, in the stop
    agreement, at the end): rank 0's failed write, if any, stops every rank with its one line."""
    message = from_rank0(_pending[0] if _pending else None)
    if message:
        fail_together(message)


@contextmanager
def writing(path, size=None):
    """Reports (report) a write failure inside the block as one line naming path (or the file that
    open() could not open); other errors pass. Under torchrun the block ends and the run goes on to the
    next check_writes."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        message = write_error(e, getattr(e, "filename", None) or path, size)  # open() names its file
        if message is None:
            raise
        report(message)


def write_atomic(path, write, binary=True, size=None):
    """write(f) into a temporary file beside path, then os.replace: a reader (or the next run) finds the
    old file or the new one, never a part. The temporary name is this process's own (host and pid). On
    any failure the temporary file is removed and the old file stays (a kill -9 leaves it behind, for the
    next run's remove_leftovers). Returns True when written."""
    tmp = temporary(path)
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the file
        os.replace(tmp, path)
        return True
    except BaseException as e:  # Ctrl-C mid-write included: no temporary file is left behind
        message = write_error(e, path, size) if isinstance(e, (OSError, RuntimeError)) else None
        with suppress(OSError):  # after the free space was read, as the failed write saw it
            os.remove(tmp)
        if message is None:
            raise
        report(message)
        return False


class RunLog:
    """metrics.jsonl: one JSON row per write, appended and flushed by rank 0 (the others hold a RunLog
    that writes nothing). A row that does not fit is cut off again, so every line stays readable JSON."""

    def __init__(self, path, master=True):
        self.path, self.file = path, None
        if master:
            with writing(path):
                self.file = open(path, "a")

    def write(self, row):
        if self.file is None:
            return
        line = json.dumps(row) + "\n"
        start = self.file.tell()
        try:
            self.file.write(line)
            self.file.flush()
        except OSError as e:
            message = write_error(e, self.path, len(line))
            if message is None:
                raise
            with suppress(OSError):  # its buffer cannot be written either: drop it with the file
                self.file.close()
            self.file = None  # no further rows: the run stops at the next check (check_writes)
            with suppress(OSError):
                os.truncate(self.path, start)
            report(message)

    def close(self):
        if self.file is not None:
            with writing(self.path):
                self.file.close()
            self.file = None


# ----------------------------------------------------------------------------------------------
# Numbered checkpoints


def keep_checkpoint(path, epoch, keep_last):
    """Keep the checkpoint just written at `path` as checkpoint-epNNNN.pt (epochs done) beside it, and
    remove all but the keep_last highest-numbered ones (0: keep all). The numbered name is a hard link
    (no second write: checkpoint.pt is always replaced, never changed in place), a copy where the file
    system has no links."""
    folder = os.path.dirname(path) or "."
    numbered = os.path.join(folder, f"checkpoint-ep{epoch:04d}.pt")
    tmp = temporary(numbered)
    try:
        os.link(path, tmp)
        os.replace(tmp, numbered)
    except OSError:
        with suppress(OSError):
            os.remove(tmp)
        with open(path, "rb") as src:
            write_atomic(numbered, lambda f: shutil.copyfileobj(src, f), size=os.path.getsize(path))
    kept = sorted((f for f in os.listdir(folder) if re.fullmatch(r"checkpoint-ep\d+\.pt", f)),
                  key=lambda f: int(f[len("checkpoint-ep"):-len(".pt")]))
    for old in kept[:-keep_last] if keep_last else []:
        with suppress(FileNotFoundError):
            os.remove(os.path.join(folder, old))
