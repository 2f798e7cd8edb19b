"""
What a GPU can do with this code, in minutes and with no download. The first command on a new GPU:

    python doctor.py --plan                             # what would run, each check's estimate and the total
    python doctor.py --out=runs/doctor                  # every recipe within 8 minutes (--budget=480) on an H100/H200
    python doctor.py --out=runs/more --only=lora-cudnn-forward,lora-compiled,lora-no-checkpointing,profile,flops

The default run, in order of what a user must know first, each check in a process of its own on a GPU (a kernel that
corrupts memory poisons only its own CUDA context; --isolate=false runs them here), each killed at its share of what
is left of --budget (seconds; what does not fit is listed as skipped, with why; ESTIMATES: an H200's seconds):
  kernels        the bf16 matmul rate (MFU's denominator), bf16 against fp64, NF4 as training runs it (4096 rows,
                 forward and backward through bitsandbytes' MatMul4Bit) against fp32, an all-reduce, and the SDPA
                 kernel training calls with and without a gradient under each attention_backend (models.set_attention),
                 at FLUX's call in diffusers' layout (permuted, non-contiguous q, k, v; 24 heads, 2537 tokens)
  preset         flux-dev-lora as it ships (compiled, cuDNN's forward, no checkpointing) at FLUX.1-dev's 19 + 38
                 blocks: a sample grid and an evaluation batch, then two iterations (the first's compile time apart
                 from the steady one), the variants each block kind compiled
  attention-flash, attention-efficient, attention-cudnn
                 one SDPA backend, forward and backward, at each family's real transformer call (FLUX's double and
                 single blocks, SD3.5's joint blocks, Qwen-Image's block; their widths, 512² to 1024²) in bf16 against
                 an fp32 math reference: WRONG if its error is over 3x the math backend's in bf16
  gradient       a real update step's gradient (full fine-tuning, 1 + 2 blocks): finite, and bf16 against fp32
  nf4-lora, full, sde, lora-eager
                 real iterations (bench.setup: random weights at FLUX.1-dev's width, the most blocks up to --blocks
                 whose preflight prediction fits): NF4 + LoRA; full fine-tuning; the SDE baseline in DanceGRPO's
                 setting (Table 3's ratio); LoRA r=64 eager
Each timed run: s/iteration and per phase, the first iteration, the peak memory beside preflight.gpu_phases'
prediction (within +2 % or 0.5 GiB it matches; above, preflight is named wrong, not the run), |log rho| at theta_old
against 1e-5 with its margin. The studies, a second run by name (--only): the LoRA levers one by one (cuDNN's forward,
compiled blocks, no checkpointing), an eager iteration profiled (profile_eager.txt), its FLOPs counted beside
bench.py --meta's (MFU). doctor.json and doctor.md in --out are rewritten after every check, so a time-out or a kill
keeps what was measured; logs/NAME.log holds each process's output. On a CPU the same checks run in this process on
the tiny models, eagerly, in seconds, the CUDA-only ones listed as skipped.
"""
import dataclasses
import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import bench
import flux
import models
import neighbor_grpo as ng
import preflight
import sde_grpo
from report import clock

ROOT = Path(__file__).resolve().parent
BF16_TFLOPS = {"H100": 989, "H200": 989, "H800": 989, "H20": 148, "A100": 312, "A800": 312, "L40S": 362, "L40": 181,
               "A6000": 155, "4090": 165, "L4": 121, "A10": 125}  # dense bf16 peaks from the vendors' sheets
DOCTOR_BLOCKS = ("19,38", "10,20", "6,12", "4,8", "2,4", "1,2")  # FLUX.1-dev's width, D double + S single blocks
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}  # the SDPA backends checked, each in its own process on a GPU
WRONG = 3.0  # a backend's bf16 error this many times the math backend's is a wrong kernel, not round-off
MAX_LOG_RATIO = 1e-5  # |log rho| at theta_old above this: the rollout's and the update's kernels disagree
PEAK_TOLERANCE = (0.02, 0.5)  # a peak above preflight's prediction by at most 2 % or 0.5 GiB (the larger) matches
TIMEOUT = (60, 3)  # a check's process is killed after the larger of 60 s and 3x its estimate (or what is left)


@dataclasses.dataclass
class Check:
    name: str  # --only, --one and logs/NAME.log
    label: str  # the report's
    kind: str  # the function that runs it (KINDS)
    estimate: float  # seconds on an H100/H200: it is skipped when less of the budget is left
    spec: dict  # its arguments (JSON: a child process reads them)
    skip: str = ""  # why it does not run here


# -----------------------------------------------------------------------------
# kernels: the device, matmuls, NF4, collectives, the attention kernel training calls


def gemm_rate(device):
    """FLOP/s of a large matmul in the recipes' compute dtype (bf16 on a GPU, fp32 on a CPU): MFU's denominator."""
    n, dtype, repeats = (8192, torch.bfloat16, 20) if device.type == "cuda" else (512, torch.float32, 10)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / bench.timed(lambda: a @ b, device, repeats)


def fp8_gemm_rate(device):
    """FLOP/s of a large rowwise-scaled FP8 matmul (torch._scaled_mm, e4m3, bf16 out: what --fp8's Float8Linear runs),
    the second MFU denominator; None where the GPU has no FP8 matmul (before Hopper / Ada) or on a CPU."""
    if device.type != "cuda":
        return None
    n, fp8 = 8192, torch.float8_e4m3fn
    a, b = (torch.randn(n, n, device=device).to(fp8) for _ in range(2))
    scale_a, scale_b = torch.ones(n, 1, device=device), torch.ones(1, n, device=device)
    try:
        # fast accumulation: Float8Linear's forward (torchao's gemm_config_output); without it the rowwise kernel
        # is the slow one torchao avoids (float8_ops.addmm_float8_unwrapped), and the rate would understate FP8
        return 2 * n**3 / bench.timed(lambda: torch._scaled_mm(a, b.t(), scale_a, scale_b, out_dtype=torch.bfloat16,
                                                               use_fast_accum=True), device, 20)
    except RuntimeError:  # no FP8 tensor cores here
        return None


def check_bf16(device):
    a, b = (torch.randn(512, 512, generator=torch.Generator().manual_seed(i)).to(device) for i in (0, 1))
    exact = a.double() @ b.double()
    error = ((a.bfloat16() @ b.bfloat16()).double() - exact).norm() / exact.norm()
    return {"relative_error": error.item(), "expected": "below 1e-2 (bf16 has 8 bits of mantissa)"}


