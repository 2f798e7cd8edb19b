"""
Table 1's evaluation of any FLUX transformer (ours, a baseline's released checkpoint, the base model): one
deterministic ODE sample per held-out prompt, every judge, mean +- standard error, in Table 1's shape beside the
paper's rows.

    torchrun --nproc_per_node=8 evaluate.py --transformer_path=runs/multi-8step/transformer --out_dir=runs/table1/ours
    torchrun --nproc_per_node=8 evaluate.py --out_dir=runs/table1/base          # FLUX.1-dev itself
    python evaluate.py --preset=digits --transformer_path=runs/digits/transformer --out_dir=runs/digits_eval

--eval_protocol=NAME picks how images are sampled and scored (docs/table1.md): "mixgrpo" (the default for FLUX.1-dev)
follows MixGRPO's inference and evaluation scripts, which the paper says it follows: all 3200 HPDv2 benchmark prompts,
1024x1024, 50 Euler steps of FluxPipeline's schedule, guidance 3.5, each image through a JPEG at PIL's default
quality 75 before scoring, HPSv2.1 under fp16 autocast and the other models in fp32, UnifiedReward's alignment line
with unparseable answers left out; "train" (the default for tiny, digits and the SD3.5 and Qwen-Image presets) is the
periodic evaluation's sampler at the preset's own settings.
Any field set on the command line wins over the protocol's, and every neighbor_grpo field applies.
Writes out_dir/eval.json (per-prompt scores), eval.md and eval.png.
"""

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import fetch
import models
import neighbor_grpo as ng
import preflight
from rewards import jpeg


@dataclass
class EvalConfig(ng.SystemConfig):
    eval_protocol: str = "mixgrpo"  # how images are sampled and scored (PROTOCOLS); set with --eval_protocol=NAME
    eval_size: int = 0  # prompts, spread evenly over eval_prompts (0 = all 3200: Table 1)
    eval_resolution: int = 1024  # image side (0 = resolution)
    eval_steps: int = 50  # ODE steps (0 = num_steps)
    eval_solver: str = "euler"  # "euler" (FluxPipeline's scheduler) or "dpm++2m" ("" = rollout_solver)
    eval_guidance_scale: float = 3.5  # FLUX.1-dev's embedded guidance (0 = guidance_scale)
    eval_jpeg_quality: int = 75  # each image through a JPEG at this PIL quality before scoring (0 = none)
    reward_precision: str = "mixgrpo"  # "mixgrpo" (HPSv2.1 fp16 autocast, the rest fp32) or "compute" (mixed_precision)
    unifiedreward_protocol: str = "mixgrpo"  # MixGRPO's scoring of the judge (rewards.UNIFIEDREWARD_PROTOCOLS)


PROTOCOLS = {  # --eval_protocol=NAME: the fields it sets, after the preset and before any --field=value
    "mixgrpo": dict(eval_size=0, eval_resolution=1024, eval_steps=50, eval_solver="euler", eval_guidance_scale=3.5,
                    eval_jpeg_quality=75, reward_precision="mixgrpo", unifiedreward_protocol="mixgrpo"),
    "train": dict(eval_resolution=0, eval_steps=0, eval_solver="", eval_guidance_scale=0.0, eval_jpeg_quality=0,
                  reward_precision="compute", unifiedreward_protocol="strict"),  # the periodic evaluation's sampler
}
CPU_PRESETS = ("tiny", "digits")  # their default protocol is "train"
PRECISIONS = dict(mixgrpo=lambda name: torch.float16 if name == "hpsv2" else torch.float32)  # MixGRPO's eval scripts

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


def parse_config(argv):
    """neighbor_grpo's parser with evaluate.py's fields and --eval_protocol=NAME (default: mixgrpo; train for the
    tiny and digits presets)."""
    preset = ([a.partition("=")[2] for a in argv if a.startswith("--preset=")] or ["flux-dev"])[-1]
    chosen = [a.partition("=")[2] for a in argv if a.startswith("--eval_protocol=")]
    flux = models.family(ng.PRESETS.get(preset, {}).get("model_path", ng.Config.model_path)).NAME == "FLUX"
    protocol = (chosen or ["train" if preset in CPU_PRESETS or not flux else "mixgrpo"])[-1]  # MixGRPO's is FLUX's
    if protocol not in PROTOCOLS:
        raise ng.ConfigError(f"--eval_protocol={protocol}: use one of {', '.join(PROTOCOLS)}")
    presets = {name: {**p, **PROTOCOLS[protocol], "eval_protocol": protocol} for name, p in ng.PRESETS.items()}
    cfg = ng.parse_config([a for a in argv if not a.startswith("--eval_protocol=")], EvalConfig, presets)
    ng.require([
        (cfg.eval_resolution % 16 == 0 and cfg.eval_resolution >= 0,
         f"eval_resolution={cfg.eval_resolution}: use a multiple of 16 (0 = resolution)"),
        (cfg.eval_solver in ("", *ng.SOLVERS), f"eval_solver={cfg.eval_solver}: use one of {', '.join(ng.SOLVERS)}"),
        (0 <= cfg.eval_jpeg_quality <= 95, f"eval_jpeg_quality={cfg.eval_jpeg_quality}: use 1..95, or 0 for none"),
        (cfg.reward_precision in ("mixgrpo", "compute"), f"reward_precision={cfg.reward_precision}: use mixgrpo or "
                                                         "compute")])
    return cfg


