"""
Neighbor GRPO: contrastive ODE policy optimisation for FLUX (He et al., CVPR 2026, arXiv 2511.16955).

    python neighbor_grpo.py --preset=tiny                 # random tiny FLUX-architecture model on CPU, ~1 minute
    python neighbor_grpo.py --preset=digits               # a pretrained 16x16 digits model: alignment rises in 45 s
    python neighbor_grpo.py --preset=flux-dev-lora        # FLUX.1-dev on one GPU with LoRA
    torchrun --nproc_per_node=8 neighbor_grpo.py          # FLUX.1-dev, the paper's 8-step DPM++ setting
    torchrun --nproc_per_node=8 neighbor_grpo.py --eval_only --transformer_path=runs/x/transformer
    torchrun --nproc_per_node=8 neighbor_grpo.py --preset=dancegrpo   # the SDE-GRPO baseline (method=sde)
    python neighbor_grpo.py --help                        # every field with its default and where it comes from

Any Config field can be set as --field=value. The file reads top to bottom like the algorithm: config ->
distributed set-up -> models -> time grid and solvers -> rewards -> advantages -> surrogate and objective ->
one iteration -> evaluation -> checkpoints -> the loop -> main. "eq. N" and "Alg. 1" refer to the paper.
"""

import contextlib
import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import string
import sys
import time
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

# diffusers' FLUX blocks return slices; nothing downstream writes into them in place (the FSDP tests check gradients)
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP in a world of one: intended

# -----------------------------------------------------------------------------
# Config


TABLE1_REWARDS = ("hpsv2", "pickscore", "imagereward", "clipscore", "unifiedreward", "aesthetic")  # Table 1's columns


