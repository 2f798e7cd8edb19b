"""
Neighbor GRPO: contrastive ODE policy optimization for FLUX (He et al., CVPR 2026, arXiv 2511.16955), and for
SD3.5 and Qwen-Image through the same loop.

    python neighbor_grpo.py --preset=tiny            # a random tiny FLUX-architecture model on CPU, ~1 minute
    python neighbor_grpo.py --preset=digits          # a pretrained 16x16 digits model, guarded, ~4 minutes
    python neighbor_grpo.py --preset=flux-dev-lora   # FLUX.1-dev on one 80 GB GPU with LoRA (10 s/iter)
    python neighbor_grpo.py --preset=flux-dev-24gb   # ... on one 24 GB GPU: LoRA on a 4-bit base
    torchrun --nproc_per_node=8 neighbor_grpo.py     # FLUX.1-dev, the paper's 8-step DPM++ setting
    python neighbor_grpo.py --help                   # every field with its default and where it comes from

Any field can be set as --field=value. The file reads top to bottom like the method: its Config, time grid and
solvers, the noise neighborhood, advantages, the surrogate and clipped objective, the policy update and one iteration,
the DDP/FSDP2 loop; then the machinery a reader can skip (SystemConfig's engineering fields, validation, evaluation,
build, main). "eq. N", "Alg. 1": the paper's. Each file beside it has one job (README's table).
"""

import contextlib
import copy
import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import sys
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import fetch
from checkpoints import (CheckpointError, Checkpointer, Preemption, all_gather_objects, all_mean, barrier, export_best,
                         init_process_group, restore, resume_state, steady_timeout)
from configurator import ConfigError, configure
from guard import guard
from models import (ATTENTION_BACKENDS, FP8_MODES, ModelError, adapters_off, auto_update_batch, blocks, check_compiler,
                    check_memory, decode_images, draw_noise, encode_prompt, export_model, load_pipeline, prepare_blocks,
                    presets as family_presets, schedule, set_attention, stack_conditions, text_encoders,
                    update_numerics, velocity)
from report import RunLog, Stopwatch, progress, save_grid, write_evaluation
from rewards import RewardError, load_reward, reward_config_problems, score

# diffusers' blocks return slices; nothing downstream writes into them in place (the FSDP tests check gradients)
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP in a world of one: intended
warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")  # its new name is not in torch 2.11

# -----------------------------------------------------------------------------
# Config: the method and its run, the paper's defaults (its best 8-step setting, Tables 1 and 3)


@dataclass
class Config:
    # model and prompts
    model_path: str = "black-forest-labs/FLUX.1-dev"  # hub id or local dir (FLUX, SD3.5, Qwen-Image); random: README
    resolution: int = 720  # image side in pixels (DanceGRPO/MixGRPO protocol)
    guidance_scale: float = 3.5  # FLUX.1-dev: embedded guidance; SD3.5, Qwen-Image: true CFG's scale (1 = none)
    negative_prompt: str = ""  # classifier-free guidance's unconditional prompt (SD3.5, Qwen-Image pipelines: "")
    max_sequence_length: int = 512  # T5 (Qwen-Image: Qwen2.5-VL) tokens per prompt (FluxPipeline default)
    prompt_file: str = "hpdv2"  # "hpdv2" = HPDv2's train split (data/hpdv2/prepare.py), a text file, "" = examples
    prompt_draw: str = "subset"  # a seeded subset, each prompt once (the paper); "uniform": each group draws anew
    # neighborhood rollout (Sec. 3.3)
    group_size: int = 12  # G candidates per prompt (Table 3)
    noise_sigma: float = 0.3  # sigma, strength of the initial-noise perturbation (eq. 7, Table 4)
    num_steps: int = 8  # T rollout steps (Table 1: 8-step DPM++)
    rollout_solver: str = "dpm++2m"  # "dpm++2m" or "euler" (= DDIM, eta=0); the train solver is Euler (Sec. 3.4.3)
    shift: float = 0.0  # static time shift (DanceGRPO: 3.0); 0 = the pipeline's own (FLUX: resolution-dependent)
    # policy update (Sec. 3.4, Alg. 1)
    num_anchors: int = 4  # B anchors per group (Table 5)
    num_train_steps: int = 4  # K transitions per anchor (Table 3)
    distance_metric: str = "squared_l2"  # d of eq. 8: "squared_l2" (the paper) or "l1"
    distance_reduction: str = "mean"  # d over latent elements: averaged ("mean") or summed ("sum", literal eq. 8)
    old_anchor: str = "train_solver"  # pi_old's anchor: theta_old's one-step DDIM prediction, or "rollout" (docs)
    temperature: float = 1.0  # tau in softmax(-d / tau); the paper omits it (supp. eq. 19)
    clip_range: float = 1e-4  # epsilon of the ratio clip (eq. 4; DanceGRPO, MixGRPO)
    adv_p: float = 0.8  # p of the quasi-norm advantages (eq. 11, Table 6); 2 = GRPO's mean/std up to 1/sqrt(G - 1)
    kl_coef: float = 0.0  # pull toward the starting model per trained transition (0 = the paper; docs/decisions.md)
    # rewards (rewards.py)
    rewards: tuple[str, ...] = ("hpsv2", "pickscore", "imagereward")  # built-in names or module.path:function
    reward_weights: tuple[float, ...] = ()  # one weight per reward; () = equal weights (MixGRPO protocol)
    # optimization
    iterations: int = 300  # GRPO iterations (paper)
    groups_per_rank: int = 1  # prompt groups per process per iteration (paper: 1 per GPU)
    lr: float = 1e-5  # AdamW learning rate (paper)
    weight_decay: float = 1e-4  # AdamW weight decay (DanceGRPO)
    max_grad_norm: float = 1.0  # gradient-norm clip before every optimizer step (DanceGRPO)
    seed: int = 0  # everything random derives from (seed, iteration, group index)


ROOT = Path(__file__).resolve().parent
DIGITS_DIR = ROOT / "data" / "digits"  # written by data/digits/prepare.py, committed
DIGIT_JUDGES = ("digit_alignment", "digit_cnn_alignment", "digit_realism")  # the reward, then two held-out judges
PRESETS = {  # each sets only what it changes; SystemConfig's fields (at the end of the file) too
    "flux-dev": {},  # the defaults are the paper's best 8-step setting
    "flux-dev-lora": dict(  # the paper's 8-step setting on one 80 GB GPU: LoRA at the LoRA scripts' lr, compiled
        lora_rank=64, lora_alpha=128.0, lr=3e-4, parallel="ddp", out_dir="runs/flux_dev_lora", compile=True,
        grad_checkpointing=False, update_batch_size=2),  # 10.0 s/iter on an H200; 48 GB: --grad_checkpointing=true
    "flux-dev-24gb": dict(  # the paper's 8-step setting on one 24 GB GPU: LoRA on a 4-bit base (docs/cost.md)
        lora_rank=64, lora_alpha=128.0, lr=3e-4, parallel="ddp", base_quantization="nf4", reward_offload=True,
        out_dir="runs/flux_dev_24gb", grad_checkpointing=True, compile=False, update_batch_size=4),
    "tiny": dict(  # the same algorithm on a random tiny FLUX-architecture model, CPU, no download
        model_path="tiny", resolution=64, max_sequence_length=64, rewards=("jpeg_compressibility",),
        prompt_file="", eval_prompts="", eval_size=0, eval_every=20, eval_only_rewards=(), guard_rewards=(),
        lr=1e-3, iterations=60, device="cpu", mixed_precision="fp32", parallel="ddp", grad_checkpointing=False,
        out_dir="runs/tiny", sample_every=20, ckpt_every=30, prompt_draw="uniform"),
    "digits": dict(  # a pretrained 16x16 FLUX-architecture model of handwritten digits: alignment on a CPU
        model_path=str(DIGITS_DIR), resolution=16, max_sequence_length=48, rewards=("digit_alignment",),
        prompt_file=str(DIGITS_DIR / "prompts.txt"), eval_prompts=str(DIGITS_DIR / "eval_prompts.txt"), eval_size=0,
        guard_rewards=DIGIT_JUDGES[1:], eval_only_rewards=DIGIT_JUDGES, eval_every=25, eval_batch_size=20,
        update_batch_size=8,  # its 2 groups' K = 4 transitions of an optimizer step in one call (docs/cost.md)
        lr=3e-5, iterations=500,  # hacked beyond ~300 unless the guard stops it first (docs/digits.md)
        groups_per_rank=2, device="cpu", mixed_precision="fp32", parallel="ddp", grad_checkpointing=False,
        out_dir="runs/digits", sample_every=50, num_samples=10, ckpt_every=0),
}
PRESETS.update(family_presets(PRESETS))  # sd3.py's and qwen_image.py's, defined in their modules