def check_nf4(device):
    """NF4 as training runs it: models.quantize_base's layer (FLUX's MLP up-projection, 3072 -> 12288; smaller on a
    CPU) at 4096 rows, forward and backward through bitsandbytes' MatMul4Bit (the weight dequantized, then a bf16
    matmul), against fp32 on the same dequantized weight (the kernels' error); and its output against the bf16 layer
    it was quantized from (the 4-bit rounding)."""
    import bitsandbytes as bnb

    width, rows = (3072, 4096) if device.type == "cuda" else (256, 4096)
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(width, 4 * width))
    x, grad = torch.randn(rows, width, generator=gen), torch.randn(rows, 4 * width, generator=gen)
    bf16 = layer.to(device, torch.bfloat16)(x.to(device, torch.bfloat16)).float()
    models.quantize_base(layer, torch.bfloat16, device)
    nf4, x4 = layer[0], x.to(device, torch.bfloat16).requires_grad_()
    out = nf4(x4)
    out.backward(grad.to(device, torch.bfloat16))
    weight = bnb.functional.dequantize_4bit(nf4.weight.data, nf4.weight.quant_state).float()
    x32 = x4.detach().float().requires_grad_()
    exact = torch.nn.functional.linear(x32, weight, nf4.bias.float())
    exact.backward(grad.to(device))
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    return {"rows": rows, "path": type(out.grad_fn).__name__, "out_vs_fp32": rel(out, exact),
            "dx_vs_fp32": rel(x4.grad, x32.grad), "nf4_vs_bf16": rel(out, bf16),
            "expected": "below 1e-2 against fp32 (bf16 round-off); about 0.1 against the bf16 layer (4-bit weights)"}


def check_collectives(device):
    """An all-reduce over a world of one (NCCL on a GPU, gloo on a CPU)."""
    import tempfile

    backend, own = ("nccl" if device.type == "cuda" else "gloo"), not ng.dist.is_initialized()
    if own:
        ng.dist.init_process_group(backend, store=ng.dist.FileStore(tempfile.mktemp(), 1), rank=0, world_size=1)
    try:
        t = torch.ones(4, device=device)
        ng.dist.all_reduce(t)
        return {"backend": ng.dist.get_backend(), "all_reduce": t[0].item() == ng.dist.get_world_size()}
    finally:
        if own:
            ng.dist.destroy_process_group()


def training_attention(device):
    """The SDPA kernel PyTorch picks at FLUX's attention call (720²: 2537 tokens, 24 heads of 128, bf16) with and
    without a gradient, under the flags models.set_attention sets for each attention_backend (the process's default
    put back after). q, k, v in diffusers' layout: [B, L, H, D] permuted to [B, H, L, D], non-contiguous views, as
    its attention dispatch hands them to SDPA."""
    shape, dtype = ((2, 2537, 24, 128), torch.bfloat16) if device.type == "cuda" else ((2, 64, 2, 16), torch.float32)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype).requires_grad_().permute(0, 2, 1, 3) for _ in range(3))
    picked = lambda: SDPBackend(torch._fused_sdp_choice(q, k, v)).name.lower()  # noqa: E731
    out = {}
    for backend in models.ATTENTION_BACKENDS:
        models.set_attention(backend)
        with_grad = picked()
        with torch.no_grad(), models.no_grad_attention():
            out[backend] = {"with gradient": with_grad, "no gradient": picked()}
    models.set_attention(ng.SystemConfig.attention_backend)
    return out


def check_kernels(spec, device, found):
    """The device and its kernels: found is filled as each is measured (a crash keeps the ones before)."""
    import bitsandbytes
    import diffusers

    cuda = device.type == "cuda"
    found.update(device=torch.cuda.get_device_name(device) if cuda else "no GPU: the CPU (tiny models)",
                 memory_gib=cuda and torch.cuda.get_device_properties(device).total_memory / 2**30 or None,
                 usable_gib=cuda and models.device_memory(device) / 2**30 or None,
                 torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                 diffusers=diffusers.__version__, bitsandbytes=bitsandbytes.__version__)
    found["gemm_tflops"] = gemm_rate(device) * 1e-12
    found["fp8_gemm_tflops"] = (fp8_gemm_rate(device) or 0) * 1e-12 or None
    for name, check in (("bf16 matmul", check_bf16), ("collectives", check_collectives),
                        ("training's attention kernel", lambda d: {"by attention_backend": training_attention(d)}),
                        ("bitsandbytes NF4", check_nf4)):
        found[name] = checked(functools.partial(check, device))
    return found


def checked(fn):
    """{"ok": True, **fn()} or {"ok": False, "error": its first line}: a failed kernel is a finding."""
    try:
        return {"ok": True, **fn()}
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "error": first_line(e)}


def first_line(e):
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"


# -----------------------------------------------------------------------------
# attention: forward and backward at each family's real call, bf16 against an fp32 math reference


def attention_cases(device):
    """(label, family module, sizes, preset, resolutions) of each family's attention call: FLUX's double and single
    blocks, SD3.5 Medium's first two joint blocks (both with its second attention, the last with the text stream's
    end), a Qwen-Image block; at their widths on a GPU, tiny on a CPU."""
    import qwen_image
    import sd3

    if device.type != "cuda":
        return [("FLUX double block", flux, {**flux.TINY, "layers": 1, "single_layers": 0}, "tiny", (64,)),
                ("FLUX single block", flux, {**flux.TINY, "layers": 0, "single_layers": 1}, "tiny", (64,)),
                ("SD3.5 joint blocks", sd3, sd3.TINY, "tiny-sd3", (64,)),
                ("Qwen-Image block", qwen_image, qwen_image.TINY, "tiny-qwen-image", (64,))]
    sides = (512, 720, 1024)
    return [("FLUX double block", flux, {**flux.FLUX_DEV, "layers": 1, "single_layers": 0}, "flux-dev", sides),
            ("FLUX single block", flux, {**flux.FLUX_DEV, "layers": 0, "single_layers": 1}, "flux-dev", sides),
            ("SD3.5 joint blocks", sd3, sd3.random_sizes("random-sd3:2"), "sd3.5-medium", sides),
            ("Qwen-Image block", qwen_image, qwen_image.random_sizes("random-qwen-image:1"), "qwen-image", sides)]


def on_device(cond, device):
    return dataclasses.replace(cond, **{f.name: getattr(cond, f.name).to(device) for f in dataclasses.fields(cond)
                                        if isinstance(getattr(cond, f.name), torch.Tensor)})


def attention_pass(model, x0, cond, backend, dtype):
    """The family's velocity call (autocast to dtype) through one SDPA backend, and its backward from a fixed
    output gradient: (output, d input, d parameters), fp32."""
    model.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_()
    with sdpa_kernel(backend):
        v = models.velocity(model, x, 0.5, cond, dtype)
    weight = torch.randn(v.shape, generator=torch.Generator().manual_seed(1)).to(v.device)
    (v * weight).sum().backward()
    grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])
    return v.detach(), x.grad, grads


