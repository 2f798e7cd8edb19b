"""
Whether a run fits, known before any weight loads: the peak GPU memory per rank and host RAM per node of a recipe in
closed form from the transformer's sizes and the config (bench.py --meta measures the same on fake tensors: the
largest phase 1 % apart at FLUX.1-dev's size, and test_bench.py holds them together for every preset), a
checkpoint's bytes on disk, and whether a checkpoint's files are whole. Imports nothing of ours.
"""

import dataclasses
import functools
import json
import math
from pathlib import Path

GIB = 2**30

# parameters of the models beside the transformer, as bench.py --meta counts them from their configurations
VAE = {"flux": 83_819_683}
TEXT_ENCODERS = 123_060_480 + 4_762_310_656  # CLIP-L, T5-XXL encoder (FLUX.1-dev's)
REWARD_PARAMETERS = dict(hpsv2=986_109_441, pickscore=986_109_441, imagereward=446_665_953, clipscore=986_714_881,
                         aesthetic=427_616_513, hpsv3=7_748_610_610)  # fp32 towers; HPSv3 in bf16, as it was trained
REWARD_BYTES = dict(hpsv3=2)  # bytes a parameter where not 4
WEIGHTLESS = ("jpeg_compressibility", "jpeg_incompressibility", "brightness", "unifiedreward",  # functions, a server
              "digit_alignment", "digit_cnn_alignment", "digit_realism")  # the digits' judges: kilobytes on the CPU


def reward_bytes(name):
    """Bytes of a reward model's weights on the GPU (0 for one without: a function, a remote judge)."""
    return REWARD_BYTES.get(name, 4) * REWARD_PARAMETERS.get(name, 0)


def unpriced(names):
    """The rewards of names this file cannot price: neither counted above nor weightless (module:function, a new one)."""
    return [n for n in dict.fromkeys(names) if n not in REWARD_PARAMETERS and n not in WEIGHTLESS]


def transformer_sizes(config, lora_rank=0, lora_targets=()):
    """FluxTransformer2DModel(**config) counted on the meta device (nothing allocated): its parameters, the largest
    block's, the root's own (outside the blocks), each nn.Linear weight's, and LoRA's adapters at lora_rank."""
    return counted_sizes(json.dumps(config, sort_keys=True), lora_rank, tuple(lora_targets))


