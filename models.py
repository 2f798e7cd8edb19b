"""
The model families neighbor_grpo.py trains and what they share. A family is one module of the same few functions
(flux.py: FLUX.1; sd3.py: Stable Diffusion 3.5; qwen_image.py: Qwen-Image); which one a model_path is comes from its
model_index.json (a random preset's name, a known hub id). The loop calls the functions at the bottom of this file,
each forwarded to the family of the pipeline, transformer or condition it is given, so neighbor_grpo.py names none.

A family module defines (flux.py is the one to copy):
    NAME, REPO                 its name in messages, the hub repository to download
    GATED                      its hub ids whose license is accepted on the hub before a token downloads them
    PIPELINE, TRANSFORMER      its diffusers classes
    random_pipeline(model_path, seed, device, dtype, master)   a random pipeline for a random preset's name (the
                               transformer in master: fp32, or dtype for a frozen base), else None
    model_sizes(model_path)    the sizes bench.py --meta builds from (a local config.json, a known hub id's)
    encode_prompt(pipe, prompt, cfg, cache) -> Condition (everything but x and t the transformer gets, one prompt)
    stack_conditions(conds)    one Condition for a batch of prompts
    draw_noise(pipe, n, resolution, gen)   initial latents drawn as its pipeline's prepare_latents draws them
    schedule(pipe, resolution, num_steps)  (image tokens for a dynamic shift, the time its pipeline's grid ends at)
    velocity(transformer, x, t, cond, dtype)   v_theta as its pipeline calls it (classifier-free guidance included)
    decode_images(pipe, x, resolution)   latents -> images in [0, 1]
    blocks(transformer)        the blocks FSDP2 shards one by one
    constants(transformer, device)   computes on device the tensors outside its state dict (RoPE tables), for a
                               transformer built on the meta device
    unreachable(transformer)   the modules its pipeline's output cannot depend on (frozen: DDP needs every gradient)
Shared here: loading with one-line errors, a 4-bit base (bitsandbytes), LoRA (peft through diffusers), export in
diffusers' formats. Of the project it imports only rewards.tokenizer_is_empty and preflight (memory, FLUX's).
"""

import contextlib
import dataclasses
import functools
import importlib
import json
import logging
import os
import string
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from rewards import tokenizer_is_empty

# bitsandbytes (which diffusers imports when it is installed) warns on every CPU that an optional hub kernel is absent
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# transformers and diffusers import torchao when it is installed (fp8): diffusers' quantizer (unused) looks for classes
# torchao 0.18 moved, and torch warns of the enums torchao registers for torch.compile; both say so on every run
logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

FAMILIES = ("flux", "sd3", "qwen_image")  # a new family: its module's name here


class ModelError(ValueError):
    """A model that cannot load as configured: the message names the field and the fix."""


def module(name):
    return importlib.import_module(name)


def presets(base):
    """Every family's recipes (its module's PRESETS); one naming a "base" preset starts from that one of base."""
    out = {}
    for name in FAMILIES:
        for preset, fields in getattr(module(name), "PRESETS", {}).items():
            out[preset] = {**base.get(fields.get("base"), {}), **{k: v for k, v in fields.items() if k != "base"}}
    return out


def local_configs(model_path, *names):
    """{name: its config.json less diffusers' _keys} of a local pipeline's subfolders, or None if it has no transformer
    config (a hub id: not downloaded)."""
    root = Path(model_path)
    if not (root / "transformer" / "config.json").is_file():
        return None
    return {n: {k: v for k, v in json.loads((root / n / "config.json").read_text()).items() if not k.startswith("_")}
            for n in names}


def hub_config(model_path):
    """model_path's model_index.json: a local pipeline's, or a hub id's already in the Hugging Face cache; else None."""
    local = Path(model_path) / "model_index.json"
    if local.is_file():
        return json.loads(local.read_text())
    if model_path.count("/") == 1 and not model_path.startswith((".", "/", "~")):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_path, "model_index.json")
        if isinstance(cached, str):
            return json.loads(Path(cached).read_text())
    return None


def is_hub_id(model_path):
    """Whether model_path names a hub repository ("org/name") rather than a local directory or a random preset."""
    return (model_path.count("/") == 1 and not model_path.startswith((".", "/", "~"))
            and not Path(model_path).exists())


