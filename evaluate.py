"""
Table 1's evaluation of any FLUX transformer (ours, a baseline's release, the base model): one deterministic ODE
sample per held-out prompt, every judge, mean +- standard error, in Table 1's shape beside the paper's rows.

    torchrun --nproc_per_node=8 evaluate.py --transformer_path=runs/multi-8step/transformer --out_dir=runs/table1/ours
    torchrun --nproc_per_node=8 evaluate.py --out_dir=runs/table1/base          # FLUX.1-dev itself
    python evaluate.py --preset=tiny --transformer_path=runs/tiny/transformer --out_dir=runs/tiny_eval

Any neighbor_grpo Config field applies (--field=value): eval_prompts, eval_only_rewards (Table 1's six by default),
eval_steps, lora_path, unifiedreward_url... Writes out_dir/eval.json (per-prompt scores), eval.md and eval.png.
"""

import sys
from pathlib import Path

import neighbor_grpo as ng
from rewards import RewardError


PAPER_TABLE1 = {  # Table 1 of the paper on the 3200 HPDv2 benchmark prompts; † = the authors' official checkpoints
    "FLUX.1-dev† (paper)": dict(hpsv2=0.310, pickscore=0.227, imagereward=1.131, clipscore=0.389, unifiedreward=3.211,
                                aesthetic=6.108),
    "DanceGRPO† (paper)": dict(hpsv2=0.371, pickscore=0.231, imagereward=1.306, clipscore=0.364, unifiedreward=3.156,
                               aesthetic=6.552),
    "MixGRPO† (paper)": dict(hpsv2=0.366, pickscore=0.235, imagereward=1.604, clipscore=0.382, unifiedreward=3.257,
                             aesthetic=6.623),
    "Neighbor GRPO, 8-step DPM++ (paper)": dict(hpsv2=0.366, pickscore=0.234, imagereward=1.640, clipscore=0.391,
                                                unifiedreward=3.334, aesthetic=6.621),
}


def evaluate_model(cfg):
    """The model of transformer_path (or model_path, with lora_path if given) on the held-out prompts; the prompts
    are dealt over the ranks, each holding a full copy in the compute dtype. Returns {reward: dict(mean, std, se)}."""
    rank, world, device = ng.setup_distributed(cfg)
    dtype, out = ng.compute_dtype(cfg), Path(cfg.out_dir)
    if (out / "eval.json").exists() and not cfg.overwrite:
        raise ng.ConfigError(f"out_dir={out}: already holds eval.json; pass --overwrite or another --out_dir")
    prompts, reward_fns = ng.eval_setup(cfg, {}, device, cfg.eval_only_rewards)
    pipe = ng.load_pipeline(cfg, device, dtype)
    pipe.transformer.to(device, dtype).eval()  # inference: no fp32 master weights, nothing sharded
    grid = ng.pipeline_grid(pipe, cfg, cfg.eval_steps or cfg.num_steps)
    cache = {}
    ng.encode_prompts(pipe, ng.rank_eval_prompts(prompts, rank, world), cfg, cache, rank)
    summary = ng.evaluate(pipe, prompts, reward_fns, cfg, grid, dtype, cache, rank, world, out / "eval")
    if rank == 0:
        table = ng.table1(summary, len(prompts), cfg.transformer_path or cfg.model_path, PAPER_TABLE1)
        (out / "eval.md").write_text(table)
        print(table, end="")
    ng.barrier(world)
    return summary


def main(argv=None):
    try:
        evaluate_model(ng.parse_config(sys.argv[1:] if argv is None else argv))
    except (ng.ConfigError, RewardError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if ng.dist.is_initialized():
            ng.dist.destroy_process_group()


if __name__ == "__main__":
    main()