@dataclass
class Config:
    # model
    model_path: str = "black-forest-labs/FLUX.1-dev"  # hub id or local dir; "tiny" / "random:D,S": random (README)
    resolution: int = 720  # image side in pixels (DanceGRPO/MixGRPO protocol)
    guidance_scale: float = 3.5  # FLUX.1-dev embedded guidance, as FluxPipeline
    max_sequence_length: int = 512  # T5 tokens per prompt (FluxPipeline default)
    transformer_path: str = ""  # a trained transformer (diffusers format) to start from or evaluate; "" = model_path's
    offload_text_encoders: bool = True  # encode this rank's prompts up front, then move CLIP and T5 to the CPU
    prompt_file: str = "hpdv2"  # training prompts: "hpdv2" = HPDv2's train split (the paper), a text file, "" = examples
    # neighbourhood rollout (Sec. 3.3)
    group_size: int = 12  # G candidates per prompt (Table 3)
    noise_sigma: float = 0.3  # sigma, strength of the initial-noise perturbation (eq. 7, Table 4)
    num_steps: int = 8  # T rollout steps (Table 1: 8-step DPM++)
    rollout_solver: str = "dpm++2m"  # "dpm++2m" or "euler" (= DDIM, eta=0); the train solver is Euler (Sec. 3.4.3)
    shift: float = 0.0  # static time shift (DanceGRPO: 3.0); 0 = FluxPipeline's resolution-dependent shift
    rollout_batch_size: int = 12  # candidates per transformer call during the rollout
    # policy update (Sec. 3.4, Alg. 1)
    num_anchors: int = 4  # B anchors per group (Table 5)
    num_train_steps: int = 4  # K transitions per anchor (Table 3)
    distance: str = "mean"  # ||.||^2 of eq. 8 averaged ("mean") or summed ("sum") over latent elements (SPEC)
    old_anchor: str = "train_solver"  # pi_old's anchor: theta_old's one-step DDIM prediction, or "rollout" (README)
    temperature: float = 1.0  # tau in softmax(-d / tau); the paper omits it (supp. eq. 19)
    clip_range: float = 1e-4  # epsilon of the ratio clip (eq. 4; DanceGRPO, MixGRPO)
    adv_p: float = 0.8  # p of the group-wise quasi-norm advantage reweighting (eq. 11, Table 6)
    # the baseline the paper reinterprets: SDE-GRPO (DanceGRPO, Flow-GRPO; eq. 5, supp. Sec. 2)
    method: str = "neighbor"  # "neighbor" (this paper) or "sde" (SDE rollouts, Gaussian policy, all G samples trained)
    sde_eta: float = 0.3  # SDE noise: sigma_t = eta * sqrt(t_k - t_{k+1}) (DanceGRPO)
    sde_samples_per_step: int = 12  # samples accumulated per optimizer step (DanceGRPO's FLUX scripts: 12 = a group)
    # rewards
    rewards: tuple[str, ...] = ("hpsv2", "pickscore", "imagereward")  # built-in names or module.path:function
    reward_weights: tuple[float, ...] = ()  # one weight per reward; () = equal weights (MixGRPO protocol)
    reward_paths: tuple[str, ...] = ()  # local reward weights as key=path, keys in REWARD_WEIGHTS; default: the hub
    reward_batch_size: int = 4  # images per VAE decode and reward call
    unifiedreward_url: str = ""  # an OpenAI-compatible server (vLLM, SGLang) serving UnifiedReward: http://host:port/v1
    unifiedreward_question: str = ""  # a text file with the judge's question, {prompt} for the caption; "" = ours
    unifiedreward_score: str = "Final Score"  # the label the score follows (MixGRPO's semantic question: Alignment Score)
    # evaluation: deterministic ODE samples (sigma = 0) of held-out prompts, every reward, mean +- standard error
    eval_only: bool = False  # evaluate transformer_path (or model_path) and exit
    eval_prompts: str = "hpdv2"  # "hpdv2" = the 3200 HPDv2 benchmark prompts (hub, or a dir of its JSONs), or a file
    eval_size: int = 256  # prompts per evaluation, spread evenly over eval_prompts (0 = all)
    eval_every: int = 50  # iterations between held-out evaluations during training (0 = never)
    eval_rewards: tuple[str, ...] = ()  # rewards scored in evaluation during training; () = the training rewards
    eval_only_rewards: tuple[str, ...] = TABLE1_REWARDS  # --eval_only: Table 1's metrics (a judge URL needed for
    # unifiedreward, skipped without one); () = eval_rewards
    eval_steps: int = 0  # ODE steps of the evaluation sampler (0 = num_steps)
    eval_batch_size: int = 8  # prompts per transformer call when sampling for evaluation and sample grids
    # optimisation
    iterations: int = 300  # GRPO iterations (paper)
    groups_per_rank: int = 1  # prompt groups per process per iteration (paper: 1 per GPU)
    lr: float = 1e-5  # AdamW learning rate (paper)
    weight_decay: float = 1e-4  # AdamW weight decay (DanceGRPO)
    max_grad_norm: float = 1.0  # gradient-norm clip before every optimizer step (DanceGRPO)
    max_skipped_steps: int = 8  # optimizer steps in a row skipped for a non-finite gradient before the run stops
    # LoRA: low-rank adapters on a frozen base, for one GPU (DanceGRPO's and Flow-GRPO's LoRA scripts)
    lora_rank: int = 0  # 0 = full fine-tuning (the paper); r > 0 = peft LoRA of rank r (Flow-GRPO: 64)
    lora_alpha: float = 128.0  # adapters scale by alpha / r (Flow-GRPO: 128 at r = 64; DanceGRPO: 256 at 128)
    lora_targets: tuple[str, ...] = (  # every attention projection of both block types (Flow-GRPO's list)
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    lora_path: str = ""  # an exported adapter (out_dir/lora) to continue from or evaluate, at the same lora_rank
    export_merged: bool = False  # with LoRA, also export out_dir/transformer with the adapter merged in
    # system: torchrun, memory, checkpoints
    seed: int = 0  # everything random derives from (seed, iteration, group index)
    device: str = "auto"  # "auto" = cuda if available, else cpu
    mixed_precision: str = "bf16"  # transformer compute dtype: "bf16" (fp32 master weights) or "fp32"
    parallel: str = "fsdp"  # "fsdp" (FSDP2, sharded: FLUX.1-dev needs it) or "ddp" (replicated, for models that fit)
    grad_checkpointing: bool = True  # recompute each transformer block in the backward pass
    out_dir: str = "runs/neighbor_grpo"  # log.jsonl, sample grids and checkpoints go here
    overwrite: bool = False  # allow a new run in an out_dir that already holds one
    resume: bool = False  # continue the run in out_dir from its latest checkpoint
    ckpt_every: int = 50  # iterations between checkpoints (0 = only at the end); the latest one is kept
    sample_every: int = 50  # iterations between sample grids (fixed prompts and noise, sigma = 0)
    num_samples: int = 4  # images in a sample grid
    wandb_project: str = ""  # also log every log.jsonl record to this Weights & Biases project (pip install wandb)
    wandb_id: str = ""  # the W&B run id to continue when resuming ("" = a new run)


DANCEGRPO = dict(method="sde", num_steps=25, num_train_steps=14, shift=3.0)  # Table 3's SDE baseline: NFE_theta 14

PRESETS = {
    "flux-dev": {},  # the defaults are the paper's best 8-step setting
    "dancegrpo": DANCEGRPO,  # the SDE-GRPO baseline on FLUX.1-dev
    "flux-dev-lora": dict(  # the paper's 8-step setting on one GPU: LoRA at the LoRA scripts' lr
        lora_rank=64, lora_alpha=128.0, lr=3e-4, parallel="ddp", out_dir="runs/flux_dev_lora"),
    "tiny": dict(  # the same algorithm on a random tiny FLUX-architecture model, CPU, no download
        model_path="tiny", resolution=64, max_sequence_length=64, rewards=("jpeg_compressibility",),
        prompt_file="", eval_prompts="", eval_size=0, eval_every=20, eval_only_rewards=(),
        lr=1e-3, iterations=60, device="cpu", mixed_precision="fp32", parallel="ddp", grad_checkpointing=False,
        out_dir="runs/tiny", sample_every=20, ckpt_every=30,
    ),
}

DIGITS_DIR = Path(__file__).resolve().parent / "data" / "digits"  # written by data/digits/prepare.py, committed
PRESETS["digits"] = dict(  # a pretrained 16x16 FLUX-architecture model of handwritten digits: alignment on a CPU
    model_path=str(DIGITS_DIR), resolution=16, max_sequence_length=48, rewards=("digit_alignment",),
    prompt_file=str(DIGITS_DIR / "prompts.txt"), eval_prompts=str(DIGITS_DIR / "eval_prompts.txt"), eval_size=0,
    eval_every=10, eval_only_rewards=(), eval_batch_size=20, lr=1e-4, groups_per_rank=2, iterations=60,
    device="cpu", mixed_precision="fp32", parallel="ddp", grad_checkpointing=False, out_dir="runs/digits",
    sample_every=20, num_samples=10, ckpt_every=0)

SOLVERS = ("euler", "dpm++2m")
OLD_ANCHORS = ("train_solver", "rollout")
METHODS = ("neighbor", "sde")
DISTANCES = ("mean", "sum")
PARALLEL = ("fsdp", "ddp")


class ConfigError(ValueError):
    """A configuration that cannot work: the message names the field and the fix."""


def _convert(name, text, annotation):
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    try:
        if annotation is bool:
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return text.lower() in ("1", "true", "yes")
        if origin is tuple:
            return tuple(args[0](x) for x in text.split(",") if x.strip() != "")
        return annotation(text)
    except ValueError:
        raise ConfigError(f"--{name}={text}: expected {getattr(annotation, '__name__', annotation)}") from None


def parse_config(argv):
    """--preset=NAME first, then --field=value overrides (a bare --flag sets a bool to true)."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    overrides = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__ + "\nPresets: " + ", ".join(PRESETS) + "\n\n" + inspect.getsource(Config))
            sys.exit(0)
        if not arg.startswith("--"):
            raise ConfigError(f"argument {arg!r}: expected --field=value (see --help)")
        key, _, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key != "preset" and key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            raise ConfigError(f"--{key}: no such field" + (f"; did you mean --{close[0]}?" if close else "; see --help"))
        overrides[key] = value if "=" in arg else "true"
    preset = overrides.pop("preset", "flux-dev")
    if preset not in PRESETS:
        raise ConfigError(f"--preset={preset}: unknown preset; use one of {', '.join(PRESETS)}")
    cfg = Config(**PRESETS[preset])
    for key, value in overrides.items():
        setattr(cfg, key, _convert(key, value, fields[key].type))
    validate(cfg)
    return cfg


def validate(cfg):
    """Fail before any model loads, with one line that names the field and the fix."""
    G, B, T, K = cfg.group_size, cfg.num_anchors, cfg.num_steps, cfg.num_train_steps
    checks = [
        (G >= 2, f"group_size={G}: a group needs at least 2 candidates; use --group_size=12 (paper)"),
        (1 <= B <= G, f"num_anchors={B}: anchors are drawn from the group, need 1 <= B <= group_size={G}"),
        (T >= 1, f"num_steps={T}: need at least one rollout step; use --num_steps=8 (paper)"),
        (1 <= K <= T, f"num_train_steps={K}: transitions are drawn from the rollout, need 1 <= K <= num_steps={T}"),
        (cfg.method in METHODS, f"method={cfg.method}: use neighbor (this paper) or sde (the SDE-GRPO baseline)"),
        (cfg.method != "sde" or K <= T - 1,
         f"num_train_steps={K}: the SDE baseline never trains the step into t = 0, need K <= num_steps - 1 = {T - 1}"),
        (cfg.sde_eta > 0, f"sde_eta={cfg.sde_eta}: must be > 0; use 0.3 (DanceGRPO)"),
        (cfg.sde_samples_per_step >= 1,
         f"sde_samples_per_step={cfg.sde_samples_per_step}: must be >= 1; use 12 (DanceGRPO) or 1 (a step a sample)"),
        (cfg.old_anchor in OLD_ANCHORS, f"old_anchor={cfg.old_anchor}: use one of {', '.join(OLD_ANCHORS)}"),
        (0 < cfg.noise_sigma < 1, f"noise_sigma={cfg.noise_sigma}: must lie in (0, 1) (eq. 7); use 0.3 (paper)"),
        (0 < cfg.adv_p <= 2, f"adv_p={cfg.adv_p}: the quasi-norm needs 0 < p <= 2 (eq. 11); use 0.8 (paper)"),
        (cfg.clip_range > 0, f"clip_range={cfg.clip_range}: must be > 0; use 1e-4 (paper)"),
        (cfg.temperature > 0, f"temperature={cfg.temperature}: must be > 0; use 1.0 (paper)"),
        (cfg.rollout_solver in SOLVERS, f"rollout_solver={cfg.rollout_solver}: use one of {', '.join(SOLVERS)}"),
        (cfg.distance in DISTANCES, f"distance={cfg.distance}: use one of {', '.join(DISTANCES)}"),
        (cfg.shift >= 0, f"shift={cfg.shift}: must be >= 0 (0 = dynamic shift, DanceGRPO uses 3.0)"),
        (not cfg.model_path.startswith("random:") or re.fullmatch(r"random:\d+,\d+", cfg.model_path),
         f"model_path={cfg.model_path}: a random FLUX.1-dev-width model is random:D,S (D double, S single blocks)"),
        (cfg.resolution > 0 and cfg.resolution % 16 == 0,
         f"resolution={cfg.resolution}: FLUX packs 2x2 latent patches, so use a positive multiple of 16"),
        (len(cfg.rewards) >= 1, "rewards: name at least one reward, e.g. --rewards=hpsv2"),
        (not cfg.reward_weights or len(cfg.reward_weights) == len(cfg.rewards),
         f"reward_weights={cfg.reward_weights}: give one weight per reward in {cfg.rewards}, or none for equal weights"),
        (all(w >= 0 for w in cfg.reward_weights) and (not cfg.reward_weights or sum(cfg.reward_weights) > 0),
         f"reward_weights={cfg.reward_weights}: weights are >= 0 and normalised to sum 1, so need a positive sum"),
        (cfg.lr >= 0, f"lr={cfg.lr}: must be >= 0; use 1e-5 (paper)"),
        (cfg.iterations >= 0, f"iterations={cfg.iterations}: must be >= 0"),
        (cfg.mixed_precision in ("bf16", "fp32"), f"mixed_precision={cfg.mixed_precision}: use bf16 or fp32"),
        (cfg.parallel in PARALLEL, f"parallel={cfg.parallel}: use fsdp (sharded) or ddp (replicated)"),
        (cfg.ckpt_every >= 0, f"ckpt_every={cfg.ckpt_every}: must be >= 0 (0 = only at the end)"),
        (cfg.max_skipped_steps >= 1, f"max_skipped_steps={cfg.max_skipped_steps}: must be >= 1; use 8"),
        (cfg.model_path != str(DIGITS_DIR) or (DIGITS_DIR / "model_index.json").is_file(),
         "preset=digits: data/digits holds no prepared model yet; run python data/digits/prepare.py (minutes on a CPU)"),
        (not cfg.wandb_project or importlib.util.find_spec("wandb"),
         f"wandb_project={cfg.wandb_project}: needs the wandb package (not a requirement): pip install wandb"),
        (not (cfg.resume and cfg.overwrite), "resume and overwrite: pick one; --resume continues the run in out_dir"),
        (min(cfg.groups_per_rank, cfg.rollout_batch_size, cfg.reward_batch_size, cfg.eval_batch_size) >= 1,
         "groups_per_rank, rollout_batch_size, reward_batch_size and eval_batch_size must be >= 1"),
        (cfg.sample_every >= 0 and cfg.num_samples >= 1, "sample_every must be >= 0 (0 = never) and num_samples >= 1"),
        (cfg.lora_rank >= 0, f"lora_rank={cfg.lora_rank}: must be >= 0 (0 = full fine-tuning; Flow-GRPO uses 64)"),
        (cfg.lora_alpha > 0, f"lora_alpha={cfg.lora_alpha}: must be > 0; use 2 * lora_rank (Flow-GRPO)"),
        (not cfg.lora_rank or cfg.lora_targets, "lora_targets: name at least one module, e.g. --lora_targets=to_q,to_v"),
        (not cfg.lora_rank or cfg.parallel == "ddp",
         "parallel=fsdp: LoRA replicates the frozen base and averages adapter gradients; use --parallel=ddp"),
        (cfg.lora_rank or not (cfg.lora_path or cfg.export_merged),
         "lora_path and export_merged need an adapter: set --lora_rank (the rank the adapter was trained with)"),
    ]
    for field in ("rewards", "eval_rewards", "eval_only_rewards"):
        for name in getattr(cfg, field):
            checks.append((name in REWARDS or ":" in name,
                           f"{field}: unknown reward {name!r}; use one of {', '.join(REWARDS)} or module.path:function"))
    checks.append(("unifiedreward" not in cfg.rewards + cfg.eval_rewards or cfg.unifiedreward_url,
                   "unifiedreward_url: the unifiedreward judge needs a server, e.g. "
                   "--unifiedreward_url=http://host:8000/v1 (README, Rewards)"))
    for item in cfg.reward_paths:
        key = item.partition("=")[0]
        checks.append((key in REWARD_WEIGHTS and "=" in item,
                       f"reward_paths: {item!r} is not key=path with key one of {', '.join(REWARD_WEIGHTS)}"))
    checks.append((cfg.eval_size >= 0 and cfg.eval_every >= 0 and cfg.eval_steps >= 0,
                   "eval_size, eval_every and eval_steps must be >= 0 (0 = all prompts / never / num_steps)"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


# -----------------------------------------------------------------------------
# Distributed set-up: torchrun's environment, or a world of one


def setup_distributed(cfg):
    """(rank, world size, device): NCCL on GPU, gloo on CPU; a plain `python neighbor_grpo.py` is a world of one."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def compute_dtype(cfg):
    return torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32


def autocast(device, dtype):
    """Mixed precision for the transformer and the reward towers; a no-op in fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def parallelize(model, cfg, device, world, dtype):
    """FSDP2 per transformer block, then the root (compute in dtype, gradients reduced in fp32), or DDP.
    FSDP shards an empty (meta) model, then rank 0 broadcasts its weights and each rank keeps only its shard:
    no rank but 0 ever holds a full copy (load_pipeline(meta=True) builds theirs without weights)."""
    if cfg.grad_checkpointing:
        model.enable_gradient_checkpointing()
    if world == 1:
        return model.to(device)
    if cfg.parallel == "ddp":
        return DDP(model.to(device), device_ids=[device.index] if device.type == "cuda" else None)
    full = model.state_dict() if dist.get_rank() == 0 else {}  # rank 0's CPU tensors: the only full copy
    model.to("meta")
    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.to_empty(device=device)  # this rank's shards, allocated on the device, then filled from rank 0
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def adamw(model, cfg):
    """AdamW over the parameters that train: all of them, or only the LoRA adapters."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                             weight_decay=cfg.weight_decay)


def gradient_sync(model, sync):
    """Gradient accumulation: ranks reduce gradients only on the last backward before an optimizer step."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return model.no_sync() if isinstance(model, DDP) and not sync else contextlib.nullcontext()


def all_mean(values, world, device):
    """The mean over ranks of a dict of floats."""
    if world == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / world).tolist()))


def all_gather_columns(x, world, device):
    """[M, N] on every rank -> [M, world * N], rank-major."""
    if world == 1:
        return x
    parts = [torch.empty_like(x, device=device) for _ in range(world)]
    dist.all_gather(parts, x.to(device).contiguous())
    return torch.cat(parts, dim=1).cpu()


def all_gather_objects(obj, world):
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled: for small results)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def progress(iterable, desc, rank):
    """A tqdm bar on rank 0 when stdout is a terminal (not in logs or CI); the iterable itself otherwise."""
    if rank != 0 or not sys.stdout.isatty():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


def batches(items, n):
    """items in consecutive lists of at most n."""
    return [items[b: b + n] for b in range(0, len(items), n)]


def barrier(world):
    if world > 1:
        dist.barrier()


# -----------------------------------------------------------------------------
# Models: FLUX through diffusers' FluxPipeline (transformer, VAE, CLIP + T5 text encoders)


TINY = dict(  # a FLUX-architecture model small enough for a CPU
    layers=1, single_layers=2, heads=2, head_dim=16, rope=(4, 6, 6), text_dim=32, pooled_dim=32, text_layers=2,
    latent_channels=4, vae_channels=(16, 32), vae_layers=1, vae_groups=8)
FLUX_DEV = dict(  # FLUX.1-dev's sizes (its text encoders are CLIP-L and T5-XXL; random stand-ins keep their widths)
    layers=19, single_layers=38, heads=24, head_dim=128, rope=(16, 56, 56), text_dim=4096, pooled_dim=768,
    text_layers=1, latent_channels=16, vae_channels=(128, 256, 512, 512), vae_layers=2, vae_groups=32)


def build_random_flux(seed, *, layers, single_layers, heads, head_dim, rope, text_dim, pooled_dim, text_layers,
                      latent_channels, vae_channels, vae_layers, vae_groups):
    """A randomly initialised FluxPipeline of the given sizes: the classes of FLUX.1-dev, tokenizers built in memory."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(seed)
    # character-level tokens: long prompts are truncated (CLIP at 77 as in FLUX), which is fine for random models
    logging.getLogger("diffusers.pipelines.flux.pipeline_flux").setLevel(logging.ERROR)
    chars = list(string.ascii_lowercase + string.digits + ",.!?'-")
    clip_vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}  # character-level BPE vocabulary
    for c in chars:
        clip_vocab[c], clip_vocab[c + "</w>"] = len(clip_vocab), len(clip_vocab) + 1
    tokenizer = CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=77)
    t5_vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]  # unigram vocabulary
    t5_vocab += [(c, -2.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    tokenizer_2 = T5Tokenizer(vocab=t5_vocab, extra_ids=0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=pooled_dim, intermediate_size=64, num_hidden_layers=text_layers,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=text_dim, d_ff=64, d_kv=16, num_layers=text_layers, num_heads=2,
        relative_attention_num_buckets=8))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text_dim,
        pooled_projection_dim=pooled_dim, guidance_embeds=True, axes_dims_rope=rope)
    n = len(vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=vae_channels, layers_per_block=vae_layers,
        latent_channels=latent_channels, norm_num_groups=vae_groups, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler config (only the time grid is used)
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


def tokenizer_is_empty(tokenizer):
    """transformers 5 silently builds an empty tokenizer when the vocabulary files are missing (even offline)."""
    ids = tokenizer("a photo of a cat", add_special_tokens=False).input_ids
    return not ids or tokenizer.unk_token_id in ids


def load_pipeline(cfg, device, dtype, meta=False):
    """FluxPipeline for cfg.model_path: VAE and text encoders on device in dtype, frozen; the transformer in fp32
    (the master weights; with LoRA the frozen base in dtype) on the CPU until parallelize() moves it. meta=True
    (FSDP ranks but 0): the transformer's architecture alone, on the meta device; rank 0 sends the weights."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    def load(fn, field, path, **kwargs):
        try:
            return fn(path, **kwargs)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"{field}={path}: cannot load FLUX ({type(e).__name__}: {str(e).splitlines()[0][:200]}); download "
                "black-forest-labs/FLUX.1-dev (huggingface-cli download) and pass its directory") from None

    def load_transformer(field, path, **kwargs):
        if meta:
            config = load(FluxTransformer2DModel.load_config, field, path, **kwargs)
            with torch.device("meta"):
                return FluxTransformer2DModel.from_config(config)
        return load(FluxTransformer2DModel.from_pretrained, field, path, dtype=master, **kwargs)

    master = dtype if cfg.lora_rank else torch.float32
    if cfg.model_path == "tiny":
        pipe = build_random_flux(cfg.seed, **TINY)
    elif cfg.model_path.startswith("random:"):  # FLUX.1-dev's width with D double and S single blocks (bench.py)
        double, single = (int(n) for n in cfg.model_path.removeprefix("random:").split(","))
        pipe = build_random_flux(cfg.seed, **{**FLUX_DEV, "layers": double, "single_layers": single})
        for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2) if dtype != torch.float32 else ():
            module.to(dtype)  # as from_pretrained(dtype=dtype) loads them
    else:
        transformer = None if cfg.transformer_path else load_transformer("model_path", cfg.model_path,
                                                                          subfolder="transformer")
        pipe = load(FluxPipeline.from_pretrained, "model_path", cfg.model_path, transformer=transformer, dtype=dtype)
        for name in ("tokenizer", "tokenizer_2"):
            if tokenizer_is_empty(getattr(pipe, name)):
                raise ConfigError(
                    f"model_path={cfg.model_path}: {name} ({type(getattr(pipe, name)).__name__}) loaded with no "
                    f"vocabulary; {name}/ lacks tokenizer.json (or vocab.json + merges.txt, spiece.model): download "
                    "black-forest-labs/FLUX.1-dev completely (huggingface-cli download) and pass its directory")
    if cfg.transformer_path:
        pipe.transformer = load_transformer("transformer_path", cfg.transformer_path)
    if cfg.lora_rank:
        add_lora(pipe.transformer, cfg, dtype)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.to(device).requires_grad_(False).eval()
    return pipe


def add_lora(transformer, cfg, dtype):
    """peft LoRA through diffusers' adapter API: the base frozen in the compute dtype (bf16: 24 GB for FLUX.1-dev
    instead of 48 GB fp32 plus gradients and AdamW), the adapters in fp32; B = 0 makes them start as a no-op."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    transformer.requires_grad_(False)
    if transformer.dtype != dtype:  # a random model; from_pretrained already loaded the base in dtype
        transformer.to(dtype)
    try:
        transformer.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights=True,
                                           target_modules=list(cfg.lora_targets)))
    except ValueError as e:
        raise ConfigError(f"lora_targets={','.join(cfg.lora_targets)}: {str(e).splitlines()[0][:200]}") from None
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if cfg.lora_path:
        if not Path(cfg.lora_path).is_dir():
            raise ConfigError(f"lora_path={cfg.lora_path}: no such directory; pass out_dir/lora of a LoRA run")
        try:
            state = FluxPipeline.lora_state_dict(cfg.lora_path)
            state = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
            unexpected = set_peft_model_state_dict(transformer, state).unexpected_keys
        except (OSError, ValueError, RuntimeError) as e:
            raise ConfigError(f"lora_path={cfg.lora_path}: cannot load the adapter at lora_rank={cfg.lora_rank} "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); pass out_dir/lora of a LoRA run "
                              "and the --lora_rank and --lora_targets it was trained with") from None
        if unexpected or not state:
            raise ConfigError(f"lora_path={cfg.lora_path}: the adapter does not fit lora_targets="
                              f"{','.join(cfg.lora_targets)} ({len(state)} tensors, unexpected {unexpected[:2]})")