def hub_files(model_path, skip=()):
    """What the family pipeline's from_pretrained reads of a hub repository, as DiffusionPipeline.download chooses it:
    model_index.json; of each component its pipeline requires (skip: those passed in, e.g. a transformer_path), a
    model's config.json and safetensors weights (one file, or an index and its shards), a scheduler's or tokenizer's
    whole folder. Returns (patterns, required): snapshot_download's allow_patterns, and per piece the files of which
    one must be there (an index.json: with its shards). The repository's single-file checkpoints at its root
    (FLUX.1-dev's flux1-dev.safetensors, 23.8 GB) match no pattern. None for a local or random model."""
    if not is_hub_id(model_path):
        return None
    import inspect

    import diffusers

    init = inspect.signature(getattr(diffusers, family(model_path).PIPELINE).__init__).parameters
    patterns, required = ["model_index.json"], [("model_index.json",)]
    for c in [k for k, v in init.items() if v.default is inspect.Parameter.empty and k != "self" and k not in skip]:
        if c.startswith(("scheduler", "tokenizer")):  # not models: diffusers downloads the folder whole
            patterns.append(f"{c}/*")
            required.append((f"{c}/scheduler_config.json",) if c.startswith("scheduler") else
                            tuple(f"{c}/{f}" for f in ("tokenizer.json", "vocab.json", "spiece.model", "vocab.txt")))
        else:  # transformers' text encoders save model*.safetensors, diffusers' models diffusion_pytorch_model*
            w = f"{c}/model" if c.startswith("text_encoder") else f"{c}/diffusion_pytorch_model"
            patterns += [f"{c}/config.json", f"{w}.safetensors", f"{w}-*-of-*.safetensors",
                         f"{w}.safetensors.index.json"]
            required += [(f"{c}/config.json",), (f"{w}.safetensors", f"{w}.safetensors.index.json")]
    return patterns, required


def family(obj):
    """The family module of a model_path (its model_index.json's pipeline class, a random preset's name, a known hub
    id; any other: FLUX, as FLUX.1-schnell and FLUX.1-Krea-dev are), or of a pipeline, transformer or condition."""
    if isinstance(obj, str):
        config = hub_config(obj)
        for name in FAMILIES:
            fam = module(name)
            if config and config.get("_class_name") == fam.PIPELINE or not config and fam.is_family_path(obj):
                return fam
        if config:
            raise ModelError(f"model_path={obj}: a {config.get('_class_name')}; the families trained here are "
                             f"{', '.join(module(n).PIPELINE for n in FAMILIES)} (models.py)")
        return module("flux")
    return family_of_type(type(getattr(obj, "module", obj)))  # DDP wraps the transformer


@functools.cache  # every velocity call asks: the answer is the type's
def family_of_type(kind):
    for cls in kind.__mro__:  # FSDP2 subclasses the transformer's class
        for name in FAMILIES:
            fam = module(name)
            if cls.__name__ in (fam.PIPELINE, fam.TRANSFORMER) or cls is fam.Condition:
                return fam
    raise ModelError(f"{kind.__name__}: not a model of {', '.join(FAMILIES)}")


# -----------------------------------------------------------------------------
# Random models' tokenizers, built in memory (character level: long prompts are truncated, fine for random models)

CHARS = list(string.ascii_lowercase + string.digits + ",.!?'-")


def clip_tokenizer(max_length=77):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}  # character-level BPE vocabulary
    for c in CHARS:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer():
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]  # unigram vocabulary
    vocab += [(c, -2.0) for c in CHARS] + [("\u2581" + c, -2.5) for c in CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def t5_xxl():
    """transformers' T5Config of google/t5-v1_1-xxl's encoder, FLUX.1-dev's and SD3.5's third text encoder."""
    from transformers import T5Config

    return T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                    feed_forward_proj="gated-gelu")


def random_model(build, seed, device=None, dtype=torch.float32):
    """build(): on the CPU with its default init in fp32 (device None: the tiny models; add_lora casts a frozen base),
    or allocated on device in dtype (fp32 master weights, or the compute dtype of a frozen base) with N(0, 0.02)
    weights: the full-width stand-ins. A default init of billions of parameters takes minutes on a CPU, bench.py's
    timings need no particular weights, and a bf16 base never passes through fp32 (FLUX.1-dev: 48 GB). Buffers and
    plain tensor attributes (positions, RoPE tables) are the constructor's own, computed on device as when loaded."""
    from accelerate import init_empty_weights

    if device is None:
        return build()
    with torch.device(device), init_empty_weights(include_buffers=False):  # parameters on meta, never initialised
        model = build()
    generator = torch.Generator(device).manual_seed(seed)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            weight = torch.empty(p.shape, dtype=dtype, device=device).normal_(std=0.02, generator=generator)
            module._parameters[name] = torch.nn.Parameter(weight, p.requires_grad)
        for name, b in module.named_buffers(recurse=False):  # as from_pretrained(dtype=) casts them
            module._buffers[name] = b.to(dtype) if b.is_floating_point() else b
    return model


