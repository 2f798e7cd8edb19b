"""
Where a Neighbor GRPO iteration's time and memory go, and the runs that compare settings.

    python bench.py --preset=tiny                                   # a real iteration's phases beside the cost model
    python bench.py --preset=flux-dev --flux_blocks=2,4 --rewards=jpeg_compressibility --prompt_file=  # GPU, random
    torchrun --nproc_per_node=8 bench.py --preset=flux-dev --flux_blocks=19,38 ...   # FLUX.1-dev's width, per rank
    python bench.py --preset=flux-dev --meta                        # FLOPs and memory at the true size, on a CPU
    python bench.py --preset=tiny --compare --iters=40              # Neighbor GRPO vs SDE-GRPO, side by side
    python bench.py --preset=digits --sweep=adv_p=0.8,2 --seeds=0,1,2 --iterations=400   # a study

Timing: --iters=N timed iterations (3) after --warmup=N (1) of the real training iteration (train_iteration), beside
the cost model "ceil(G / rollout_batch_size) * T forwards + B * ceil(K / update_batch_size) forward-backward passes"
whose unit costs are timed on the transformer alone; then (unless --batch1=false) the update's seconds at
update_batch_size and at batch 1, for Neighbor GRPO and the SDE baseline, side by side. --flux_blocks=D,S swaps in a
random model of FLUX.1-dev's width with D double and S single blocks (speed and memory do not depend on the weights).
--meta: the transformer at the configured size on fake tensors (no memory, no weights, no GPU), through the
project's own rollout forward and a whole optimizer step of the update (step_gradient, policy_update's calls): FLOPs
per phase and per iteration, peak memory per rank by category (FSDP2 over --world_size=8 fake ranks, or one process
with LoRA or DDP), the other models' sizes from their real configurations, and the seconds per iteration at
--tflops=790 with the MFU the paper's time implies.
--compare: Neighbor GRPO with the given config against the SDE baseline (sde_grpo.py) with DanceGRPO's setting on
top of it, alternating iterations in one process, both sampled every --eval_every=N (5) iterations with the same
ODE sampler, or with --seconds=S each trained for S seconds; writes compare.csv and compare.png to --out.
--sweep=FIELD=A,B: one training run per value and seed in --seeds (0,1,2), then every held-out metric (the reward
and any judges) first -> last in sweep.md and over iterations (--x=wall_clock: seconds) in sweep.png, in --out;
runs are kept under --runs (default --out/runs) and an identical finished run is reused. --sweep=method=neighbor,sde
runs the SDE baseline for --sde_iterations. Here --eval_every is the runs' Config field.
A new GPU's checks are doctor.py's (python doctor.py --plan, then python doctor.py), not this file's.
Every other --field=value is a neighbor_grpo field.
"""

import contextlib
import csv
import dataclasses
import functools
import hashlib
import json
import math
import sys
import types
from pathlib import Path

import torch

import configurator
import flux
import models
import neighbor_grpo as ng
import preflight
import sde_grpo
from report import clock
from rewards import build_imagereward, score


def timed(fn, device, repeats=3):
    """Seconds per call of fn, after one untimed call."""
    fn()
    t0 = clock(device)
    for _ in range(repeats):
        fn()
    return (clock(device) - t0) / repeats


def parse(argv):
    opts, rest = dict(iters=3, warmup=1, flux_blocks="", compare=False, eval_every=5, seconds=0.0,
                      out="runs/compare", sweep="", seeds="0,1,2", sde_iterations=0, x="iteration", runs="", meta=False,
                      world_size=8, tflops=790.0, batch1=True), []
    sweeping = any(arg.startswith("--sweep=") for arg in argv)  # then --eval_every is the training runs' field
    for arg in argv:
        key, _, value = arg.removeprefix("--").partition("=")
        if key == "doctor":  # doctor.py imports this file, never the reverse
            raise ng.ConfigError("--doctor: the doctor is its own script: run python doctor.py (the same options)")
        if key in ("compare", "meta", "batch1"):
            opts[key] = value in ("", "1", "true")
        elif key in opts and not (sweeping and key == "eval_every"):
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
    """One batched no-grad forward (the rollout's unit) and one forward+backward of preflight.update_batch(cfg)
    transitions (the update's unit)."""
    pipe, model, device, dtype = s.pipe, s.model, s.device, s.dtype
    cond = models.encode_prompt(pipe, s.prompts[0], cfg, s.cache)
    x = ng.neighborhood_noise(pipe, cfg, torch.Generator().manual_seed(0), max(min(
        cfg.rollout_batch_size, cfg.group_size), preflight.update_batch(cfg)), 0.5, device)  # the family's latents

    def forward():
        with torch.no_grad():
            models.velocity(pipe.transformer, x[: min(cfg.rollout_batch_size, cfg.group_size)], 0.5, cond, dtype)

    def forward_backward():
        models.velocity(model, x[: preflight.update_batch(cfg)], 0.5, cond, dtype).pow(2).mean().backward()

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
    calls, ub = math.ceil(G / cfg.rollout_batch_size) * T * n, preflight.update_batch(cfg)
    update_calls = B * math.ceil(n * K / ub)  # an optimizer step per anchor, its n * K transitions in calls of ub
    ideal = dict(rollout=calls * t_fwd, update=update_calls * t_fb)
    rb = min(cfg.rollout_batch_size, G)
    blocks = f"FLUX.1-dev width, {opts['flux_blocks']} blocks" if opts["flux_blocks"] else cfg.model_path
    print(f"bench | {blocks} | {cfg.resolution}px | {s.device} {str(s.dtype).removeprefix('torch.')} | "
          f"world {s.world} x {n} group(s) | G={G} B={B} T={T} K={K} | {opts['iters']} iterations")
    print(f"unit costs: forward (batch {rb}) {t_fwd * 1e3:.1f} ms, forward+backward (batch {ub}) {t_fb * 1e3:.1f} ms")
    print(f"{'phase':<8} {'measured s':>11} {'ideal s':>9} {'ratio':>6}  ideal is")
    print(f"{'rollout':<8} {totals['rollout']:>11.3f} {ideal['rollout']:>9.3f} "
          f"{totals['rollout'] / ideal['rollout']:>6.2f}  {calls} forwards of batch {rb} (G*T = {G * T * n} samples)")
    print(f"{'reward':<8} {totals['reward']:>11.3f} {'-':>9} {'-':>6}  VAE decode and {', '.join(cfg.rewards)}")
    print(f"{'update':<8} {totals['update']:>11.3f} {ideal['update']:>9.3f} "
          f"{totals['update'] / ideal['update']:>6.2f}  {update_calls} forward+backward of batch <= {ub} "
          f"(B*K = {B * K * n} transitions)")
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