@dataclass
class Condition:
    """Everything besides (x, t) that FluxPipeline passes to the transformer, for one prompt."""

    prompt_embeds: torch.Tensor  # [1, S, D_t5]
    pooled: torch.Tensor  # [1, D_clip]
    txt_ids: torch.Tensor  # [S, 3]
    img_ids: torch.Tensor  # [L, 3]
    guidance: torch.Tensor | None  # [1] or None for models without guidance embedding


def latent_shape(pipe, resolution):
    """(L, C) of the packed latents: 2x2 latent patches become tokens of 4 * latent_channels."""
    side = resolution // pipe.vae_scale_factor // 2
    return side * side, pipe.transformer.config.in_channels


@torch.no_grad()
def encode_prompt(pipe, prompt, cfg, cache):
    """CLIP pooled + T5 embeddings of one prompt, computed once and cached on the CPU."""
    device = pipe.vae.device
    if prompt not in cache:  # on the text encoders' device: the CPU once offloaded, for a prompt met late
        embeds, pooled, _ = pipe.encode_prompt(prompt, prompt_2=prompt, device=pipe.text_encoder_2.device,
                                               max_sequence_length=cfg.max_sequence_length)
        cache[prompt] = (embeds.cpu(), pooled.cpu())
    embeds, pooled = cache[prompt]
    side = cfg.resolution // pipe.vae_scale_factor // 2
    img_ids = pipe._prepare_latent_image_ids(1, side, side, device, torch.float32)
    txt_ids = torch.zeros(embeds.shape[1], 3, device=device)
    guidance = torch.full([1], cfg.guidance_scale, device=device) if pipe.transformer.config.guidance_embeds else None
    return Condition(embeds.to(device), pooled.to(device), txt_ids, img_ids, guidance)


def encode_prompts(pipe, prompts, cfg, cache, rank=0):
    """Fill the prompt-embedding cache, then move the idle text encoders (T5-XXL: 9.5 GB) off the GPU."""
    for prompt in progress(dict.fromkeys(prompts), "encoding prompts", rank):
        encode_prompt(pipe, prompt, cfg, cache)
    if cfg.offload_text_encoders:
        pipe.text_encoder.to("cpu")
        pipe.text_encoder_2.to("cpu")


def velocity(transformer, x, t, cond, dtype=torch.float32):
    """v_theta(x, t, c) for a batch x [N, L, C] at time t, called exactly as FluxPipeline calls it."""
    n = x.shape[0]
    with autocast(x.device, dtype):
        v = transformer(
            hidden_states=x,
            timestep=torch.full((n,), float(t), device=x.device),  # FluxPipeline passes sigma * 1000 / 1000
            guidance=None if cond.guidance is None else cond.guidance.expand(n),
            pooled_projections=cond.pooled.expand(n, -1),
            encoder_hidden_states=cond.prompt_embeds.expand(n, -1, -1),
            txt_ids=cond.txt_ids,
            img_ids=cond.img_ids,
            return_dict=False,
        )[0]
    return v.float()


@torch.no_grad()
def decode_images(pipe, x, resolution):
    """Packed latents [N, L, C] -> images [N, 3, H, W] in [0, 1], as FluxPipeline decodes them."""
    vae = pipe.vae
    latents = pipe._unpack_latents(x, resolution, resolution, pipe.vae_scale_factor)
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


# -----------------------------------------------------------------------------
# Time grid and solvers. Rectified flow: x_t = (1 - t) x0 + t eps, v = eps - x0, data prediction x0 = x - t v.


def time_grid(num_steps, seq_len, scheduler_config, shift=0.0):
    """t_0 = 1 > ... > t_T = 0: exactly FluxPipeline's sigmas for T steps (a static shift replaces the dynamic one)."""
    t = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    if shift > 0:
        t = shift * t / (1 + (shift - 1) * t)
    else:  # diffusers' calculate_shift: mu grows linearly with the image sequence length
        c = scheduler_config
        slope = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
        mu = c["base_shift"] + slope * (seq_len - c["base_image_seq_len"])
        t = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    return torch.cat([t, t.new_zeros(1)]).tolist()


def pipeline_grid(pipe, cfg, num_steps):
    """time_grid for this pipeline's scheduler at cfg's resolution and shift."""
    return time_grid(num_steps, latent_shape(pipe, cfg.resolution)[0], pipe.scheduler.config, cfg.shift)


def euler_step(x, v, t, t_next):
    """One-step DDIM (eta = 0) = Euler for rectified flow: the TrainSolver (eq. 2)."""
    return x + (t_next - t) * v


def log_snr(t):
    """lambda_t = log(alpha_t / sigma_t) with alpha_t = 1 - t, sigma_t = t."""
    return math.log(1 - t) - math.log(t) if 0 < t < 1 else (-math.inf if t >= 1 else math.inf)


def dpm_solver_pp_2m_step(x, v, k, grid, prev_x0):
    """DPM-Solver++(2M), data prediction (Lu et al. 2022). Returns (x_{k+1}, x0 prediction at step k).

    The step out of t = 1 (lambda = -inf) and the final step into t = 0 are first order; both then equal Euler.
    """
    t, t_next = grid[k], grid[k + 1]
    x0 = x - t * v
    if t_next == 0:
        return x0, x0
    h = log_snr(t_next) - log_snr(t)
    d = x0
    if prev_x0 is not None and grid[k - 1] < 1:  # second order: extrapolate the data prediction in lambda
        r = (log_snr(t) - log_snr(grid[k - 1])) / h
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
    return (t_next / t) * x - (1 - t_next) * math.expm1(-h) * d, x0


@torch.no_grad()
def rollout(v_fn, x, grid, solver):
    """Integrate dx/dt = v from t = 1 to 0 on grid, keeping every state [N, T + 1, L, C] and, beside it, the
    TrainSolver's one-step prediction from each state [N, T, L, C] (theta_old's DDIM step: free, v is at hand)."""
    states, train_next, prev_x0 = [x.float()], [], None
    for k in range(len(grid) - 1):
        v = v_fn(states[-1], grid[k])
        train_next.append(euler_step(states[-1], v, grid[k], grid[k + 1]))
        if solver == "euler":
            nxt = train_next[-1]
        else:
            nxt, prev_x0 = dpm_solver_pp_2m_step(states[-1], v, k, grid, prev_x0)
        states.append(nxt)
    return torch.stack(states, dim=1), torch.stack(train_next, dim=1)


def sde_step(x, v, t, t_next, eta):
    """SDE-GRPO's step (eq. 5; supp. eq. 4): mean x_ODE - sigma_t^2 / (2t) eps_hat with eps_hat = x + (1 - t) v,
    standard deviation sigma_t = eta sqrt(t - t_next). Returns (mean, sigma_t)."""
    sigma_t = eta * math.sqrt(t - t_next)
    return euler_step(x, v, t, t_next) - sigma_t**2 / (2 * t) * (x + (1 - t) * v), sigma_t


