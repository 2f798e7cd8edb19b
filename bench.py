"""
Where a Neighbor GRPO iteration's time goes: the rollout, reward and update phases of the real training
iteration, beside the cost model "G*T transformer forwards + B*K forward-backward passes", whose unit costs
are timed on the transformer alone in the same run.

    python bench.py --preset=tiny
    python bench.py --preset=flux-dev --flux_blocks=2,4 --rewards=jpeg_compressibility --prompt_file=  # random,
    torchrun --nproc_per_node=8 bench.py --preset=flux-dev --flux_blocks=19,38 ...  # FLUX.1-dev width; per rank
    python bench.py --preset=tiny --compare --iters=40                                  # Neighbor GRPO vs SDE-GRPO
    python bench.py --preset=tiny --sweep=old_anchor=rollout,train_solver --seeds=0,1,2 --iterations=100

Bench options: --iters=N timed iterations (3), --warmup=N untimed ones (1), --flux_blocks=D,S a random model of
FLUX.1-dev's width with D double and S single blocks (weights cannot be downloaded everywhere; speed and memory
do not depend on them), --compare: Neighbor GRPO with the given config against the SDE baseline (sde_grpo.py) with
DanceGRPO's setting on top of it (sde_grpo.DANCEGRPO), alternating iterations in one process, with
--eval_every=N (5) evaluations of both on the same deterministic sampler, or with --seconds=S a training run
of S seconds each, always advancing the method that has used less time; it writes compare.csv and compare.png
to --out (runs/compare). --sweep=FIELD=A,B trains one run per value and seed in --seeds (0,1,2) and writes
sweep.md (held-out reward gain, mean and spread over seeds; clip fraction; first-anchor |log rho|) to --out.
Every other --field=value is a neighbor_grpo Config field.
"""

import csv
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

import flux
import neighbor_grpo as ng
import sde_grpo
from rewards import RewardError, score


def timed(fn, device, repeats=3):
    """Seconds per call of fn, after one untimed call."""
    fn()
    t0 = ng.clock(device)
    for _ in range(repeats):
        fn()
    return (ng.clock(device) - t0) / repeats


def parse(argv):
    opts, rest = dict(iters=3, warmup=1, flux_blocks="", compare=False, eval_every=5, seconds=0.0,
                      out="runs/compare", sweep="", seeds="0,1,2"), []
    for arg in argv:
        key, _, value = arg.removeprefix("--").partition("=")
        if key == "compare":
            opts[key] = value in ("", "1", "true")
        elif key in opts:
            opts[key] = type(opts[key])(value)
        else:
            rest.append(arg)
    return opts, ng.parse_config(rest)


def setup(cfg, flux_blocks, method=ng.NEIGHBOR):
    """train()'s own builder, neighbor_grpo.build; --flux_blocks=D,S swaps the weights for random ones at FLUX.1-dev's
    width (model_path=random:D,S). No evaluation, and no refusal of an out_dir that holds a run: bench writes none."""
    if flux_blocks:
        cfg = dataclasses.replace(cfg, model_path=f"random:{flux_blocks}")
    return ng.build(dataclasses.replace(cfg, eval_every=0, overwrite=True, resume=False), method)


def unit_costs(s, cfg):
    """One batched no-grad forward (the rollout's unit) and one batch-1 forward+backward (the update's unit)."""
    pipe, model, device, dtype = s.pipe, s.model, s.device, s.dtype
    cond = flux.encode_prompt(pipe, s.prompts[0], cfg, s.cache)
    x = torch.randn(min(cfg.rollout_batch_size, cfg.group_size), *flux.latent_shape(pipe, cfg.resolution),
                    device=device)

    def forward():
        with torch.no_grad():
            flux.velocity(pipe.transformer, x, 0.5, cond, dtype)

    def forward_backward():
        flux.velocity(model, x[:1], 0.5, cond, dtype).pow(2).mean().backward()

    t_fwd, t_fb = timed(forward, device), timed(forward_backward, device)
    s.optimizer.zero_grad(set_to_none=True)
    return t_fwd, t_fb


def one_iteration(s, cfg, iteration):
    """One real training iteration (train_iteration, the code train() runs): phase seconds and mean rewards."""
    groups, stats, timings = ng.train_iteration(s, cfg, iteration)
    return timings, torch.cat([g.rewards for g in groups], dim=1).mean(1).tolist(), stats


def run_iterations(s, cfg, iters, warmup):
    """Mean phase seconds over iters iterations after warmup ones."""
    totals = dict(rollout=0.0, reward=0.0, update=0.0, total=0.0)
    for i in range(warmup + iters):
        timings, _, _ = one_iteration(s, cfg, i)
        if i >= warmup:
            for k in totals:
                totals[k] += timings[k] / iters
    return totals