def empty_model(build, device):
    """build() on the meta device, no memory and no init (FSDP's ranks but 0, bench.py --meta): its parameters and
    buffers are what to_empty allocates and rank 0's state dict fills. Anything else (Qwen-Image's RoPE tables are
    plain attributes) the family computes on device (its constants()); a tensor no rank would fill stops here in one
    line, not at the first forward."""
    with torch.device("meta"):
        model = build()
    fam = family(model)
    fam.constants(model, device)
    for prefix, module in model.named_modules():
        left = [n for n, v in vars(module).items() if isinstance(v, torch.Tensor) and v.is_meta]
        for name in [*left, *sorted(module._non_persistent_buffers_set)]:  # to_empty empties those on every rank
            raise ModelError(f"{type(model).__name__}.{prefix + '.' if prefix else ''}{name}: a tensor outside the "
                             f"state dict, which no rank sends under FSDP; compute it in {fam.__name__}.constants()")
    return model


def freeze_unreachable(transformer):
    """Freeze what the pipeline's output cannot depend on (the family's unreachable(): the last block's text stream
    past its keys and values), LoRA adapters included. DDP stops at the second iteration over a parameter that trains
    without a gradient (Qwen-Image's last text MLP), find_unused_parameters would walk the graph at every step, and
    one whose gradient is always zero (the last text queries) would hold AdamW's state for nothing. The output, its
    gradient and every other parameter's update are unchanged."""
    for module in family(transformer).unreachable(transformer):
        if module is not None:  # a norm a config leaves out (qk_norm=None)
            module.requires_grad_(False)


# -----------------------------------------------------------------------------
# Loading


def load_pipeline(cfg, device, dtype, meta=False, inference=False):
    """The family's pipeline for cfg.model_path: VAE and text encoders on device in dtype, frozen; the transformer in
    fp32 (the master weights; with LoRA or for inference, evaluate.py's, in dtype) on the CPU until parallelize() moves
    it (a random full-width stand-in is built on device). meta=True (FSDP ranks but 0): the transformer's
    architecture alone, on the meta device; rank 0 sends the weights."""
    import diffusers

    fam = family(cfg.model_path)
    pipeline_class, transformer_class = getattr(diffusers, fam.PIPELINE), getattr(diffusers, fam.TRANSFORMER)

    def load(fn, field, path, **kwargs):
        fix = ("pass a trained transformer's directory (a run's out_dir/transformer)" if field == "transformer_path"
               else f"download {fam.REPO} (huggingface-cli download) and pass its directory")
        if not Path(path).exists() and not is_hub_id(path):
            raise ModelError(f"{field}={path}: no such directory; {fix}")
        verbosity = diffusers.utils.logging.get_verbosity()
        diffusers.utils.logging.set_verbosity(logging.CRITICAL)  # a missing file is said once, below, not as its log
        try:
            return fn(path, **kwargs)
        except (OSError, ValueError) as e:
            raise ModelError(f"{field}={path}: cannot load {fam.NAME} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}); {fix}") from None
        finally:
            diffusers.utils.logging.set_verbosity(verbosity)

    def load_transformer(field, path, **kwargs):
        if meta:
            config = load(transformer_class.load_config, field, path, **kwargs)
            return empty_model(lambda: transformer_class.from_config(config), device)
        return load(transformer_class.from_pretrained, field, path, dtype=master, **kwargs)

    master = dtype if cfg.lora_rank or inference else torch.float32
    pipe = fam.random_pipeline(cfg.model_path, cfg.seed, device, dtype, master)
    if pipe is None:
        transformer = None if cfg.transformer_path else load_transformer("model_path", cfg.model_path,
                                                                          subfolder="transformer")
        pipe = load(pipeline_class.from_pretrained, "model_path", cfg.model_path, transformer=transformer, dtype=dtype)
        for name in [n for n in pipe.components if n.startswith("tokenizer")]:
            if tokenizer_is_empty(getattr(pipe, name)):
                raise ModelError(
                    f"model_path={cfg.model_path}: {name} ({type(getattr(pipe, name)).__name__}) loaded with no "
                    f"vocabulary; {name}/ lacks tokenizer.json (or vocab.json + merges.txt, spiece.model): download "
                    f"{fam.REPO} completely (huggingface-cli download) and pass its directory")
    if cfg.transformer_path:
        pipe.transformer = load_transformer("transformer_path", cfg.transformer_path)
    if cfg.base_quantization:
        quantize_base(pipe.transformer, dtype, device)
    if cfg.lora_rank:
        add_lora(pipe.transformer, cfg, dtype)
    if cfg.fp8:  # after add_lora: the frozen base's layers convert, the adapters stay in their dtype
        convert_fp8(pipe.transformer, device)
    freeze_unreachable(pipe.transformer)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.vae, *text_encoders(pipe)):
        m.to(device).requires_grad_(False).eval()
    return pipe