def gaussian_log_prob(x, mean, std):
    """log N(x; mean, std^2 I) per sample, averaged over latent elements as DanceGRPO and Flow-GRPO do."""
    log_density = -((x.float() - mean.float()) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return log_density.flatten(1).mean(1)


@torch.no_grad()
def sde_rollout(v_fn, x, grid, eta, gen):
    """SDE sampling keeping every state and each stochastic transition's log-probability: [N, T + 1, L, C],
    [N, T - 1]. The last step is the data prediction x - t v, the image DanceGRPO decodes (never trained)."""
    states, log_probs = [x.float()], []
    for k in range(len(grid) - 2):
        mean, std = sde_step(states[-1], v_fn(states[-1], grid[k]), grid[k], grid[k + 1], eta)
        states.append(mean + std * torch.randn(mean.shape, generator=gen).to(mean.device))
        log_probs.append(gaussian_log_prob(states[-1], mean, std))
    states.append(euler_step(states[-1], v_fn(states[-1], grid[-2]), grid[-2], grid[-1]))
    return torch.stack(states, dim=1), torch.stack(log_probs, dim=1)


def perturbed_noise(base, delta, sigma):
    """Neighbourhood of initial noises around base (eq. 7): unit variance is kept for any sigma."""
    return math.sqrt(1 - sigma**2) * base + sigma * delta


def draw_noise(pipe, n, resolution, gen, device):
    """n standard normal latents drawn in FluxPipeline's unpacked shape, then packed to [n, L, C]."""
    channels = pipe.transformer.config.in_channels // 4
    side = 2 * (resolution // pipe.vae_scale_factor // 2)
    noise = torch.randn(n, channels, side, side, generator=gen)
    return pipe._pack_latents(noise, n, channels, side, side).to(device)


# -----------------------------------------------------------------------------
# Rewards: fn(images [N, 3, H, W] in [0, 1], prompts list[str]) -> tensor [N]. Higher is better.


def jpeg_compressibility(images, prompts):
    """Minus the JPEG size in kB at quality 95 (DDPO's compressibility reward): rewards simple images."""
    from PIL import Image

    sizes = []
    for image in (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return -torch.tensor(sizes)


def jpeg_incompressibility(images, prompts):
    """The JPEG size in kB (DDPO's incompressibility reward): rewards detailed images."""
    return -jpeg_compressibility(images, prompts)


def brightness(images, prompts):
    """Mean pixel value: a toy reward that, unlike JPEG sizes, is smooth in the image."""
    return images.float().mean(dim=(1, 2, 3))


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel statistics, used by all three models below
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(images, size, fit, mean=CLIP_MEAN, std=CLIP_STD):
    """CLIP-style preprocessing on tensors, no PIL round trip. fit="crop": the short side to size, centre crop
    (CLIP, PickScore, ImageReward; clamped like PIL's uint8); fit="pad": the long side to size, zero padding
    (HPSv2's ResizeMaxSize). Bicubic with antialiasing, as PIL and torchvision resize."""
    x = images.float()
    h, w = x.shape[-2:]
    if fit == "crop":  # torchvision's Resize(size): the long side truncated
        nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    else:  # HPSv2's ResizeMaxSize: both sides rounded
        nh, nw = round(h * size / max(h, w)), round(w * size / max(h, w))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    if fit == "crop":
        top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))  # torchvision's CenterCrop
        x = x[..., top: top + size, left: left + size].clamp(0, 1)
    else:
        x = F.pad(x, ((size - nw) // 2, size - nw - (size - nw) // 2, (size - nh) // 2, size - nh - (size - nh) // 2))
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (mean, std))
    return (x - mean) / std


# what --reward_paths=KEY=PATH can replace: hub repo and file (None: a from_pretrained directory)
REWARD_WEIGHTS = {
    "hpsv2": ("xswu/HPSv2", "HPS_v2.1_compressed.pt"),
    "pickscore": ("yuvalkirstain/PickScore_v1", None),
    "pickscore_processor": ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", None),
    "imagereward": ("THUDM/ImageReward", "ImageReward.pt"),
    "imagereward_med_config": ("THUDM/ImageReward", "med_config.json"),
    "imagereward_bert": ("bert-base-uncased", None),
    "clipscore": ("apple/DFN5B-CLIP-ViT-H-14-384", "open_clip_pytorch_model.bin"),  # MixGRPO's eval script
    "clipscore_config": ("apple/DFN5B-CLIP-ViT-H-14-384", "open_clip_config.json"),
    "aesthetic": ("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth"),  # = sac+logos+ava1-l14-linearMSE.pth
    "aesthetic_clip": ("openai/clip-vit-large-patch14", None),
}


def missing_weights(key, error):
    repo, filename = REWARD_WEIGHTS[key]
    return (f"reward_paths: {key} weights not found ({type(error).__name__}); download them (huggingface-cli "
            f"download {repo}{' ' + filename if filename else ''}) or pass --reward_paths={key}=/local/"
            f"{filename or repo.split('/')[-1]}")


def reward_weights(cfg, key, loader=None):
    """A reward's weights from --reward_paths, else the hub (or its local cache); loader(path) for directories."""
    local = dict(item.split("=", 1) for item in cfg.reward_paths)
    repo, filename = REWARD_WEIGHTS[key]
    if key in local and not Path(local[key]).exists():
        raise ConfigError(f"reward_paths: {key}={local[key]} does not exist")
    try:
        if loader is not None:
            loaded = loader(local.get(key, repo))
            if hasattr(loaded, "convert_tokens_to_ids") and tokenizer_is_empty(loaded):
                raise OSError("a tokenizer without its vocabulary files")
            return loaded
        if key in local:
            return local[key]
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo, filename)
    except OSError as e:
        raise ConfigError(missing_weights(key, e)) from None


def import_package(module, package, reward):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"rewards: {reward} needs the {package} package ({e}); pip install -r requirements.txt") from None


def cosine(a, b):
    """Row-wise cosine in fp32: bf16 would quantise an HPS score of 0.31 in steps of 0.002."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


HPS_ARCH = "ViT-H-14"  # HPSv2's open_clip architecture


def hpsv2_reward(cfg, device):
    """HPSv2.1 (Wu et al. 2023): the hpsv2 package's open_clip ViT-H-14 with HPS_v2.1_compressed.pt."""
    open_clip = import_package("hpsv2.src.open_clip", "hpsv2x", "hpsv2")
    path = reward_weights(cfg, "hpsv2")  # before building the 1B-parameter model
    model = open_clip.create_model(HPS_ARCH, pretrained=None)  # hpsv2.score() would first fetch laion weights
    model.load_state_dict(torch.load(path, map_location="cpu")["state_dict"])
    return hpsv2_scorer(model.to(device).eval(), open_clip.get_tokenizer(HPS_ARCH), compute_dtype(cfg))


def hpsv2_scorer(model, tokenizer, dtype):
    @torch.no_grad()
    def hpsv2(images, prompts):
        """The image-text cosine of HPSv2's features (about 0.31 for FLUX.1-dev)."""
        device = next(model.parameters()).device
        pixels = clip_pixels(images.to(device), model.visual.image_size[0], fit="pad")
        with autocast(device, dtype):
            image, text = model.encode_image(pixels), model.encode_text(tokenizer(prompts).to(device))
        return cosine(image, text)

    return hpsv2


def pickscore_reward(cfg, device):
    """PickScore (Kirstain et al. 2023): CLIP ViT-H-14 fine-tuned on Pick-a-Pic, tokenised as laion's ViT-H-14."""
    from transformers import CLIPModel, CLIPTokenizer

    model = reward_weights(cfg, "pickscore", CLIPModel.from_pretrained)
    tokenizer = reward_weights(cfg, "pickscore_processor", CLIPTokenizer.from_pretrained)
    return pickscore_scorer(model.to(device).eval(), tokenizer, compute_dtype(cfg))


def pickscore_scorer(model, tokenizer, dtype):
    @torch.no_grad()
    def pickscore(images, prompts):
        """logit_scale * cos(image, text) / 100, as the paper reports it (about 0.23 for FLUX.1-dev)."""
        device = model.device
        text = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
        pixels = clip_pixels(images.to(device), model.config.vision_config.image_size, fit="crop")
        with autocast(device, dtype):
            image = model.get_image_features(pixel_values=pixels).pooler_output  # transformers 5: an output object
            text = model.get_text_features(**text).pooler_output
        return model.logit_scale.exp().float() * cosine(image, text) / 100

    return pickscore


def import_imagereward():
    """image-reward 1.5's model code under transformers 5. Its package __init__ imports its training script and
    OpenAI's clip, so only the model modules are loaded; its BERT copy (med.py) calls five transformers 4
    helpers, restored here exactly (head pruning, which ImageReward never uses, excepted)."""
    import types

    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    if "ImageReward.ImageReward" in sys.modules:  # done before
        return sys.modules["ImageReward.ImageReward"], sys.modules["ImageReward.models.BLIP.blip_pretrain"]
    spec = importlib.util.find_spec("ImageReward")
    if spec is None:
        raise ConfigError("rewards: imagereward needs the image-reward package; pip install -r requirements.txt")
    root = spec.submodule_search_locations[0]
    for name, path in (("ImageReward", root), ("ImageReward.models", os.path.join(root, "models"))):
        if not hasattr(sys.modules.get(name), "__path__"):
            sys.modules[name] = types.ModuleType(name)
            sys.modules[name].__path__ = [path]
    for helper in ("apply_chunking_to_forward", "prune_linear_layer"):
        setattr(modeling_utils, helper, getattr(pytorch_utils, helper))
    modeling_utils.find_pruneable_heads_and_indices = None
    med = importlib.import_module("ImageReward.models.BLIP.med")

    def invert_attention_mask(self, mask):
        mask = (mask[:, None, None, :] if mask.dim() == 2 else mask[:, None, :, :]).to(self.dtype)
        return (1.0 - mask) * torch.finfo(self.dtype).min

    def get_head_mask(self, head_mask, num_layers, is_attention_chunked=False):
        if head_mask is not None:
            raise ValueError("ImageReward: head masks are not supported")
        return [None] * num_layers

    med.BertModel.all_tied_weights_keys = {}  # transformers 5 sets this in post_init(), which med.py never calls
    med.BertModel.invert_attention_mask = invert_attention_mask
    med.BertModel.get_head_mask = get_head_mask
    return importlib.import_module("ImageReward.ImageReward"), importlib.import_module(
        "ImageReward.models.BLIP.blip_pretrain")


def imagereward_tokenizer(path):
    """BLIP's BERT tokenizer: bert-base-uncased plus [DEC] and [ENC], 30524 tokens (the package's init_tokenizer)."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(path)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    return tokenizer


def build_imagereward(med_config, tokenizer):
    """The package's ImageReward (BLIP ViT-L + BERT with cross-attention + MLP head) with the given tokenizer."""
    image_reward, blip_pretrain = import_imagereward()
    blip_pretrain.init_tokenizer = lambda: tokenizer  # the package would download bert-base-uncased here
    return image_reward.ImageReward(med_config=med_config).eval()


def imagereward_reward(cfg, device):
    """ImageReward-v1.0 (Xu et al. 2023), raw model output (about 1.1 for FLUX.1-dev)."""
    tokenizer = reward_weights(cfg, "imagereward_bert", imagereward_tokenizer)
    med_config, checkpoint = reward_weights(cfg, "imagereward_med_config"), reward_weights(cfg, "imagereward")
    model = build_imagereward(med_config, tokenizer)
    state = torch.load(checkpoint, map_location="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)  # strict=False as the package's load()
    if [k for k in missing + unexpected if not k.endswith("position_ids")]:
        raise ConfigError(f"reward_paths: imagereward checkpoint does not match ImageReward-v1.0 "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return imagereward_scorer(model.to(device), compute_dtype(cfg))


def imagereward_scorer(model, dtype):
    @torch.no_grad()
    def imagereward(images, prompts):
        """ImageReward.score, batched: BLIP features under autocast, the MLP head in fp32, then standardised."""
        device = next(model.parameters()).device
        text = model.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35,
                                    return_tensors="pt").to(device)
        pixels = clip_pixels(images.to(device), 224, fit="crop")
        with autocast(device, dtype):
            image = model.blip.visual_encoder(pixels)
            out = model.blip.text_encoder(text.input_ids, attention_mask=text.attention_mask,
                                          encoder_hidden_states=image,
                                          encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long,
                                                                            device=device), return_dict=True)
        reward = model.mlp(out.last_hidden_state[:, 0].float())
        return ((reward - model.mean) / model.std).squeeze(-1)

    return imagereward