def trained_per_group(cfg):
    """Trajectories trained per group: B anchors, or every sample for the SDE baseline."""
    return cfg.group_size if isinstance(cfg, sde_grpo.SDEConfig) else cfg.num_anchors


def report(cfg, opts, totals, t_fwd, t_fb, s):
    G, T, K, n = cfg.group_size, cfg.num_steps, cfg.num_train_steps, cfg.groups_per_rank
    B = trained_per_group(cfg)
    calls = math.ceil(G / cfg.rollout_batch_size) * T * n
    ideal = dict(rollout=calls * t_fwd, update=B * K * n * t_fb)
    rb = min(cfg.rollout_batch_size, G)
    blocks = f"FLUX.1-dev width, {opts['flux_blocks']} blocks" if opts["flux_blocks"] else cfg.model_path
    print(f"bench | {blocks} | {cfg.resolution}px | {s.device} {str(s.dtype).removeprefix('torch.')} | "
          f"world {s.world} x {n} group(s) | G={G} B={B} T={T} K={K} | {opts['iters']} iterations")
    print(f"unit costs: forward (batch {rb}) {t_fwd * 1e3:.1f} ms, forward+backward (batch 1) {t_fb * 1e3:.1f} ms")
    print(f"{'phase':<8} {'measured s':>11} {'ideal s':>9} {'ratio':>6}  ideal is")
    print(f"{'rollout':<8} {totals['rollout']:>11.3f} {ideal['rollout']:>9.3f} "
          f"{totals['rollout'] / ideal['rollout']:>6.2f}  {calls} forwards of batch {rb} (G*T = {G * T * n} samples)")
    print(f"{'reward':<8} {totals['reward']:>11.3f} {'-':>9} {'-':>6}  VAE decode and {', '.join(cfg.rewards)}")
    print(f"{'update':<8} {totals['update']:>11.3f} {ideal['update']:>9.3f} "
          f"{totals['update'] / ideal['update']:>6.2f}  B*K = {B * K * n} forward+backward of batch 1")
    print(f"{'total':<8} {totals['total']:>11.3f} s/iteration")
    if s.device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated(s.device) / 2**30:.2f} GiB")


PAPER_S_PER_ITER = dict(neighbor=45.08, sde=237.86)  # Table 3, 32 x H800: Neighbor GRPO 8-step DPM++, DanceGRPO


def compare(opts, cfg):
    """Neighbor GRPO against the SDE baseline on one preset: seconds per iteration, NFEs, the speed-up, and a
    side-by-side training run (compare.csv, compare.png)."""
    cfgs = dict(neighbor=cfg, sde=sde_grpo.SDEConfig(**{**dataclasses.asdict(cfg), **sde_grpo.DANCEGRPO}))
    setups = {m: setup(c, opts["flux_blocks"], sde_grpo.SDE if m == "sde" else ng.NEIGHBOR) for m, c in cfgs.items()}
    ref = setups["neighbor"]
    prompts = ref.prompts[: cfg.num_samples]  # the preset's own prompts (tiny: the examples)
    rows, seconds, wall, done = [], {m: [] for m in cfgs}, dict.fromkeys(cfgs, 0.0), dict.fromkeys(cfgs, 0)
    while True:  # interleaved, so both meet the same machine
        if opts["seconds"]:  # the method that has used less time goes next, until both used the budget
            m = min((m for m in cfgs if wall[m] < opts["seconds"]), key=wall.get, default=None)
        else:  # alternating, warmup + iters iterations each
            m = min((m for m in cfgs if done[m] < opts["warmup"] + opts["iters"]), key=done.get, default=None)
        if m is None:
            break
        c, i = cfgs[m], done[m]
        timings, rewards, stats = one_iteration(setups[m], c, i)
        wall[m] += timings["total"]
        done[m] += 1
        row = dict(method=m, iteration=i, wall_clock_s=wall[m], **{f"time/{k}": v for k, v in timings.items()},
                   **{f"reward/{n}": r for n, r in zip(c.rewards, rewards)}, **stats)
        if opts["eval_every"] and (i + 1) % opts["eval_every"] == 0:  # both on Neighbor GRPO's ODE sampler
            images = ng.generate(setups[m].pipe, prompts, cfg, ref.grid, cfg.seed, ref.dtype,
                                 setups[m].cache)
            row.update({f"eval/{n}": r for n, r in zip(c.rewards, score(ref.reward_fns, images, prompts)
                                                       .mean(1).tolist())})
        rows.append(row)
        if i >= opts["warmup"]:
            seconds[m].append(timings["total"])
    if ref.rank == 0:
        report_comparison(cfgs, seconds, rows, Path(opts["out"]))


