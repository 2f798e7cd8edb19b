"""
SDE-GRPO, the baseline Neighbor GRPO reinterprets (DanceGRPO, Flow-GRPO; the paper's eq. 5 and supp. Sec. 2), in
DanceGRPO's FLUX setting: G SDE trajectories from one shared noise, a Gaussian policy per step, std-normalised
advantages, every sample trained on K of its steps. It reuses neighbor_grpo's loop (models, rewards, distributed
update, logging, checkpoints, evaluation) through one hook, neighbor_grpo.Method; only what differs is here.

    python sde_grpo.py --preset=tiny                     # the tiny random model on CPU
    torchrun --nproc_per_node=8 sde_grpo.py              # FLUX.1-dev, Table 3's setting: 25 steps, K = 14 of all 12
    python bench.py --preset=tiny --compare              # side by side with Neighbor GRPO

Every neighbor_grpo field (Config, SystemConfig) applies (--field=value), plus sde_eta and sde_samples_per_step.
"""

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass

import torch

import neighbor_grpo as ng


@dataclass
class SDEConfig(ng.SystemConfig):
    num_steps: int = 25  # T SDE steps (Table 3: DanceGRPO samples 25)
    num_train_steps: int = 14  # K of each sample's first T - 1 transitions (DanceGRPO: timestep_fraction 0.6)
    shift: float = 3.0  # static time shift (DanceGRPO's scripts)
    out_dir: str = "runs/sde_grpo"
    sde_eta: float = 0.3  # SDE noise: sigma_t = eta * sqrt(t_k - t_{k+1}) (DanceGRPO)
    sde_samples_per_step: int = 12  # samples accumulated per optimizer step (DanceGRPO's FLUX scripts: 12 = a group)


# what SDEConfig changes in a neighbor_grpo config (bench.py runs both methods from one config)
DANCEGRPO = {f.name: f.default for f in dataclasses.fields(SDEConfig)
             if f.name != "out_dir" and f.default != getattr(ng.SystemConfig, f.name, f.default)}
PRESETS = {name: {**p, **({"out_dir": p["out_dir"] + "_sde"} if "out_dir" in p else {})}
           for name, p in ng.PRESETS.items()}
PRESETS["dancegrpo"] = PRESETS["flux-dev"]  # Table 3's SDE baseline on FLUX.1-dev (train.sh dancegrpo)


def parse_config(argv):
    cfg = ng.parse_config(argv, SDEConfig, PRESETS)
    T, K = cfg.num_steps, cfg.num_train_steps
    ng.require([
        (K <= T - 1, f"num_train_steps={K}: the SDE baseline never trains the step into t = 0, need K <= num_steps - 1 "
                     f"= {T - 1}"),
        (cfg.sde_eta > 0, f"sde_eta={cfg.sde_eta}: must be > 0; use 0.3 (DanceGRPO)"),
        (cfg.fp8 != "rollout", "fp8=rollout: the SDE baseline's pi_old is its FP8 rollout's, the update's would not be; "
                               "use --fp8=all"),
        (cfg.sde_samples_per_step >= 1,
         f"sde_samples_per_step={cfg.sde_samples_per_step}: must be >= 1; use 12 (DanceGRPO) or 1 (a step a sample)")])
    return cfg


# -----------------------------------------------------------------------------
# The SDE step, its Gaussian policy and the rollout


def sde_step(x, v, t, t_next, eta):
    """SDE-GRPO's step (eq. 5; supp. eq. 4): mean x_ODE - sigma_t^2 / (2t) eps_hat with eps_hat = x + (1 - t) v,
    standard deviation sigma_t = eta sqrt(t - t_next). Returns (mean, sigma_t)."""
    sigma_t = eta * math.sqrt(t - t_next)
    return ng.euler_step(x, v, t, t_next) - sigma_t**2 / (2 * t) * (x + (1 - t) * v), sigma_t


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
    states.append(ng.euler_step(states[-1], v_fn(states[-1], grid[-2]), grid[-2], grid[-1]))
    return torch.stack(states, dim=1), torch.stack(log_probs, dim=1)