def clipscore_reward(cfg, device):
    """CLIP score (Table 1, ref. [8]) as MixGRPO's evaluation computes it: open_clip's ViT-H-14 of its
    hf-hub config (apple/DFN5B-CLIP-ViT-H-14-384), the ViT-H-14 tokenizer, image-text cosine."""
    open_clip = import_package("hpsv2.src.open_clip", "hpsv2x", "clipscore")
    config = json.loads(Path(reward_weights(cfg, "clipscore_config")).read_text())
    checkpoint = reward_weights(cfg, "clipscore")
    model_cfg = dict(config["model_cfg"])
    model = (open_clip.CustomTextCLIP if model_cfg.pop("custom_text", False) else open_clip.CLIP)(**model_cfg)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu"))
    pre = config.get("preprocess_cfg", {})
    return clipscore_scorer(model.to(device).eval(), open_clip.get_tokenizer(HPS_ARCH),
                            pre.get("mean", CLIP_MEAN), pre.get("std", CLIP_STD), compute_dtype(cfg))


def clipscore_scorer(model, tokenizer, mean, std, dtype):
    @torch.no_grad()
    def clipscore(images, prompts):
        """The image-text cosine (about 0.39 for FLUX.1-dev)."""
        device = next(model.parameters()).device
        pixels = clip_pixels(images.to(device), model.visual.image_size[0], "crop", mean, std)  # square: = squash
        with autocast(device, dtype):
            image, text = model.encode_image(pixels), model.encode_text(tokenizer(prompts).to(device))
        return cosine(image, text)

    return clipscore


def aesthetic_mlp():
    """The LAION aesthetic predictor v2's head (improved-aesthetic-predictor; Flow-GRPO's aesthetic scorer)."""
    dims, drops = (768, 1024, 128, 64, 16, 1), (0.2, 0.2, 0.1)
    layers = []
    for i in range(5):
        layers += [torch.nn.Linear(dims[i], dims[i + 1])] + ([torch.nn.Dropout(drops[i])] if i < 3 else [])
    mlp = torch.nn.Module()
    mlp.layers = torch.nn.Sequential(*layers)  # the checkpoint's key names: layers.0.weight, ...
    return mlp.eval()


def aesthetic_reward(cfg, device):
    """LAION aesthetic score (Table 1, ref. [26]): the MLP on L2-normalised OpenAI CLIP ViT-L/14 image embeddings."""
    from transformers import CLIPModel

    clip = reward_weights(cfg, "aesthetic_clip", CLIPModel.from_pretrained)
    mlp = aesthetic_mlp()
    mlp.load_state_dict(torch.load(reward_weights(cfg, "aesthetic"), map_location="cpu"))
    return aesthetic_scorer(clip.to(device).eval(), mlp.to(device), compute_dtype(cfg))


def aesthetic_scorer(clip, mlp, dtype):
    @torch.no_grad()
    def aesthetic(images, prompts):
        """A 1-10 rating (about 6.1 for FLUX.1-dev); the prompt is not used."""
        device = clip.device
        pixels = clip_pixels(images.to(device), clip.config.vision_config.image_size, fit="crop")
        with autocast(device, dtype):
            embed = clip.get_image_features(pixel_values=pixels).pooler_output
        return mlp.layers(F.normalize(embed.float(), dim=-1)).squeeze(-1)

    return aesthetic


def digit_alignment_reward(cfg, device):
    """The digits preset's alignment: the probability its classifier (logistic regression on 8x8 images, fit by
    data/digits/prepare.py) gives to the digit the prompt asks for."""
    path = Path(cfg.model_path) / "classifier.pt"
    if not path.is_file():
        raise ConfigError(f"rewards: digit_alignment needs {path}; use --preset=digits (or run data/digits/prepare.py)")
    state = torch.load(path)
    return digit_scorer(state["weight"], state["bias"])


def digit_features(images):
    """What the digit classifier sees: the image averaged to 8x8 grey, on load_digits' 0..16 scale."""
    return F.adaptive_avg_pool2d(images.float().mean(1, keepdim=True), 8).flatten(1).cpu() * 16


def digit_scorer(weight, bias):
    def digit_alignment(images, prompts):
        """p(asked digit | image), from the classifier's softmax."""
        x = digit_features(images)
        asked = [re.findall(r"\d", p) for p in prompts]
        if not all(asked):
            raise RewardError(f"reward 'digit_alignment': a prompt names no digit ({prompts[asked.index([])]!r})")
        probs = torch.softmax(x @ weight.T + bias, dim=-1)
        return probs[torch.arange(len(prompts)), torch.tensor([int(a[-1]) for a in asked])]

    return digit_alignment


UNIFIEDREWARD_QUESTION = (  # ours; MixGRPO's asks for the same closing line
    "You see an image generated from the caption below. Judge how faithfully it depicts the caption (objects, "
    "attributes, counts, relations) and its visual quality (clarity, detail, artefacts, aesthetic appeal). Reason "
    "briefly, then end with one overall score from 1 (poor) to 5 (excellent) on its own line as "
    "'Final Score: X'.\nCaption: {prompt}")


def unifiedreward_reward(cfg, device):
    """UnifiedReward (Table 1, ref. [37]): a VLM judge behind an OpenAI-compatible chat-completions endpoint, as
    MixGRPO serves it; the number after 'Final Score:' (1-5, about 3.2 for FLUX.1-dev)."""
    question = UNIFIEDREWARD_QUESTION
    if cfg.unifiedreward_question:
        if not Path(cfg.unifiedreward_question).is_file():
            raise ConfigError(f"unifiedreward_question={cfg.unifiedreward_question}: no such file; write the question "
                              "with {prompt} where the caption goes, or pass '' for the built-in one")
        question = Path(cfg.unifiedreward_question).read_text()
    return unifiedreward_scorer(cfg.unifiedreward_url.rstrip("/") + "/chat/completions", question,
                                cfg.unifiedreward_score)


def unifiedreward_scorer(url, question, label="Final Score", workers=8, timeout=120.0, tries=3, backoff=2.0):
    """Each image (JPEG, base64) and its caption posted concurrently by a bounded pool; a request that fails or
    times out is retried with exponential backoff, then the run stops naming the server."""
    import base64
    import concurrent.futures
    import urllib.request

    from PIL import Image

    pattern = re.compile(re.escape(label) + r"\W*([0-9]+(?:\.[0-9]+)?)")  # "Final Score: 4", "... (1-5): 3.5"

    def ask(image, prompt):
        buffer = io.BytesIO()
        Image.fromarray((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()).save(
            buffer, format="JPEG", quality=95)
        content = [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," +
                                                       base64.b64encode(buffer.getvalue()).decode()}},
                   {"type": "text", "text": question.replace("{prompt}", prompt)}]
        body = json.dumps({"model": "UnifiedReward", "temperature": 0, "max_tokens": 1024,
                           "messages": [{"role": "user", "content": content}]}).encode()
        for attempt in range(tries):
            try:
                request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    answer = json.loads(response.read())["choices"][0]["message"]["content"]
                break
            except (OSError, ValueError, KeyError, IndexError, TypeError) as e:  # refused, time-out, HTTP, bad JSON
                error = e
                time.sleep(backoff * 2**attempt if attempt + 1 < tries else 0)
        else:
            raise RewardError(f"reward 'unifiedreward': no answer from {url} after {tries} tries "
                              f"({type(error).__name__}: {error}); start the judge (README, Rewards) or fix "
                              "--unifiedreward_url")
        match = pattern.search(answer)
        if match is None:
            raise RewardError(f"reward 'unifiedreward': {url} answered without '{label}: N' ({answer[:80]!r}); serve "
                              "the UnifiedReward model, or make --unifiedreward_question ask for that line")
        return float(match.group(1))

    def unifiedreward(images, prompts):
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            return torch.tensor(list(pool.map(ask, images, prompts)))

    return unifiedreward


# name -> factory(cfg, device) returning the reward function; factories load weights once
REWARDS = {
    "hpsv2": hpsv2_reward,
    "pickscore": pickscore_reward,
    "imagereward": imagereward_reward,
    "clipscore": clipscore_reward,
    "aesthetic": aesthetic_reward,
    "unifiedreward": unifiedreward_reward,
    "jpeg_compressibility": lambda cfg, device: jpeg_compressibility,
    "jpeg_incompressibility": lambda cfg, device: jpeg_incompressibility,
    "brightness": lambda cfg, device: brightness,
    "digit_alignment": digit_alignment_reward,
}


class RewardError(RuntimeError):
    """A reward that failed or returned something unusable: the message names the reward."""


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite gradients step after step): the message says what is kept."""


def load_reward(name, cfg, device):
    """A built-in reward by name, or any importable callable given as module.path:function."""
    if name in REWARDS:
        return REWARDS[name](cfg, device)
    module, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"rewards: cannot import {name!r} ({e}); give module.path:function on PYTHONPATH") from None


REWARD_TRIES, REWARD_BACKOFF_S = 3, 2.0  # a reward that raises (a remote server's hiccup) is called again after 2, 4 s


def call_reward(name, fn, images, prompts):
    """fn(images, prompts), retried with exponential backoff when it raises; then the run stops naming it."""
    for attempt in range(REWARD_TRIES):
        try:
            return fn(images, prompts)
        except (RewardError, ConfigError):
            raise
        except Exception as e:  # noqa: BLE001: any failure of user code is retried, then reported
            error = e
            if attempt + 1 < REWARD_TRIES:
                time.sleep(REWARD_BACKOFF_S * 2**attempt)
    raise RewardError(f"reward {name!r} raised {type(error).__name__} ({str(error)[:160]}) {REWARD_TRIES} times in a "
                      "row; check the reward's model or server, then continue with --resume")


def score(reward_fns, images, prompts):
    """Rewards [M, N] of N images for M reward functions, checked for shape and finiteness."""
    rows = []
    for name, fn in reward_fns.items():
        r = torch.as_tensor(call_reward(name, fn, images, prompts)).detach().float().cpu().reshape(-1)
        if r.numel() != len(prompts):
            raise RewardError(f"reward {name!r} returned {r.numel()} scores for {len(prompts)} images")
        if not torch.isfinite(r).all():
            raise RewardError(f"reward {name!r} returned a non-finite score {r.tolist()} for prompt {prompts[0]!r}")
        rows.append(r)
    return torch.stack(rows)


# -----------------------------------------------------------------------------
# Advantages


def quasi_norm_advantages(rewards, p):
    """Group-wise quasi-norm reweighting (eq. 11): centred rewards divided by their L_p (quasi-)norm.

    Scale-invariant, keeps sign and order; p = 2 is std-normalised GRPO (eq. 3) up to a constant, p < 2 shrinks
    flat groups whose advantages carry no clear signal. An all-equal group gets zeros.
    """
    r = rewards.double()  # the fp32 mean of equal fp32 values is inexact, and this normalisation would amplify it
    c = r - r.mean(-1, keepdim=True)
    norm = c.abs().pow(p).sum(-1, keepdim=True).pow(1 / p)
    return torch.where(norm > 0, c / norm.clamp_min(1e-300), torch.zeros_like(c)).to(rewards.dtype)


def std_advantages(rewards):
    """Standard GRPO advantages (eq. 3), the SDE baseline's: centred rewards over their standard deviation."""
    r = rewards.double()
    c, std = r - r.mean(-1, keepdim=True), r.std(-1, keepdim=True)
    return torch.where(std > 0, c / std.clamp_min(1e-300), torch.zeros_like(c)).to(rewards.dtype)


def reward_mix(cfg):
    """One weight per reward model, normalised to sum 1 (MixGRPO's advantage_aggr); equal when none are given."""
    w = cfg.reward_weights or (1.0,) * len(cfg.rewards)
    return tuple(x / sum(w) for x in w)


def group_advantages(rewards, weights, p=None):
    """Per-reward-model advantages [M, G] (quasi-norm, or std-normalised when p is None) combined with the
    configured weights (MixGRPO) into [G]."""
    w = torch.as_tensor(weights, dtype=torch.float32).reshape(-1, 1)
    return (w * (std_advantages(rewards) if p is None else quasi_norm_advantages(rewards, p))).sum(0)


# -----------------------------------------------------------------------------
# The surrogate leaping policy and the clipped objective