def text_encoders(pipe):
    """The pipeline's text encoders (FLUX: CLIP and T5; SD3: two CLIPs and T5; Qwen-Image: Qwen2.5-VL)."""
    return [m for n, m in pipe.components.items() if n.startswith("text_encoder") and m is not None]


def quantize_base(transformer, dtype, device):
    """QLoRA's frozen base (base_quantization="nf4"): every nn.Linear of the transformer becomes a bitsandbytes
    Linear4bit holding 4-bit NormalFloat weights in blocks of 64 with double-quantized scales (0.52 bytes a weight
    instead of bf16's 2), computing in dtype; each is quantized as it moves to device, so the full-precision weights
    never reach it. This is the swap diffusers' BitsAndBytesConfig loader makes, which refuses to run without a GPU."""
    import bitsandbytes as bnb

    class Linear4bit(bnb.nn.Linear4bit):
        """Returns dtype, as nn.Linear does under autocast: bitsandbytes' returns its input's dtype, and FLUX's
        LayerNorms hand it fp32, which would double every activation after a quantized layer."""

        def forward(self, x):
            return super().forward(x.to(self.compute_dtype))

    transformer.requires_grad_(False).to(dtype)  # load_pipeline builds or loads it in dtype already (LoRA's master)
    for parent in list(transformer.modules()):
        for name, linear in list(parent.named_children()):
            if type(linear) is torch.nn.Linear:
                nf4 = Linear4bit(linear.in_features, linear.out_features, linear.bias is not None, dtype,
                                 compress_statistics=True, quant_type="nf4", device="meta")
                nf4.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                               quant_type="nf4")
                if linear.bias is not None:
                    nf4.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
                setattr(parent, name, nf4.to(device))


def pipeline_class(transformer):
    import diffusers

    return getattr(diffusers, family(transformer).PIPELINE)


def add_lora(transformer, cfg, dtype):
    """peft LoRA through diffusers' adapter API: the base frozen in the compute dtype (bf16: 24 GB for FLUX.1-dev
    instead of 48 GB fp32 plus gradients and AdamW), the adapters in fp32; B = 0 makes them start as a no-op."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    transformer.requires_grad_(False)
    if transformer.dtype != dtype:  # bench.py's meta model; load_pipeline builds or loads the base in dtype
        transformer.to(dtype)
    try:
        transformer.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights=True,
                                           target_modules=list(cfg.lora_targets)))
    except ValueError as e:
        raise ModelError(f"lora_targets={','.join(cfg.lora_targets)}: {str(e).splitlines()[0][:200]}") from None
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if cfg.lora_path:
        if not Path(cfg.lora_path).is_dir():
            raise ModelError(f"lora_path={cfg.lora_path}: no such directory; pass out_dir/lora of a LoRA run")
        try:
            state = pipeline_class(transformer).lora_state_dict(cfg.lora_path)
            state = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
            unexpected = set_peft_model_state_dict(transformer, state).unexpected_keys
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelError(f"lora_path={cfg.lora_path}: cannot load the adapter at lora_rank={cfg.lora_rank} "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); pass out_dir/lora of a LoRA run "
                              "and the --lora_rank and --lora_targets it was trained with") from None
        if unexpected or not state:
            raise ModelError(f"lora_path={cfg.lora_path}: the adapter does not fit lora_targets="
                              f"{','.join(cfg.lora_targets)} ({len(state)} tensors, unexpected {unexpected[:2]})")


# -----------------------------------------------------------------------------
# Export, in diffusers' formats


def export_transformer(model, path, rank, dtype):
    """The full transformer as safetensors + config.json, loadable by its class's from_pretrained."""
    from huggingface_hub import save_torch_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        Path(path).mkdir(parents=True, exist_ok=True)
        save_torch_state_dict({k: v.to(dtype) for k, v in state.items()}, path, max_shard_size="10GB",
                              filename_pattern="diffusion_pytorch_model{suffix}.safetensors")
        getattr(model, "module", model).save_config(path)