def attention_errors(case, side, backend, device):
    """Relative errors (out, dx, dW) of the math backend in bf16 and of backend in bf16 against fp32 math."""
    _, fam, sizes, preset, _ = case
    cfg = ng.parse_config([f"--preset={preset}", f"--resolution={side}", "--prompt_file=",
                           "--rewards=jpeg_compressibility", "--guard_rewards="] +
                          (["--max_sequence_length=32"] if device.type != "cuda" else []))
    torch.manual_seed(0)
    with torch.device(device):  # the class's own initialisation, on the device
        model = fam.meta_transformer(sizes)
    x0 = torch.randn(1, *fam.meta_shapes(cfg, sizes)[0], device=device)
    cond = on_device(fam.meta_condition(cfg, sizes), device)
    reference = attention_pass(model, x0, cond, SDPBackend.MATH, torch.float32)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    errors = lambda run: dict(zip(("out", "dx", "dW"), map(rel, run, reference)),  # noqa: E731
                              finite=all(bool(torch.isfinite(t).all()) for t in run))
    out = {"tokens": fam.meta_shapes(cfg, sizes)[2] + cond.prompt_embeds.shape[1],
           "math": errors(attention_pass(model, x0, cond, SDPBackend.MATH, torch.bfloat16))}
    out[backend] = checked(lambda: errors(attention_pass(model, x0, cond, BACKENDS[backend], torch.bfloat16)))
    return out


def check_attention(spec, device, found):
    """One SDPA backend at every family's call and resolution: found["calls"][label][side] as each is measured."""
    calls = {}
    for case in attention_cases(device):
        for side in case[4]:
            calls.setdefault(case[0], {})[f"{side}²"] = attention_errors(case, side, spec["backend"], device)
            found["calls"] = calls  # written now: a crash at the next keeps this one
    return found


def attention_verdict(errors, backend, parts=("out", "dx", "dW")):
    """"ok", "WRONG: ..." (not finite, or an error in parts over WRONG times the math backend's in bf16) or the
    failure; parts=("out",): its forward alone (a call without gradient)."""
    mine, math_ = errors.get(backend, {}), errors["math"]
    if not mine.get("ok", False):
        return f"failed: {mine.get('error', 'not run')}"
    worse = [k for k in parts if not mine[k] <= WRONG * math_[k]]  # NaN is worse
    if worse or (len(parts) > 1 and not mine["finite"]):
        return "WRONG: " + (", ".join(f"{k} {mine[k]:.2g} vs math's {math_[k]:.2g}" for k in worse) or "not finite")
    return "ok"


