"""
Where a Neighbor GRPO iteration's time goes: the rollout, reward and update phases of the real training
iteration, beside the cost model "G*T transformer forwards + B*K forward-backward passes", whose unit costs
are timed on the transformer alone in the same run.

    python bench.py --preset=tiny
    python bench.py --preset=flux-dev --flux_blocks=2,4 --rewards=jpeg_compressibility  # FLUX.1-dev width, random
    torchrun --nproc_per_node=8 bench.py --preset=flux-dev --flux_blocks=19,38 ...      # figures are per rank

Bench options: --iters=N timed iterations (3), --warmup=N untimed ones (1), --flux_blocks=D,S a random model of
FLUX.1-dev's width with D double and S single blocks (weights cannot be downloaded everywhere; speed and memory
do not depend on them). Every other --field=value is a neighbor_grpo Config field.
"""

import math
import sys

import torch

import neighbor_grpo as ng


def timed(fn, device, repeats=3):
    """Seconds per call of fn, after one untimed call."""
    fn()
    t0 = ng.clock(device)
    for _ in range(repeats):
        fn()
    return (ng.clock(device) - t0) / repeats


def parse(argv):
    opts, rest = dict(iters=3, warmup=1, flux_blocks=""), []
    for arg in argv:
        key, _, value = arg.removeprefix("--").partition("=")
        if key in opts:
            opts[key] = type(opts[key])(value)
        else:
            rest.append(arg)
    return opts, ng.parse_config(rest)


def setup(cfg, flux_blocks):
    """Everything train() builds before its loop, on this rank."""
    rank, world, device = ng.setup_distributed(cfg)
    dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32
    if flux_blocks:
        double, single = (int(n) for n in flux_blocks.split(","))
        pipe = ng.build_random_flux(cfg.seed, **{**ng.FLUX_DEV, "layers": double, "single_layers": single})
        for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            module.to(device, None if dtype == torch.float32 else dtype).requires_grad_(False).eval()
    else:
        pipe = ng.load_pipeline(cfg, device, dtype)
    model = ng.parallelize(pipe.transformer, cfg, device, world, dtype)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    reward_fns = {name: ng.load_reward(name, cfg, device) for name in cfg.rewards}
    grid = ng.time_grid(cfg.num_steps, ng.latent_shape(pipe, cfg.resolution)[0], pipe.scheduler.config, cfg.shift)
    return dict(rank=rank, world=world, device=device, dtype=dtype, pipe=pipe, model=model, optimizer=optimizer,
                reward_fns=reward_fns, weights=cfg.reward_weights or (1.0,) * len(cfg.rewards), grid=grid,
                prompts=ng.load_prompts(cfg.prompt_file), cache={})


def unit_costs(s, cfg):
    """One batched no-grad forward (the rollout's unit) and one batch-1 forward+backward (the update's unit)."""
    pipe, model, device, dtype = s["pipe"], s["model"], s["device"], s["dtype"]
    cond = ng.encode_prompt(pipe, s["prompts"][0], cfg, s["cache"])
    x = torch.randn(min(cfg.rollout_batch_size, cfg.group_size), *ng.latent_shape(pipe, cfg.resolution),
                    device=device)

    def forward():
        with torch.no_grad():
            ng.velocity(pipe.transformer, x, 0.5, cond, dtype)

    def forward_backward():
        ng.velocity(model, x[:1], 0.5, cond, dtype).pow(2).mean().backward()

    t_fwd, t_fb = timed(forward, device), timed(forward_backward, device)
    s["optimizer"].zero_grad(set_to_none=True)
    return t_fwd, t_fb


def run_iterations(s, cfg, iters, warmup, first_iteration=0):
    """Mean phase seconds of real training iterations (train_iteration, the code train() runs)."""
    totals = dict(rollout=0.0, reward=0.0, update=0.0, total=0.0)
    group_ids = range(s["rank"] * cfg.groups_per_rank, (s["rank"] + 1) * cfg.groups_per_rank)
    for i in range(warmup + iters):
        t0 = ng.clock(s["device"])
        _, _, timings = ng.train_iteration(s["pipe"], s["model"], s["optimizer"], s["reward_fns"], s["weights"],
                                           s["prompts"], s["grid"], cfg, first_iteration + i, s["dtype"],
                                           s["cache"], group_ids)
        timings["total"] = ng.clock(s["device"]) - t0
        if i >= warmup:
            for k in totals:
                totals[k] += timings[k] / iters
    return totals


def report(cfg, opts, totals, t_fwd, t_fb, s):
    G, B, T, K, n = cfg.group_size, cfg.num_anchors, cfg.num_steps, cfg.num_train_steps, cfg.groups_per_rank
    calls = math.ceil(G / cfg.rollout_batch_size) * T * n
    ideal = dict(rollout=calls * t_fwd, update=B * K * n * t_fb)
    rb = min(cfg.rollout_batch_size, G)
    blocks = f"FLUX.1-dev width, {opts['flux_blocks']} blocks" if opts["flux_blocks"] else cfg.model_path
    print(f"bench | {blocks} | {cfg.resolution}px | {s['device']} {str(s['dtype']).removeprefix('torch.')} | "
          f"world {s['world']} x {n} group(s) | G={G} B={B} T={T} K={K} | {opts['iters']} iterations")
    print(f"unit costs: forward (batch {rb}) {t_fwd * 1e3:.1f} ms, forward+backward (batch 1) {t_fb * 1e3:.1f} ms")
    print(f"{'phase':<8} {'measured s':>11} {'ideal s':>9} {'ratio':>6}  ideal is")
    print(f"{'rollout':<8} {totals['rollout']:>11.3f} {ideal['rollout']:>9.3f} "
          f"{totals['rollout'] / ideal['rollout']:>6.2f}  {calls} forwards of batch {rb} (G*T = {G * T * n} samples)")
    print(f"{'reward':<8} {totals['reward']:>11.3f} {'-':>9} {'-':>6}  VAE decode and {', '.join(cfg.rewards)}")
    print(f"{'update':<8} {totals['update']:>11.3f} {ideal['update']:>9.3f} "
          f"{totals['update'] / ideal['update']:>6.2f}  B*K = {B * K * n} forward+backward of batch 1")
    print(f"{'total':<8} {totals['total']:>11.3f} s/iteration")
    if s["device"].type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated(s['device']) / 2**30:.2f} GiB")


def main(argv):
    opts, cfg = parse(argv)
    s = setup(cfg, opts["flux_blocks"])
    t_fwd, t_fb = unit_costs(s, cfg)
    totals = run_iterations(s, cfg, opts["iters"], opts["warmup"])
    if s["rank"] == 0:
        report(cfg, opts, totals, t_fwd, t_fb, s)
    if ng.dist.is_initialized():
        ng.dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