def sampler(cfg):
    """cfg as the evaluation samples: the protocol's resolution, solver and guidance, or training's where 0 or ""."""
    return dataclasses.replace(cfg, resolution=cfg.eval_resolution or cfg.resolution,
                               rollout_solver=cfg.eval_solver or cfg.rollout_solver,
                               guidance_scale=cfg.eval_guidance_scale or cfg.guidance_scale)


def jpeg_round_trip(images, quality):
    """What scoring saved .jpg files sees: each image [3, H, W] in [0, 1] rounded to 8 bits, encoded by PIL at
    quality (MixGRPO's inference script saves with PIL's default, 75) and decoded."""
    from PIL import Image

    out = []
    for image in images:
        decoded = np.asarray(Image.open(io.BytesIO(jpeg(image, quality))).convert("RGB"))
        out.append(torch.from_numpy(decoded.copy()).permute(2, 0, 1).float() / 255)
    return torch.stack(out).to(images.device)


def evaluate_model(cfg):
    """The model of transformer_path (or model_path, with lora_path if given) on the held-out prompts, dealt over
    the ranks, each holding a full copy in the compute dtype. Returns {reward: dict(mean, std, se, missing)}."""
    rank, world, device = ng.setup_distributed(cfg)
    dtype, out, cfg = ng.compute_dtype(cfg), Path(cfg.out_dir), sampler(cfg)
    if (out / "eval.json").exists() and not cfg.overwrite:
        raise ng.ConfigError(f"out_dir={out}: already holds eval.json; pass --overwrite or another --out_dir")
    check_memory(cfg, device, rank, world)
    fetch.require_downloads(cfg, evaluation=True)  # offline: every missing piece named at once
    prompts, reward_fns = ng.eval_setup(cfg, {}, device, cfg.eval_only_rewards, PRECISIONS.get(cfg.reward_precision))
    pipe = ng.load_pipeline(cfg, device, dtype, inference=True)  # read in the compute dtype: no fp32 copy on the host
    pipe.transformer.to(device, dtype).eval()  # nothing sharded: each rank samples its prompts with a full copy
    cache = {}
    ng.encode_prompts(pipe, ng.rank_eval_prompts(prompts, rank, world), cfg, cache, rank)
    transform = (lambda images: jpeg_round_trip(images, cfg.eval_jpeg_quality)) if cfg.eval_jpeg_quality else None
    summary = ng.evaluate(pipe, prompts, reward_fns, cfg, ng.eval_grid(pipe, cfg), dtype, cache, rank, world,
                          out / "eval", transform, PAPER_TABLE1)
    if rank == 0:
        print(f"{cfg.eval_protocol} protocol: {cfg.resolution}px, {cfg.eval_steps or cfg.num_steps} {cfg.rollout_solver} "
              f"steps, guidance {cfg.guidance_scale}, JPEG {cfg.eval_jpeg_quality or 'none'}, rewards in "
              f"{cfg.reward_precision} precision\n{(out / 'eval.md').read_text()}", end="")
    ng.barrier(world)
    return summary


def check_memory(cfg, device, rank, world):
    """The predicted peak per rank (preflight.evaluation_phases) against the GPUs, before anything loads."""
    capacity, fam = models.device_memory(device, world), models.family(cfg.model_path)
    if not capacity or fam.NAME != "FLUX":  # a CPU: nothing to check; preflight.py's closed form is FLUX's
        return
    sizes = fam.model_sizes(cfg.model_path)
    phases = preflight.evaluation_phases(cfg, sizes, fam.transformer_config(**sizes), sizes is fam.FLUX_DEV,
                                         ng.scorable(cfg.eval_only_rewards, cfg))
    top = max(phases, key=phases.get)
    if cfg.memory_check and phases[top] > capacity:
        raise ng.ConfigError(f"this GPU's {capacity / 2**30:.1f} GiB usable cannot hold the evaluation "
                             f"(~{phases[top] / 2**30:.1f} GiB at its {top}); lower --eval_batch_size or "
                             "--reward_batch_size, score fewer judges (--eval_only_rewards=...), or "
                             "--memory_check=false to try anyway")
    if rank == 0:
        print(f"memory: ~{phases[top] / 2**30:.1f} GiB a rank predicted ({top}) of this GPU's {capacity / 2**30:.1f} "
              "usable")


def main(argv=None):
    return ng.main(argv, parse_config, evaluate_model)


if __name__ == "__main__":
    main()