# -----------------------------------------------------------------------------
# Time grid and solvers. Rectified flow: x_t = (1 - t) x0 + t eps, v = eps - x0, data prediction x0 = x - t v.

SOLVERS = ("euler", "dpm++2m")


def time_grid(num_steps, seq_len, scheduler_config, shift=0.0, t_min=0.0):
    """t_0 = 1 > ... > t_T = 0: exactly the pipeline's sigmas for T steps, from linspace(1, t_min or 1 / T, T) (a
    static shift replaces a dynamic one; SD3's scheduler shifts statically, Qwen-Image's stretches to shift_terminal)."""
    c = scheduler_config
    t = torch.linspace(1.0, t_min or 1.0 / num_steps, num_steps, dtype=torch.float64)
    if shift > 0 or not c.get("use_dynamic_shifting", True):
        s = shift or c["shift"]
        t = s * t / (1 + (s - 1) * t)
    else:  # diffusers' calculate_shift: mu grows linearly with the image sequence length
        slope = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
        mu = c["base_shift"] + slope * (seq_len - c["base_image_seq_len"])
        e = math.exp(mu) if c.get("time_shift_type", "exponential") == "exponential" else mu
        t = e / (e + (1 / t - 1))
    if c.get("shift_terminal"):
        t = 1 - (1 - t) * (1 - c["shift_terminal"]) / (1 - t[-1])
    return torch.cat([t, t.new_zeros(1)]).tolist()


def pipeline_grid(pipe, cfg, num_steps, shift=None):
    """time_grid for this pipeline's scheduler at cfg's resolution and shift (eval_grid: the pipeline's own, no training
    shift, eval_steps steps, the same for any method)."""
    seq_len, t_min = schedule(pipe, cfg.resolution, num_steps)
    return time_grid(num_steps, seq_len, pipe.scheduler.config, cfg.shift if shift is None else shift, t_min)


def euler_step(x, v, t, t_next):
    """One-step DDIM (eta = 0) = Euler for rectified flow: the TrainSolver (eq. 2)."""
    return x + (t_next - t) * v


def log_snr(t):
    """lambda_t = log(alpha_t / sigma_t) with alpha_t = 1 - t, sigma_t = t."""
    return math.log(1 - t) - math.log(t) if 0 < t < 1 else (-math.inf if t >= 1 else math.inf)


def dpm_solver_pp_2m_step(x, v, k, grid, prev_x0):
    """DPM-Solver++(2M), data prediction (Lu et al. 2022). Returns (x_{k+1}, x0 prediction at step k). The step out
    of t = 1 (lambda = -inf) and the final step into t = 0 are first order; both then equal Euler."""
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


# -----------------------------------------------------------------------------
# Prompt groups and their noise neighborhood (Sec. 3.3, eq. 7). All randomness derives from (seed, iteration,
# global group index), so any split of the same groups over ranks computes the same update, and a resumed run
# draws what an uninterrupted one would.


