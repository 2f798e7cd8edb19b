"""
What a run survives, beside neighbor_grpo.py's loop: resumable checkpoints (torch.distributed.checkpoint for what
trains and AdamW's state, the transformer or adapter exported in diffusers' format beside it), the guard's best model,
the checks before a resume, and preemption (SIGTERM, SIGUSR1). The two collectives they need live here too; neighbor_grpo.py imports them.
Rank 0 writes the files every rank shares; each rank writes its own shards.
"""

import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path

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


def barrier(world):
    if world > 1:
        dist.barrier()


def save_checkpoint(model, optimizer, cfg, iteration, guard_state, rank, world, dtype):
    """Write under tmp-N, rename to step-N, then replace the `latest` pointer: a crash mid-save leaves the
    previous checkpoint intact. All randomness derives from (seed, iteration, group), so no RNG state is needed;
    guard_state is the guard's before the evaluation at iteration N, which a resumed run makes again."""
    root = Path(cfg.out_dir) / "checkpoints"
    tmp, final = root / f"tmp-{iteration:06d}", root / f"step-{iteration:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
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
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp / "state", no_dist=world == 1)
    export_model(model, tmp, rank, dtype, cfg.lora_rank)
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps({"iteration": iteration, "config": dataclasses.asdict(cfg),
                                                   "guard": guard_state}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (root / "latest.tmp").write_text(final.name)
        os.replace(root / "latest.tmp", root / "latest")
        for old in root.glob("step-*"):
            if old != final:
                shutil.rmtree(old)
    barrier(world)


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


def resume_state(cfg, out):
    """The checkpoint --resume continues from, after refusing to overwrite a run or to resume nothing."""
    pointer = out / "checkpoints" / "latest"
    if cfg.resume and not pointer.exists():
        raise CheckpointError(f"resume: out_dir={out} holds no checkpoint; drop --resume to start a new run")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"out_dir={out}: cannot be created ({e.strerror}); pass a directory this user can write")
    if not cfg.resume and (out / "log.jsonl").exists() and not cfg.overwrite:
        raise CheckpointError(f"out_dir={out}: already holds a run (log.jsonl); pass --resume to continue it, "
                              "--overwrite to replace it, or another --out_dir")
    return pointer.parent / pointer.read_text().strip() if cfg.resume else None


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
        flag = torch.tensor([float(self.signal is not None)], device=device)
        if world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