def sweep_config(cfg, field, value, seed, run_dir, opts):
    """One study run's config and method: cfg with field=value, or with method=sde the SDE baseline (DanceGRPO's
    setting) for --sde_iterations, its evaluations as many as Neighbor GRPO's."""
    common = dict(seed=seed, out_dir=str(run_dir), overwrite=True)  # out_dir set by the caller
    if field == "method" and value == "sde":
        its = opts["sde_iterations"] or cfg.iterations
        evals = max(1, cfg.iterations // cfg.eval_every) if cfg.eval_every else 0
        run_cfg = sde_grpo.SDEConfig(**{**dataclasses.asdict(cfg), **sde_grpo.DANCEGRPO, **common, "iterations": its,
                                        "eval_every": max(1, its // evals) if evals else 0})
        return run_cfg, sde_grpo.SDE
    if field == "method":
        return dataclasses.replace(cfg, **common), ng.NEIGHBOR
    types = {f.name: f.type for f in dataclasses.fields(ng.SystemConfig)}
    if field not in types:
        raise ng.ConfigError(f"--sweep={opts['sweep']}: {field} is not a field (nor method); use --sweep=FIELD=A,B")
    run_cfg = dataclasses.replace(cfg, **{field: configurator.convert(field, value, types[field])}, **common)
    ng.validate(run_cfg)
    return run_cfg, ng.NEIGHBOR


def run_key(cfg):
    """A run's directory name: its class and a digest of every field but where it writes."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out_dir", "overwrite")}
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{type(cfg).__name__}-seed{cfg.seed}-{digest}"


def held_out_curves(log):
    """{metric: [(iteration, wall-clock seconds of training before it, value)]} from a run's log.jsonl records."""
    curves, wall = {}, 0.0
    for record in log:
        for key, value in record.items():
            if key.startswith("eval/"):
                curves.setdefault(key[5:], []).append((record["iter"], wall, value))
        wall += record.get("time/total", 0.0)
    return curves


def sweep(opts, cfg):
    """One training run per (value of the swept field, seed), then every held-out metric (the reward and any judges)
    from first to last evaluation in sweep.md, and over iterations (--x=wall_clock: seconds) in sweep.png."""
    field, _, values = opts["sweep"].partition("=")
    out, runs = Path(opts["out"]), {}
    for value in values.split(","):
        for seed in opts["seeds"].split(","):
            run_cfg, method = sweep_config(cfg, field, value, int(seed), None, opts)
            run_dir = Path(opts["runs"] or out / "runs") / run_key(run_cfg)  # a finished identical run is reused
            run_cfg.out_dir = str(run_dir)
            log = run_dir / "log.jsonl"
            if not (log.exists() and json.loads(log.read_text().splitlines()[-1])["iter"] == run_cfg.iterations
                    and (run_dir / "config.json").exists()):
                ng.train(run_cfg, method)
            runs.setdefault(value, []).append([json.loads(line) for line in log.read_text().splitlines()])
    table = sweep_table(field, runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text(table)
    plot_sweep(field, runs, opts["x"], out / "sweep.png")
    print(table + f"wrote {out / 'sweep.md'} and {out / 'sweep.png'}")


EMPTY = '""'  # how a swept value of "" (a field's off, as base_quantization=) is shown


def sweep_table(field, runs):
    """Per setting: each held-out metric's first -> last evaluation (mean over seeds), its gain (mean ± s.d.,
    per seed), the clip fraction, the first anchor's |log rho| (last fifth, max), iterations and seconds."""
    metrics = list(held_out_curves(next(iter(runs.values()))[0]))
    rows = [f"| {field} | " + " | ".join(f"{m}: first → last (gain ± s.d.; per seed)" for m in metrics) +
            " | clip fraction | first-anchor \\|log ρ\\| | iterations | seconds |",
            "| --- |" + " --- |" * (len(metrics) + 4)]
    for value, logs in runs.items():
        cells = []
        for m in metrics:
            ends = torch.tensor([[c[m][0][2], c[m][-1][2]] for c in map(held_out_curves, logs)], dtype=torch.float64)
            gain = ends[:, 1] - ends[:, 0]
            cells.append(f"{ends[:, 0].mean():.3f} → {ends[:, 1].mean():.3f} ({gain.mean():+.3f} ± "
                         f"{gain.std() if len(gain) > 1 else 0:.3f}; {' '.join(f'{g:+.3f}' for g in gain)})")
        train = [[r for r in log if "loss" in r] for log in logs]
        clip = sum(sum(r["clip_frac"] for r in t) / len(t) for t in train) / len(train)
        ratio = sum(max(r["first_anchor_abs_log_ratio"] for r in t[-max(1, len(t) // 5):]) for t in train) / len(train)
        seconds = sum(sum(r["time/total"] for r in t) for t in train) / len(train)
        rows.append(f"| {value or EMPTY} | " + " | ".join(cells) + f" | {clip:.2f} | {ratio:.1e} | {len(train[0])} | "
                    f"{seconds:.0f} |")
    return "\n".join(rows) + "\n"


def plot_sweep(field, runs, x, path):
    """One panel per held-out metric: the mean over seeds per setting, a band of one standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(held_out_curves(next(iter(runs.values()))[0]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for value, logs in runs.items():
        curves = [held_out_curves(log) for log in logs]
        for ax, m in zip(axes[0], metrics):
            points = torch.tensor([[p[0 if x == "iteration" else 1] for p in c[m]] for c in curves],
                                  dtype=torch.float64).mean(0)
            values = torch.tensor([[p[2] for p in c[m]] for c in curves], dtype=torch.float64)
            mean, std = values.mean(0), values.std(0) if len(values) > 1 else torch.zeros(values.shape[1])
            ax.plot(points, mean, "o-", ms=3, label=f"{field}={value or EMPTY}")
            ax.fill_between(points, mean - std, mean + std, alpha=0.2)
    for ax, m in zip(axes[0], metrics):
        ax.set(title=f"held-out {m}", xlabel="iteration" if x == "iteration" else "training wall-clock (s)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -----------------------------------------------------------------------------
# --meta: the transformer at its true size on fake tensors (FakeTensorMode: shapes and dtypes, no memory), driven
# through the project's own calls. FLOPs come from FlopCounterMode, peak memory by category from MemTracker (one
# process) or FSDPMemTracker over a fake process group of --world_size ranks. No GPU and no weights are needed.

H800_BF16 = 989e12  # dense bf16 FLOP/s of the paper's GPU (an H800 computes like an H100 SXM)
PAPER_SECONDS = {(8, 4, 4): 45.08, (16, 4, 9): 105.85}  # Table 3's s/iter for DPM++ (T, B, K) at 720², 32 x H800
ATTENTION = {"_scaled_dot_product_flash_attention_for_cpu": "_scaled_dot_product_flash_attention",  # CPU kernels
             "_scaled_dot_product_flash_attention_for_cpu_backward": "_scaled_dot_product_flash_attention_backward"}


def count_flops(fn):
    """FLOPs of fn(): every matmul, convolution and attention, recomputation in the backward pass included, and
    bitsandbytes' 4-bit matmuls."""
    from torch.utils import flop_counter

    def as_registered(op):  # the counter's own formula for the GPU kernel, already taking tensors
        formula = flop_counter.flop_registry[getattr(torch.ops.aten, op)]
        counted = lambda *args, **kwargs: formula(*args, **kwargs)  # noqa: E731
        counted._get_raw = True
        return counted

    mapping = {getattr(torch.ops.aten, cpu): as_registered(gpu) for cpu, gpu in ATTENTION.items()} | nf4_matmuls()
    with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def nf4_matmuls():
    """bitsandbytes' 4-bit matmul ops, each 2 M N K FLOPs as nn.Linear's: a Linear4bit's forward (CPU and CUDA) is one
    op that dequantizes and multiplies inside, which the counter does not see into (its backward's matmul it does);
    none unless bitsandbytes is loaded."""
    if "bitsandbytes" not in sys.modules:
        return {}
    flops = lambda a, b, shape_b, *args, **kwargs: 2 * math.prod(a[:-1]) * shape_b[0] * shape_b[1]  # noqa: E731
    ops = torch.ops.bitsandbytes
    return {getattr(ops, name): flops for name in ("gemm_4bit", "gemv_4bit") if hasattr(ops, name)}


def meta_transformer(cfg, sizes, dtype):
    """The transformer as load_pipeline() holds it, on the meta device: fp32 (LoRA: the base in dtype, fp32 adapters),
    built as FSDP's ranks but 0 build it (models.empty_model: a tensor no rank would fill stops here too)."""
    fam = models.family(cfg.model_path)
    model = models.empty_model(lambda: fam.meta_transformer(sizes), torch.device("cpu"))
    if cfg.lora_rank:
        with torch.device("meta"):
            models.add_lora(model, cfg, dtype)
    if cfg.fp8:  # as on the GPU it prices: torchao's size rule
        models.convert_fp8(model, torch.device("cuda"))
    return model


def fake_parameters(model):
    """The meta model's parameters and buffers given fake CPU storage (under FakeTensorMode: shapes, no memory), as
    to_empty gives them real storage; its plain tensor attributes (RoPE tables, real since models.empty_model) faked."""
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            module._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad)
        for name, value in [*module.named_buffers(recurse=False), *vars(module).items()]:
            if isinstance(value, torch.Tensor):
                setattr(module, name, torch.empty(value.shape, dtype=value.dtype))
    return model


def meta_training(cfg, model, mesh, dtype):
    """The transformer as training holds it, under FakeTensorMode: fake parameters, block checkpointing if
    configured, FSDP2 over the mesh's ranks, AdamW on what trains."""
    fake_parameters(model)
    if cfg.grad_checkpointing:
        model.enable_gradient_checkpointing()
    if mesh is not None:
        ng.shard(model, mesh, dtype)
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)


def meta_reference(cfg, model, frozen, mesh, dtype):  # -> (the reference's context factory, the frozen copy or None)
    """kl_coef's reference as build() makes it: the adapters switched off (LoRA), else frozen (a meta transformer in
    the compute dtype) with fake parameters, sharded like the model."""
    if cfg.lora_rank:
        return functools.partial(ng.adapters_off, model), None
    frozen = fake_parameters(frozen)
    if mesh is not None:
        ng.shard(frozen, mesh, dtype)
    return lambda: contextlib.nullcontext(frozen), frozen


def meta_group(cfg, sizes):
    """One prompt group as the update meets it: the conditioning its pipeline passes (the family's meta_condition:
    max_sequence_length text tokens, with CFG the negative prompt's) and the stored rollout (states, pi_old's anchors,
    advantages), random values."""
    fam, G, T = models.family(cfg.model_path), cfg.group_size, cfg.num_steps
    x = fam.meta_shapes(cfg, sizes)[0]
    return ng.Group("", fam.meta_condition(cfg, sizes), torch.randn(G, T + 1, *x), torch.randn(G, T, *x),
                    torch.zeros(1, G), torch.randn(G), [0], [list(range(cfg.num_train_steps))])


def rollout_forward(model, cfg, group, grid, dtype):
    """The rollout's unit: one batched velocity call, rollout_batch_size candidates, no gradient."""
    with torch.no_grad():
        models.velocity(model, group.states[: min(cfg.rollout_batch_size, cfg.group_size), 0], grid[0], group.cond,
                        dtype)


def update_calls(cfg):
    """Transformer calls with gradient per optimizer step: this rank's groups' K transitions in calls of at most
    update_batch_size."""
    return math.ceil(cfg.groups_per_rank * cfg.num_train_steps / cfg.update_batch_size)


def meta_run(model, optimizer, cfg, grid, dtype, reference=None, method=ng.NEIGHBOR):
    """What policy_update is given: the model, AdamW, the method, the grid, the dtype, kl_coef's reference."""
    return types.SimpleNamespace(model=model, optimizer=optimizer, method=method, grid=grid, dtype=dtype,
                                 reference=reference)


def update_step(run, cfg, groups):
    """One optimizer step of the update as policy_update runs it: step_gradient (the loop's own calls of
    update_batch_size, synchronised as it does) over the first anchor's K transitions of each of this rank's groups,
    then AdamW's step."""
    ng.step_gradient(run.model, run.method, [(group, group.anchors[0], k) for group in groups for k in group.steps[0]],
                     run.grid, cfg, run.dtype, run.reference)
    run.optimizer.step()


def tracked_peak(model, optimizer, world, inputs, fn, frozen=None):
    """{category: bytes} at the peak of fn(), as (FSDP)MemTracker sees it; frozen: another module fn calls
    (kl_coef's reference), counted as the trackers meet it."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    if world > 1:
        tracker = FSDPMemTracker(model, optimizer)
        tracker.track_inputs(inputs)
    else:
        class Tracker(MemTracker):  # the run's peak alone: per-module peaks cost a pass over every module per operator
            def _update_peak_stats(self, state):
                for dev, snap in self._curr_mem_snap.items():
                    if self._peak_mem.get(dev, 0) < snap["Total"]:
                        self._peak_mem[dev], self._peak_mem_snap[dev] = snap["Total"], dict(snap)

        tracker = Tracker()
        tracker.track_external(model, optimizer, *inputs)
        unhooked = types.SimpleNamespace(remove=lambda: None)
        for p in [*model.parameters(), *(frozen.parameters() if frozen else ())]:  # MemTracker would hook every
            if not p.requires_grad:  # parameter's gradient, frozen ones (LoRA's base, the reference) too
                tracker._param_to_grad_hook_handles[p] = (unhooked, unhooked)
    def anew(module, args):  # the trackers refuse a root module's second call, which an optimizer step of several
        if module in (model, frozen) and module in tracker.memory_tracking:  # calls makes: their per-module stats
            tracker.reset_mod_stats()  # (not the memory they count) start anew

    hook = torch.nn.modules.module.register_module_forward_pre_hook(anew)
    try:
        with tracker:
            fn()
    finally:
        hook.remove()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return {str(getattr(k, "value", k)): v for k, v in peak.items() if v}


@contextlib.contextmanager
def default_dtype(dtype):
    """Modules built inside hold parameters of dtype."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(default)


def parameter_count(build, fake=True):
    """Parameters of the module build() makes, counted on fake tensors (nothing allocated), or real bf16 ones for
    code that reads values while it builds."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with default_dtype(torch.bfloat16), FakeTensorMode() if fake else contextlib.nullcontext():
        return sum(p.numel() for p in build().parameters())


def clip_config(text, vision, projection, image_size):
    """CLIPConfig's arguments for a CLIP of these (width, layers, heads) towers."""
    tower = lambda width, layers, heads: dict(hidden_size=width, intermediate_size=4 * width,  # noqa: E731
                                              num_hidden_layers=layers, num_attention_heads=heads)
    return dict(text_config=dict(vocab_size=49408, **tower(*text)), projection_dim=projection,
                vision_config=dict(**tower(*vision), image_size=image_size, patch_size=14))


# the reward and guard models' CLIP towers, from their public configurations: (text, vision, projection, image side)
CLIPS = dict(hpsv2=("HPSv2.1 (open_clip ViT-H-14)", clip_config((1024, 24, 16), (1280, 32, 16), 1024, 224)),
             pickscore=("PickScore (CLIP ViT-H-14)", clip_config((1024, 24, 16), (1280, 32, 16), 1024, 224)),
             clipscore=("CLIP score (DFN5B ViT-H-14-378)", clip_config((1024, 24, 16), (1280, 32, 16), 1024, 378)),
             aesthetic=("LAION aesthetic (CLIP ViT-L/14 + MLP)", clip_config((768, 12, 12), (1024, 24, 16), 768, 224)))


def other_models(cfg, sizes):
    """(name, parameters, bytes per parameter as loaded, role, TFLOP per image) for everything beside the transformer,
    from each model's real configuration (FLUX.1-dev's text encoders; the rewards' public models). Roles: "resident"
    (on the GPU throughout), "start-up" (the text encoders while the prompts are encoded), "reward" (the training
    rewards: resident, or with reward_offload on the GPU one at a time while scoring), "guard" (the judges scored at
    evaluations: on the GPU one at a time while scoring)."""
    from transformers import CLIPConfig, CLIPModel

    fam, half = models.family(cfg.model_path), 2 if cfg.mixed_precision == "bf16" else 4
    with torch.device("meta"):
        vae = type(fam.meta_vae(sizes)).__name__
    rows = [(f"VAE ({vae})", parameter_count(lambda: fam.meta_vae(sizes)), half, "resident", 0.0)]
    encoders = fam.meta_text_encoders(sizes)
    if not encoders:
        return rows
    role = "start-up" if cfg.offload_text_encoders else "resident"
    rows += [(label, parameter_count(build), half, role, 0.0) for label, build in encoders]
    for name in [*cfg.rewards, *ng.scorable(cfg.guard_rewards, cfg)]:  # reward towers: fp32 weights, autocast compute
        role = "reward" if name in cfg.rewards else "guard"
        if name in CLIPS:
            label, config = CLIPS[name]
            rows.append((label, parameter_count(lambda: CLIPModel(CLIPConfig(**config))), 4, role,
                         clip_flops(config) * 1e-12))
        elif name == "imagereward":
            rows.append(("ImageReward (BLIP ViT-L + BERT-base)", imagereward_parameters(), 4, role, float("nan")))
        elif name == "hpsv3":
            rows.append(("HPSv3 (Qwen2-VL-7B in bf16 + its head)", hpsv3_parameters(), 2, role, float("nan")))
    return rows


QWEN2_VL_7B = dict(  # Qwen/Qwen2-VL-7B-Instruct's config.json, its vocabulary with HPSv3's reward token added
    text_config=dict(vocab_size=151658, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, rope_scaling=dict(type="mrope",
                                                                                     mrope_section=[16, 24, 24])),
    vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4))


def hpsv3_parameters():
    """HPSv3's backbone as rewards.hpsv3_reward holds it (Qwen2VLModel, no language-model head) and its head."""
    from transformers import Qwen2VLConfig, Qwen2VLModel

    from rewards import hpsv3_head

    return parameter_count(lambda: torch.nn.ModuleList([Qwen2VLModel(Qwen2VLConfig(**QWEN2_VL_7B)),
                                                        hpsv3_head(QWEN2_VL_7B["text_config"]["hidden_size"])]))


def clip_flops(config):
    """FLOPs of scoring one image and its caption (77 tokens) with a CLIP of this configuration, on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import CLIPConfig, CLIPModel

    side = config["vision_config"]["image_size"]
    with default_dtype(torch.bfloat16), FakeTensorMode():
        model = CLIPModel(CLIPConfig(**config))
        ids, pixels = torch.zeros(1, 77, dtype=torch.long), torch.randn(1, 3, side, side)
        with torch.no_grad():
            return count_flops(lambda: model(input_ids=ids, pixel_values=pixels))


def imagereward_parameters():
    """ImageReward-v1.0's parameters: the package's own model classes with its released med_config."""
    import tempfile

    from transformers import BertTokenizer

    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])})
    tokenizer.enc_token_id = 0
    med = dict(architectures=["BertModel"], hidden_size=768, intermediate_size=3072, num_attention_heads=12,
               num_hidden_layers=12, max_position_embeddings=512, vocab_size=30524, type_vocab_size=2,
               layer_norm_eps=1e-12, hidden_act="gelu", encoder_width=1024, add_cross_attention=True,
               hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, initializer_range=0.02, pad_token_id=0)
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(med, f)
        f.flush()
        return parameter_count(lambda: build_imagereward(f.name, tokenizer), fake=False)  # BLIP reads


def meta(opts, cfg):
    """FLOPs and peak memory per rank of every phase at the configured size, and what they predict."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    world, mesh = opts["world_size"] if cfg.parallel == "fsdp" and not cfg.lora_rank else 1, None
    if world > 1:  # a process group whose collectives do nothing: this one process stands for rank 0 of world
        from torch.distributed.device_mesh import init_device_mesh
        from torch.testing._internal.distributed.fake_pg import FakeStore

        ng.dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
        mesh = init_device_mesh("cpu", (world,))
    fam = models.family(cfg.model_path)
    sizes, dtype = fam.model_sizes(cfg.model_path), ng.compute_dtype(cfg)
    _, vae_input, L = fam.meta_shapes(cfg, sizes)
    grid = ng.time_grid(cfg.num_steps, L, fam.SCHEDULER, cfg.shift)
    meta_model = meta_transformer(cfg, sizes, dtype)
    frozen = meta_transformer(cfg, sizes, dtype).requires_grad_(False).to(dtype) if cfg.kl_coef and not cfg.lora_rank \
        else None
    with FakeTensorMode():
        with default_dtype(dtype):  # the VAE as loaded (in the compute dtype)
            vae = fam.meta_vae(sizes)
        model, optimizer = meta_training(cfg, meta_model, mesh, dtype)
        reference, frozen = meta_reference(cfg, model, frozen, mesh, dtype) if cfg.kl_coef else (None, None)
        groups = [meta_group(cfg, sizes) for _ in range(cfg.groups_per_rank)]  # an optimizer step's, this rank's
        group, run = groups[0], meta_run(model, optimizer, cfg, grid, dtype, reference)
        f_roll = count_flops(lambda: rollout_forward(model, cfg, group, grid, dtype))
        f_step = count_flops(lambda: update_step(run, cfg, groups))  # AdamW's state exists from the first anchor on
        optimizer.zero_grad(set_to_none=True)
        inputs = [t for g in groups for t in (g.states, g.old_next, g.cond.prompt_embeds)]
        roll = lambda: rollout_forward(model, cfg, group, grid, dtype)  # noqa: E731
        mem_roll = tracked_peak(model, optimizer, world, inputs, roll)
        tracked = dataclasses.replace(cfg, kl_coef=0.0) if cfg.lora_rank else cfg  # MemTracker cannot follow a module
        mem_update = tracked_peak(model, optimizer, world, inputs, lambda: update_step(  # twice in a pass: LoRA's
            run, tracked, groups), frozen)  # reference (adapters off) left out
        latents = torch.randn(cfg.reward_batch_size, *vae_input, dtype=dtype)
        with torch.no_grad():
            f_vae = count_flops(lambda: vae.decode(latents))
            mem_vae = tracked_peak(vae, None, 1, (latents,), lambda: vae.decode(latents))
    n_params = parameter_count(lambda: fam.meta_transformer(sizes))
    frozen_copy = (f"kl_coef's reference: the transformer frozen in {cfg.mixed_precision}, 1/{world}", n_params / world,
                   dtype.itemsize, "resident", 0.0)
    others = other_models(cfg, sizes) + [frozen_copy] * bool(frozen is not None and world > 1)  # one process: tracked
    nf4 = nf4_bytes(model) if cfg.base_quantization else None
    for mem in (mem_roll, mem_update) if nf4 else ():  # the bf16 base the fake model holds, as NF4
        mem["Parameter"] += nf4[1] - nf4[0]
        mem["Temp"] = mem.get("Temp", 0) + nf4[2]
        mem["Total"] += nf4[1] - nf4[0] + nf4[2]
    report_meta(cfg, opts, world, sizes, len(models.blocks(model)), L, n_params, f_roll, f_step, f_vae, mem_roll,
                mem_update, mem_vae, others, nf4)
    ckpt = preflight.checkpoint_bytes(meta_transformer(cfg, sizes, dtype).parameters(), dtype.itemsize, cfg.lora_rank)
    print(f"a checkpoint: {ckpt / 1e9:.1f} GB over all ranks (the trained weights and AdamW's moments in fp32, and the "
          "export); the previous one stays on disk until the next is whole")
    if world > 1:
        ng.dist.destroy_process_group()
    return dict(rollout_forward=f_roll, checkpoint_bytes=ckpt, update_step=f_step, vae_decode=f_vae,
                rollout_memory=mem_roll,
                update_memory=mem_update, vae_memory=mem_vae,
                phases=memory_phases(cfg, mem_roll, mem_update, mem_vae["Total"], others))


def report_meta(cfg, opts, world, sizes, blocks, L, n_params, f_roll, f_step, f_vae, mem_roll, mem_update, mem_vae,
                others, nf4=None):
    G, B, T, K, rb = cfg.group_size, cfg.num_anchors, cfg.num_steps, cfg.num_train_steps, cfg.rollout_batch_size
    rb = min(rb, G)
    gib, tf = 2**-30, 1e-12
    ub, n, calls = preflight.update_batch(cfg), cfg.groups_per_rank, update_calls(cfg)
    rollout, update, decode, total = iteration_flops(cfg, f_roll, f_step, f_vae).values()
    name = "FLUX.1-dev" if sizes is flux.FLUX_DEV else cfg.model_path
    print(f"meta | {name}: {blocks} blocks, {n_params / 1e9:.3f} B parameters | "
          f"{cfg.resolution}px = {L} image + {cfg.max_sequence_length} text tokens | {cfg.mixed_precision} | "
          f"{'LoRA r=' + str(cfg.lora_rank) if cfg.lora_rank else 'full fine-tuning'} | "
          f"{'FSDP2 over ' + str(world) + ' ranks' if world > 1 else 'one process'} | checkpointing "
          f"{'on' if cfg.grad_checkpointing else 'off'} | G={G} B={B} T={T} K={K}")
    print(f"{'phase':<50} {'TFLOP':>10}")
    for label, flops in ((f"transformer forward, batch {rb} (rollout unit)", f_roll),
                         (f"optimizer step: {n} group(s) x K={K} in {calls} call(s) <= {ub}", f_step),
                         (f"VAE decode, batch {cfg.reward_batch_size}", f_vae),
                         (f"rollout: G*T/{rb} = {G * T / rb:g} forwards", rollout),
                         (f"update: B = {B} optimizer steps / {n} group(s)", update),
                         (f"decode: G/{cfg.reward_batch_size} = {G / cfg.reward_batch_size:g} VAE decodes", decode),
                         ("iteration, per prompt group", total)):
        print(f"{label:<50} {flops * tf:>10.4g}")
    paper = PAPER_SECONDS.get((T, B, K)) if cfg.resolution == 720 and cfg.rollout_solver == "dpm++2m" else None
    print(f"at {opts['tflops']:g} TFLOP/s: {total / (opts['tflops'] * 1e12):.1f} s per iteration per group (reward models "
          "not counted)" + (f"; the paper's {paper} s/iter for this setting (one group per H800, Table 3) is "
                            f"{total / paper / H800_BF16:.1%} MFU" if paper else ""))
    cats = list(dict.fromkeys(k for m in (mem_roll, mem_update) for k in m if k != "Total"))
    print(f"\npeak memory per rank, GiB (the tracker's categories) {'rollout':>8} {'update':>8}")
    for c in cats + ["Total"]:
        print(f"  {c:<50} {mem_roll.get(c, 0) * gib:>8.3f} {mem_update.get(c, 0) * gib:>8.3f}")
    if nf4:
        print(f"  NF4 base, counted from bitsandbytes' format (fake tensors cannot hold 4-bit weights): its nn.Linear "
              f"weights {nf4[0] * gib:.2f} GiB in bf16 -> {nf4[1] * gib:.2f} GiB (in Parameter); the largest "
              f"dequantized to bf16 while it computes, {nf4[2] * gib:.2f} GiB (in Temp)")
    print(f"VAE decode of {cfg.reward_batch_size} images: peak {mem_vae['Total'] * gib:.2f} GiB")
    where = {"resident": "", "start-up": " (on the CPU after start-up)", "guard": " (guard: on the CPU but while it "
             "scores)", "reward": " (on the CPU but while it scores)" if cfg.reward_offload else ""}
    for label, n, nbytes, role, _ in others:
        print(f"  {label:<44} {n / 1e9:7.3f} B parameters x {nbytes} B = {n * nbytes * gib:6.2f} GiB{where[role]}")
    guards = [(label, tflop) for label, _, _, role, tflop in others if role == "guard"]
    if guards and cfg.eval_every:
        n, steps = cfg.eval_size or 3200, cfg.eval_steps or T
        sampling = n * steps * f_roll / rb + n / cfg.reward_batch_size * f_vae
        judged = n * sum(tflop for _, tflop in guards) * 1e12
        print(f"each evaluation of {n} prompts: sampling and decoding {sampling * 1e-15:.1f} PFLOP; the guards "
              f"({', '.join(label for label, _ in guards)}) {judged * tf:.3g} TFLOP more ({judged / sampling:.2%}), "
              f"{judged / (opts['tflops'] * 1e12):.2f} s at {opts['tflops']:g} TFLOP/s over all ranks")
    phases = memory_phases(cfg, mem_roll, mem_update, mem_vae["Total"], others)
    print("peak memory per rank by phase, GiB: " + ", ".join(f"{k} {v * gib:.1f}" for k, v in phases.items()))
    top = max(phases, key=phases.get)
    print(f"per rank: the largest phase ({top}) = {phases[top] * gib:.1f} GiB (+ the CUDA context and allocator "
          "slack); measured on fake tensors, not yet on a GPU")


def iteration_flops(cfg, f_roll, f_step, f_vae):
    """An iteration's FLOPs per prompt group from its units (a rollout forward, an optimizer step of groups_per_rank
    groups, a VAE decode): G / rollout_batch_size * T forwards, B optimizer steps, G / reward_batch_size decodes."""
    G = cfg.group_size
    rollout = G / min(cfg.rollout_batch_size, G) * cfg.num_steps * f_roll
    update, decode = cfg.num_anchors * f_step / cfg.groups_per_rank, G / cfg.reward_batch_size * f_vae
    return dict(rollout=rollout, update=update, decode=decode, total=rollout + update + decode)


RESTING = ("Sharded Param", "Parameter", "OptState", "Optstate", "Buffer", "Inputs", "Other")  # outlive a phase


def memory_phases(cfg, mem_roll, mem_update, vae_peak, others):
    """Peak bytes per rank of each phase of a run: the transformer as its trackers saw it in the rollout and the
    update, or else at rest (parameters, optimizer state, the group's states), plus the other models on the GPU then:
    the resident ones, the text encoders at start-up, the rewards (all, or with reward_offload the largest, which
    is there alone while it scores) and at evaluations the largest guard."""
    rest = sum(v for k, v in mem_update.items() if k in RESTING)
    size = lambda role: [n * b for _, n, b, r, _ in others if r == role]  # noqa: E731
    resident = sum(size("resident")) + (0 if cfg.reward_offload else sum(size("reward")))
    one_reward = max(size("reward"), default=0) if cfg.reward_offload else 0
    return {"start-up": rest + resident + sum(size("start-up")), "rollout": mem_roll["Total"] + resident,
            "rewards": rest + resident + vae_peak + one_reward, "update": mem_update["Total"] + resident,
            "evaluation": rest + resident + vae_peak + max([one_reward, *size("guard")])}


def nf4_bytes(model):
    """(bf16 bytes, NF4 bytes, the largest one's bf16 bytes) of the frozen nn.Linear weights that quantize_base turns
    to NF4 (preflight.nf4_bytes)."""
    sizes = [m.weight.numel() for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad]
    return 2 * sum(sizes), preflight.nf4_bytes(sizes), 2 * max(sizes)


def main(argv):
    return ng.main(argv, parse, lambda parsed: run(*parsed))


def run(opts, cfg):
    if opts["meta"]:  # update_batch_size=auto: no GPU's memory to fit here, so an optimizer step's transitions
        cfg.update_batch_size = cfg.update_batch_size or models.auto_update_batch(cfg, torch.device("cpu"), 1)
        return meta(opts, cfg)
    if opts["sweep"]:
        return sweep(opts, cfg)
    if opts["compare"]:
        return compare(opts, cfg)
    s = setup(cfg, opts["flux_blocks"])
    t_fwd, t_fb = unit_costs(s, cfg)
    totals = run_iterations(s, cfg, opts["iters"], opts["warmup"])
    if s.rank == 0:
        report(cfg, opts, totals, t_fwd, t_fb, s)
    if opts["batch1"]:
        report_update_batching(update_seconds(s, cfg, opts, totals["update"]), cfg.update_batch_size, s.rank)


def update_seconds(s, cfg, opts, batched):
    """The update's seconds per iteration at update_batch_size and at batch 1, for Neighbor GRPO (s, whose batched
    time is given) and for the SDE baseline with DanceGRPO's setting on the same model: {method: (batched, 1)}."""
    sde_cfg = sde_grpo.SDEConfig(**{**dataclasses.asdict(cfg), **sde_grpo.DANCEGRPO})
    sde = setup(sde_cfg, opts["flux_blocks"], sde_grpo.SDE)
    seconds = lambda run, c, b: run_iterations(run, dataclasses.replace(c, update_batch_size=b), opts["iters"],  # noqa
                                                opts["warmup"])["update"]
    return {"Neighbor GRPO": (batched, seconds(s, cfg, 1)),
            "SDE-GRPO (DanceGRPO)": (seconds(sde, sde_cfg, cfg.update_batch_size), seconds(sde, sde_cfg, 1))}


def report_update_batching(seconds, batch, rank):
    if rank != 0:
        return
    print(f"\n{'update, s/iteration':<22} {'batch ' + str(batch):>9} {'batch 1':>9} {'batch 1 / batched':>18}")
    for method, (batched, one) in seconds.items():
        print(f"{method:<22} {batched:>9.3f} {one:>9.3f} {one / batched:>17.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