def export_lora(model, path, rank):
    """The adapter as the family pipeline's save_lora_weights writes it, with its LoraConfig (alpha included), so that
    its load_lora_weights(path) reproduces the trained model."""
    from peft.utils import get_peft_model_state_dict

    transformer = getattr(model, "module", model)  # DDP wraps it
    if rank == 0:
        layers = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(transformer).items()}
        pipeline_class(transformer).save_lora_weights(
            path, transformer_lora_layers=layers,
            transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())


def export_model(model, path, rank, dtype, lora=False, merged=False):
    """path/transformer (diffusers format) or, with LoRA, path/lora (the adapter alone); with merged (the end of a LoRA
    run), also path/transformer with the adapter merged into the base, in place."""
    if not lora:
        return export_transformer(model, path / "transformer", rank, dtype)
    export_lora(model, path / "lora", rank)
    if merged:
        transformer = getattr(model, "module", model)  # DDP wraps it
        transformer.fuse_lora()
        transformer.unload_lora()
        export_transformer(transformer, path / "transformer", rank, dtype)


@contextlib.contextmanager
def adapters_off(model):
    """The same transformer with its LoRA adapters switched off (the base model), at no memory; back on after (peft
    makes every adapter trainable again: the unreachable ones are frozen anew)."""
    transformer = getattr(model, "module", model)  # DDP wraps it
    transformer.disable_adapters()
    try:
        yield transformer
    finally:
        transformer.enable_adapters()
        freeze_unreachable(transformer)


# -----------------------------------------------------------------------------
# Kernels: attention and compilation, chosen once per process

ATTENTION_BACKENDS = ("sdpa", "cudnn_forward", "cudnn")
_NO_GRAD_ATTENTION = None  # SDPA backends, in order, for calls without gradient (rollout, evaluation); None: torch's


def cudnn_forward_measured():
    """Whether this GPU is one cuDNN's SDPA forward was measured correct on: Hopper (sm90: H100, H200, H800) with a
    CUDA 12.9+ build. PyTorch itself prefers it only there and disables it on older CUDA builds (memory corruption)."""
    return (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
            and tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2]) >= (12, 9))


def set_attention(backend):
    """PyTorch's SDPA kernels for this process, set where the device is (before any model runs) so that gradient
    checkpointing's recompute, which runs outside any context around the forward, meets the same kernel. cuDNN's
    backward fails or is silently wrong on FLUX's blocks (docs/cost.md): off unless backend="cudnn" (a later PyTorch
    may fix it). "cudnn_forward" runs cuDNN's forward, 1.6x flash's and as accurate on an H200, where nothing needs a
    gradient, on the GPUs it was measured on (elsewhere it is "sdpa"); a shape cuDNN cannot run (the VAE's 512-wide
    heads) falls through to flash, memory-efficient, then math. Compiled blocks fix their kernel when first traced and
    torch's on-disk compile cache does not key on these flags: the backend is tagged into its key."""
    global _NO_GRAD_ATTENTION
    from torch.nn.attention import SDPBackend

    torch.backends.cuda.enable_cudnn_sdp(backend == "cudnn")
    for enable in (torch.backends.cuda.enable_flash_sdp, torch.backends.cuda.enable_mem_efficient_sdp,
                   torch.backends.cuda.enable_math_sdp):
        enable(True)
    cudnn_first = backend == "cudnn_forward" and cudnn_forward_measured()
    _NO_GRAD_ATTENTION = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                          SDPBackend.MATH] if cudnn_first else None
    torch.compiler.config.cache_key_tag = f"attention={backend}:{cudnn_first}"  # pytorch#185449