def training_verdict(report, kernel, call):
    """What the attention checks say of the kernel training calls ("with gradient": forward and backward)."""
    backend = kernel.removesuffix("_attention")
    check = report["checks"].get(f"attention-{backend}", {})
    if "calls" not in check:
        return f"{kernel}, not checked"
    parts = ("out",) if call == "no gradient" else ("out", "dx", "dW")
    bad = [f"{case}, {side}: {v}" for case, sides in check["calls"].items() for side, e in sides.items()
           if (v := attention_verdict(e, backend, parts)) != "ok"]
    return f"{kernel}, " + (f"{bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "") if bad else "ok")


# -----------------------------------------------------------------------------
# gradient: a real update step's gradient, finite, bf16 against fp32


def check_gradient(spec, device, found):
    """One group rolled out (bf16) and the first anchor's optimizer step's gradient (step_gradient, the loop's own
    calls): as configured, then with a clip range that clips nothing in bf16 and in fp32 (the same stored states
    and pi_old; clipping would cut the two at different ratios), the relative error of the transformer's gradient."""
    cfg = ng.parse_config(spec["args"])
    s = bench.setup(cfg, "")
    group = ng.make_group(s, cfg, s.prompts[0], ng.group_generator(cfg.seed, 0, 0))
    terms = [(group, group.anchors[0], k) for k in group.steps[0]]

    def gradient(run, c):
        ng.step_gradient(run.model, run.method, terms, run.grid, c, run.dtype, run.reference)
        return torch.cat([p.grad.flatten().float() for p in run.model.parameters() if p.grad is not None])

    real = gradient(s, cfg)
    found.update(finite=bool(torch.isfinite(real).all()), norm=real.norm().item(), blocks=cfg.model_path)
    unclipped = dataclasses.replace(cfg, clip_range=1e6)
    low, full = gradient(s, unclipped), gradient(dataclasses.replace(s, dtype=torch.float32), unclipped)
    found.update(bf16_vs_fp32=((low - full).norm() / full.norm()).item(),
                 cosine=torch.nn.functional.cosine_similarity(low, full, dim=0).item(),
                 expected="about 1e-2 (bf16 round-off through the blocks)")
    s.optimizer.zero_grad(set_to_none=True)
    return found


# -----------------------------------------------------------------------------
# timed iterations: the loop's own iteration on a random model at FLUX.1-dev's width


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def check_iterations(spec, device, found):
    """Build the run as training does (bench.setup), the sample grid's and evaluation's calls first where asked, run
    spec["iterations"] iterations (the last one timed, its peak memory read; the first less it: compile time), then
    untimed where asked: one profiled, one under the FLOP counter, and --meta's count of the same config."""
    sde = spec["method"] == "sde"
    cfg = (sde_grpo.parse_config if sde else ng.parse_config)(spec["args"])
    method = sde_grpo.SDE if sde else ng.NEIGHBOR
    s = bench.setup(cfg, "", method)
    if spec.get("warmup"):  # one iteration timed: its transformer calls run once before (lazy kernels, the allocator)
        found.update(unit_costs_s=bench.unit_costs(s, cfg))
    if spec.get("sampling"):  # as a run begins: a sample grid, then an evaluation's batch (compiled: their variants)
        found.update(sampling_s=sampling(s, cfg, device))
    seconds = []
    for i in range(spec["iterations"]):
        reset_peak(device)
        timings, _, stats = bench.one_iteration(s, cfg, i)
        seconds.append(timings["total"])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    found.update(s_per_iteration=timings["total"], phases_s={k: v for k, v in timings.items() if k != "total"},
                 first_iteration_s=seconds[0], compile_s=seconds[0] - seconds[-1] if cfg.compile and len(seconds) > 1
                 else None, peak_gib=peak, abs_log_ratio=stats["first_anchor_abs_log_ratio"],
                 clip_frac=stats["clip_frac"], grad_norm=stats["grad_norm"], finite=math.isfinite(stats["loss"]) and not stats["skipped_steps"],
                 GTBK=f"{cfg.group_size}, {cfg.num_steps}, {bench.trained_per_group(cfg)}, {cfg.num_train_steps}")
    if cfg.compile:  # every batch size the run met by now: the static set prepare_blocks names
        found.update(compiled_variants=models.compiled_variants(s.model))
    if spec.get("profile"):
        found.update(profile=checked(lambda: profile_iteration(s, cfg, len(seconds), device, Path(spec["profile"]))))
    if spec.get("count"):
        counted = checked(lambda: {"flops": bench.count_flops(lambda: bench.one_iteration(s, cfg, len(seconds) + 1))})
        found.update(tflop_counted=counted["flops"] * 1e-12 if counted["ok"] else None,
                     count_error=counted.get("error"))
    if spec.get("meta"):
        found.update(tflop_meta=meta_flops(cfg) * 1e-12)
    return found


def sampling(s, cfg, device):
    """Seconds of the sample grid (num_samples prompts) and of one evaluation batch (eval_batch_size, on its grid),
    through the loop's own sampler (neighbor_grpo.generate); the prompts are ones build() encoded."""
    prompts, out = s.prompts[: cfg.num_samples], {}
    for name, batch, grid in (("sample grid", prompts, s.grid),
                              ("evaluation", (prompts * cfg.eval_batch_size)[: cfg.eval_batch_size], s.eval_grid)):
        t0 = clock(device)
        ng.generate(s.pipe, batch, cfg, grid, cfg.seed, s.dtype, s.cache)
        out[name] = clock(device) - t0
    return out


def profile_iteration(s, cfg, iteration, device, path):
    """One iteration under torch.profiler: the top 15 kernels by device time (CPU time on a CPU) to path."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        bench.one_iteration(s, cfg, iteration)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:15]
    total = sum(getattr(e, key) for e in prof.key_averages()) or 1
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=100))
    return {"file": str(path), "top": [(e.key[:100], getattr(e, key) / total) for e in events]}


def meta_flops(cfg):
    """bench.py --meta's FLOPs of one iteration per group for cfg, on fake tensors: G / rollout_batch_size * T rollout
    forwards, B optimizer steps, the VAE decodes (bench.iteration_flops)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fam = models.family(cfg.model_path)
    sizes, dtype = fam.model_sizes(cfg.model_path), ng.compute_dtype(cfg)
    _, vae_input, L = fam.meta_shapes(cfg, sizes)
    grid = ng.time_grid(cfg.num_steps, L, fam.SCHEDULER, cfg.shift)
    meta_model = bench.meta_transformer(cfg, sizes, dtype)
    with FakeTensorMode():
        with bench.default_dtype(dtype):
            vae = fam.meta_vae(sizes)
        model, optimizer = bench.meta_training(cfg, meta_model, None, dtype)
        groups = [bench.meta_group(cfg, sizes) for _ in range(cfg.groups_per_rank)]
        run = bench.meta_run(model, optimizer, cfg, grid, dtype)
        f_roll = bench.count_flops(lambda: bench.rollout_forward(model, cfg, groups[0], grid, dtype))
        f_step = bench.count_flops(lambda: bench.update_step(run, cfg, groups))
        latents = torch.randn(cfg.reward_batch_size, *vae_input, dtype=dtype)
        with torch.no_grad():
            f_vae = bench.count_flops(lambda: vae.decode(latents))
    return bench.iteration_flops(cfg, f_roll, f_step, f_vae)["total"]


KINDS = dict(kernels=check_kernels, attention=check_attention, gradient=check_gradient, iterations=check_iterations)


# -----------------------------------------------------------------------------
# the plan: what runs, in order of importance, with what


SMALL = ["--rewards=jpeg_compressibility", "--prompt_file=", "--eval_every=0", "--sample_every=0", "--guard_rewards=",
         "--parallel=ddp", "--memory_check=false", "--iterations=4"]  # no download, no evaluation, one process
TINY = ["--preset=tiny", "--group_size=4", "--num_anchors=2", "--num_steps=4", "--num_train_steps=2", *SMALL]  # a
# CPU's smoke test of the same code (the SDE baseline's too: not DanceGRPO's 25 steps there)
RECIPES = dict(  # (preset at FLUX.1-dev's width, the fields that carry over to the tiny preset)
    full=("flux-dev", dict(grad_checkpointing=True)),
    lora=("flux-dev-lora", dict(lora_rank=4, lora_alpha=8.0, grad_checkpointing=False, update_batch_size=2)),
    nf4=("flux-dev-24gb", dict(lora_rank=4, lora_alpha=8.0, base_quantization="nf4", reward_offload=True,
                               grad_checkpointing=True)))
EAGER = dict(compile=False, attention_backend="sdpa", grad_checkpointing=True, update_batch_size=4)  # no lever on
LEVERS = (  # the LoRA recipe's settings, each adding a lever to the one before (update_batch_size 0: by memory)
    ("lora-cudnn-forward", "LoRA, + cuDNN's forward", {**EAGER, "attention_backend": "cudnn_forward"}),
    ("lora-compiled", "LoRA, + compiled blocks", {**EAGER, "attention_backend": "cudnn_forward", "compile": True}),
    ("lora-no-checkpointing", "LoRA, + no checkpointing", dict(compile=True, attention_backend="cudnn_forward",
                                                              grad_checkpointing=False, update_batch_size=0)))
FP8 = (  # the preset as it ships at 19 + 38 blocks, + FP8 block matmuls (docs/fp8.md): its speed and its clip fraction
    ("lora-fp8-rollout", "flux-dev-lora + fp8=rollout", dict(fp8="rollout")),
    ("lora-fp8-all", "flux-dev-lora + fp8=all", dict(fp8="all")))
ORDER = ("kernels", "preset", "attention-flash", "attention-efficient", "attention-cudnn", "gradient", "nf4-lora",
         "full", "sde", "lora-eager")  # the default run: what a user must know first, first
STUDIES = ("lora-cudnn-forward", "lora-compiled", "lora-no-checkpointing", "lora-fp8-rollout", "lora-fp8-all",
           "profile", "flops")  # --only=...: a second run, the levers one by one, FP8, the eager iteration's top kernels,
# its FLOPs counted beside --meta's
ESTIMATES = {  # seconds on an H200 from a cold process (~20 s: Python, torch, a random model), from docs/cost.md's
    "kernels": 25,  # an 8192³ bf16 matmul rate, NF4 at 4096 rows with its backward, one all-reduce, SDPA's choice
    "preset": 175,  # 19 + 38 blocks: 25 s to build; the sample grid's and evaluation's variants compiled and run, ~45;
    # the first iteration 93 (compiled at the rollout's and update's batches); the steady one 10.0
    "attention": 20,  # a backend: 4 families' blocks at 3 resolutions, forward and backward
    "gradient": 20,  # 1 + 2 blocks: a group rolled out and three gradients
    "nf4-lora": 35,  # 6 + 12 blocks: two eager iterations of ~5 s (16.3 s at 19 + 38) and NF4's dequantization
    "full": 40,  # 6 + 12 blocks: two eager iterations of ~6.6 s (4.45 s at 4 + 8)
    "sde": 65,  # 6 + 12 blocks: its transformer calls once, then an iteration of ~35 s (5.3x full's: Table 3)
    "lora-eager": 30,  # 6 + 12 blocks: two eager iterations of ~5 s
    "lora-cudnn-forward": 30, "lora-compiled": 120, "lora-no-checkpointing": 120,  # compiled: ~90 s at any depth
    "lora-fp8-rollout": 130, "lora-fp8-all": 130,  # 19 + 38 blocks compiled, FP8's casts compiled too (not measured)
    "profile": 35, "flops": 60}  # one eager iteration profiled; one counted, and --meta's count on fake tensors
NOT_SELECTED = "not selected (the default run, or --only)"
H200 = 139.8 * 2**30  # docs/cost.md's card: what --plan plans for where there is no GPU


def cost(name, device):
    """Seconds a check is expected to take: on a GPU an H200's (the budget's unit), on a CPU one."""
    return ESTIMATES[name.partition("-")[0] if name.startswith("attention") else name] if device.type == "cuda" else 1


def as_args(fields):
    return [f"--{k}={v}" for k, v in fields.items()]


def prediction(cfg):
    """Preflight's predicted peak bytes of one process running cfg's random stand-in (preflight.gpu_phases)."""
    sizes = flux.model_sizes(cfg.model_path)
    return max(preflight.gpu_phases(cfg, sizes, flux.transformer_config(**sizes), 1, False).values())


def sized(args, parse, capacity, most):
    """args with the most blocks (up to most) whose prediction fits capacity bytes; None if none does."""
    for blocks in DOCTOR_BLOCKS[DOCTOR_BLOCKS.index(most):]:
        with_blocks = [*args, f"--model_path=random:{blocks}"]
        if capacity is None or prediction(parse(with_blocks)) <= capacity:
            return with_blocks
    return None


def memory_batch(fields, capacity):
    """The largest update_batch_size a run at FLUX.1-dev's 19 + 38 blocks fits on this GPU with these levers, as
    update_batch_size=auto decides it (preflight.largest_update_batch): the lever measures what a run here uses."""
    cfg = ng.parse_config(["--preset=flux-dev-lora", *SMALL, *as_args({**fields, "update_batch_size": 0})])
    sizes = flux.model_sizes(cfg.model_path)
    return preflight.largest_update_batch(cfg, sizes, flux.transformer_config(**sizes), 1, capacity, False)


def timed_check(name, label, recipe, fields, device, capacity, most, method="neighbor", **spec):
    """A Check of real iterations of a recipe (RECIPES) with fields, the preset's own where fields leaves them (two
    iterations on a GPU: the first, compile included, and a steady one); on a CPU the tiny preset with what carries
    over, eager. spec: sampling (the sample grid's and evaluation's calls first), profile, count, meta, warmup."""
    gpu, parse = device.type == "cuda", sde_grpo.parse_config if method == "sde" else ng.parse_config
    spec = {"method": method, "iterations": 2 if gpu and method == "neighbor" else 1, **spec}
    if not gpu:
        spec["args"] = [*TINY, *as_args({**RECIPES[recipe][1], **fields})]
        compiled = fields.get("compile", False)
        skip = "GPU only: torch.compile's first iteration takes minutes on a CPU" if compiled else (
            "GPU only: cuDNN is a CUDA library" if fields.get("attention_backend") == "cudnn_forward" else "")
        return Check(name, label + " (tiny, eager)", "iterations", cost(name, device), spec, skip)
    args = sized([f"--preset={RECIPES[recipe][0]}", *SMALL, *as_args(fields)], parse, capacity, most)
    if args is None:
        return Check(name, label, "iterations", cost(name, device), spec, "no block count's prediction fits this GPU")
    blocks = args[-1].removeprefix("--model_path=random:").replace(",", " + ")
    spec.update(args=args, predicted_gib=prediction(parse(args)) / 2**30)
    return Check(name, f"{label}, {blocks} blocks", "iterations", cost(name, device), spec)


def plan(device, capacity, opts):
    """Every check after kernels, the default run's in ORDER (the most important first), then the studies, given
    this GPU's usable bytes (None: not known, or a CPU)."""
    gpu, out, most = device.type == "cuda", Path(opts["out"]).resolve(), opts["blocks"]
    checks = [timed_check("preset", "flux-dev-lora as it ships", "lora", {}, device, capacity, "19,38",
                          sampling=True)]
    checks += [Check(f"attention-{b}", f"attention: {b}", "attention", cost("attention", device), {"backend": b},
                     "" if gpu or b == "flash" else "GPU only: a CUDA kernel") for b in BACKENDS]
    grad_args = ["--preset=flux-dev", *SMALL, "--model_path=random:1,2"] if gpu else TINY
    checks.append(Check("gradient", "a training step's gradient", "gradient", cost("gradient", device),
                        {"args": [*grad_args, "--mixed_precision=bf16"]}))
    checks += [timed_check("nf4-lora", "NF4 + LoRA r=64", "nf4", {}, device, capacity, most),
               timed_check("full", "full fine-tuning", "full", {}, device, capacity, most),  # as many blocks as fit
               timed_check("sde", "SDE baseline (DanceGRPO's setting), full fine-tuning", "full", {}, device,
                           capacity, most, method="sde", warmup=gpu),  # the same blocks as full's (Table 3's ratio)
               timed_check("lora-eager", "LoRA r=64, eager", "lora", EAGER, device, capacity, most)]
    for name, label, fields in LEVERS:
        if not fields["update_batch_size"]:
            fields = {**fields, "update_batch_size": memory_batch(fields, capacity) if gpu else 2}
        checks.append(timed_check(name, label, "lora", fields, device, capacity, most))
    checks += [timed_check(name, label, "lora", fields, device, capacity, "19,38") for name, label, fields in FP8]
    checks += [timed_check("profile", "LoRA r=64, eager, profiled", "lora", EAGER, device, capacity, most,
                           iterations=1, profile=str(out / "profile_eager.txt")),
               timed_check("flops", "LoRA r=64, eager, FLOPs counted", "lora", EAGER, device, capacity, most,
                           iterations=1, count=True, meta=True)]
    return sorted(checks, key=lambda c: (ORDER + STUDIES).index(c.name))


def why_not(check, left, selected):
    """Why check does not run with left seconds of the budget ("" if it runs): not selected, its own skip, or time."""
    if check.name not in selected:
        return NOT_SELECTED
    return check.skip or ("" if left >= check.estimate else
                          f"the budget: {max(left, 0):.0f} s left, it takes ~{check.estimate:.0f} s")


def kernels_check(device):
    return Check("kernels", "the device and its kernels", "kernels", cost("kernels", device), {})


def print_plan(opts):
    """What the doctor would run here with these options, each check with its estimate as if each took it, and the
    total, without running any: on a machine without a GPU, an H200's plan. Returns {"checks": [...], "total_s"}."""
    here = torch.cuda.is_available()
    device = torch.device("cuda")  # the estimates and sizes are a GPU's
    capacity = models.device_memory(device) if here else preflight.usable_memory(H200, H200)
    selected, left, rows = [n for n in opts["only"].split(",") if n] or ORDER, opts["budget"], []
    for check in [kernels_check(device), *plan(device, capacity, opts)]:
        why = why_not(check, left, selected)
        left -= 0 if why else check.estimate
        if why != NOT_SELECTED:
            rows.append(dict(name=check.name, label=check.label, estimate_s=check.estimate, skipped=why))
    total = sum(r["estimate_s"] for r in rows if not r["skipped"])
    device_name = torch.cuda.get_device_name() if here else f"an H200 ({H200 / 2**30:.1f} GiB; no GPU here)"
    print(f"the doctor's plan on {device_name}, --budget={opts['budget']:.0f} s:")
    for r in rows:
        print(f"  {r['name']:<22} {r['estimate_s']:>4.0f} s  {r['label']}" + (f"  SKIPPED: {r['skipped']}"
                                                                               if r["skipped"] else ""))
    print(f"  {'total':<22} {total:>4.0f} s of {opts['budget']:.0f}")
    return {"checks": rows, "total_s": total}


# -----------------------------------------------------------------------------
# running the checks: each in its own process (a GPU) or here (a CPU), the report rewritten after each


def child_command(check, result):
    return [sys.executable, str(ROOT / "doctor.py"), "--one=" + json.dumps(dict(kind=check.kind, **check.spec)),
            f"--result={result}"]


def run_isolated(check, out, timeout):
    """check in a process of its own, killed (with anything it started) after timeout seconds. Returns what it
    wrote, with why it stopped if it did not finish: a signal, an exit status and its log's last error line."""
    result, log = out / "parts" / f"{check.name}.json", out / "logs" / f"{check.name}.log"
    result.unlink(missing_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(child_command(check, result), stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True,  # no compile cache: the compile time is a first run's
                                env={**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"})
        try:
            code, why = proc.wait(timeout), None
        except subprocess.TimeoutExpired:
            code, why = None, f"timed out after {timeout:.0f} s"
        finally:  # a time-out, or this process interrupted: the child and its workers go too
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    found = json.loads(result.read_text()) if result.exists() else {}
    if code == 0:
        return found
    if why is None:
        why = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    errors = [line for line in log.read_text(errors="replace").splitlines() if "Error" in line or "error:" in line]
    return {**found, "status": "timed out" if code is None else "failed",
            "error": found.get("error") or f"{why}{': ' + errors[-1].strip()[:300] if errors else ''}"}


def run_check(check, device, out, timeout, isolate, found):
    """check in its own process (isolate) or in this one, what it found put in found (failures included: the next
    check runs; a KeyboardInterrupt goes through)."""
    if isolate:
        return found.update(run_isolated(check, out, timeout))
    try:
        KINDS[check.kind](check.spec, device, found)
    except Exception as e:  # noqa: BLE001 - a failed check is a finding
        found.update(status="failed", error=first_line(e))


def one(spec, result):
    """A child's work: KINDS[kind](spec), what it found written to result as it goes (a crash keeps it)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    class Found(dict):
        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            write_json(result, self)

        def update(self, *args, **kwargs):
            super().update(*args, **kwargs)
            write_json(result, self)

    found = Found()
    try:
        KINDS[spec["kind"]](spec, device, found)
    except Exception as e:
        found.update(status="failed", error=first_line(e))
        raise


def write_json(path, value):
    """Whole or not at all: a kill while writing leaves the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1, default=str))
    tmp.replace(path)


def interrupted(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (timeout(1), a scheduler) ends like Ctrl-C: the running check's process killed


def doctor(opts):
    """Every check in order within --budget; doctor.json and doctor.md rewritten after each. Returns the report."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out, start = Path(opts["out"]).resolve(), time.monotonic()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    isolate = opts["isolate"] if opts["isolate"] != "auto" else device.type == "cuda"
    selected = [n for n in opts["only"].split(",") if n] or ORDER
    report = dict(budget_s=opts["budget"], elapsed_s=0.0, isolated=isolate, checks={})
    kernels = kernels_check(device)
    checks = [kernels]
    while checks:
        check, found = checks.pop(0), {}
        left = opts["budget"] - (time.monotonic() - start)
        why = why_not(check, left, selected)
        if why:
            report["checks"][check.name] = {"label": check.label, "status": "skipped", "why": why}
        else:
            t0 = time.monotonic()
            try:
                run_check(check, device, out, min(left, max(TIMEOUT[0], TIMEOUT[1] * check.estimate)), isolate,
                          found)
            except KeyboardInterrupt:
                found["status"] = "interrupted"
                raise
            finally:  # whatever happened, what it found is in the files before anything else runs
                report["checks"][check.name] = {"label": check.label, "status": "ok", **found,
                                                "seconds": time.monotonic() - t0}
                publish(report, out, start)
        if check is kernels:  # what follows depends on this GPU's memory
            report.update({k: found.get(k) for k in ("device", "memory_gib", "usable_gib", "torch", "cuda")})
            capacity = found.get("usable_gib") and found["usable_gib"] * 2**30
            report["presets"] = presets(capacity)
            checks = plan(device, capacity, opts)
        publish(report, out, start)
    print(markdown(report) + f"wrote {out / 'doctor.json'} and {out / 'doctor.md'}")
    return report


def presets(capacity):
    """Every FLUX preset's predicted peak per rank (preflight) against this GPU's usable memory."""
    sizes, rows = flux.FLUX_DEV, {}
    for preset, world in (("flux-dev", 8), ("flux-dev", 32), ("flux-dev-lora", 1), ("flux-dev-24gb", 1)):
        phases = preflight.gpu_phases(ng.parse_config([f"--preset={preset}"]), sizes,
                                      flux.transformer_config(**sizes), world, True)
        need = max(phases.values())
        rows[f"{preset} over {world}"] = {"predicted_gib": need / 2**30, "fits": capacity and need <= capacity}
    return rows


def publish(report, out, start):
    """The conclusions drawn from what has run so far, then doctor.json and doctor.md (each whole)."""
    report["elapsed_s"] = time.monotonic() - start
    summarise(report)
    write_json(out / "doctor.json", report)
    tmp = out / "doctor.md.tmp"
    tmp.write_text(markdown(report))
    tmp.replace(out / "doctor.md")


# -----------------------------------------------------------------------------
# the conclusions and the report


def timed_runs(report):
    return {n: c for n, c in report["checks"].items() if "s_per_iteration" in c}


def summarise(report):
    """MFU, each run's correctness, attention's verdicts, the fastest correct LoRA setting, Table 3's ratio."""
    kernels = report["checks"].get("kernels", {})
    rate, fp8 = kernels.get("gemm_tflops"), kernels.get("fp8_gemm_tflops")
    sheet = next((v for k, v in BF16_TFLOPS.items() if k in (report.get("device") or "")), None)
    for run in timed_runs(report).values():
        tflop = run.get("tflop_counted") or run.get("tflop_meta")
        run["tflop_per_s"] = tflop and tflop / run["s_per_iteration"]
        run["mfu"] = rate and run["tflop_per_s"] and run["tflop_per_s"] / rate
        run["mfu_sheet"] = sheet and run["tflop_per_s"] and run["tflop_per_s"] / sheet
        run["mfu_fp8"] = fp8 and run["tflop_per_s"] and run["tflop_per_s"] / fp8  # FP8's tensor-core rate
        run["count_vs_meta"] = run.get("tflop_counted") and run.get("tflop_meta") and (
            run["tflop_counted"] / run["tflop_meta"])
        why = [w for w, bad in (("not finite", not run["finite"]), (f"|log rho| over {MAX_LOG_RATIO:g}",
                                run["abs_log_ratio"] > MAX_LOG_RATIO)) if bad]
        run["correct"], run["not_correct_because"] = not why, why
        run["log_ratio_margin"] = MAX_LOG_RATIO - run["abs_log_ratio"]  # what is left below the limit
        run["preflight"] = peak_verdict(run["peak_gib"], run.get("predicted_gib"))
    for name, check in report["checks"].items():
        if name.startswith("attention-") and "calls" in check:
            backend = name.removeprefix("attention-")
            check["verdicts"] = {f"{case}, {side}": attention_verdict(e, backend)
                                 for case, sides in check["calls"].items() for side, e in sides.items()}
    picks = kernels.get("training's attention kernel", {}).get("by attention_backend", {})
    if ng.SystemConfig.attention_backend in picks:
        report["training_attention"] = {call: training_verdict(report, kernel, call) for call, kernel in
                                        picks[ng.SystemConfig.attention_backend].items()}
    settings = {n: r for n, r in timed_runs(report).items() if n.startswith(("lora-", "preset")) and r["correct"]}
    fastest = min(settings, key=lambda n: settings[n]["s_per_iteration"], default=None)
    report["fastest_correct_lora_setting"] = fastest and {"check": fastest, "label": settings[fastest]["label"],
                                                          "s_per_iteration": settings[fastest]["s_per_iteration"]}
    runs = timed_runs(report)
    if "sde" in runs and "full" in runs:
        sde, neighbor = runs["sde"]["s_per_iteration"], runs["full"]["s_per_iteration"]
        report["table3"] = {"sde_s": sde, "neighbor_s": neighbor, "ratio": sde / neighbor,
                            "paper_ratio": bench.PAPER_S_PER_ITER["sde"] / bench.PAPER_S_PER_ITER["neighbor"]}


def peak_verdict(peak, predicted):
    """"matches" when the peak is within PEAK_TOLERANCE above preflight's prediction (or below it), else preflight
    named wrong: the run held what it holds, the prediction missed it. None: not measured (a CPU)."""
    if None in (peak, predicted):
        return None
    slack = max(PEAK_TOLERANCE[0] * predicted, PEAK_TOLERANCE[1])
    return "matches" if peak <= predicted + slack else (
        f"preflight is wrong: the peak {peak:.1f} GiB is {peak - predicted:.1f} above its {predicted:.1f} GiB "
        f"(tolerance {slack:.1f})")


def fmt(value, spec=".3g", none="-"):
    return none if value is None or value == "" else format(value, spec)


def markdown(report):
    k = report["checks"].get("kernels", {})
    lines = [f"# doctor: {report.get('device') or 'device unknown'} ({fmt(report.get('memory_gib'), '.1f')} GiB, "
             f"{fmt(report.get('usable_gib'), '.1f')} usable), torch {report.get('torch')}, CUDA {report.get('cuda')}; "
             f"{report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget"
             f"{', each check in its own process' if report['isolated'] else ''}", ""]
    if "gemm_tflops" in k:
        lines += ["| kernel check | result |", "| --- | --- |",
                  f"| matmul rate (MFU's denominator) | {k['gemm_tflops']:.3g} TFLOP/s measured |"]
        for name in ("bf16 matmul", "bitsandbytes NF4", "collectives"):
            r = k.get(name, {"ok": False, "error": "not run"})
            found = ", ".join(f"{a} {fmt(b) if isinstance(b, float) else b}" for a, b in r.items() if a != "ok")
            lines.append(f"| {name} | {'ok' if r['ok'] else 'FAILED'}: {found} |")
        picks = k.get("training's attention kernel", {}).get("by attention_backend", {})
        lines += [f"| SDPA kernel at attention_backend={b} | with gradient {p['with gradient']}, no gradient "
                  f"{p['no gradient']}{' (the default)' if b == ng.SystemConfig.attention_backend else ''} |"
                  for b, p in picks.items()]
    lines += attention_markdown(report)
    g = report["checks"].get("gradient", {})
    if "finite" in g:
        lines += ["", f"A training step's gradient ({g['blocks']}, full fine-tuning): finite {g['finite']}, norm "
                  f"{g['norm']:.3g}; bf16 against fp32 {fmt(g.get('bf16_vs_fp32'))} relative error (cosine "
                  f"{fmt(g.get('cosine'), '.6f')}; {g.get('expected', '')})"]
    if "presets" in report:
        lines += ["", "| preset (ranks) | predicted peak per rank, GiB | fits this GPU |", "| --- | --- | --- |"]
        lines += [f"| {n} | {v['predicted_gib']:.1f} | {'-' if v['fits'] is None else 'yes' if v['fits'] else 'no'} |"
                  for n, v in report["presets"].items()]
    lines += runs_markdown(report)
    lines += ["", "| check | not measured |", "| --- | --- |"]
    lines += [f"| {n} | {c['status']}: {c.get('why') or c.get('error')} |" for n, c in report["checks"].items()
              if c.get("status") != "ok" and c.get("why") != NOT_SELECTED]
    return "\n".join(lines) + "\n"


def attention_markdown(report):
    found = {n.removeprefix("attention-"): c for n, c in report["checks"].items() if "calls" in c}
    if not found:
        return []
    lines = ["", "Attention, forward and backward at each family's call in bf16 against fp32 math: relative errors "
             "of the output / d input / d weights", "", "| call | tokens | math in bf16 | " + " | ".join(found) + " |",
             "| --- | --- | --- |" + " --- |" * len(found)]
    errors = lambda e: "/".join(fmt(e.get(x), ".2g") for x in ("out", "dx", "dW"))  # noqa: E731
    for case, sides in next(iter(found.values()))["calls"].items():
        for side, e in sides.items():
            cells = [errors(c["calls"][case][side][b]) if c["verdicts"].get(f"{case}, {side}") == "ok" else
                     c["verdicts"].get(f"{case}, {side}", "not run")[:120] for b, c in found.items()
                     if case in c["calls"] and side in c["calls"][case]]
            lines.append(f"| {case}, {side} | {e['tokens']} | {errors(e['math'])} | " + " | ".join(cells) + " |")
    if "training_attention" in report:
        lines += ["", f"Training's attention (attention_backend={ng.SystemConfig.attention_backend}, the default): " +
                  "; ".join(f"{call}: {v}" for call, v in report["training_attention"].items())]
    return lines


def runs_markdown(report):
    runs = timed_runs(report)
    if not runs:
        return []
    lines = ["", "| timed iteration | G, T, B, K | s/iter | rollout | reward | update | first iter | TFLOP counted | "
             "--meta | ratio | MFU (measured matmul) | MFU (FP8 matmul) | MFU (sheet) | peak GiB | predicted GiB | "
             f"preflight | \\|log ρ\\| (limit {MAX_LOG_RATIO:g}) | clip fraction | correct |", "| --- |" + " --- |" * 18]
    for r in runs.values():
        p = r["phases_s"]
        lines.append(
            f"| {r['label']} | {r['GTBK']} | {r['s_per_iteration']:.2f} | {fmt(p.get('rollout'), '.2f')} | "
            f"{fmt(p.get('reward'), '.2f')} | {fmt(p.get('update'), '.2f')} | {r['first_iteration_s']:.2f} | "
            f"{fmt(r.get('tflop_counted'))} | {fmt(r.get('tflop_meta'))} | {fmt(r.get('count_vs_meta'), '.3f')} | "
            f"{fmt(r.get('mfu'), '.1%')} | {fmt(r.get('mfu_fp8'), '.1%')} | {fmt(r.get('mfu_sheet'), '.1%')} | "
            f"{fmt(r['peak_gib'], '.1f')} | {fmt(r.get('predicted_gib'), '.1f')} | {r.get('preflight') or '-'} | "
            f"{r['abs_log_ratio']:.1e} (margin {r['log_ratio_margin']:.1e}) | {fmt(r.get('clip_frac'), '.2f')} | "
            f"{'yes' if r['correct'] else 'no: ' + ', '.join(r['not_correct_because'])} |")
    fastest = report.get("fastest_correct_lora_setting")
    lines += ["", f"- the fastest correct LoRA setting (finite, |log ρ| <= {MAX_LOG_RATIO:g}): " + (
        f"{fastest['label']}, {fastest['s_per_iteration']:.2f} s/iteration" if fastest else "none measured")]
    lines += [f"- compile time ({r['label']}): {r['compile_s']:.0f} s (the first iteration less the steady one)"
              for r in runs.values() if r.get("compile_s") is not None]
    lines += [f"- before the iterations ({r['label']}): " + ", ".join(f"the {k} {v:.1f} s" for k, v in
                                                                      r["sampling_s"].items())
              for r in runs.values() if r.get("sampling_s")]
    lines += [f"- compiled variants ({r['label']}): " + ", ".join(f"{k} {v}" for k, v in
                                                                 r["compiled_variants"].items())
              for r in runs.values() if r.get("compiled_variants")]
    t3 = report.get("table3")
    if t3:
        lines.append(f"- Table 3: the SDE baseline's iteration {t3['sde_s']:.2f} s against Neighbor GRPO's "
                     f"{t3['neighbor_s']:.2f} s (full fine-tuning, the same blocks): {t3['ratio']:.2f}x; the paper "
                     f"{t3['paper_ratio']:.2f}x")
    for r in runs.values():
        if r.get("profile"):
            lines.append(f"- top kernels of one eager iteration: {r['profile']['file']} (first: "
                         f"{', '.join(f'{name} {share:.0%}' for name, share in r['profile']['top'][:3])})"
                         if r["profile"]["ok"] else f"- the profile failed: {r['profile']['error']}")
    return lines


# -----------------------------------------------------------------------------


def parse(argv):
    opts = dict(out="runs/doctor", budget=480.0, blocks="6,12", only="", isolate="auto", plan=False, one="",
                result="")
    for arg in argv:
        key, _, value = arg.removeprefix("--").partition("=")
        if key not in opts or not arg.startswith("--"):
            raise ng.ConfigError(f"{arg}: doctor.py takes --{', --'.join(opts)} (see its docstring)")
        if key in ("isolate", "plan"):  # isolate=auto: on a GPU
            opts[key] = value if value == "auto" else value in ("", "1", "true")
        else:
            opts[key] = type(opts[key])(value)
    if opts["blocks"] not in DOCTOR_BLOCKS:
        raise ng.ConfigError(f"--blocks={opts['blocks']}: use one of {', '.join(DOCTOR_BLOCKS)}")
    unknown = set(filter(None, opts["only"].split(","))) - set(ORDER + STUDIES)
    if unknown:
        raise ng.ConfigError(f"--only: no check {', '.join(sorted(unknown))}; the checks: {', '.join(ORDER + STUDIES)}")
    return opts


def main(argv):
    def job(opts):
        if opts["one"]:
            return one(json.loads(opts["one"]), Path(opts["result"]))
        if opts["plan"]:
            return print_plan(opts)
        previous = signal.signal(signal.SIGTERM, interrupted)
        try:
            return doctor(opts)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return ng.main(argv, parse, job)


if __name__ == "__main__":
    main(sys.argv[1:])
