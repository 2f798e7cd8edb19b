"""
What a run writes and prints, beside neighbor_grpo.py's loop: config.json, log.jsonl and a console line per iteration
and evaluation (RunLog), curves.png, sample grids, an evaluation's summary and its Table-1-shaped markdown, the closing
line. Rank 0 writes; nothing here changes the model (models.compiled_variants only counts its compiled blocks), and
every number arrives computed (and gathered over ranks).
"""

import dataclasses
import hashlib
import importlib
import inspect
import json
import math
import sys
import time
from pathlib import Path

import torch

from models import compiled_variants


class RunLog:
    """The run's record, written by rank 0: config.json, log.jsonl (a record per iteration, evaluations in it), a
    console line per iteration and evaluation, curves.png, optional W&B, a closing summary. run: neighbor_grpo's Run."""

    def __init__(self, run, cfg):
        self.run, self.cfg, self.out, self.record, self.wandb = run, cfg, Path(cfg.out_dir), {}, None
        if run.rank != 0:
            return
        (self.out / "samples").mkdir(parents=True, exist_ok=True)
        code = source_of(run.method)
        (self.out / "config.json").write_text(json.dumps({**dataclasses.asdict(cfg), "code": code}, indent=2))
        self.file = open_log(self.out, run.start)
        if cfg.wandb_project:  # optional: the same records as log.jsonl
            self.wandb = importlib.import_module("wandb")
            self.wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg), dir=self.out, resume="allow",
                            id=cfg.wandb_id or None)
        print(f"{run.method.describe(cfg)} | {code} | {cfg.model_path} | {run.world} process(es) x "
              f"{cfg.groups_per_rank} group(s) | G={cfg.group_size} T={cfg.num_steps} K={cfg.num_train_steps} | "
              f"start at iteration {run.start}")

    def evaluation(self, it, summary, n, guard):
        """summary: {reward: mean, se, ...} of the held-out prompts; guard: the guard's decision (neighbor_grpo.guard)."""
        if self.run.rank == 0:
            best = guard["best"]["iteration"] if guard["best"] else None
            self.record.update({"iter": it, **{f"eval/{k}": v["mean"] for k, v in summary.items()},
                                "guard/fallen": len(guard["fallen"]), "best_iter": best})
            print(f"eval {it:4d} | " + " ".join(f"{k} {mean_se(v)}" + (" FALLEN from {:.4f} (iteration {})".format(
                *guard["fallen"][k][:2]) if k in guard["fallen"] else "") for k, v in summary.items()) +
                  f" | {n} held-out prompts | " + ("best so far" if guard["new_best"] else f"best: iteration {best}"))

    def iteration(self, it, rewards, stats):
        """rewards [M, N]: every rank's groups; stats: the update's statistics, averaged over ranks."""
        cfg = self.cfg
        if self.run.rank == 0:
            self.write({"iter": it, **self.record, **{f"reward/{n}": r.mean().item() for n, r in zip(cfg.rewards, rewards)},
                        **{f"reward_std/{n}": r.std().item() for n, r in zip(cfg.rewards, rewards)}, **stats})
            print(f"iter {it:4d} | " + " ".join(f"{n} {r.mean():.4f}" for n, r in zip(cfg.rewards, rewards)) +
                  f" | loss {stats['loss']:+.3e} | clip {stats['clip_frac']:.2f} | "
                  f"|log rho| {stats['first_anchor_abs_log_ratio']:.1e} | {stats['time/total']:.2f}s")
            if cfg.compile and it == self.run.start:  # by now the sample grid, evaluation, rollout and update ran
                print("compiled blocks: " + ", ".join(f"{kind} {n} variants" for kind, n in
                                                      compiled_variants(self.run.model).items()))

    def write(self, record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if any(k.startswith("eval/") for k in record):
            plot_curves(self.out, self.cfg.rewards)
        if self.wandb:
            self.wandb.log(record, step=record["iter"])
        self.record = {}

    def stopped(self, it, signal_name):
        if self.run.rank == 0:
            print(f"stopped by {signal_name or 'a signal to another rank'} after iteration {it}: checkpoint "
                  f"step-{it + 1:06d} written; continue with the same command and --resume")
            self.file.close()

    def close(self, guard):
        if self.run.rank != 0:
            return
        if self.record:  # the final evaluation: write() draws the curves with it
            self.write(self.record)
        else:
            plot_curves(self.out, self.cfg.rewards)
        self.file.close()
        if self.wandb:
            self.wandb.finish()
        print(summary_line(self.out, self.cfg, guard))


def source_of(method):
    """The file that defines the method's objective and the start of its text's SHA-256: a fork's banner and config.json
    name the fork, and an edited file its own hash."""
    path = Path(inspect.getsourcefile(method.objective))
    return f"{path.name} sha256:{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"


def open_log(out, start):
    """log.jsonl, keeping the records of iterations before start when a run resumes."""
    path = out / "log.jsonl"
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["iter"] < start] if start else []
    log = open(path, "w")
    log.writelines(line + "\n" for line in kept)
    return log