def no_grad_attention():
    """The context of a transformer call: cuDNN's forward first when set_attention chose it and no gradient is
    recorded (then nothing is recomputed later, outside it). Every no-grad call of the transformer must come through
    here (models.velocity): a compiled block keeps the kernel of its first no-grad trace for the whole process."""
    from torch.nn.attention import sdpa_kernel

    if _NO_GRAD_ATTENTION and not torch.is_grad_enabled():
        return sdpa_kernel(_NO_GRAD_ATTENTION, set_priority=True)
    return contextlib.nullcontext()


def prepare_blocks(model, checkpointing, compiled):
    """Gradient checkpointing (each block recomputed in the backward), and torch.compile on each block (regional
    compilation): the blocks repeat, so each kind compiles once per variant, in the first iteration (about 1.5
    minutes at FLUX.1-dev's size on an H200); checkpointing and FSDP2's hooks stay outside the compiled code. The
    variants are static (dynamic=False: no shape-generic kernels): a grad mode at each batch size a run meets, the
    sample grid's min(num_samples, eval_batch_size), evaluation's eval_batch_size, the rollout's rollout_batch_size
    and the update's update_batch_size (with their remainders), and the kl_coef reference's adapters-off forward;
    the single blocks each twice, the first one's input laid out apart from the others' (a stride). The rollout and
    the update run the same compiled blocks: |log rho| at theta_old stays at round-off."""
    if checkpointing:
        model.enable_gradient_checkpointing()
    if compiled:  # a block kind meets up to ~10 variants (grad mode, batch, layout, adapters off): above dynamo's 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)  # would run eager
        torch._dynamo.config.optimize_ddp = False  # DDP's hooks overlap the all-reduce; no splitting of each block
        for block in blocks(model):
            block.compile(dynamic=False)


def compiled_variants(model):
    """{block kind: variants compiled so far}: dynamo's cache entries of each kind's forward (the blocks of a kind
    share them; DDP's wrapper and FSDP2's subclass do not change the kind)."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    codes = dict.fromkeys(type(b).forward.__code__ for b in blocks(getattr(model, "module", model)))  # in order
    return {c.co_qualname.split(".")[0]: len(_debug_get_cache_entry_list(c)) for c in codes}


def check_compiler(cfg, device):
    """compile=true: a trivial function compiled and run on device before any model loads, so a machine that cannot
    build kernels (no C compiler, no Python headers) stops in one line instead of minutes into the first iteration.
    Inductor's caches are off for it: a cached kernel would hide a compiler that is missing."""
    if not cfg.compile:
        return
    import torch._inductor.config

    try:
        with torch._inductor.config.patch(force_disable_caches=True):
            torch.compile(lambda x: (x * 2).sin() + 1, dynamic=False)(torch.ones(8, device=device))
    except Exception as e:  # noqa: BLE001 - any failure to build a kernel means the same fix
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ModelError(f"compile=true: torch.compile cannot build kernels here ({type(e).__name__}: {why}); "
                         "install a C compiler and Python's headers (apt install build-essential python3-dev, or set "
                         "CXX), or run with --compile=false") from None


# -----------------------------------------------------------------------------
# FP8 matmuls (fp8): torchao's float8 training linears, rowwise scales, in the transformer's blocks (docs/fp8.md)

FP8_MODES = ("", "rollout", "all")  # off; the calls without gradient (rollout, evaluation); every call
_FP8_ON = True  # whether converted layers compute in FP8 now; update_numerics turns it off for fp8="rollout"