def sample_anchors_and_steps(G, B, T, K, gen):
    """Symmetric anchor sampling (Sec. 3.4.1): B anchors from the group and K of the T transitions, shared."""
    anchors = torch.randperm(G, generator=gen)[:B].tolist()
    steps = sorted(torch.randperm(T, generator=gen)[:K].tolist())
    return anchors, [steps] * B


def sample_sde_steps(G, T, K, gen):
    """SDE-GRPO trains every sample, each on K of its first T - 1 transitions (DanceGRPO: per sample, last ignored)."""
    return torch.randperm(G, generator=gen).tolist(), [sorted(torch.randperm(T - 1, generator=gen)[:K].tolist())
                                                       for _ in range(G)]


def neighbour_distances(candidates, anchor, distance="mean"):
    """Squared L2 distance from the anchor [L, C] to each candidate [G, L, C], in fp32 (eq. 8)."""
    sq = (candidates.float() - anchor.float()).pow(2).flatten(1)
    return sq.mean(1) if distance == "mean" else sq.sum(1)


def surrogate_log_probs(d, temperature=1.0):
    """log pi(x^(i) | {s_t}) = log softmax_i(-d_i / tau): the surrogate leaping policy (eq. 8)."""
    return torch.log_softmax(-d / temperature, dim=-1)


LOG_RATIO_MAX = 20.0  # rho > e^20 is far outside any trust region; the cap keeps exp and its gradient finite


def grpo_objective(adv, logp, logp_old, clip_range):
    """J = sum_i min(A_i rho_i, A_i clip(rho_i, 1 - eps, 1 + eps)) (eq. 9), rho in log space, fp32."""
    ratio = torch.exp((logp.float() - logp_old.float()).clamp(max=LOG_RATIO_MAX))
    unclipped = adv * ratio
    clipped = adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    clip_frac = ((ratio - 1).abs() > clip_range).float().mean()
    return torch.minimum(unclipped, clipped).sum(), clip_frac


def nfe_theta(B, G, K):
    """Effective transformer forward-backward passes per sample in the update: (B / G) K (Table 3)."""
    return B / G * K


def trained_per_group(cfg):
    """Trajectories trained per group: B anchors, or every sample for the SDE baseline."""
    return cfg.group_size if cfg.method == "sde" else cfg.num_anchors


def anchor_objective(transformer, states, adv, j, k, grid, cond, cfg, dtype, old_next):
    """J_{j,k}: one TrainSolver step from the anchor's stored state, scored against all candidates at t_{k+1};
    pi_old's anchor is old_next[j, k] (cfg.old_anchor: theta_old's own TrainSolver step, or the stored state)."""
    x = states[j, k].unsqueeze(0)
    x_theta = euler_step(x, velocity(transformer, x, grid[k], cond, dtype), grid[k], grid[k + 1])[0]
    candidates = states[:, k + 1]
    logp = surrogate_log_probs(neighbour_distances(candidates, x_theta, cfg.distance), cfg.temperature)
    logp_old = surrogate_log_probs(neighbour_distances(candidates, old_next[j, k], cfg.distance), cfg.temperature)
    J, clip_frac = grpo_objective(adv, logp, logp_old, cfg.clip_range)
    return J, clip_frac, (logp - logp_old).detach().abs().mean()


def sde_objective(transformer, states, adv, j, k, grid, cond, cfg, dtype, logp_old):
    """The SDE baseline's J_{j,k} (eq. 4): sample j's own Gaussian policy ratio at step k, clipped."""
    x = states[j, k].unsqueeze(0)
    mean, std = sde_step(x, velocity(transformer, x, grid[k], cond, dtype), grid[k], grid[k + 1], cfg.sde_eta)
    logp = gaussian_log_prob(states[j, k + 1].unsqueeze(0), mean, std)
    J, clip_frac = grpo_objective(adv[j:j + 1], logp, logp_old[j, k:k + 1], cfg.clip_range)
    return J, clip_frac, (logp - logp_old[j, k]).detach().abs().mean()


# -----------------------------------------------------------------------------
# One GRPO iteration

EXAMPLE_PROMPTS = [  # prompts of the paper's Figure 6 and supplementary Figure 1
    "A low poly lemon in high quality rendering",
    "A hamster resembling a horse",
    "Peter Griffin taking a selfie in a park on an iPhone 12 Pro.",
    "A whale is reading a book about avoiding Japanese spears in an underwater library.",
    "Two skunks - one small and dark blue with yellow eyes and a larger albino one with red eyes.",
    "Anime-style vector illustration of a cloudy sky with a unique perspective.",
    "Realism tattoo design sketch of a pirate ship.",
    "The image shows a pirate holding up a beer in celebration.",
    "The image is of a massive cave interior filled with glowing stalactites and stalagmites.",
    "A cat laying on the floor of a kitchen.",
    "A portrait of a woman with a paper bag over her head.",
    "A kitchen counter top with a white bowl sitting next to another white bowl.",
]


HPDV2_STYLES = ("anime", "concept-art", "paintings", "photo")  # the HPDv2 benchmark: 800 prompts per style


HPDV2_TRAIN_PROMPTS = Path(__file__).resolve().parent / "data" / "hpdv2_train.txt"  # extracted once, then reused


def hpdv2_train_prompts():
    """HPDv2's training prompts (the paper's, DanceGRPO's, MixGRPO's): the unique prompts of its train.json, in
    order, extracted once from the hub (or its cache) into HPDV2_TRAIN_PROMPTS."""
    if not HPDV2_TRAIN_PROMPTS.is_file():
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download("zhwang/HPDv2", "train.json", repo_type="dataset")
        except OSError as e:
            raise ConfigError(f"prompt_file=hpdv2: cannot fetch HPDv2's training annotations ({type(e).__name__}); "
                              "download them (huggingface-cli download zhwang/HPDv2 train.json --repo-type dataset) "
                              "or pass --prompt_file=a text file with one prompt per line") from None
        prompts = dict.fromkeys(p for p in (row["prompt"].strip() for row in json.loads(Path(path).read_text())) if p)
        tmp = HPDV2_TRAIN_PROMPTS.with_suffix(f".{os.getpid()}.tmp")  # every rank may extract: rename atomically
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text("".join(p + "\n" for p in prompts))
        os.replace(tmp, HPDV2_TRAIN_PROMPTS)
    return HPDV2_TRAIN_PROMPTS


def load_prompts(source, field="prompt_file"):
    """Prompts from a text file (one per line) or a JSON list; "hpdv2": HPDv2's training prompts for prompt_file,
    its 3200-prompt benchmark (or a directory holding its four JSON files) for eval_prompts; "" = the examples."""
    if not source:
        return list(EXAMPLE_PROMPTS)
    if source == "hpdv2" and field == "prompt_file":
        files = [hpdv2_train_prompts()]
    elif source == "hpdv2":
        from huggingface_hub import hf_hub_download

        try:
            files = [hf_hub_download("zhwang/HPDv2", f"benchmark/{style}.json", repo_type="dataset")
                     for style in HPDV2_STYLES]
        except OSError as e:
            raise ConfigError(f"{field}=hpdv2: cannot fetch the HPDv2 benchmark prompts ({type(e).__name__}); "
                              "download them (huggingface-cli download zhwang/HPDv2 --repo-type dataset --include "
                              f"'benchmark/*.json') and pass --{field}=/path/to/benchmark") from None
    elif Path(source).is_dir():
        files = [Path(source) / f"{style}.json" for style in HPDV2_STYLES]
        if not all(f.is_file() for f in files):
            raise ConfigError(f"{field}={source}: a prompt directory must hold the HPDv2 files "
                              f"{', '.join(s + '.json' for s in HPDV2_STYLES)}")
    elif Path(source).is_file():
        files = [source]
    else:
        raise ConfigError(f"{field}={source}: no such file; pass a text file with one prompt per line, or hpdv2 "
                          "(README, Prompts)")
    prompts = []
    for f in files:
        text = Path(f).read_text()
        lines = json.loads(text) if str(f).endswith(".json") else text.splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"{field}={source}: holds no prompts; write one prompt per line")
    return prompts