def summary_line(out, cfg, guard):
    """The closing line: why the run ended (the guard that fell, from what to what), each held-out reward's first and
    last evaluation, the best model, and where the run's outputs are."""
    evals = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if any("eval/" in k for k in r)]
    gains = [f"{k[5:]} {evals[0][k]:.4f} -> {evals[-1][k]:.4f} ({evals[-1][k] - evals[0][k]:+.4f})"
             for k in (evals[-1] if evals else {}) if k.startswith("eval/") and k in evals[0]]
    held_out = f"held-out (iterations {evals[0]['iter']} -> {evals[-1]['iter']}): " if gains else "no held-out evaluation"
    saved = [p for p in ("samples", "curves.png", "eval", "lora" if cfg.lora_rank else "transformer")
             if (out / p).is_file() or (out / p).is_dir() and any((out / p).iterdir())]
    ended = "done" if not guard.get("stop") else f"stopped by the guard at iteration {guard['iteration']}: " + ", ".join(
        f"{g} fell from {best:.4f} (iteration {at}) to {now:.4f} ± {se:.4f}" for g, (best, at, now, se) in
        guard["fallen"].items()) + f" ({guard['streak']} evaluations in a row)"
    best = guard.get("best")
    best = (f" | best model (iteration {best['iteration']}: " + ", ".join(f"{k} {v['mean']:.4f}" for k, v in
                                                                       best["scores"].items()) + f") in {out / 'best'}"
            if best else "")
    return f"{ended} | {held_out}{', '.join(gains)}{best} | in {out}: {', '.join(saved)}"


def plot_curves(out, rewards):
    """out/curves.png from log.jsonl: each reward (training groups and held-out) in its panel, the clip fraction and
    the first anchor's |log rho|."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    names = list(dict.fromkeys([*rewards, *(k[5:] for r in log for k in r if k.startswith("eval/"))]))
    panels = [(n + ("" if n in rewards else " (not trained on)"), f"reward/{n}", f"eval/{n}") for n in names] + [
        ("clip fraction", "clip_frac", None), ("first-anchor |log rho|", "first_anchor_abs_log_ratio", None)] + [
        ("distance to the reference (kl)", "kl", None)] * any("kl" in r for r in log)
    best = next((r["best_iter"] for r in reversed(log) if r.get("best_iter") is not None), None)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for ax, (title, train, held_out) in zip(axes[0], panels):
        for key, style, label in ((train, "-", "training groups"), (held_out, "o-", "held-out")):
            points = [(r["iter"], max(r[key], 1e-12) if "rho" in title else r[key]) for r in log if key in r]
            if points:
                ax.plot(*zip(*points), style, label=label)
        if best is not None:
            ax.axvline(best, color="grey", ls=":", label=f"best model ({best})")
        ax.set(title=title, xlabel="iteration", yscale="log" if "rho" in title else "linear")
        if held_out:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)


def save_grid(images, path, min_side=128):
    """Images [N, 3, H, W] in [0, 1] side by side in one PNG, small ones scaled up (nearest) to min_side pixels."""
    from PIL import Image

    images = images.float().cpu().clamp(0, 1)
    scale = math.ceil(min_side / images.shape[-1])
    if scale > 1:
        images = images.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
    row = torch.cat(list(images), dim=2)
    Image.fromarray((row * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).save(path)


def write_evaluation(path, prompts, names, rows, samples, cfg, grid, paper_rows=None):
    """path.json (per-prompt scores, mean, std, standard error), path.md (Table 1's shape, with any paper_rows) and
    path.png (the samples) of an evaluation: rows [(prompt index, [score per reward in names])], samples {index:
    image}. Returns {reward: dict(mean, std, se, missing)}."""
    scores = torch.tensor([r for _, r in rows], dtype=torch.float64)
    summary = {name: summarise(scores[:, m]) for m, name in enumerate(names)}
    scores = [dict(index=i, prompt=prompts[i], **{k: None if math.isnan(v) else v for k, v in zip(names, r)})
              for i, r in rows]
    result = dict(num_prompts=len(prompts), num_steps=len(grid) - 1, solver=cfg.rollout_solver,
                  resolution=cfg.resolution, seed=cfg.seed, rewards=summary, scores=scores)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{path}.json").write_text(json.dumps(result, indent=1))
    Path(f"{path}.md").write_text(table1(summary, len(prompts), cfg.transformer_path or cfg.model_path, paper_rows))
    save_grid(torch.stack([samples[i] for i in sorted(samples)]), f"{path}.png")
    return summary


def summarise(x):
    """Mean, standard deviation and standard error of the scores; missing: NaN (answers a judge could not score)."""
    x, n = x[~x.isnan()], len(x)
    std = x.std().item() if len(x) > 1 else 0.0
    return dict(mean=x.mean().item(), std=std, se=std / math.sqrt(max(len(x), 1)), missing=n - len(x))


def table1(summary, n, model, paper_rows=None):
    """Markdown in Table 1's shape: the evaluated model (mean ± standard error over n prompts), then any paper rows
    {row name: {reward: value}} for the same columns."""
    lines = ["| model | " + " | ".join(summary) + " |", "| --- |" + " --- |" * len(summary),
             f"| {model} (n = {n}) | " + " | ".join(mean_se(v) for v in summary.values()) + " |"]
    lines += [f"| {row} | " + " | ".join(f"{values[k]:.3f}" if k in values else "–" for k in summary) + " |"
              for row, values in (paper_rows or {}).items() if any(name in values for name in summary)]
    return "\n".join(lines) + "\n"


def mean_se(v):
    return f"{v['mean']:.4f} ± {v['se']:.4f}" + (f" ({v['missing']} unscored)" if v.get("missing") else "")


def progress(iterable, desc, rank):
    """A tqdm bar on rank 0 when stdout is a terminal (not in logs or CI); the iterable itself otherwise."""
    if rank != 0 or not sys.stdout.isatty():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


def clock(device):
    """Wall time once the device's queued work is done (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Stopwatch:
    """lap(phase) adds the seconds since the previous lap to that phase."""

    def __init__(self, device):
        self.device, self.seconds, self.last = device, {}, clock(device)

    def __call__(self, phase):
        now = clock(self.device)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.last
        self.last = now