def fp8_layer(module, name, device):
    """Whether an nn.Linear of the transformer computes in FP8: a linear of a block (attention, MLP), not its
    modulation (norm*.linear: a [batch, D] input, memory-bound), not the embedders or proj_out / norm_out outside the
    blocks, not a LoRA adapter; on a GPU, torchao's size rule for rowwise scaling (_auto_filter_for_recipe: both dims
    multiples of 16, N > 2048, K > 1024, not N <= 4096 with K <= 2048, below which FP8 was slower on an H100). On a CPU
    FP8 is emulated and never faster: every block linear with dims in multiples of 16 converts, so that the tests and
    the digits study run the numerics at their widest."""
    from torchao.float8 import _auto_filter_for_recipe

    in_blocks = name.startswith(("transformer_blocks.", "single_transformer_blocks."))
    if not in_blocks or ".norm" in name or "lora_" in name:
        return False
    if device.type == "cuda":
        return _auto_filter_for_recipe("rowwise", [])(module, name)
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_fp8(transformer, device):
    """fp8: the transformer's block linears (fp8_layer) become torchao Float8Linears with rowwise dynamic scales:
    input, weight and gradients cast to float8_e4m3 per row, scales a power of 2, the product in the input's dtype. Each
    token's input scale is its own row's, so a sample's output does not depend on what it is batched with: the rollout
    and the update compute theta_old's prediction alike (the ratio's round-off). Weights stay as they are (fp32 master,
    or LoRA's bf16 base), cast per call, no copy kept; FSDP2 all-gathers them in the compute dtype (torchao's FP8
    all-gather takes tensorwise scales only: a whole batch's). update_numerics switches them to high precision."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if device.type == "cpu" and not cpu_rowwise_fp8():  # else an internal assert in the first FP8 matmul
        raise ModelError(f"fp8 on a CPU: torch {torch.__version__}'s CPU matmul takes per-tensor FP8 scales only, not "
                         "rowwise ones (torch 2.14's does); run --fp8 on a GPU (Hopper, Ada) or with the pinned torch")
    convert_to_float8_training(transformer, module_filter_fn=lambda m, name: fp8_layer(m, name, device),
                               config=Float8LinearConfig.from_recipe_name("rowwise"))
    for m in transformer.modules():
        if type(m).__name__ == "Float8Linear":
            m.__class__ = switchable_float8_linear()  # the same module and weights, with a high-precision path
    return transformer


@functools.cache
def cpu_rowwise_fp8():
    """Whether this torch's CPU torch._scaled_mm takes rowwise scales (2.14's does; 2.11's asserts per-tensor only)."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), torch.ones(16, 1), torch.ones(1, 16), out_dtype=torch.bfloat16)
        return True
    except RuntimeError:
        return False


@functools.cache
def switchable_float8_linear():
    import types

    from torchao.float8.float8_linear import Float8Linear, matmul_with_hp_or_float8_args as fp8_matmul
    from torchao.float8.float8_scaling_utils import get_maybe_axiswise_dim, hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import GemmInputRole

    def cast(t, cast_config, mm_config, role, dim, round_scales):
        return hp_tensor_to_float8_dynamic(t, cast_config.target_dtype, mm_config, gemm_input_role=role,
                                           scaling_granularity=cast_config.scaling_granularity,
                                           axiswise_dim=get_maybe_axiswise_dim(dim, cast_config.scaling_granularity),
                                           round_scales_to_power_of_2=round_scales)

    @torch._dynamo.allow_in_graph
    class FrozenWeightMatmul(torch.autograd.Function):
        """torchao's FP8 matmul for a weight that does not train (LoRA's base): its forward, and of its backward only
        the input's gradient. torchao's keeps every input and computes the weight's gradient regardless (at
        FLUX.1-dev's size with LoRA, bench.py --meta: +40 % of the update's FLOPs, +10.6 GiB of activations)."""

        @staticmethod
        def forward(ctx, x, weight_t, mm_config, config):
            ctx.save_for_backward(weight_t)
            ctx.mm_config, ctx.config = mm_config, config
            return fp8_matmul.forward(types.SimpleNamespace(save_for_backward=lambda *a: None), x, weight_t,
                                      mm_config, config)

        @staticmethod
        def backward(ctx, grad_output):  # the first half of torchao's backward, as written there
            (weight_t,), c, shape = ctx.saved_tensors, ctx.config, grad_output.shape
            g = cast(grad_output.reshape(-1, shape[-1]), c.cast_config_grad_output, ctx.mm_config,
                     GemmInputRole.GRAD_OUTPUT, -1, c.round_scales_to_power_of_2)
            w = cast(weight_t, c.cast_config_weight_for_grad_input, ctx.mm_config, GemmInputRole.WEIGHT, -1,
                     c.round_scales_to_power_of_2)
            return torch.mm(g, w.t()).reshape(*shape[:-1], -1), None, None, None

    class SwitchableFloat8Linear(Float8Linear):
        """torchao's Float8Linear, or plain nn.Linear's matmul while update_numerics says so (the same weights); a
        frozen weight's backward computes the input's gradient alone, as nn.Linear's does."""

        def forward(self, x):
            if not _FP8_ON:
                return torch.nn.functional.linear(x, self.weight, self.bias)
            if torch.is_autocast_enabled(x.device.type):  # torchao follows CUDA's autocast only; a CPU's alike
                x = x.to(torch.get_autocast_dtype(x.device.type))
            if self.weight.requires_grad:
                return super().forward(x)
            out = FrozenWeightMatmul.apply(x, self.weight.t(), self.linear_mm_config, self.config)
            return out if self.bias is None else out + self.bias.to(out.dtype)

    return SwitchableFloat8Linear