def eval_subset(prompts, size):
    """size prompts spread evenly over the list (every style of HPDv2 alike); all of them when size is 0."""
    if not size or size >= len(prompts):
        return prompts
    return [prompts[i * len(prompts) // size] for i in range(size)]


def group_generator(seed, iteration, group):
    """The random stream of one prompt group, a function of (seed, iteration, global group index) only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + iteration) * 1_000_033 + group)


def group_prompt(prompts, seed, iteration, group):
    """Group g's prompt at this iteration, and its generator for the noises, anchors and transitions."""
    gen = group_generator(seed, iteration, group)
    return prompts[torch.randint(len(prompts), (1,), generator=gen).item()], gen


def neighbourhood_noise(pipe, cfg, gen, size, sigma, device):
    """size initial noises around one base noise drawn from gen (eq. 7); sigma = 0, size = 1: the base itself."""
    base = draw_noise(pipe, 1, cfg.resolution, gen, device)
    return perturbed_noise(base, draw_noise(pipe, size, cfg.resolution, gen, device), sigma)


def neighbourhood_rollout(pipe, cond, cfg, grid, gen, size, sigma, dtype):
    """size ODE trajectories from a neighbourhood of one base noise (eq. 7), with theta_old: the states
    [size, T + 1, L, C] and the TrainSolver's prediction from each [size, T, L, C] (see rollout).

    With sigma = 0 and size = 1 this is plain deterministic ODE sampling, the inference sampler.
    """
    x1 = neighbourhood_noise(pipe, cfg, gen, size, sigma, cond.img_ids.device)
    v_fn = lambda x, t: velocity(pipe.transformer, x, t, cond, dtype)  # noqa: E731
    parts = [rollout(v_fn, x, grid, cfg.rollout_solver) for x in x1.split(cfg.rollout_batch_size)]
    return torch.cat([states for states, _ in parts]), torch.cat([train_next for _, train_next in parts])


def sde_group_rollout(pipe, cond, cfg, grid, gen, dtype):
    """The SDE baseline's group: G SDE trajectories from one shared initial noise (DanceGRPO's init_same_noise)."""
    x1 = draw_noise(pipe, 1, cfg.resolution, gen, cond.img_ids.device).expand(cfg.group_size, -1, -1)
    v_fn = lambda x, t: velocity(pipe.transformer, x, t, cond, dtype)  # noqa: E731
    parts = [sde_rollout(v_fn, x, grid, cfg.sde_eta, gen) for x in x1.split(cfg.rollout_batch_size)]
    return torch.cat([states for states, _ in parts]), torch.cat([log_probs for _, log_probs in parts])


@torch.no_grad()
def generate(pipe, prompts, cfg, grid, seed, dtype, cache, indices=None):
    """Inference: one deterministic ODE sample per prompt, eval_batch_size prompts per transformer call, each
    noise neighbourhood_noise(sigma = 0, size = 1) of the prompt's index, so the images do not depend on batching
    or on the number of ranks: [N, 3, H, W]."""
    device, images = pipe.vae.device, []
    items = list(zip(range(len(prompts)) if indices is None else indices, prompts))
    for chunk in batches(items, cfg.eval_batch_size):
        conds = [encode_prompt(pipe, prompt, cfg, cache) for _, prompt in chunk]
        cond = dataclasses.replace(conds[0], prompt_embeds=torch.cat([c.prompt_embeds for c in conds]),
                                   pooled=torch.cat([c.pooled for c in conds]))
        x1 = torch.cat([neighbourhood_noise(pipe, cfg, group_generator(seed, -1, i), 1, 0.0, device) for i, _ in chunk])
        states, _ = rollout(lambda x, t: velocity(pipe.transformer, x, t, cond, dtype), x1, grid, cfg.rollout_solver)
        images += [decode_images(pipe, x, cfg.resolution) for x in states[:, -1].split(cfg.reward_batch_size)]
    return torch.cat(images)


def save_grid(images, path):
    """Images [N, 3, H, W] in [0, 1] side by side in one PNG."""
    from PIL import Image

    row = torch.cat(list(images.float().cpu().clamp(0, 1)), dim=2)
    Image.fromarray((row * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).save(path)


@dataclass
class Group:
    """One prompt's neighbourhood: stored rollout states, rewards, advantages and the sampled anchors and steps."""

    prompt: str
    cond: Condition
    states: torch.Tensor  # [G, T + 1, L, C], theta_old
    rewards: torch.Tensor  # [M, G]
    adv: torch.Tensor  # [G]
    anchors: list  # the trajectories trained, in the order of the optimizer steps
    steps: list  # per anchor, the transitions it is trained on
    old: torch.Tensor  # what pi_old needs: [G, T, L, C] anchor targets (old_anchor), or the SDE's [G, T - 1] log-probs


def policy_update(model, optimizer, groups, grid, cfg, dtype):
    """Alg. 1's update: for each anchor, accumulate -J_{j,k} / K over the K transitions, then one optimizer step.
    The SDE baseline runs the same loop with every sample as an anchor, its own objective, and one step per
    sde_samples_per_step samples (the loss then averaged over them, as DanceGRPO's gradient accumulation)."""
    K, B = cfg.num_train_steps, len(groups[0].anchors)
    per_step = cfg.sde_samples_per_step if cfg.method == "sde" else 1
    chunks = batches(range(B), per_step)
    objective = sde_objective if cfg.method == "sde" else anchor_objective
    stats = dict(loss=0.0, clip_frac=0.0, first_anchor_abs_log_ratio=0.0, grad_norm=0.0, skipped_steps=0)
    for c, chunk in enumerate(chunks):
        optimizer.zero_grad(set_to_none=True)
        micro_steps = [(group, b, k) for group in groups for b in chunk for k in group.steps[b]]
        scale = K * len(chunk) * len(groups)
        for n, (group, b, k) in enumerate(micro_steps):
            with gradient_sync(model, sync=n == len(micro_steps) - 1):
                J, clip_frac, abs_log_ratio = objective(model, group.states, group.adv, group.anchors[b], k, grid,
                                                        group.cond, cfg, dtype, group.old)
                loss = -J / scale
                loss.backward()
            stats["loss"] += loss.item() / len(chunks)
            stats["clip_frac"] += clip_frac.item() / (B * K * len(groups))
            if c == 0:  # theta = theta_old here: any |log rho| is the rollout/train solver drift (or round-off)
                stats["first_anchor_abs_log_ratio"] += abs_log_ratio.item() / scale
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
        if torch.isfinite(grad_norm):  # the norm of all-reduced gradients: every rank takes the same branch
            stats["grad_norm"] += grad_norm.item() / len(chunks)
            optimizer.step()
        else:  # a non-finite loss or gradient: skip this step rather than write NaN into the weights
            stats["skipped_steps"] += 1
    return stats


def clock(device):
    """Wall time once the device's queued work is done (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def train_iteration(pipe, model, optimizer, reward_fns, weights, prompts, grid, cfg, iteration, dtype, cache,
                    group_ids):
    """Rollout, rewards and advantages for this process's prompt groups, then the policy update."""
    timings, groups, device = dict(rollout=0.0, reward=0.0), [], pipe.vae.device
    for g in group_ids:
        prompt, gen = group_prompt(prompts, cfg.seed, iteration, g)
        t0 = clock(device)
        cond = encode_prompt(pipe, prompt, cfg, cache)
        if cfg.method == "sde":
            states, old = sde_group_rollout(pipe, cond, cfg, grid, gen, dtype)
        else:
            states, train_next = neighbourhood_rollout(pipe, cond, cfg, grid, gen, cfg.group_size, cfg.noise_sigma,
                                                       dtype)
            old = train_next if cfg.old_anchor == "train_solver" else states[:, 1:]
        t1 = clock(device)
        images = torch.cat([decode_images(pipe, x, cfg.resolution) for x in states[:, -1].split(cfg.reward_batch_size)])
        rewards = torch.cat([score(reward_fns, chunk, [prompt] * len(chunk))
                             for chunk in images.split(cfg.reward_batch_size)], dim=1)
        G, T, K = cfg.group_size, cfg.num_steps, cfg.num_train_steps
        if cfg.method == "sde":
            adv = group_advantages(rewards, weights)
            anchors, steps = sample_sde_steps(G, T, K, gen)
        else:
            adv = group_advantages(rewards, weights, cfg.adv_p)
            anchors, steps = sample_anchors_and_steps(G, cfg.num_anchors, T, K, gen)
        groups.append(Group(prompt, cond, states, rewards, adv.to(states.device), anchors, steps, old))
        timings["rollout"] += t1 - t0
        timings["reward"] += clock(device) - t1
    t2 = clock(device)
    stats = policy_update(model, optimizer, groups, grid, cfg, dtype)
    timings["update"] = clock(device) - t2
    return groups, stats, timings


# -----------------------------------------------------------------------------
# Evaluation: one deterministic ODE sample per held-out prompt, every reward, mean +- standard error


def eval_indices(n, rank, world):
    """Prompt indices dealt round-robin to this rank, padded with the last prompt so that every rank runs as many
    forwards (FSDP needs all ranks in each one); an index >= n marks padding."""
    return [rank + j * world for j in range(math.ceil(n / world))]


def rank_eval_prompts(prompts, rank, world):
    """The prompts this rank samples in evaluate(), padding included: the ones to encode up front."""
    return [prompts[min(i, len(prompts) - 1)] for i in eval_indices(len(prompts), rank, world)]


@torch.no_grad()
def evaluate(pipe, prompts, reward_fns, cfg, grid, dtype, cache, rank, world, path):
    """Rank 0 writes path.json (per-prompt scores, mean, std, standard error), path.md and path.png (the first
    num_samples prompts); returns {reward: mean} on rank 0, None elsewhere."""
    n, rows, samples = len(prompts), [], {}
    for chunk in progress(batches(eval_indices(n, rank, world), cfg.eval_batch_size), f"evaluating {n} prompts", rank):
        js = [min(i, n - 1) for i in chunk]  # every rank runs as many chunks of the same sizes (FSDP)
        images = generate(pipe, [prompts[j] for j in js], cfg, grid, cfg.seed, dtype, cache, indices=js)
        real = [(i, image) for i, image in zip(chunk, images) if i < n]
        scores = torch.cat([score(reward_fns, torch.stack([im for _, im in part]), [prompts[i] for i, _ in part])
                            for part in batches(real, cfg.reward_batch_size)], dim=1)
        rows += [(i, scores[:, c].tolist()) for c, (i, _) in enumerate(real)]
        samples.update({i: image.cpu() for i, image in real if i < cfg.num_samples})
    gathered = all_gather_objects((rows, samples), world)
    if rank != 0:
        return None
    rows = sorted(row for part, _ in gathered for row in part)
    samples = {i: image for _, part in gathered for i, image in part.items()}
    scores = torch.tensor([r for _, r in rows], dtype=torch.float64)
    std = scores.std(0) if n > 1 else torch.zeros(scores.shape[1], dtype=torch.float64)
    summary = {name: dict(mean=scores[:, m].mean().item(), std=std[m].item(), se=std[m].item() / math.sqrt(n))
               for m, name in enumerate(reward_fns)}
    result = dict(num_prompts=n, num_steps=len(grid) - 1, solver=cfg.rollout_solver, seed=cfg.seed,
                  rewards=summary, scores=[dict(index=i, prompt=prompts[i], **dict(zip(reward_fns, r))) for i, r in rows])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{path}.json").write_text(json.dumps(result, indent=1))
    Path(f"{path}.md").write_text(table1(summary, n, cfg.transformer_path or cfg.model_path))
    save_grid(torch.stack([samples[i] for i in sorted(samples)]), f"{path}.png")
    return {name: v["mean"] for name, v in summary.items()}


PAPER_TABLE1 = {  # Table 1 of the paper, 3200 HPDv2 prompts
    "FLUX.1-dev (paper)": dict(hpsv2=0.310, pickscore=0.227, imagereward=1.131, clipscore=0.389, unifiedreward=3.211,
                               aesthetic=6.108),
    "Neighbor GRPO, 8-step DPM++ (paper)": dict(hpsv2=0.366, pickscore=0.234, imagereward=1.640, clipscore=0.391,
                                                unifiedreward=3.334, aesthetic=6.621),
}


def table1(summary, n, model):
    """Markdown in Table 1's shape: the evaluated model (mean ± standard error over n prompts), then the paper's
    rows for the same columns."""
    lines = ["| model | " + " | ".join(summary) + " |", "| --- |" + " --- |" * len(summary),
             f"| {model} (n = {n}) | " + " | ".join(f"{v['mean']:.4f} ± {v['se']:.4f}" for v in summary.values()) + " |"]
    for row, values in PAPER_TABLE1.items():
        if any(name in values for name in summary):
            lines.append(f"| {row} | " + " | ".join(f"{values[k]:.3f}" if k in values else "–" for k in summary) + " |")
    return "\n".join(lines) + "\n"


def eval_setup(cfg, reward_fns, device):
    """Held-out prompts and the reward functions scored on them (the training ones are reused)."""
    prompts = eval_subset(load_prompts(cfg.eval_prompts, "eval_prompts"), cfg.eval_size)
    names = (cfg.eval_only and cfg.eval_only_rewards) or cfg.eval_rewards or cfg.rewards
    names = [n for n in names if n != "unifiedreward" or cfg.unifiedreward_url]  # the judge needs its server
    return prompts, {n: reward_fns[n] if n in reward_fns else load_reward(n, cfg, device) for n in names}


def run_evaluation(cfg):
    """--eval_only: the model of transformer_path (or model_path) on the held-out prompts; each rank a full copy."""
    rank, world, device = setup_distributed(cfg)
    dtype, out = compute_dtype(cfg), Path(cfg.out_dir)
    if (out / "eval.json").exists() and not cfg.overwrite:
        raise ConfigError(f"out_dir={out}: already holds eval.json; pass --overwrite or another --out_dir")
    prompts, reward_fns = eval_setup(cfg, {}, device)
    pipe = load_pipeline(cfg, device, dtype)
    pipe.transformer.to(device, dtype).eval()  # inference: no fp32 master weights, nothing sharded
    grid = pipeline_grid(pipe, cfg, cfg.eval_steps or cfg.num_steps)
    cache = {}
    encode_prompts(pipe, rank_eval_prompts(prompts, rank, world), cfg, cache, rank)
    means = evaluate(pipe, prompts, reward_fns, cfg, grid, dtype, cache, rank, world, out / "eval")
    if rank == 0:
        print((out / "eval.md").read_text(), end="")
    barrier(world)
    return means


# -----------------------------------------------------------------------------
# Checkpoints: resumable state with torch.distributed.checkpoint, the transformer in diffusers format


def export_transformer(model, path, rank, dtype):
    """The full transformer as safetensors + config.json, loadable by FluxTransformer2DModel.from_pretrained."""
    from huggingface_hub import save_torch_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        Path(path).mkdir(parents=True, exist_ok=True)
        save_torch_state_dict({k: v.to(dtype) for k, v in state.items()}, path, max_shard_size="10GB",
                              filename_pattern="diffusion_pytorch_model{suffix}.safetensors")
        (model.module if isinstance(model, DDP) else model).save_config(path)


def export_lora(model, path, rank):
    """The adapter as FluxPipeline.save_lora_weights writes it, with its LoraConfig (alpha included), so that
    FluxPipeline.load_lora_weights(path) reproduces the trained model."""
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    transformer = model.module if isinstance(model, DDP) else model
    if rank == 0:
        layers = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(transformer).items()}
        FluxPipeline.save_lora_weights(path, transformer_lora_layers=layers,
                                       transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())


def export_model(model, path, cfg, rank, dtype):
    """path/transformer (diffusers format) or, with LoRA, path/lora (the adapter alone)."""
    if cfg.lora_rank:
        export_lora(model, path / "lora", rank)
    else:
        export_transformer(model, path / "transformer", rank, dtype)


def latest_checkpoint(out_dir):
    pointer = Path(out_dir) / "checkpoints" / "latest"
    return pointer.parent / pointer.read_text().strip() if pointer.exists() else None


TRAINED = StateDictOptions(ignore_frozen_params=True)  # a checkpoint holds what trains: all of it, or the adapter


def save_checkpoint(model, optimizer, cfg, iteration, rank, world, dtype):
    """Write under tmp-N, rename to step-N, then replace the `latest` pointer: a crash mid-save leaves the
    previous checkpoint intact. All randomness derives from (seed, iteration, group), so no RNG state is needed."""
    root = Path(cfg.out_dir) / "checkpoints"
    tmp, final = root / f"tmp-{iteration:06d}", root / f"step-{iteration:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(world)
    model_state, optim_state = get_state_dict(model, optimizer, options=TRAINED)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp / "state", no_dist=world == 1)
    export_model(model, tmp, cfg, rank, dtype)
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps({"iteration": iteration, "config": dataclasses.asdict(cfg)}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (root / "latest.tmp").write_text(final.name)
        os.replace(root / "latest.tmp", root / "latest")
        for old in root.glob("step-*"):
            if old != final:
                shutil.rmtree(old)
    barrier(world)


def load_checkpoint(model, optimizer, path, world):
    """Restore model and optimizer (in whatever sharding this run uses); returns the checkpoint's iteration and
    config."""
    model_state, optim_state = get_state_dict(model, optimizer, options=TRAINED)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path / "state", no_dist=world == 1)  # strict: every trained tensor must be there
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))  # the frozen base is model_path's
    return json.loads((path / "meta.json").read_text())