def sde_group_rollout(pipe, cond, cfg, grid, gen, dtype):
    """A group: G SDE trajectories from one shared initial noise (DanceGRPO's init_same_noise)."""
    x1 = ng.draw_noise(pipe, 1, cfg.resolution, gen, pipe.vae.device)
    x1 = x1.expand(cfg.group_size, *x1.shape[1:])
    v_fn = lambda x, t: ng.velocity(pipe.transformer, x, t, cond, dtype)  # noqa: E731
    parts = [sde_rollout(v_fn, x, grid, cfg.sde_eta, gen) for x in x1.split(cfg.rollout_batch_size)]
    return torch.cat([states for states, _ in parts]), torch.cat([log_probs for _, log_probs in parts])


# -----------------------------------------------------------------------------
# Advantages, what is trained, the objective: the hook into neighbor_grpo's loop


def std_advantages(rewards):
    """Standard GRPO advantages (eq. 3): centred rewards over their standard deviation."""
    r = rewards.double()
    c, std = r - r.mean(-1, keepdim=True), r.std(-1, keepdim=True)
    return torch.where(std > 0, c / std.clamp_min(1e-300), torch.zeros_like(c)).to(rewards.dtype)


def sample_sde_steps(G, T, K, gen):
    """Every sample is trained, each on K of its first T - 1 transitions (DanceGRPO: per sample, the last ignored)."""
    return torch.randperm(G, generator=gen).tolist(), [sorted(torch.randperm(T - 1, generator=gen)[:K].tolist())
                                                       for _ in range(G)]


@dataclass
class SDEGroup:
    """One prompt's SDE group: states, each transition's log-probability under theta_old, rewards, advantages, and
    the samples trained (every one, each its own anchor) with their transitions."""

    prompt: str
    cond: typing.Any  # the family's Condition
    states: torch.Tensor  # [G, T + 1, L, C]
    logp_old: torch.Tensor  # [G, T - 1]
    rewards: torch.Tensor  # [M, G]
    adv: torch.Tensor  # [G]
    anchors: list
    steps: list


def sde_group(prompt, cond, states, logp_old, rewards, weights, cfg, gen):
    """After the rollout: std advantages (combined over reward models as Neighbor GRPO does) and the steps trained."""
    adv = ng.group_advantages(std_advantages(rewards), weights)
    anchors, steps = sample_sde_steps(cfg.group_size, cfg.num_steps, cfg.num_train_steps, gen)
    return SDEGroup(prompt, cond, states, logp_old, rewards, adv.to(states.device), anchors, steps)


def sde_objective(terms, x, v, grid, cfg):
    """J_{j,k} (eq. 4) of each transition (group, sample j, step k), v_theta at X[j, k] given: sample j's own Gaussian
    policy ratio at step k, clipped. Per transition [n]: J, clip fraction, |log rho|."""
    out = []
    for (group, j, k), x_jk, v_jk in zip(terms, x, v):
        mean, std = sde_step(x_jk[None], v_jk[None], grid[k], grid[k + 1], cfg.sde_eta)
        logp = gaussian_log_prob(group.states[j, k + 1][None], mean, std)
        J, clip_frac = ng.grpo_objective(group.adv[j:j + 1], logp, group.logp_old[j, k:k + 1], cfg.clip_range)
        out.append((J, clip_frac, (logp - group.logp_old[j, k]).detach().abs().mean()))
    return [torch.stack(column) for column in zip(*out)]


# one optimizer step per sde_samples_per_step samples, the loss averaged over them (DanceGRPO's accumulation)
SDE = ng.Method(lambda cfg: f"SDE-GRPO | eta={cfg.sde_eta}", sde_group_rollout, sde_group, sde_objective,
                lambda cfg: cfg.sde_samples_per_step)


def main(argv=None):
    ng.main(argv, parse_config, functools.partial(ng.train, method=SDE))


if __name__ == "__main__":
    main()