@contextlib.contextmanager
def update_numerics(fp8):
    """The update's arithmetic: fp8="rollout" computes it (and pi_old's anchor, neighbor_grpo.old_anchors) in the
    compute dtype, FP8 left to the calls without gradient; "all" and "" change nothing. A compiled block guards on the
    flag: one more variant of each."""
    global _FP8_ON
    before, _FP8_ON = _FP8_ON, fp8 != "rollout"
    try:
        yield
    finally:
        _FP8_ON = before


# -----------------------------------------------------------------------------
# What the loop calls, forwarded to the family


def encode_prompt(pipe, prompt, cfg, cache):
    return family(pipe).encode_prompt(pipe, prompt, cfg, cache)


def stack_conditions(conds):
    return family(conds[0]).stack_conditions(conds)


def draw_noise(pipe, n, resolution, gen, device):
    return family(pipe).draw_noise(pipe, n, resolution, gen).to(device)


def schedule(pipe, resolution, num_steps):
    return family(pipe).schedule(pipe, resolution, num_steps)


def velocity(transformer, x, t, cond, dtype=torch.float32):
    with no_grad_attention():
        return family(cond).velocity(transformer, x, t, cond, dtype)


def decode_images(pipe, x, resolution):
    return family(pipe).decode_images(pipe, x, resolution)


def blocks(transformer):
    return family(transformer).blocks(transformer)


def device_memory(device, world=1):
    """The bytes a process can use on device (preflight.usable_memory), the least over the world's ranks so that
    every rank decides alike; None on a CPU: nothing to check."""
    import preflight

    if device.type != "cuda":
        return None
    free = [preflight.usable_memory(*torch.cuda.mem_get_info(device))] * world
    if world > 1:
        torch.distributed.all_gather_object(free, free[0])
    return min(free)


def check_memory(cfg, device, world, rank, presets):
    """(ok, message), before any weight loads: whether the recipe is predicted to fit this GPU (preflight.py), else
    one line naming what does: checkpointing, a one-GPU preset, torchrun over 8 GPUs."""
    capacity = device_memory(device, world)
    if not capacity or not cfg.memory_check:
        return True, ""
    offers = {"--grad_checkpointing=true": (dataclasses.replace(cfg, grad_checkpointing=True), world)}
    for p in ("flux-dev-lora", "flux-dev-24gb"):
        offers[f"--preset={p}"] = (dataclasses.replace(cfg, **presets[p]), 1)
    offers["torchrun over 8 GPUs"] = (dataclasses.replace(cfg, **presets["flux-dev"]), 8)
    return memory_fits(cfg, world, capacity, offers, rank, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def auto_update_batch(cfg, device, world):
    """update_batch_size=auto: the largest divisor of an optimizer step's transitions whose predicted peak fits this
    GPU's usable memory (preflight.largest_update_batch; the least free memory of the world's ranks); on a CPU, where
    nothing is checked, all of them in one call."""
    import preflight

    fam, capacity = family(cfg.model_path), device_memory(device, world)
    if capacity is None:
        return preflight.largest_update_batch(cfg, None, None, world, None, False)
    if fam.NAME != "FLUX":
        raise ModelError(f"update_batch_size=auto: preflight.py prices FLUX only; set a number for {fam.NAME} "
                         "(python bench.py --meta prices it)")
    sizes = fam.model_sizes(cfg.model_path)
    return preflight.largest_update_batch(cfg, sizes, fam.transformer_config(**sizes), world, capacity,
                                          sizes is fam.FLUX_DEV)


def memory_fits(cfg, world, capacity, offers, rank, ranks_per_node):
    """preflight.fits for FLUX (its closed form is FLUX's); other families: a line saying so, and go on."""
    import preflight

    fam = family(cfg.model_path)
    if fam.NAME != "FLUX":
        if rank == 0:
            print(f"memory: preflight.py predicts FLUX only; python bench.py --meta prices {fam.NAME} recipes")
        return True, ""
    sizes = fam.model_sizes(cfg.model_path)
    return preflight.fits(cfg, sizes, fam.transformer_config(**sizes), world, capacity, sizes is fam.FLUX_DEV, offers,
                          rank, ranks_per_node)
