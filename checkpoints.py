"""
What a run survives, beside neighbor_grpo.py's loop: resumable checkpoints (torch.distributed.checkpoint for what
trains and AdamW's state, written in the background, the transformer or adapter exported in diffusers' format beside
it) every ckpt_every iterations or ckpt_minutes, the guard's best model, the checks before a resume, preemption
(SIGTERM, SIGUSR1), torchrun's restarts (continued from the latest checkpoint) and a hung rank (the steady-state
collective timeout). The loop's small collectives live here too; neighbor_grpo.py imports them. Rank 0 writes the
files every rank shares; each rank writes its own shards. What survives what: docs/cluster.md.
"""

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import signal
from datetime import timedelta
from pathlib import Path
from time import monotonic

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from models import export_model
from preflight import checkpoint_bytes, damaged_files

TRAINED = StateDictOptions(ignore_frozen_params=True)  # a checkpoint holds what trains: all of it, or the adapter
RENAMED = {"distance": "distance_reduction"}  # fields of older runs' saved configs, by their name now


class CheckpointError(ValueError):
    """A checkpoint cannot be written or continued from: the message says what is kept and the command that goes on."""


def all_gather_objects(obj, world):
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled: for small results)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def all_mean(values, world, device):
    """The mean over ranks of a dict of floats."""
    if world == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / world).tolist()))


def all_max(value, world, device):
    """The largest of a float over ranks: one decision every rank takes alike."""
    t = torch.tensor([float(value)], device=device)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def barrier(world):
    if world > 1:
        dist.barrier()


def restart_count():
    """torchrun's restarts of this worker group so far (0 outside torchrun, or on its first round)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def init_process_group(backend, seconds):
    """The default group. torchrun keeps its agent's TCPStore across restarts (static rendezvous:
    static_tcp_rendezvous.py's `if not self._store`; c10d: dynamic_rendezvous.py's shared store), so a restarted round
    would read the dead round's gloo addresses or NCCL id; on one node (one agent, one restart count) the keys go under
    the restart's prefix. Across nodes the counts differ (api.py restarts a healthy node without counting), so
    train.sh sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: a new store each round (docs/cluster.md)."""
    timeout = timedelta(seconds=seconds)
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and os.environ.get("GROUP_WORLD_SIZE") == "1"
    store = dist.PrefixStore(f"restart{restart_count()}", store) if shared else store
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def steady_timeout(cfg, iteration_seconds, world):
    """After start-up (weights broadcast, prompts encoded) a collective waits max(steady_timeout, 3 iterations), not
    dist_timeout: a hung rank then ends the run in minutes and torchrun restarts it (NCCL's watchdog aborts at it)."""
    seconds = max(cfg.steady_timeout, 3 * iteration_seconds)
    if world > 1:  # dist.set_timeout is torch 2.14's name; the GPUs' 2.11 has only the private one (deprecated since)
        set_timeout = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout
        set_timeout(timedelta(seconds=seconds))
    return seconds


class Checkpointer:
    """When to checkpoint, and the one checkpoint in flight. A save is due every ckpt_every iterations or ckpt_minutes,
    whichever comes first, on the slowest rank's clock (all-reduced: every rank decides alike). The state is staged to
    host memory and written in the background (dcp.async_save) while training goes on; rank 0 moves `latest` to it
    once written, and a save waits for the one before. run: neighbor_grpo's Run."""

    def __init__(self, run, cfg):
        self.run, self.cfg, self.pending, self.last = run, cfg, None, monotonic()
        # its own gloo group: async_save needs a CPU backend (state_dict_saver.py; NCCL alone fails, even in a world of
        # one), and the writer thread's collectives must not interleave with training's; it keeps dist_timeout
        seconds = timedelta(seconds=cfg.dist_timeout)
        self.group = dist.new_group(backend="gloo", timeout=seconds) if dist.is_initialized() else None

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc):
        if kind is None:
            self.commit(wait=True)
        elif issubclass(kind, Exception):  # the write in flight is a whole state: commit it if it ends (not on ^C)
            with contextlib.suppress(TimeoutError):  # a writer stuck on a hung rank: `latest` stays where it is
                self.commit(wait=True, timeout=self.cfg.steady_timeout)

    def due(self, iteration):
        """Collective: whether to checkpoint after `iteration` iterations (the last one is saved by the loop's end)."""
        self.commit(wait=False)
        minutes = all_max((monotonic() - self.last) / 60, self.run.world, self.run.device)
        every, limit = self.cfg.ckpt_every, self.cfg.ckpt_minutes
        due = (every and iteration % every == 0) or (limit and minutes >= limit)
        return iteration < self.cfg.iterations and bool(due)

    def save(self, iteration, guard_state, wait=False):
        self.commit(wait=True)  # one write at a time
        run = self.run
        self.pending = save_checkpoint(run.model, run.optimizer, self.cfg, iteration, guard_state, run.rank, run.world,
                                       run.dtype, self.group)
        self.last = monotonic()
        if wait:
            self.commit(wait=True)

    def commit(self, wait, timeout=None):
        """Rank 0 moves `latest` once its write is done: dcp writes the metadata after every rank's shards (its finish
        step gathers their results), so rank 0's future completing means the whole checkpoint is on disk."""
        if self.pending and (wait or self.pending[0].done()):
            written, commit = self.pending
            failed = written.exception(timeout)  # TimeoutError if still in flight after timeout seconds
            self.pending = None
            if failed:  # `latest` still names the checkpoint before
                raise failed
            commit()