def report_comparison(cfgs, seconds, rows, out):
    nfe = {m: (c.num_steps, ng.nfe_theta(trained_per_group(c), c.group_size, c.num_train_steps))
           for m, c in cfgs.items()}
    mean = {m: sum(v) / len(v) for m, v in seconds.items()}
    print(f"{'method':<9} {'s/iter':>8} {'NFE_old':>8} {'NFE_theta':>10} {'paper s/iter':>13}")
    for m in cfgs:
        print(f"{m:<9} {mean[m]:>8.3f} {nfe[m][0]:>8} {nfe[m][1]:>10.2f} {PAPER_S_PER_ITER[m]:>13.2f}")
    print(f"speed-up of Neighbor GRPO: {mean['sde'] / mean['neighbor']:.2f}x here, "
          f"{PAPER_S_PER_ITER['sde'] / PAPER_S_PER_ITER['neighbor']:.2f}x in the paper (Table 3)")
    out.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    plot_comparison(rows, cfgs["neighbor"].rewards[0], out / "compare.png")
    print(f"wrote {out / 'compare.csv'} and {out / 'compare.png'}")


def plot_comparison(rows, reward, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for m, label in (("neighbor", "Neighbor GRPO"), ("sde", "SDE-GRPO (DanceGRPO setting)")):
        mine = [r for r in rows if r["method"] == m]
        axes[0].plot([r["wall_clock_s"] for r in mine], [r[f"reward/{reward}"] for r in mine], label=label)
        evals = [r for r in mine if f"eval/{reward}" in r]
        axes[1].plot([r["wall_clock_s"] for r in evals], [r[f"eval/{reward}"] for r in evals], "o-", label=label)
    for ax, title in zip(axes, ("training reward (each method's own samples)", "held-out, same ODE sampler")):
        ax.set(xlabel="training wall-clock (s)", ylabel=reward, title=title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def sweep(opts, cfg):
    """One training run per (value of the swept field, seed): what each value does to learning, in one table."""
    field, _, values = opts["sweep"].partition("=")
    types = {f.name: f.type for f in dataclasses.fields(ng.Config)}
    if field not in types:
        raise ng.ConfigError(f"--sweep={opts['sweep']}: {field} is not a Config field; use --sweep=FIELD=A,B")
    out, rows = Path(opts["out"]), []
    for value in values.split(","):
        gains, clip, ratio = [], [], []
        for seed in opts["seeds"].split(","):
            run_dir = out / f"{field}={value}" / f"seed{seed}"
            run_cfg = dataclasses.replace(cfg, **{field: ng._convert(field, value, types[field])}, seed=int(seed),
                                          out_dir=str(run_dir), overwrite=True)
            ng.validate(run_cfg)
            ng.train(run_cfg)
            log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
            evals = [r for r in log if f"eval/{cfg.rewards[0]}" in r]
            gains.append(evals[-1][f"eval/{cfg.rewards[0]}"] - evals[0][f"eval/{cfg.rewards[0]}"])
            train = [r for r in log if "loss" in r]
            clip.append(sum(r["clip_frac"] for r in train) / len(train))
            ratio.append(max(r["first_anchor_abs_log_ratio"] for r in train[-len(train) // 5:]))
        g = torch.tensor(gains)
        rows.append(f"| {field}={value} | {cfg.rewards[0]} | {g.mean():+.3f} ± {g.std() if len(g) > 1 else 0:.3f} | "
                    f"{' '.join(f'{x:+.3f}' for x in gains)} | {sum(clip) / len(clip):.2f} | "
                    f"{sum(ratio) / len(ratio):.1e} |")
    table = ["| setting | reward | held-out gain (mean ± s.d.) | per seed | clip fraction | first-anchor |log ρ| "
             "(last fifth, max) |", "| --- | --- | --- | --- | --- | --- |"] + rows
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


def main(argv):
    try:
        run(*parse(argv))
    except (ng.ConfigError, flux.ModelError, RewardError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(opts, cfg):
    if opts["sweep"]:
        return sweep(opts, cfg)
    if opts["compare"]:
        compare(opts, cfg)
        if ng.dist.is_initialized():
            ng.dist.destroy_process_group()
        return
    s = setup(cfg, opts["flux_blocks"])
    t_fwd, t_fb = unit_costs(s, cfg)
    totals = run_iterations(s, cfg, opts["iters"], opts["warmup"])
    if s.rank == 0:
        report(cfg, opts, totals, t_fwd, t_fb, s)
    if ng.dist.is_initialized():
        ng.dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