# -----------------------------------------------------------------------------
# The training loop


def open_log(out, start):
    """log.jsonl, keeping the records of iterations before start when a run resumes."""
    path = out / "log.jsonl"
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["iter"] < start] if start else []
    log = open(path, "w")
    log.writelines(line + "\n" for line in kept)
    return log


def resume_state(cfg, out):
    """The checkpoint --resume continues from, after refusing to overwrite a run or to resume nothing."""
    latest = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and latest is None:
        raise ConfigError(f"resume: out_dir={out} holds no checkpoint; drop --resume to start a new run")
    if not cfg.resume and (out / "log.jsonl").exists() and not cfg.overwrite:
        raise ConfigError(f"out_dir={out}: already holds a run (log.jsonl); pass --resume to continue it, "
                          "--overwrite to replace it, or another --out_dir")
    return latest


def restore(model, optimizer, cfg, path, rank, world):
    """Load a checkpoint into this run; returns the iterations it already did, listing any changed fields."""
    meta = load_checkpoint(model, optimizer, path, world)
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))
    changed = [f"{k} {meta['config'].get(k)} -> {now[k]}" for k in now
               if k not in ("resume", "overwrite", "iterations") and meta["config"].get(k) != now[k]]
    if changed and rank == 0:
        print(f"resuming {path} with changed fields: {', '.join(changed)}")
    return meta["iteration"]


class Preemption:
    """SIGTERM and SIGUSR1, what SLURM and Kubernetes send before a kill, only raise a flag; the loop then
    finishes its iteration, checkpoints and exits 0, on every rank once any rank got one."""

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


def log_line(it, rewards, stats, cfg):
    return (f"iter {it:4d} | " + " ".join(f"{n} {r.mean():.4f}" for n, r in zip(cfg.rewards, rewards)) +
            f" | loss {stats['loss']:+.3e} | clip {stats['clip_frac']:.2f} | "
            f"|log rho| {stats['first_anchor_abs_log_ratio']:.1e} | {stats['time/total']:.2f}s")


@dataclass
class Run:
    """Everything the loop needs, built once by build() (bench.py builds the same)."""

    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    pipe: typing.Any  # FluxPipeline
    model: torch.nn.Module  # the transformer, parallelised
    optimizer: torch.optim.Optimizer
    prompts: list
    reward_fns: dict
    weights: tuple
    grid: list
    eval_prompts: list
    eval_fns: dict
    eval_grid: list
    start: int  # the first iteration to run (> 0 when resumed)
    group_ids: range  # this rank's prompt groups
    cache: dict  # prompt -> embeddings


def build(cfg):
    """Prompts and rewards (they fail faster than FLUX loads), the pipeline, the parallel model, AdamW, the
    resumed state, and every prompt this rank will meet encoded (known from the seed) before the text encoders
    leave the GPU."""
    rank, world, device = setup_distributed(cfg)
    dtype = compute_dtype(cfg)
    resume_from = resume_state(cfg, Path(cfg.out_dir))
    prompts = load_prompts(cfg.prompt_file)
    reward_fns = {name: load_reward(name, cfg, device) for name in cfg.rewards}
    eval_prompts, eval_fns = eval_setup(cfg, reward_fns, device) if cfg.eval_every else ([], {})
    pipe = load_pipeline(cfg, device, dtype, meta=world > 1 and cfg.parallel == "fsdp" and rank > 0)
    model = parallelize(pipe.transformer, cfg, device, world, dtype)
    model.train()
    optimizer = adamw(model, cfg)
    start = restore(model, optimizer, cfg, resume_from, rank, world) if resume_from else 0
    group_ids = range(rank * cfg.groups_per_rank, (rank + 1) * cfg.groups_per_rank)
    cache = {}
    encode_prompts(pipe, [group_prompt(prompts, cfg.seed, it, g)[0] for it in range(start, cfg.iterations)
                          for g in group_ids] + prompts[: cfg.num_samples] + rank_eval_prompts(eval_prompts, rank, world),
                   cfg, cache, rank)
    return Run(rank, world, device, dtype, pipe, model, optimizer, prompts, reward_fns, reward_mix(cfg),
               pipeline_grid(pipe, cfg, cfg.num_steps), eval_prompts, eval_fns,
               pipeline_grid(pipe, cfg, cfg.eval_steps or cfg.num_steps), start, group_ids, cache)


def plot_curves(out, rewards):
    """out/curves.png from log.jsonl: training and held-out rewards, clip fraction and first-anchor |log rho|."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for name in rewards:
        train = [r for r in log if f"reward/{name}" in r]
        axes[0].plot([r["iter"] for r in train], [r[f"reward/{name}"] for r in train], label=f"train {name}")
    for name in dict.fromkeys(k.removeprefix("eval/") for r in log for k in r if k.startswith("eval/")):
        evals = [r for r in log if f"eval/{name}" in r]
        axes[0].plot([r["iter"] for r in evals], [r[f"eval/{name}"] for r in evals], "o-", label=f"held-out {name}")
    train = [r for r in log if "clip_frac" in r]
    axes[1].plot([r["iter"] for r in train], [r["clip_frac"] for r in train])
    axes[2].semilogy([r["iter"] for r in train], [max(r["first_anchor_abs_log_ratio"], 1e-12) for r in train])
    for ax, title in zip(axes, ("reward", "clip fraction", "first-anchor |log rho| (theta = theta_old)")):
        ax.set(xlabel="iteration", title=title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)


def train(cfg):
    """Neighbor GRPO on this process's share of the prompt groups; returns the trained (wrapped) transformer."""
    run, out = build(cfg), Path(cfg.out_dir)
    rank, world, device, dtype, pipe, model, optimizer, start = (
        run.rank, run.world, run.device, run.dtype, run.pipe, run.model, run.optimizer, run.start)
    prompts, grid, cache = run.prompts, run.grid, run.cache
    wandb = None
    if rank == 0:
        (out / "samples").mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        log = open_log(out, start)
        if cfg.wandb_project:  # optional: the same records as log.jsonl
            wandb = importlib.import_module("wandb")
            wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg), dir=out, resume="allow",
                       id=cfg.wandb_id or None)
        method = (f"SDE-GRPO | eta={cfg.sde_eta}" if cfg.method == "sde" else
                  f"Neighbor GRPO | B={cfg.num_anchors} sigma={cfg.noise_sigma} p={cfg.adv_p}")
        print(f"{method} | {cfg.model_path} | {world} process(es) x {cfg.groups_per_rank} group(s) | "
              f"G={cfg.group_size} T={cfg.num_steps} K={cfg.num_train_steps} | start at iteration {start}")
    nfe_old, nfe_new = cfg.num_steps, nfe_theta(trained_per_group(cfg), cfg.group_size, cfg.num_train_steps)
    skipped_in_a_row = 0
    with Preemption() as preempted:
        for it in range(start, cfg.iterations + 1):
            record = dict(iter=it)
            if cfg.sample_every and (it % cfg.sample_every == 0 or it == cfg.iterations):
                images = generate(pipe, prompts[: cfg.num_samples], cfg, grid, cfg.seed, dtype, cache)  # every rank
                if rank == 0:
                    save_grid(images, out / f"samples/{it:06d}.png")
            if cfg.eval_every and (it % cfg.eval_every == 0 or it == cfg.iterations):
                means = evaluate(pipe, run.eval_prompts, run.eval_fns, cfg, run.eval_grid, dtype, cache, rank, world,
                                 out / f"eval/iter_{it:06d}")
                record.update({f"eval/{k}": v for k, v in (means or {}).items()})
            if it == cfg.iterations:
                break
            t0 = clock(device)
            groups, stats, timings = train_iteration(pipe, model, optimizer, run.reward_fns, run.weights, prompts,
                                                     grid, cfg, it, dtype, cache, run.group_ids)
            timings["total"] = clock(device) - t0
            rewards = all_gather_columns(torch.cat([g.rewards for g in groups], dim=1), world, device)
            stats = all_mean({**stats, **{f"time/{k}": v for k, v in timings.items()}}, world, device)
            if rank == 0:
                record.update(**{f"reward/{n}": r.mean().item() for n, r in zip(cfg.rewards, rewards)},
                              **{f"reward_std/{n}": r.std().item() for n, r in zip(cfg.rewards, rewards)},
                              **stats, nfe_old=nfe_old, nfe_theta=nfe_new)
                log.write(json.dumps(record) + "\n")
                log.flush()
                print(log_line(it, rewards, stats, cfg))
                if any(k.startswith("eval/") for k in record):
                    plot_curves(out, cfg.rewards)
                if wandb:
                    wandb.log(record, step=it)
            skipped_in_a_row = skipped_in_a_row + int(stats["skipped_steps"]) if stats["skipped_steps"] else 0
            if skipped_in_a_row >= cfg.max_skipped_steps:
                raise TrainingError(
                    f"{skipped_in_a_row} optimizer steps in a row had a non-finite loss or gradient (iteration {it}); "
                    f"nothing was saved since, so the last checkpoint in {out / 'checkpoints'} is good: --resume "
                    "from it with a lower --lr, or raise --max_skipped_steps")
            if preempted(world, device):  # finish the iteration, checkpoint, exit 0; the scheduler reruns with --resume
                save_checkpoint(model, optimizer, cfg, it + 1, rank, world, dtype)
                if rank == 0:
                    print(f"stopped by {preempted.signal or 'a signal to another rank'} after iteration {it}: "
                          f"checkpoint step-{it + 1:06d} written; continue with the same command and --resume")
                    log.close()
                barrier(world)
                return model
            if cfg.ckpt_every and (it + 1) % cfg.ckpt_every == 0 and it + 1 < cfg.iterations:
                save_checkpoint(model, optimizer, cfg, it + 1, rank, world, dtype)
        if start < cfg.iterations:  # a resumed run with nothing left to do keeps its checkpoint as it is
            save_checkpoint(model, optimizer, cfg, cfg.iterations, rank, world, dtype)
        export_model(model, out, cfg, rank, dtype)
        if cfg.export_merged:  # the run is over: merge the adapter into the base in place
            transformer = model.module if isinstance(model, DDP) else model
            transformer.fuse_lora()
            transformer.unload_lora()
            export_transformer(transformer, out / "transformer", rank, dtype)
        if rank == 0:
            if len(record) > 1:  # the final evaluation
                log.write(json.dumps(record) + "\n")
                wandb and wandb.log(record, step=cfg.iterations)
            log.close()
            plot_curves(out, cfg.rewards)
            wandb and wandb.finish()
        barrier(world)
        return model


def main(argv=None):
    try:
        cfg = parse_config(sys.argv[1:] if argv is None else argv)
        run_evaluation(cfg) if cfg.eval_only else train(cfg)
    except (ConfigError, RewardError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