def save_checkpoint(model, optimizer, cfg, iteration, guard_state, rank, world, dtype, group=None):
    """Write under tmp-N; once written, rename to step-N, then replace the `latest` pointer: a crash mid-save leaves the
    previous checkpoint intact. All randomness derives from (seed, iteration, group), so no RNG state is needed;
    guard_state is the guard's before the evaluation at iteration N, which a resumed run makes again. Returns the
    state's write in flight and what commits it (rank 0's rename)."""
    root = Path(cfg.out_dir) / "checkpoints"
    tmp, final = root / f"tmp-{iteration:06d}", root / f"step-{iteration:06d}"
    if rank == 0:
        for old in root.glob("tmp-*"):  # a dead round's unfinished writes
            shutil.rmtree(old, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(world)
    need = checkpoint_bytes(model.parameters(), dtype.itemsize, cfg.lora_rank)
    free = min(all_gather_objects(shutil.disk_usage(tmp).free, world))  # each rank's disk, one decision
    if free < need:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"checkpoint at iteration {iteration}: needs {need / 1e9:.1f} GB in {root}, "
                              f"{free / 1e9:.1f} GB free; the last checkpoint is kept: free space (or move out_dir), "
                              "then --resume")
    model_state, optim_state = get_state_dict(model, optimizer, options=TRAINED)
    written = dcp.async_save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp / "state",
                             process_group=group, no_dist=group is None)  # staged (copied) before it returns
    # the export stays synchronous: FSDP gathers the full weights on every rank, which cannot leave the loop's thread
    export_model(model, tmp, rank, dtype, cfg.lora_rank)
    if rank != 0:
        return written, lambda: None
    (tmp / "meta.json").write_text(json.dumps({"iteration": iteration, "config": dataclasses.asdict(cfg),
                                               "guard": guard_state}))
    return written, functools.partial(commit_checkpoint, root, tmp, final)