def group_generator(seed, iteration, group):
    """The random stream of one prompt group, a function of (seed, iteration, global group index) only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + iteration) * 1_000_033 + group)


def group_prompt(prompts, cfg, iteration, group, groups):
    """Group g's prompt at this iteration (of `groups` per iteration) and its generator for noises, anchors and steps.
    "subset", the paper's draw: group n = iteration * groups + g takes the n-th prompt of a seeded permutation, each
    prompt once (a short file is cycled, a new permutation per pass); "uniform": a prompt at random per group."""
    gen = group_generator(cfg.seed, iteration, group)
    if cfg.prompt_draw == "uniform":
        return prompts[torch.randint(len(prompts), (1,), generator=gen).item()], gen
    n = iteration * groups + group
    return prompts[prompt_order(len(prompts), cfg.seed, n // len(prompts))[n % len(prompts)]], gen


@functools.lru_cache(maxsize=4)
def prompt_order(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def perturbed_noise(base, delta, sigma):
    """Neighborhood of initial noises around base (eq. 7): unit variance is kept for any sigma."""
    return math.sqrt(1 - sigma**2) * base + sigma * delta


def neighborhood_noise(pipe, cfg, gen, size, sigma, device):
    """size initial noises around one base noise drawn from gen (eq. 7); sigma = 0, size = 1: the base itself."""
    base = draw_noise(pipe, 1, cfg.resolution, gen, device)
    return perturbed_noise(base, draw_noise(pipe, size, cfg.resolution, gen, device), sigma)


def neighborhood_rollout(pipe, cond, cfg, grid, gen, dtype, size=None, sigma=None):
    """size (group_size) ODE trajectories from a neighborhood of one base noise (eq. 7, noise_sigma), with theta_old:
    the states [size, T + 1, L, C] and the TrainSolver's prediction from each [size, T, L, C]. With sigma = 0 and
    size = 1 this is plain deterministic ODE sampling, the inference sampler."""
    size, sigma = size or cfg.group_size, cfg.noise_sigma if sigma is None else sigma
    x1 = neighborhood_noise(pipe, cfg, gen, size, sigma, pipe.vae.device)
    v_fn = lambda x, t: velocity(pipe.transformer, x, t, cond, dtype)  # noqa: E731
    parts = [rollout(v_fn, x, grid, cfg.rollout_solver) for x in x1.split(cfg.rollout_batch_size)]
    return torch.cat([states for states, _ in parts]), torch.cat([train_next for _, train_next in parts])


def score_samples(pipe, reward_fns, x, prompt, cfg, device):
    """Rewards [M, N] of final latents x [N, L, C], decoded by the VAE and scored reward_batch_size at a time."""
    images = torch.cat([decode_images(pipe, c, cfg.resolution) for c in x.split(cfg.reward_batch_size)])
    return score(reward_fns, images, [prompt] * len(images), device, cfg.reward_batch_size)


# -----------------------------------------------------------------------------
# Advantages (eq. 11)


def quasi_norm_advantages(rewards, p):
    """Group-wise quasi-norm reweighting (eq. 11): centred rewards divided by their L_p (quasi-)norm. Scale-invariant,
    keeps sign and order; p = 2 is std-normalised GRPO (eq. 3) times 1 / sqrt(G - 1), p < 2 shrinks flat groups
    whose advantages carry no clear signal. An all-equal group gets zeros."""
    r = rewards.double()  # the fp32 mean of equal fp32 values is inexact, and this normalisation would amplify it
    c = r - r.mean(-1, keepdim=True)
    norm = c.abs().pow(p).sum(-1, keepdim=True).pow(1 / p)
    return torch.where(norm > 0, c / norm.clamp_min(1e-300), torch.zeros_like(c)).to(rewards.dtype)


def reward_mix(cfg):
    """One weight per reward model, normalised to sum 1 (MixGRPO's advantage_aggr); equal when none are given."""
    w = cfg.reward_weights or (1.0,) * len(cfg.rewards)
    return tuple(x / sum(w) for x in w)


def group_advantages(per_model, weights):
    """Per-reward-model advantages [M, G] combined with the configured weights (MixGRPO) into [G]."""
    return (torch.as_tensor(weights, dtype=torch.float32).reshape(-1, 1) * per_model).sum(0)


# -----------------------------------------------------------------------------
# Anchors, the surrogate leaping policy and the clipped objective (Sec. 3.4, eqs. 8-9)

DISTANCE_METRICS, DISTANCE_REDUCTIONS, OLD_ANCHORS = ("squared_l2", "l1"), ("mean", "sum"), ("train_solver", "rollout")


def sample_anchors_and_steps(G, B, T, K, gen):
    """Symmetric anchor sampling (Sec. 3.4.1): B anchors from the group and K of the T transitions, shared."""
    anchors = torch.randperm(G, generator=gen)[:B].tolist()
    steps = sorted(torch.randperm(T, generator=gen)[:K].tolist())
    return anchors, [steps] * B


def neighbor_distances(candidates, anchor, metric="squared_l2", reduction="mean"):
    """d_i: the distance from the anchor [L, C] to each candidate [G, L, C] in fp32, squared L2 (eq. 8) or L1, averaged
    or summed over the latent elements."""
    diff = (candidates.float() - anchor.float()).flatten(1)
    d = diff.pow(2) if metric == "squared_l2" else diff.abs()
    return d.mean(1) if reduction == "mean" else d.sum(1)


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


@dataclass
class Group:
    """One prompt's neighborhood: the stored rollout, rewards, advantages, and the anchors and transitions trained."""

    prompt: str
    cond: typing.Any  # the family's Condition (flux.Condition, ...)
    states: torch.Tensor  # X [G, T + 1, L, C], theta_old's rollout
    old_next: torch.Tensor  # pi_old's anchor for each (j, k) [G, T, L, C] (old_anchor)
    rewards: torch.Tensor  # [M, G]
    adv: torch.Tensor  # [G]
    anchors: list  # the trajectories trained, in the order of the optimizer steps
    steps: list  # per anchor, the transitions it is trained on


def neighbor_group(prompt, cond, states, train_next, rewards, weights, cfg, gen):
    """Alg. 1 after the rollout of one prompt: quasi-norm advantages (eq. 11), B anchors and K shared transitions
    (Sec. 3.4.1), and pi_old's anchor for each (old_anchor: theta_old's own DDIM step, or the stored X[j, k + 1])."""
    adv = group_advantages(quasi_norm_advantages(rewards, cfg.adv_p), weights)
    anchors, steps = sample_anchors_and_steps(cfg.group_size, cfg.num_anchors, cfg.num_steps, cfg.num_train_steps, gen)
    old_next = train_next if cfg.old_anchor == "train_solver" else states[:, 1:]
    return Group(prompt, cond, states, old_next, rewards, adv.to(states.device), anchors, steps)


def anchor_objective(terms, x, v, grid, cfg):
    """J_{j,k} of each transition (group, anchor j, k) in terms, v_theta at its X[j, k] given: one TrainSolver step,
    scored against every candidate of its group at t_{k+1} (eqs. 8-9) and against pi_old's anchor group.old_next[j, k].
    Per transition [n]: J, clip fraction, mean |log rho|."""
    out = []
    for (group, j, k), x_jk, v_jk in zip(terms, x, v):
        x_theta = euler_step(x_jk, v_jk, grid[k], grid[k + 1])
        candidates = group.states[:, k + 1]
        d, d_old = (neighbor_distances(candidates, anchor, cfg.distance_metric, cfg.distance_reduction)
                    for anchor in (x_theta, group.old_next[j, k]))
        logp, logp_old = surrogate_log_probs(d, cfg.temperature), surrogate_log_probs(d_old, cfg.temperature)
        J, clip_frac = grpo_objective(group.adv, logp, logp_old, cfg.clip_range)
        out.append((J, clip_frac, (logp - logp_old).detach().abs().mean()))
    return [torch.stack(column) for column in zip(*out)]


def prediction_distance(terms, v, v_ref, grid):
    """kl_coef's pull toward the model the run started from: per transition, the squared distance (mean over latent
    elements) between theta's and the reference's one-step DDIM predictions from X[j, k], dt^2 |v - v_ref|^2; the
    KL of two Gaussian policies of one variance is proportional to it (docs/decisions.md). [n]"""
    dt = torch.tensor([grid[k + 1] - grid[k] for _, _, k in terms], device=v.device).view(-1, *[1] * (v.dim() - 1))
    return (dt * (v - v_ref)).pow(2).flatten(1).mean(1)


@dataclass(frozen=True)
class Method:
    """A GRPO variant on this loop. Neighbor GRPO is NEIGHBOR; sde_grpo.py's SDE baseline is the other, and this hook is
    all it needs: how a prompt's group is rolled out, what it trains, one transition's objective, trajectories per
    optimizer step."""

    describe: typing.Callable  # cfg -> the run's banner
    rollout: typing.Callable  # (pipe, cond, cfg, grid, gen, dtype) -> states [G, T + 1, L, C], what pi_old needs
    group: typing.Callable  # (prompt, cond, states, pi_old's, rewards, weights, cfg, gen) -> a Group
    objective: typing.Callable  # ([(group, j, k)], X[j, k], v_theta, grid, cfg) -> J, clip fraction, |log rho| [n]
    per_step: typing.Callable = lambda cfg: 1  # trained trajectories per optimizer step (Alg. 1: one anchor)


NEIGHBOR = Method(lambda cfg: f"Neighbor GRPO | B={cfg.num_anchors} sigma={cfg.noise_sigma} p={cfg.adv_p} | distance "
                              f"{cfg.distance_metric} ({cfg.distance_reduction}), pi_old at {cfg.old_anchor}",
                  neighborhood_rollout, neighbor_group, anchor_objective)


# -----------------------------------------------------------------------------
# The policy update and one iteration (Alg. 1)


def transition_velocities(transformer, terms, grid, dtype):
    """v_theta at the stored states X[j, k] of a batch of transitions (group, j, k): one transformer call with a
    timestep per sample, the update's transformer work. Returns the states and velocities [n, L, C]."""
    x = torch.stack([group.states[j, k] for group, j, k in terms])
    cond = stack_conditions([group.cond for group, _, _ in terms])
    return x, velocity(transformer, x, [grid[k] for _, _, k in terms], cond, dtype)


@torch.no_grad()
def old_anchors(transformer, group, grid, cfg, dtype):
    """pi_old's anchors in the update's precision (fp8="rollout": the rollout's FP8 ones put rho past the 1e-4 clip):
    theta_old's one-step DDIM prediction from X[j, k] recomputed for the B x K trained (j, k), batched as the update."""
    terms = [(group, j, k) for j, steps in zip(group.anchors, group.steps) for k in steps]
    with update_numerics(cfg.fp8):
        for call in batches(terms, cfg.update_batch_size):
            x, v = transition_velocities(transformer, call, grid, dtype)
            for (_, j, k), x_jk, v_jk in zip(call, x, v):
                group.old_next[j, k] = euler_step(x_jk, v_jk, grid[k], grid[k + 1])


def transitions_loss(model, method, terms, grid, cfg, dtype, reference):
    """The loss kl_coef * kl - J of each transition in terms, from one transformer call with gradient (and, with
    kl_coef, one of the reference without), with its clip fraction, |log rho| and kl [n]."""
    if cfg.kl_coef:  # the reference first: switching LoRA adapters off and on touches requires_grad
        with torch.no_grad(), reference() as ref:
            v_ref = transition_velocities(ref, terms, grid, dtype)[1]
    x, v = transition_velocities(model, terms, grid, dtype)
    J, clip_frac, abs_log_ratio = method.objective(terms, x, v, grid, cfg)
    kl = prediction_distance(terms, v, v_ref, grid) if cfg.kl_coef else torch.zeros_like(J)
    return cfg.kl_coef * kl - J, clip_frac, abs_log_ratio, kl


def gradient_sync(model, sync):
    """DDP decides in the forward whether a backward all-reduces: only an optimizer step's last call does (each rank
    holds one full gradient anyway). FSDP2 reduce-scatters every call into the sharded gradients: without that it
    would hold every gradient unsharded in fp32 between calls (FLUX.1-dev: 44 GiB a rank; docs/cost.md)."""
    return model.no_sync() if isinstance(model, DDP) and not sync else contextlib.nullcontext()


def step_gradient(model, method, terms, grid, cfg, dtype, reference=None):
    """The gradient of one optimizer step's loss, the mean over its transitions (this rank's groups' anchors), in
    calls of update_batch_size; the ranks' gradients are averaged by the last call. Per call: loss, clip fraction,
    |log rho| and kl per transition (bench.py --meta prices memory by running this)."""
    model.zero_grad(set_to_none=True)
    calls, out = batches(terms, cfg.update_batch_size), []
    for n, call in enumerate(calls):
        with gradient_sync(model, sync=n == len(calls) - 1), update_numerics(cfg.fp8):  # fp8="rollout": not FP8
            loss, *logs = transitions_loss(model, method, call, grid, cfg, dtype, reference)
            loss = loss / len(terms)
            loss.sum().backward()
        out.append((loss.detach(), *logs))
    return out


def optimizer_step(model, optimizer, max_grad_norm):
    """Clip the gradient norm, then step, unless the norm (of all-reduced gradients: the same on every rank) is not
    finite: then the step is skipped rather than write NaN into the weights. Returns the norm."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
    if torch.isfinite(grad_norm):
        optimizer.step()
    return grad_norm.item()


def policy_update(model, optimizer, method, groups, grid, cfg, dtype, reference=None):
    """Alg. 1's update: for each anchor, the gradient of -J_{j,k} / K accumulated over its K transitions (and this
    rank's groups), update_batch_size transitions per transformer call, then one optimizer step, at which the ranks
    average their gradients. Returns the update's statistics."""
    steps = batches(range(len(groups[0].anchors)), method.per_step(cfg))  # one optimizer step per anchor
    logged, norms = [], []
    for s, anchors in enumerate(steps):
        terms = [(group, group.anchors[b], k) for group in groups for b in anchors for k in group.steps[b]]
        for values in step_gradient(model, method, terms, grid, cfg, dtype, reference):
            logged += [(s, len(terms), *row) for row in zip(*(t.tolist() for t in values))]
        norms.append(optimizer_step(model, optimizer, cfg.max_grad_norm))
    optimizer.zero_grad(set_to_none=True)  # no gradient memory held through the next rollout
    stats = update_stats(logged, norms, len(steps))
    return stats if cfg.kl_coef else {k: v for k, v in stats.items() if k != "kl"}  # kl: measured only when used


def update_stats(terms, norms, steps):
    """The update's log: the loss (mean of its optimizer steps' losses), the fraction of clipped ratios, the first
    step's mean |log rho| (theta = theta_old there: solver drift or round-off), the mean finite grad norm, skips, the
    mean distance to the reference (kl)."""
    stats = dict(loss=0.0, clip_frac=0.0, first_anchor_abs_log_ratio=0.0, grad_norm=0.0, skipped_steps=0, kl=0.0)
    for s, n, loss, clip_frac, abs_log_ratio, kl in terms:
        stats["loss"] += loss / steps
        stats["clip_frac"] += clip_frac / len(terms)
        stats["kl"] += kl / len(terms)
        stats["first_anchor_abs_log_ratio"] += abs_log_ratio / n if s == 0 else 0.0
    for norm in norms:
        stats["grad_norm"] += norm / steps if math.isfinite(norm) else 0.0
        stats["skipped_steps"] += int(not math.isfinite(norm))
    return stats


def make_group(run, cfg, prompt, gen, lap=lambda phase: None):
    """One prompt's group: rolled out with theta_old (the method's rollout), decoded and scored, then given its
    advantages and what it trains (the method's group); lap(phase) times each phase (and fp8=rollout's old_anchors)."""
    cond = encode_prompt(run.pipe, prompt, cfg, run.cache)
    states, old = run.method.rollout(run.pipe, cond, cfg, run.grid, gen, run.dtype)
    lap("rollout")
    rewards = score_samples(run.pipe, run.reward_fns, states[:, -1], prompt, cfg, run.device)
    group = run.method.group(prompt, cond, states, old, rewards, run.weights, cfg, gen)
    lap("reward")
    if cfg.fp8 == "rollout" and cfg.old_anchor == "train_solver":  # the rollout's anchors were FP8, the update's not
        old_anchors(run.pipe.transformer, group, run.grid, cfg, run.dtype)
        lap("old_anchors")
    return group


def train_iteration(run, cfg, iteration):
    """One iteration of Alg. 1 on this rank's prompt groups: each group rolled out, scored and given advantages, then
    the policy update. Returns the groups, the update's statistics and the seconds of each phase."""
    lap = Stopwatch(run.device)
    total = run.world * cfg.groups_per_rank
    groups = [make_group(run, cfg, *group_prompt(run.prompts, cfg, iteration, g, total), lap) for g in run.group_ids]
    stats = policy_update(run.model, run.optimizer, run.method, groups, run.grid, cfg, run.dtype, run.reference)
    lap("update")
    return groups, stats, {**lap.seconds, "total": sum(lap.seconds.values())}


# -----------------------------------------------------------------------------
# The training loop


def train(cfg, method=NEIGHBOR):
    """Alg. 1 on this process's share of the prompt groups, evaluated and guarded every eval_every iterations until
    cfg.iterations or the guard stops it; returns the trained (wrapped) transformer."""
    run = build(cfg, method)
    log, skipped, out, it, guarded = RunLog(run, cfg), 0, Path(cfg.out_dir), run.start, run.guard
    with Preemption() as preempted, Checkpointer(run, cfg) as checkpoints:  # written in the background
        for it in range(run.start, cfg.iterations + 1):
            before, guarded = guarded, periodic(run, cfg, it, log, guarded)
            if it == cfg.iterations or guarded.get("stop"):
                break
            groups, stats, seconds = train_iteration(run, cfg, it)
            rewards, stats = iteration_record(run, cfg, groups, stats, seconds)
            log.iteration(it, rewards, stats)
            if it == run.start:  # start-up is over: a hung rank now ends the run within minutes (docs/cluster.md)
                steady_timeout(cfg, stats["time/total"], run.world)
            skipped = skipped + int(stats["skipped_steps"]) if stats["skipped_steps"] else 0
            if skipped >= cfg.max_skipped_steps:
                raise TrainingError(
                    f"{skipped} optimizer steps in a row had a non-finite loss or gradient (iteration {it}); nothing "
                    f"was saved since, so the last checkpoint in {out / 'checkpoints'} is good: --resume from it with "
                    "a lower --lr, or raise --max_skipped_steps")
            if preempted(run.world, run.device):  # finish the iteration, checkpoint, exit 0; rerun with --resume
                checkpoints.save(it + 1, guarded, wait=True)
                log.stopped(it, preempted.signal)
                barrier(run.world)
                return run.model
            if checkpoints.due(it + 1):
                checkpoints.save(it + 1, guarded)
        if run.start < it:  # a resumed run with nothing left to do keeps its checkpoint as it is
            checkpoints.save(it, before, wait=True)
        export_model(run.model, out, run.rank, run.dtype, cfg.lora_rank, cfg.export_merged)
        log.close(guarded)
        barrier(run.world)
    return run.model


def periodic(run, cfg, it, log, guard_state):
    """The sample grid and the held-out evaluation with the guard's decision (and the best model's export), every
    sample_every and eval_every iterations and after the last one (on every rank: FSDP needs them all in each
    forward). Returns the guard's state."""
    due = lambda every: every and (it % every == 0 or it == cfg.iterations)  # noqa: E731
    if due(cfg.sample_every):
        images = generate(run.pipe, run.prompts[: cfg.num_samples], cfg, run.grid, cfg.seed, run.dtype, run.cache)
        if run.rank == 0:
            save_grid(images, Path(cfg.out_dir) / f"samples/{it:06d}.png")
    if due(cfg.eval_every):
        summary = evaluate(run.pipe, run.eval_prompts, run.eval_fns, cfg, run.eval_grid, run.dtype, run.cache,
                           run.rank, run.world, Path(cfg.out_dir) / f"eval/iter_{it:06d}")
        decided = guard(guard_state, it, summary, cfg, run.weights) if run.rank == 0 else None
        guard_state = all_gather_objects(decided, run.world)[0]  # rank 0 holds the scores; every rank acts alike
        if guard_state["new_best"]:
            export_best(run.model, cfg, guard_state, run.rank, run.world, run.dtype)
        log.evaluation(it, summary, len(run.eval_prompts), guard_state)
    return guard_state


def iteration_record(run, cfg, groups, stats, seconds):
    """What the log records of an iteration (collective): every rank's group rewards [M, world * groups], and the
    update's statistics and phase seconds averaged over ranks, with the transformer passes per sample (Table 3)."""
    rewards = torch.cat(all_gather_objects(torch.cat([g.rewards for g in groups], dim=1).cpu(), run.world), 1)
    stats = all_mean({**stats, **{f"time/{k}": v for k, v in seconds.items()}}, run.world, run.device)
    return rewards, {**stats, "nfe_old": cfg.num_steps,
                     "nfe_theta": nfe_theta(len(groups[0].anchors), cfg.group_size, cfg.num_train_steps)}


def setup_distributed(cfg):
    """(rank, world size, device): NCCL on GPU, gloo on CPU; a plain `python neighbor_grpo.py` is a world of one. The
    GPU is made current and its attention kernels chosen here, before any model runs (models.set_attention)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if device.type == "cuda":  # torchrun's local rank, else the device given (--device=cuda:1)
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) if "RANK" in os.environ else device.index or 0)
        torch.cuda.set_device(device)
    set_attention(cfg.attention_backend)
    if "RANK" not in os.environ:
        return 0, 1, device
    if not dist.is_initialized():
        init_process_group("nccl" if device.type == "cuda" else "gloo", cfg.dist_timeout)  # none of a dead round's keys
    return dist.get_rank(), dist.get_world_size(), device


def parallelize(model, cfg, device, world, dtype):
    """FSDP2 (shard) or DDP. FSDP shards an empty (meta) model, then rank 0 broadcasts its weights and each rank keeps
    its shard: no rank but 0 ever holds a full copy (load_pipeline(meta=True) builds theirs without weights)."""
    prepare_blocks(model, cfg.grad_checkpointing, cfg.compile)
    if world == 1:
        return model.to(device)
    if cfg.parallel == "ddp":  # buffers (RoPE tables, SD3's 453 MB pos_embed) never change: not re-sent every step
        return DDP(model.to(device), device_ids=[device.index] if device.type == "cuda" else None,
                   broadcast_buffers=False, gradient_as_bucket_view=True)
    full = model.state_dict() if dist.get_rank() == 0 else {}  # rank 0's CPU tensors: the only full copy
    model.to("meta")
    shard(model, init_device_mesh(device.type, (world,)), dtype)
    model.to_empty(device=device)  # this rank's shards, allocated on the device, then filled from rank 0
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def shard(model, mesh, dtype):
    """FSDP2 on each transformer block, then on the root: compute in dtype, gradients reduced in fp32. The inputs go
    in as DDP and the pipelines pass them (autocast picks each op's dtype): cast, the timestep and RoPE would be bf16."""
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def batches(items, n):
    """items in consecutive lists of at most n."""
    return [items[b: b + n] for b in range(0, len(items), n)]


# =============================================================================
# The machinery, which a reader of the method can skip: the engineering fields, the command line, evaluation, building
# a run, main. Checkpoints and preemption are checkpoints.py's, the guard against reward hacking guard.py's.


@dataclass
class SystemConfig(Config):
    """Config's method and run, plus the engineering around them. A run's config is one of these; every field is set
    as --field=value. The method's fields are Config's, at the top of the file."""

    # models and kernels
    transformer_path: str = ""  # a trained transformer (diffusers format) to start from or evaluate; "" = model_path's
    offload_text_encoders: bool = True  # encode this rank's prompts up front, then move the text encoders to the CPU
    mixed_precision: str = "bf16"  # transformer compute dtype: "bf16" (fp32 master weights) or "fp32"
    attention_backend: str = "cudnn_forward"  # "sdpa" (flash, ...), + cuDNN's no-grad forward on Hopper, "cudnn" (docs)
    compile: bool = False  # torch.compile each transformer block; the first iteration pays ~1.5 min (docs/cost.md)
    grad_checkpointing: bool = True  # recompute each transformer block in the backward pass
    rollout_batch_size: int = 12  # candidates per transformer call during the rollout
    update_batch_size: int = 4  # transitions per transformer call in the update (docs/cost.md); auto (0): what fits
    fp8: str = ""  # FP8 block matmuls (torchao, rowwise): "rollout" (no-grad calls), "all" (docs/fp8.md); "" = off
    # LoRA: low-rank adapters on a frozen base, for one GPU (DanceGRPO's and Flow-GRPO's LoRA scripts)
    lora_rank: int = 0  # 0 = full fine-tuning (the paper); r > 0 = peft LoRA of rank r (Flow-GRPO: 64)
    lora_alpha: float = 128.0  # adapters scale by alpha / r (Flow-GRPO: 128 at r = 64; DanceGRPO: 256 at 128)
    lora_targets: tuple[str, ...] = (  # every attention projection of both block types (Flow-GRPO's list)
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    lora_path: str = ""  # an exported adapter (out_dir/lora) to continue from or evaluate, at the same lora_rank
    base_quantization: str = ""  # "nf4": the frozen base in 4-bit NormalFloat (QLoRA, bitsandbytes); "" = bf16
    export_merged: bool = False  # with LoRA, also export out_dir/transformer with the adapter merged in
    # rewards: where their weights are and how they run
    reward_paths: tuple[str, ...] = ()  # local reward weights as key=path, keys in REWARD_WEIGHTS; default: the hub
    reward_batch_size: int = 4  # images per VAE decode and reward call
    reward_offload: bool = False  # keep the reward models on the CPU, each on the GPU only while it scores
    unifiedreward_url: str = ""  # an OpenAI-compatible server (vLLM, SGLang) serving UnifiedReward: http://host:port/v1
    unifiedreward_question: str = ""  # a text file with the judge's question, {prompt} for the caption; "" = ours
    unifiedreward_score: str = "Alignment Score"  # the answer's line scored (MixGRPO's); "Style Score", "Final Score"...
    unifiedreward_protocol: str = "strict"  # "strict" (answers must parse) or "mixgrpo" (4096 tokens, unparsed left out)
    # evaluation: deterministic ODE samples (sigma = 0) of held-out prompts, every reward, mean +- standard error
    eval_prompts: str = "hpdv2"  # "hpdv2" = the 3200 HPDv2 benchmark prompts (data/hpdv2/prepare.py), or a text file
    eval_size: int = 256  # prompts per evaluation, spread evenly over eval_prompts (0 = all)
    eval_every: int = 50  # iterations between held-out evaluations during training (0 = never)
    eval_rewards: tuple[str, ...] = ()  # more rewards to score in evaluation during training, beside the training ones
    eval_only_rewards: tuple[str, ...] = (  # evaluate.py's: Table 1's columns (the judge only with its URL)
        "hpsv2", "pickscore", "imagereward", "clipscore", "unifiedreward", "aesthetic")
    eval_steps: int = 0  # ODE steps of the evaluation sampler (0 = num_steps)
    eval_batch_size: int = 8  # prompts per transformer call when sampling for evaluation and sample grids
    # the guard against reward hacking: held-out judges never trained on, the best model, stopping (docs/decisions.md)
    guard_rewards: tuple[str, ...] = (  # also scored at every evaluation: Table 1's out-of-domain columns (the judge
        "clipscore", "aesthetic", "unifiedreward")  # only with its URL)
    guard_tolerance: float = 3.0  # a guard has fallen this many standard errors below its best (3: docs/digits.md)
    guard_patience: int = 2  # evaluations in a row with a fallen guard before the run stops (0 = never stop)
    max_skipped_steps: int = 8  # optimizer steps in a row skipped for a non-finite gradient before the run stops
    # system: torchrun, memory, checkpoints, logging
    device: str = "auto"  # "auto" = cuda if available, else cpu
    parallel: str = "fsdp"  # "fsdp" (FSDP2, sharded: FLUX.1-dev needs it) or "ddp" (replicated, for models that fit)
    dist_timeout: int = 3600  # seconds a rank waits in a collective at start-up: rank 0's first 24 GB download (docs)
    steady_timeout: int = 600  # after the first iteration: max(this, 3 iterations); a hung rank ends the run (docs)
    memory_check: bool = True  # refuse, before loading, a recipe predicted not to fit this GPU (preflight.py)
    out_dir: str = "runs/neighbor_grpo"  # log.jsonl, sample grids and checkpoints go here
    overwrite: bool = False  # allow a new run in an out_dir that already holds one
    resume: bool = False  # continue the run in out_dir from its latest checkpoint
    ckpt_every: int = 50  # iterations between checkpoints (0 = only at the end); the latest one is kept
    ckpt_minutes: float = 60.0  # or this many minutes, whichever first (0 = off): 1.3 % stall at 8 GPUs (docs/cluster)
    sample_every: int = 50  # iterations between sample grids (fixed prompts and noise, sigma = 0)
    num_samples: int = 4  # images in a sample grid
    wandb_project: str = ""  # also log every log.jsonl record to this Weights & Biases project (pip install wandb)
    wandb_id: str = ""  # the W&B run id to continue when resuming ("" = a new run)


PARALLEL, PROMPT_DRAWS = ("fsdp", "ddp"), ("subset", "uniform")
ALIASES = {"distance": "distance_reduction"}  # older command lines' names of fields


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite gradients step after step): the message says what is kept."""


def parse_config(argv, config=SystemConfig, presets=PRESETS):
    """--preset=NAME first, then --field=value overrides (configurator.py), then validated."""
    cfg = configure(argv, config, presets, ALIASES, auto=("update_batch_size",))  # --field=auto: 0, build() decides
    validate(cfg)
    return cfg


def validate(cfg):
    """Fail before any model loads, with one line that names the field and the fix."""
    G, B, T, K = cfg.group_size, cfg.num_anchors, cfg.num_steps, cfg.num_train_steps
    one_of = lambda name, allowed: (getattr(cfg, name) in allowed,  # noqa: E731
                                    f"{name}={getattr(cfg, name)}: use one of {', '.join(allowed)}")
    checks = [
        (G >= 2, f"group_size={G}: a group needs at least 2 candidates; use --group_size=12 (paper)"),
        (1 <= B <= G, f"num_anchors={B}: anchors are drawn from the group, need 1 <= B <= group_size={G}"),
        (T >= 1, f"num_steps={T}: need at least one rollout step; use --num_steps=8 (paper)"),
        (1 <= K <= T, f"num_train_steps={K}: transitions are drawn from the rollout, need 1 <= K <= num_steps={T}"),
        one_of("old_anchor", OLD_ANCHORS), one_of("rollout_solver", SOLVERS), one_of("prompt_draw", PROMPT_DRAWS),
        one_of("distance_metric", DISTANCE_METRICS), one_of("distance_reduction", DISTANCE_REDUCTIONS),
        (0 < cfg.noise_sigma < 1, f"noise_sigma={cfg.noise_sigma}: must lie in (0, 1) (eq. 7); use 0.3 (paper)"),
        (0 < cfg.adv_p <= 2, f"adv_p={cfg.adv_p}: the quasi-norm needs 0 < p <= 2 (eq. 11); use 0.8 (paper)"),
        (cfg.clip_range > 0, f"clip_range={cfg.clip_range}: must be > 0; use 1e-4 (paper)"),
        (cfg.temperature > 0, f"temperature={cfg.temperature}: must be > 0; use 1.0 (paper)"),
        (cfg.shift >= 0, f"shift={cfg.shift}: must be >= 0 (0 = dynamic shift, DanceGRPO uses 3.0)"),
        (not cfg.model_path.startswith("random") or re.fullmatch(r"random(:\d+,\d+|-sd3:\d+|-qwen-image:\d+)", cfg.model_path),
         f"model_path={cfg.model_path}: random:D,S (FLUX.1-dev's width, D + S blocks), random-sd3:N, random-qwen-image:N"),
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
        (cfg.attention_backend in ATTENTION_BACKENDS,
         f"attention_backend={cfg.attention_backend}: use one of {', '.join(ATTENTION_BACKENDS)} (docs/cost.md)"),
        (cfg.ckpt_every >= 0, f"ckpt_every={cfg.ckpt_every}: must be >= 0 (0 = only at the end)"),
        (cfg.dist_timeout > 0, f"dist_timeout={cfg.dist_timeout}: must be > 0 seconds; use 3600"),
        (cfg.steady_timeout > 0, f"steady_timeout={cfg.steady_timeout}: must be > 0 seconds; use 600"),
        (cfg.ckpt_minutes >= 0, f"ckpt_minutes={cfg.ckpt_minutes}: must be >= 0 (0 = by iterations only)"),
        (cfg.max_skipped_steps >= 1, f"max_skipped_steps={cfg.max_skipped_steps}: must be >= 1; use 8"),
        (cfg.model_path != str(DIGITS_DIR) or (DIGITS_DIR / "model_index.json").is_file(),
         "preset=digits: data/digits holds no prepared model yet; run python data/digits/prepare.py (minutes on a CPU)"),
        (not cfg.wandb_project or importlib.util.find_spec("wandb"),
         f"wandb_project={cfg.wandb_project}: needs the wandb package (not a requirement): pip install wandb"),
        (not (cfg.resume and cfg.overwrite), "resume and overwrite: pick one; --resume continues the run in out_dir"),
        (min(cfg.groups_per_rank, cfg.rollout_batch_size, cfg.update_batch_size + 1, cfg.reward_batch_size,
             cfg.eval_batch_size) >= 1,
         "groups_per_rank, rollout_batch_size, reward_batch_size and eval_batch_size must be >= 1, update_batch_size "
         ">= 1 or auto"),
        (cfg.sample_every >= 0 and cfg.num_samples >= 1, "sample_every must be >= 0 (0 = never) and num_samples >= 1"),
        (cfg.lora_rank >= 0, f"lora_rank={cfg.lora_rank}: must be >= 0 (0 = full fine-tuning; Flow-GRPO uses 64)"),
        (cfg.lora_alpha > 0, f"lora_alpha={cfg.lora_alpha}: must be > 0; use 2 * lora_rank (Flow-GRPO)"),
        (not cfg.lora_rank or cfg.lora_targets, "lora_targets: name at least one module, e.g. --lora_targets=to_q,to_v"),
        (cfg.base_quantization in ("", "nf4"), f"base_quantization={cfg.base_quantization}: use nf4 or '' (bf16)"),
        (cfg.fp8 in FP8_MODES, f"fp8={cfg.fp8}: use rollout, all, or '' (off)"),
        (not (cfg.fp8 and cfg.base_quantization), f"fp8={cfg.fp8} and base_quantization=nf4: drop one"),
        (not cfg.fp8 or importlib.util.find_spec("torchao"), "fp8 needs torchao: pip install -r requirements.txt"),
        (not cfg.base_quantization or cfg.lora_rank and cfg.parallel == "ddp" and not cfg.export_merged,
         "base_quantization=nf4: a 4-bit base only carries LoRA adapters: add --lora_rank=64 --parallel=ddp (and "
         "merge an adapter onto the bf16 base, not with --export_merged)"),
        (not cfg.base_quantization or importlib.util.find_spec("bitsandbytes"),
         "base_quantization=nf4 needs the bitsandbytes package: pip install -r requirements.txt"),
        (not cfg.lora_rank or cfg.parallel == "ddp",
         "parallel=fsdp: LoRA replicates the frozen base and averages adapter gradients; use --parallel=ddp"),
        (cfg.lora_rank or not (cfg.lora_path or cfg.export_merged),
         "lora_path and export_merged need an adapter: set --lora_rank (the rank the adapter was trained with)"),
        (cfg.eval_size >= 0 and cfg.eval_every >= 0 and cfg.eval_steps >= 0,
         "eval_size, eval_every and eval_steps must be >= 0 (0 = all prompts / never / num_steps)"),
        (not set(cfg.guard_rewards) & set(cfg.rewards), f"guard_rewards: {set(cfg.guard_rewards) & set(cfg.rewards)} "
         "also trained on; a guard is a judge the run never trains on: drop it from --guard_rewards"),
        (cfg.eval_every or not scorable(cfg.guard_rewards, cfg),
         f"guard_rewards={','.join(scorable(cfg.guard_rewards, cfg))}: guards are scored at evaluations; "
         "set --eval_every=N (e.g. 50), or --guard_rewards= for an unguarded run"),
        (cfg.guard_tolerance > 0, f"guard_tolerance={cfg.guard_tolerance}: must be > 0 standard errors; use 3"),
        (cfg.guard_patience >= 0, f"guard_patience={cfg.guard_patience}: must be >= 0 (0 = never stop); use 2"),
        (cfg.kl_coef >= 0, f"kl_coef={cfg.kl_coef}: must be >= 0 (0 = no pull toward the starting model, the paper)"),
    ] + [(False, problem) for problem in reward_config_problems(cfg)]
    require(checks)


def scorable(names, cfg):
    """The rewards of names this config can score: UnifiedReward only with its server's URL."""
    return [n for n in names if n != "unifiedreward" or cfg.unifiedreward_url]


def require(checks):
    """Raise ConfigError with the message of the first failed (ok, message) check."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def compute_dtype(cfg):
    return torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32


# -----------------------------------------------------------------------------
# Prompts and evaluation: one deterministic ODE sample per held-out prompt (sigma = 0), every reward, mean +- s.e.

EXAMPLES = ROOT / "data/examples/prompts.txt"  # the prompts of the paper's Figure 6 and supplementary Figure 1
HPDV2_FILES = dict(prompt_file=ROOT / "data/hpdv2/train.txt", eval_prompts=ROOT / "data/hpdv2/test.txt")


def load_prompts(source, field="prompt_file"):
    """Prompts from a text file (one per line) or a JSON list; "hpdv2": the text files data/hpdv2/prepare.py writes
    (HPDv2's training split for prompt_file, its 3200-prompt benchmark for eval_prompts); "" = the examples."""
    path = Path(HPDV2_FILES[field] if source == "hpdv2" else source or EXAMPLES)
    if source == "hpdv2" and not path.is_file():
        raise ConfigError(f"{field}=hpdv2: {path} is missing; run python data/hpdv2/prepare.py once (it downloads "
                          "HPDv2's prompts), or pass a text file with one prompt per line")
    if not path.is_file():
        raise ConfigError(f"{field}={source}: no such file; pass a text file with one prompt per line, or hpdv2")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{field}={source}: not UTF-8 text (byte {e.start}); save it as UTF-8, one prompt per line")
    lines = json.loads(text) if path.suffix == ".json" else text.splitlines()
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"{field}={source}: holds no prompts; write one prompt per line")
    return prompts


def eval_subset(prompts, size):
    """size prompts spread evenly over the list (every style of HPDv2 alike); all of them when size is 0."""
    if not size or size >= len(prompts):
        return prompts
    return [prompts[i * len(prompts) // size] for i in range(size)]


def eval_grid(pipe, cfg):  # the pipeline's own grid, no training shift, eval_steps steps: the same for any method
    return pipeline_grid(pipe, cfg, cfg.eval_steps or cfg.num_steps, shift=0.0)


@torch.no_grad()
def generate(pipe, prompts, cfg, grid, seed, dtype, cache, indices=None):
    """Inference: one deterministic ODE sample per prompt, eval_batch_size prompts per transformer call, each
    noise neighborhood_noise(sigma = 0, size = 1) of the prompt's index, so the images do not depend on batching
    or on the number of ranks: [N, 3, H, W]."""
    device, images = pipe.vae.device, []
    items = list(zip(range(len(prompts)) if indices is None else indices, prompts))
    for chunk in batches(items, cfg.eval_batch_size):
        cond = stack_conditions([encode_prompt(pipe, prompt, cfg, cache) for _, prompt in chunk])
        x1 = torch.cat([neighborhood_noise(pipe, cfg, group_generator(seed, -1, i), 1, 0.0, device) for i, _ in chunk])
        states, _ = rollout(lambda x, t: velocity(pipe.transformer, x, t, cond, dtype), x1, grid, cfg.rollout_solver)
        images += [decode_images(pipe, x, cfg.resolution) for x in states[:, -1].split(cfg.reward_batch_size)]
    return torch.cat(images)


def eval_indices(n, rank, world):
    """Prompt indices dealt round-robin to this rank, padded so that every rank runs as many forwards (FSDP needs all
    ranks in each one); an index >= n marks padding, which samples the last prompt."""
    return [rank + j * world for j in range(math.ceil(n / world))]


def rank_eval_prompts(prompts, rank, world):  # the ones to encode up front
    return [prompts[min(i, len(prompts) - 1)] for i in eval_indices(len(prompts), rank, world)]


@torch.no_grad()
def evaluate(pipe, prompts, reward_fns, cfg, grid, dtype, cache, rank, world, path, transform=None, paper_rows=None):
    """Rank 0 writes path.json (per-prompt scores, mean, std, standard error), path.md (Table 1's shape, with any
    paper_rows) and path.png (the first num_samples prompts) and returns {reward: dict(mean, std, se, missing)}; other
    ranks return None. transform: what happens to the images before they are scored (evaluate.py's JPEG round trip)."""
    n, rows, samples = len(prompts), [], {}
    for chunk in progress(batches(eval_indices(n, rank, world), cfg.eval_batch_size), f"evaluating {n} prompts", rank):
        js = [min(i, n - 1) for i in chunk]  # every rank runs as many chunks of the same sizes (FSDP)
        images = generate(pipe, [prompts[j] for j in js], cfg, grid, cfg.seed, dtype, cache, indices=js)
        real = [(i, image) for i, image in zip(chunk, transform(images) if transform else images) if i < n]
        scores = score(reward_fns, torch.stack([image for _, image in real]), [prompts[i] for i, _ in real],
                       images.device, cfg.reward_batch_size)
        rows += [(i, scores[:, c].tolist()) for c, (i, _) in enumerate(real)]
        samples.update({i: image.cpu() for i, image in real if i < cfg.num_samples})
    gathered = all_gather_objects((rows, samples), world)
    if rank != 0:
        return None
    return write_evaluation(path, prompts, list(reward_fns), sorted(row for part, _ in gathered for row in part),
                            {i: image for _, part in gathered for i, image in part.items()}, cfg, grid, paper_rows)


def eval_setup(cfg, reward_fns, device, names=(), precision=None):
    """Held-out prompts and the rewards scored on them: names (evaluate.py's), else the training rewards, eval_rewards
    and the guards (the training ones reused as loaded); precision(name) -> the dtype of a reward's towers (default:
    the compute dtype)."""
    prompts = eval_subset(load_prompts(cfg.eval_prompts, "eval_prompts"), cfg.eval_size)
    names = scorable(names or dict.fromkeys([*cfg.rewards, *cfg.eval_rewards, *cfg.guard_rewards]), cfg)
    return prompts, {n: reward_fns[n] if n in reward_fns else
                     load_reward(n, cfg, device, precision(n) if precision else compute_dtype(cfg)) for n in names}


# -----------------------------------------------------------------------------
# Building a run: what the loop holds


@dataclass
class Run:
    """Everything the loop needs, built once by build() (bench.py builds the same)."""

    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    pipe: typing.Any  # the family's diffusers pipeline
    model: torch.nn.Module  # the transformer, parallelised
    optimizer: torch.optim.Optimizer
    method: Method  # NEIGHBOR, or a baseline's hook
    prompts: list
    reward_fns: dict
    weights: tuple
    grid: list
    eval_prompts: list
    eval_fns: dict
    eval_grid: list
    start: int  # the first iteration to run (> 0 when resumed)
    guard: dict  # the guard's state before the evaluation at start (restored when resumed)
    reference: typing.Callable  # () -> a context giving the model the run started from (kl_coef's pull)
    group_ids: range  # this rank's prompt groups
    cache: dict  # prompt -> embeddings


def build(cfg, method=NEIGHBOR):
    """Prompts and rewards (they fail faster than FLUX loads), the pipeline, the parallel model, AdamW, the
    resumed state, and every prompt this rank will meet encoded (known from the seed) before the text encoders
    leave the GPU."""
    rank, world, device = setup_distributed(cfg)
    check_compiler(cfg, device)  # compile=true: a C compiler, before minutes of loading
    dtype = compute_dtype(cfg)
    cfg.update_batch_size = cfg.update_batch_size or auto_update_batch(cfg, device, world)  # auto: what fits here
    require([check_memory(cfg, device, world, rank, PRESETS)])  # preflight.py, before any weight loads
    resume_from = resume_state(cfg, Path(cfg.out_dir), rank, world)
    fetch.require_downloads(cfg)  # every download here, or (offline) all missing ones named at once
    prompts = load_prompts(cfg.prompt_file)
    home = torch.device("cpu") if cfg.reward_offload else device  # where the reward models wait between calls
    reward_fns = {name: load_reward(name, cfg, home, dtype) for name in cfg.rewards}
    cpu = torch.device("cpu")  # the guards wait there: each holds the GPU only while it scores
    eval_prompts, eval_fns = eval_setup(cfg, reward_fns, cpu) if cfg.eval_every else ([], {})
    pipe = load_pipeline(cfg, device, dtype, meta=world > 1 and cfg.parallel == "fsdp" and rank > 0)
    frozen = starting_model(pipe.transformer, cfg, device, world, dtype) if cfg.kl_coef and not cfg.lora_rank else None
    model = parallelize(pipe.transformer, cfg, device, world, dtype)
    model.train()
    reference = functools.partial(adapters_off, model) if cfg.lora_rank else lambda: contextlib.nullcontext(frozen)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,  # or the adapters
                                  weight_decay=cfg.weight_decay, fused=device.type == "cuda")  # no fp32 temporary
    start, guard_state = restore(model, optimizer, cfg, resume_from, rank, world) if resume_from else (0, {})
    group_ids = range(rank * cfg.groups_per_rank, (rank + 1) * cfg.groups_per_rank)
    cache = {}
    met = [group_prompt(prompts, cfg, it, g, world * cfg.groups_per_rank)[0] for it in range(start, cfg.iterations)
           for g in group_ids]
    encode_prompts(pipe, met + prompts[: cfg.num_samples] + rank_eval_prompts(eval_prompts, rank, world), cfg, cache, rank)
    return Run(rank, world, device, dtype, pipe, model, optimizer, method, prompts, reward_fns, reward_mix(cfg),
               pipeline_grid(pipe, cfg, cfg.num_steps), eval_prompts, eval_fns,
               eval_grid(pipe, cfg), start, guard_state, reference, group_ids, cache)


def starting_model(transformer, cfg, device, world, dtype):
    """kl_coef's reference with full fine-tuning: the transformer as the run starts, frozen in the compute dtype and
    sharded like the trained one under FSDP (made before parallelize() and restore() change the original)."""
    frozen = copy.deepcopy(transformer).requires_grad_(False).to(dtype)
    if world > 1 and cfg.parallel == "fsdp":
        return parallelize(frozen, dataclasses.replace(cfg, grad_checkpointing=False, compile=False), device, world,
                           dtype)
    return frozen.to(device)


def encode_prompts(pipe, prompts, cfg, cache, rank=0):
    """Fill the prompt-embedding cache, then move the idle text encoders (T5-XXL: 9.5 GB) off the GPU."""
    for prompt in progress(dict.fromkeys(prompts), "encoding prompts", rank):
        encode_prompt(pipe, prompt, cfg, cache)
    for encoder in text_encoders(pipe) if cfg.offload_text_encoders else ():
        encoder.to("cpu")


def main(argv=None, parse=parse_config, job=train):
    """job(parse(argv)): training here, sde_grpo.py's baseline, evaluate.py's and bench.py's runs. What cannot work
    ends in one line on stderr and exit status 2."""
    try:
        argv, job = fetch.dispatch(sys.argv[1:] if argv is None else argv, job)  # --fetch: download instead
        return job(parse(argv))
    except (ConfigError, CheckpointError, ModelError, RewardError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