@functools.lru_cache(maxsize=64)  # a plan prices tens of recipes of a few sizes: each size built once
def counted_sizes(config_json, lora_rank, lora_targets):
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**json.loads(config_json))
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    blocks = [count(b) for b in [*model.transformer_blocks, *model.single_transformer_blocks]]
    linears = [(n, m) for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    adapters = sum(lora_rank * (m.in_features + m.out_features) for n, m in linears
                   if any(n == t or n.endswith("." + t) for t in lora_targets))
    return dict(n=count(model), block=max(blocks), root=count(model) - sum(blocks),
                linears=[m.weight.numel() for _, m in linears], adapters=adapters)


def nf4_bytes(sizes):
    """Bytes of nn.Linear weights of these sizes in bitsandbytes' NF4 (flux.quantize_base): 4 bits a weight, an 8-bit
    scale per block of 64 and, double quantized, an fp32 scale per 256 blocks."""
    return sum(n / 2 + math.ceil(n / 64) + 4 * math.ceil(n / 64 / 256) for n in sizes)


ADAMW_STEP = dict(fused=0, foreach=4)  # bytes a trained parameter AdamW's step allocates on top of its state (H200)
MARGIN = (1.5 * GIB, 0.02)  # a GPU's memory PyTorch's allocator does not count: NCCL, cuBLAS/cuDNN workspaces, slack


def usable_memory(free, total):
    """The bytes a process can plan for (free, total: torch.cuda.mem_get_info): the free memory less MARGIN, for
    what max_memory_allocated does not see (NCCL's buffers, cuBLAS's and cuDNN's workspaces, the caching allocator's
    fragmentation), 1.5 GiB and 2 % of the card."""
    return free - MARGIN[0] - MARGIN[1] * total


def update_batch(cfg):
    """Transitions per transformer call in the update: update_batch_size, at most an optimizer step's (K per group)."""
    return min(cfg.update_batch_size, cfg.groups_per_rank * cfg.num_train_steps)


def largest_update_batch(cfg, sizes, config, world, capacity, real_models):
    """update_batch_size=auto: the largest divisor of an optimizer step's transitions (groups_per_rank * K: calls of
    one size) whose predicted peak per rank (gpu_phases) fits capacity bytes; capacity None (a CPU): all of them."""
    n = cfg.groups_per_rank * cfg.num_train_steps
    for batch in [b for b in range(n, 0, -1) if n % b == 0]:
        c = dataclasses.replace(cfg, update_batch_size=batch)
        if capacity is None or max(gpu_phases(c, sizes, config, world, real_models).values()) <= capacity:
            return batch
    return 1


def image_tokens(cfg, sizes):
    """Packed latent tokens of one image at cfg.resolution: the VAE's downsampling, then FLUX's 2x2 patches."""
    return (cfg.resolution // 2 ** (len(sizes["vae_channels"]) - 1) // 2) ** 2


def checkpoint_bytes(parameters, dtype_bytes, lora):
    """Bytes a checkpoint of a model with these parameters writes over all ranks: what trains in fp32 with AdamW's two
    moments (the state to resume from), and its export (the adapter in fp32, or the whole transformer in the compute
    dtype) for evaluate.py. A sharded parameter (DTensor) counts whole."""
    sizes = [(p.numel(), p.requires_grad) for p in parameters]
    trained, total = sum(n for n, trains in sizes if trains), sum(n for n, _ in sizes)
    return 12 * trained + (4 * trained if lora else dtype_bytes * total)


def damaged_files(state_dir):
    """The files of a torch.distributed.checkpoint directory that are missing or shorter than its metadata says."""
    import torch.distributed.checkpoint as dcp

    try:
        items = dcp.FileSystemReader(str(state_dir)).read_metadata().storage_data.values()
    except Exception:  # noqa: BLE001 - any unreadable metadata is damage
        return [str(Path(state_dir) / ".metadata")]
    need = {}
    for item in items:
        need[item.relative_path] = max(need.get(item.relative_path, 0), item.offset + item.length)
    return [str(Path(state_dir) / f) for f, n in sorted(need.items())
            if not (Path(state_dir) / f).is_file() or (Path(state_dir) / f).stat().st_size < n]


def decode_bytes(batch, resolution, half, sizes):
    """The VAE decode's activation peak: 3.12 GiB for 4 images at 720² in bf16 through FLUX.1-dev's VAE (--meta),
    in proportion to the images' pixels and the decoder's widest (full-resolution) channels."""
    return 3.12 * GIB * batch / 4 * (resolution / 720) ** 2 * half / 2 * sizes["vae_channels"][0] / 128


def fp8_bytes(cfg, tokens, D, linears, phase):
    """What fp8's casts add to the rollout's or the update's peak (models.convert_fp8; the update only with "all"):
    torchao casts per call, one layer at a time, keeping what nn.Linear keeps: in the forward the widest input (the
    single blocks' proj_out: 5D a token) and a weight; in the backward the MLP's 4D gradient twice (rowwise along each
    dim) and its D input, and two weights. An FP8 byte an element compiled (fused); eager, each cast also holds the
    fp32 copy and its scaled product: 8 bytes (bench.py --meta, eager: +3.2 GiB at the rollout's 12 x 2537 tokens)."""
    if not cfg.fp8 or phase == "update" and cfg.fp8 != "all":
        return 0
    per = 1 if cfg.compile else 8
    forward = per * (tokens * 5 * D + max(linears))
    return forward if phase == "rollout" else max(forward, per * (tokens * 9 * D + 2 * max(linears)))


def gpu_phases(cfg, sizes, config, world, real_models, adamw="fused"):
    """Predicted peak bytes per rank of each phase (start-up, rollout, rewards, update, evaluation), as bench.py
    --meta's memory_phases measures them: the transformer's weights, gradients and AdamW state counted exactly; its
    working set in closed form (the forms, and how close they come to --meta, in docs/cost.md); and the other models
    on the GPU then. sizes: flux.py's; config: FluxTransformer2DModel's; real_models: FLUX.1-dev's text encoders and
    the named rewards are counted (random models: their VAE alone). adamw: the step's implementation (the loop's on a
    GPU: fused; foreach allocates an fp32 temporary of every trained parameter)."""
    m = transformer_sizes(config, cfg.lora_rank, cfg.lora_targets)
    n, block, root, linears, adapters = m["n"], m["block"], m["root"], m["linears"], m["adapters"]
    D, half = sizes["heads"] * sizes["head_dim"], 2 if cfg.mixed_precision == "bf16" else 4
    L, S, C = image_tokens(cfg, sizes), cfg.max_sequence_length, config["in_channels"]
    G, T = cfg.group_size, cfg.num_steps
    tokens = lambda batch: batch * (L + S) * D * half  # one hidden state of a batch  # noqa: E731
    blocks = sizes["layers"] + sizes["single_layers"]
    inputs = cfg.groups_per_rank * (4 * G * (2 * T + 1) * L * C + 4 * S * sizes["text_dim"])  # stored rollouts
    ub = update_batch(cfg)
    # checkpointed: each block's input kept, one block's forward and backward live; else the hidden states a block
    # keeps for its backward: 17 eager, 13 compiled (fused elementwise ops), as an H200 measured them at 720²
    kept = (blocks + 30) if cfg.grad_checkpointing else (13 if cfg.compile else 17) * blocks
    work = kept * tokens(ub) + 0.27 * GIB * (D / 3072) ** 2 + fp8_bytes(cfg, ub * (L + S), D, linears, "update")
    if cfg.lora_rank:
        rest = half * n - (2 * sum(linears) - nf4_bytes(linears) if cfg.base_quantization else 0) + 12 * adapters
        grads, gathered = 4 * adapters, (2 * max(linears) if cfg.base_quantization else 0)  # NF4: one dequantized
        rolled, step = gathered, ADAMW_STEP[adamw] * adapters
    else:  # FSDP2: fp32 shards and AdamW's moments; a block and the root gathered in the compute dtype, its gradient
        shards = world if cfg.parallel == "fsdp" else 1  # reduce-scattered in fp32; DDP: a whole replica a rank
        rest, grads, step = 12 * n / shards, 4 * n / shards, ADAMW_STEP[adamw] * n / shards
        gathered = 2 * (2 * block + root) + 4 * block if shards > 1 else 0
        rolled = 2 * (2 * block + root) if shards > 1 else 0
        if cfg.kl_coef:  # its reference (neighbor_grpo.starting_model): a frozen copy in the compute dtype, sharded
            rest += half * n / shards  # like the model under FSDP; LoRA's is its adapters switched off, no copy
    update = rest + grads + inputs + max(gathered + work, step)  # the step runs after the backward has let go
    rollout = rest + inputs + rolled + 13 * tokens(min(cfg.rollout_batch_size, G))
    rollout += fp8_bytes(cfg, min(cfg.rollout_batch_size, G) * (L + S), D, linears, "rollout")
    vae = decode_bytes(cfg.reward_batch_size, cfg.resolution, half, sizes)
    resident = half * VAE["flux"] if real_models or sizes["vae_channels"][0] == 128 else 0  # FLUX.1-dev's VAE
    encoders, rewards, guards = 0, [], []
    if real_models:
        encoders = half * TEXT_ENCODERS
        rewards = [reward_bytes(r) for r in cfg.rewards if r in REWARD_PARAMETERS]
        guards = [reward_bytes(r) for r in cfg.guard_rewards if r in REWARD_PARAMETERS]
    if not cfg.offload_text_encoders:
        resident, encoders = resident + encoders, 0
    resident += 0 if cfg.reward_offload else sum(rewards)
    one = max(rewards, default=0) if cfg.reward_offload else 0
    at_rest = rest + inputs
    return {"start-up": at_rest + resident + encoders, "rollout": rollout + resident,
            "rewards": at_rest + resident + vae + one, "update": update + resident,
            "evaluation": at_rest + resident + vae + max([one, *guards])}


def evaluation_phases(cfg, sizes, config, real_models, names):
    """evaluate.py's predicted peak bytes per rank (cfg as it samples: its resolution): the transformer in the compute
    dtype, the VAE and the judges in names (fp32 towers) throughout, beside the text encoders at start-up, the
    sampler's forward, or the VAE's decode."""
    n, half = transformer_sizes(config)["n"], 2 if cfg.mixed_precision == "bf16" else 4
    L = image_tokens(cfg, sizes)
    held = half * n + (half * VAE["flux"] if real_models else 0) + sum(reward_bytes(r) for r in names)
    forward = 13 * cfg.eval_batch_size * (L + cfg.max_sequence_length) * sizes["heads"] * sizes["head_dim"] * half
    decode = decode_bytes(cfg.reward_batch_size, cfg.resolution, half, sizes)
    return {"start-up": held + (half * TEXT_ENCODERS if real_models else 0), "sampling": held + forward,
            "decode and score": held + decode}


def host_bytes(cfg, n, world, ranks_per_node):
    """Host RAM per node at start-up: rank 0 reads the transformer (fp32 master weights; LoRA, NF4 and evaluate.py:
    the compute dtype; full fine-tuning with kl_coef: twice, while its reference is copied from them) and each rank
    holds its text encoders while it encodes, its offloaded models after."""
    master = 2 if cfg.lora_rank else 4
    copies = 2 if cfg.kl_coef and not cfg.lora_rank else 1  # kl_coef's reference: a deepcopy of them, then its cast
    fsdp = world > 1 and cfg.parallel == "fsdp" and not cfg.lora_rank
    loads = 1 if fsdp else ranks_per_node  # FSDP: rank 0 alone reads the weights; DDP: every rank does
    return loads * copies * master * n + ranks_per_node * 2 * TEXT_ENCODERS


def fits(cfg, sizes, config, world, capacity, real_models, offers, rank=0, ranks_per_node=1):
    """(ok, message): whether the predicted peak per rank fits capacity bytes (rank 0 prints it, and the host RAM a
    node needs), else one line naming the offers that do: {description: (cfg, world)}, in order."""
    phases = gpu_phases(cfg, sizes, config, world, real_models)
    top = max(phases, key=phases.get)
    for name in unpriced([*cfg.rewards, *cfg.eval_rewards, *cfg.guard_rewards]) if rank == 0 else ():
        print(f"memory: reward {name} is not priced (0 bytes assumed); add its parameter count to "
              "preflight.REWARD_PARAMETERS")
    if phases[top] <= capacity:
        if rank == 0:
            host = host_bytes(cfg, transformer_sizes(config)["n"], world, ranks_per_node)
            print(f"memory: ~{phases[top] / GIB:.1f} GiB a rank predicted ({top}) of this GPU's {capacity / GIB:.1f} "
                  f"usable; host RAM ~{host / 1e9:.0f} GB a node at start-up (preflight.py)")
        return True, ""
    fitting = [name for name, (c, w) in offers.items()
               if max(gpu_phases(c, sizes, config, w, real_models).values()) <= capacity]
    what = (f"LoRA r={cfg.lora_rank}" + (" on a 4-bit base" if cfg.base_quantization else "") if cfg.lora_rank
            else "full fine-tuning") + f" over {world} rank(s)"
    return False, (f"this GPU's {capacity / GIB:.1f} GiB usable cannot hold {what} (needs ~{phases[top] / GIB:.1f} GiB "
                   f"a rank at its {top}); use {' or '.join(fitting) if fitting else 'more GPUs (torchrun)'}, or "
                   "--memory_check=false to try anyway")