def commit_checkpoint(root, tmp, final):
    """Rank 0, once tmp's state is written: tmp becomes step-N, `latest` points at it, older ones go."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    (root / "latest.tmp").write_text(final.name)
    os.replace(root / "latest.tmp", root / "latest")
    for old in root.glob("step-*"):
        if old != final:
            shutil.rmtree(old)


def export_best(model, cfg, state, rank, world, dtype):
    """out_dir/best: the guard's best model so far (transformer/ or lora/) and best.json (its iteration and every
    held-out score), written beside and then swapped in."""
    out = Path(cfg.out_dir)
    if rank == 0:
        shutil.rmtree(out / "best.tmp", ignore_errors=True)
    export_model(model, out / "best.tmp", rank, dtype, cfg.lora_rank)
    if rank == 0:
        best = {k: state["best"][k] for k in ("iteration", "scores")}
        (out / "best.tmp" / "best.json").write_text(json.dumps(best, indent=1))
        shutil.rmtree(out / "best", ignore_errors=True)
        os.replace(out / "best.tmp", out / "best")
    barrier(world)


def resume_state(cfg, out, rank=0, world=1):
    """The checkpoint --resume continues from, after refusing to overwrite a run or to resume nothing. Under torchrun's
    restarts the same command continues from the latest checkpoint by itself (or starts over if none was written):
    the largest count of any rank, as a node restarted for another's failure counts none (elastic/agent/server/api.py)."""
    pointer, refused = out / "checkpoints" / "latest", out / ".refused"  # a refused round's restarts refuse it too
    seen = all_gather_objects((restart_count(), refused.exists()), world)  # one decision for every rank
    restart = 0 if any(r for _, r in seen) else max(n for n, _ in seen)
    if cfg.resume and not pointer.exists():
        raise CheckpointError(f"resume: out_dir={out} holds no checkpoint; drop --resume to start a new run")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"out_dir={out}: cannot be created ({e.strerror}); pass a directory this user can write")
    if not (cfg.resume or restart) and (out / "log.jsonl").exists() and not cfg.overwrite:
        refused.touch()  # by every rank: whichever exits first leaves it for torchrun's restart
        raise CheckpointError(f"out_dir={out}: already holds a run (log.jsonl); pass --resume to continue it, "
                              "--overwrite to replace it, or another --out_dir")
    path = pointer.parent / pointer.read_text().strip() if (cfg.resume or restart) and pointer.exists() else None
    refused.unlink(missing_ok=True)
    if restart and rank == 0:
        print(restart_line(restart, out, path))
    return path


def restart_line(restart, out, path):
    """One line: the restart, the checkpoint it continues from and the iterations lost since (log.jsonl's last)."""
    log = out / "log.jsonl"
    done = [json.loads(line)["iter"] for line in (log.read_text().splitlines() if log.exists() else [])]
    start = json.loads((path / "meta.json").read_text())["iteration"] if path else 0
    lost = max(done, default=start - 1) + 1 - start
    source = f"continuing from {path}" if path else f"no checkpoint yet: starting over in {out}"
    return f"torchrun restart {restart}: {source} (iteration {start}); {lost} iteration(s) lost since"


def restore(model, optimizer, cfg, path, rank, world):
    """Model and AdamW state from a checkpoint, in whatever sharding this run uses; returns the iterations it already
    did and the guard's state, listing any fields that changed since."""
    damaged = damaged_files(path / "state")
    if damaged:
        export = f"--lora_path={path}/lora" if cfg.lora_rank else f"--transformer_path={path}/transformer"
        raise CheckpointError(f"resume: {damaged[0]} is missing or cut short ({len(damaged)} damaged file(s)); no "
                              f"older checkpoint is kept: start anew from its export ({export}) in another out_dir")
    model_state, optim_state = get_state_dict(model, optimizer, options=TRAINED)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path / "state", no_dist=world == 1)  # strict: every trained tensor must be there
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))  # the frozen base is model_path's
    meta, now = json.loads((path / "meta.json").read_text()), json.loads(json.dumps(dataclasses.asdict(cfg)))
    saved = {RENAMED.get(k, k): v for k, v in meta["config"].items()}
    changed = [f"{k} {saved.get(k)} -> {now[k]}" for k in now
               if k not in ("resume", "overwrite", "iterations") and k in saved and saved[k] != now[k]]
    if changed and rank == 0:
        print(f"resuming {path} with changed fields: {', '.join(changed)}")
    return meta["iteration"], meta.get("guard", {})


class Preemption:
    """SIGTERM and SIGUSR1 (what SLURM and Kubernetes send before a kill) only raise a flag; the loop then finishes
    its iteration, checkpoints and exits 0, on every rank once any rank got one."""

    SIGNALS = [getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name)]

    def __enter__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __call__(self, world, device):
        return bool(all_max(self.signal is not None, world, device))

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
