"""
FLUX.1-dev through diffusers, as neighbor_grpo.py uses it: the FluxPipeline (transformer, VAE, CLIP and T5 text
encoders) loaded from the hub or a directory, on the meta device for FSDP ranks, with LoRA adapters (peft), or built
at random sizes for CPU presets and benchmarks; the conditioning FluxPipeline passes, the velocity call, decoding,
and export in diffusers' formats. Of the project it imports only rewards.tokenizer_is_empty.
"""

import contextlib
import json
import logging
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from rewards import tokenizer_is_empty

# bitsandbytes (which diffusers imports when it is installed) warns on every CPU that an optional hub kernel is absent
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class ModelError(ValueError):
    """A model that cannot load as configured: the message names the field and the fix."""


TINY = dict(  # a FLUX-architecture model small enough for a CPU
    layers=1, single_layers=2, heads=2, head_dim=16, rope=(4, 6, 6), text_dim=32, pooled_dim=32, text_layers=2,
    latent_channels=4, vae_channels=(16, 32), vae_layers=1, vae_groups=8)
FLUX_DEV = dict(  # FLUX.1-dev's sizes (its text encoders are CLIP-L and T5-XXL; random stand-ins keep their widths)
    layers=19, single_layers=38, heads=24, head_dim=128, rope=(16, 56, 56), text_dim=4096, pooled_dim=768,
    text_layers=1, latent_channels=16, vae_channels=(128, 256, 512, 512), vae_layers=2, vae_groups=32)
FLUX_SCHEDULER = dict(  # FLUX.1-dev's scheduler config (of the scheduler, the project uses only the time grid)
    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
    max_image_seq_len=4096)


def random_sizes(model_path):
    """The sizes of a random model_path: "tiny" (TINY) or "random:D,S" (FLUX.1-dev's width with D double and S single
    blocks); None for a model to load."""
    if model_path == "tiny":
        return TINY
    if model_path.startswith("random:"):
        double, single = (int(n) for n in model_path.removeprefix("random:").split(","))
        return {**FLUX_DEV, "layers": double, "single_layers": single}
    return None


def model_sizes(model_path):
    """The sizes of model_path's transformer and VAE: random_sizes', a local pipeline's config.json, or FLUX.1-dev's
    (any other path: the hub model, not downloaded)."""
    sizes = random_sizes(model_path)
    config = Path(model_path) / "transformer" / "config.json"
    if sizes is not None or not config.is_file():
        return sizes or FLUX_DEV
    c, vae = json.loads(config.read_text()), json.loads((Path(model_path) / "vae" / "config.json").read_text())
    return dict(layers=c["num_layers"], single_layers=c["num_single_layers"], heads=c["num_attention_heads"],
                head_dim=c["attention_head_dim"], rope=tuple(c["axes_dims_rope"]), text_dim=c["joint_attention_dim"],
                pooled_dim=c["pooled_projection_dim"], latent_channels=c["in_channels"] // 4,
                vae_channels=tuple(vae["block_out_channels"]), vae_layers=vae["layers_per_block"],
                vae_groups=vae["norm_num_groups"])


def transformer_config(layers, single_layers, heads, head_dim, rope, text_dim, pooled_dim, latent_channels, **_):
    """FluxTransformer2DModel's arguments for these sizes (FLUX_DEV: black-forest-labs/FLUX.1-dev's config.json)."""
    return dict(patch_size=1, in_channels=4 * latent_channels, num_layers=layers, num_single_layers=single_layers,
                attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text_dim,
                pooled_projection_dim=pooled_dim, guidance_embeds=True, axes_dims_rope=rope)


def vae_config(latent_channels, vae_channels, vae_layers, vae_groups, **_):
    """AutoencoderKL's arguments for these sizes (FLUX_DEV: FLUX.1-dev's VAE)."""
    n = len(vae_channels)
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=vae_channels, layers_per_block=vae_layers,
                latent_channels=latent_channels, norm_num_groups=vae_groups, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)


def build_random_flux(seed, *, layers, single_layers, heads, head_dim, rope, text_dim, pooled_dim, text_layers,
                      latent_channels, vae_channels, vae_layers, vae_groups, init_device=None):
    """A randomly initialised FluxPipeline of the given sizes: the classes of FLUX.1-dev, tokenizers built in memory.
    init_device: the transformer is built there, its weights N(0, 0.02) (a 12 B-parameter default init takes minutes
    on a CPU; bench.py's timings need no particular weights)."""
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
    config = transformer_config(layers, single_layers, heads, head_dim, rope, text_dim, pooled_dim, latent_channels)
    if init_device is None:
        transformer = FluxTransformer2DModel(**config)
    else:
        with torch.device("meta"):
            transformer = FluxTransformer2DModel(**config)
        transformer.to_empty(device=init_device)
        generator = torch.Generator(init_device).manual_seed(seed)
        for p in transformer.parameters():
            torch.nn.init.normal_(p.data, std=0.02, generator=generator)
    vae = AutoencoderKL(**vae_config(latent_channels, vae_channels, vae_layers, vae_groups))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae,
                        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)


def load_pipeline(cfg, device, dtype, meta=False, inference=False):
    """FluxPipeline for cfg.model_path: VAE and text encoders on device in dtype, frozen; the transformer in fp32
    (the master weights; with LoRA or for inference, evaluate.py's, in dtype) on the CPU until parallelize() moves
    it (a random FLUX.1-dev-width stand-in is built on device). meta=True (FSDP ranks but 0): the transformer's
    architecture alone, on the meta device; rank 0 sends the weights."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    def load(fn, field, path, **kwargs):
        fix = ("pass a trained transformer's directory (a run's out_dir/transformer)" if field == "transformer_path"
               else "download black-forest-labs/FLUX.1-dev (huggingface-cli download) and pass its directory")
        if not Path(path).exists() and (path.count("/") != 1 or path.startswith((".", "/", "~"))):  # not a hub id
            raise ModelError(f"{field}={path}: no such directory; {fix}")
        try:
            return fn(path, **kwargs)
        except (OSError, ValueError) as e:
            raise ModelError(f"{field}={path}: cannot load FLUX ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                             f"{fix}") from None

    def load_transformer(field, path, **kwargs):
        if meta:
            config = load(FluxTransformer2DModel.load_config, field, path, **kwargs)
            with torch.device("meta"):
                return FluxTransformer2DModel.from_config(config)
        return load(FluxTransformer2DModel.from_pretrained, field, path, dtype=master, **kwargs)

    master, sizes = dtype if cfg.lora_rank or inference else torch.float32, random_sizes(cfg.model_path)
    if sizes is not None:
        pipe = build_random_flux(cfg.seed, **sizes, init_device=None if sizes is TINY else device)
        for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2) if sizes is not TINY else ():
            module.to(dtype)  # FLUX.1-dev-width stand-ins (bench.py): as from_pretrained(dtype=dtype) loads them
    else:
        transformer = None if cfg.transformer_path else load_transformer("model_path", cfg.model_path,
                                                                          subfolder="transformer")
        pipe = load(FluxPipeline.from_pretrained, "model_path", cfg.model_path, transformer=transformer, dtype=dtype)
        for name in ("tokenizer", "tokenizer_2"):
            if tokenizer_is_empty(getattr(pipe, name)):
                raise ModelError(
                    f"model_path={cfg.model_path}: {name} ({type(getattr(pipe, name)).__name__}) loaded with no "
                    f"vocabulary; {name}/ lacks tokenizer.json (or vocab.json + merges.txt, spiece.model): download "
                    "black-forest-labs/FLUX.1-dev completely (huggingface-cli download) and pass its directory")
    if cfg.transformer_path:
        pipe.transformer = load_transformer("transformer_path", cfg.transformer_path)
    if cfg.base_quantization:
        quantize_base(pipe.transformer, dtype, device)
    if cfg.lora_rank:
        add_lora(pipe.transformer, cfg, dtype)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.to(device).requires_grad_(False).eval()
    return pipe


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

    transformer.requires_grad_(False).to(dtype)  # a random model is fp32; from_pretrained loads it in dtype already
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
        raise ModelError(f"lora_targets={','.join(cfg.lora_targets)}: {str(e).splitlines()[0][:200]}") from None
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if cfg.lora_path:
        if not Path(cfg.lora_path).is_dir():
            raise ModelError(f"lora_path={cfg.lora_path}: no such directory; pass out_dir/lora of a LoRA run")
        try:
            state = FluxPipeline.lora_state_dict(cfg.lora_path)
            state = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
            unexpected = set_peft_model_state_dict(transformer, state).unexpected_keys
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelError(f"lora_path={cfg.lora_path}: cannot load the adapter at lora_rank={cfg.lora_rank} "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); pass out_dir/lora of a LoRA run "
                              "and the --lora_rank and --lora_targets it was trained with") from None
        if unexpected or not state:
            raise ModelError(f"lora_path={cfg.lora_path}: the adapter does not fit lora_targets="
                              f"{','.join(cfg.lora_targets)} ({len(state)} tensors, unexpected {unexpected[:2]})")


@dataclass
class Condition:
    """Everything besides (x, t) that FluxPipeline passes to the transformer, for one prompt."""

    prompt_embeds: torch.Tensor  # [1, S, D_t5]
    pooled: torch.Tensor  # [1, D_clip]
    txt_ids: torch.Tensor  # [S, 3]
    img_ids: torch.Tensor  # [L, 3]
    guidance: torch.Tensor | None  # [1] or None for models without guidance embedding


def packed_side(pipe, resolution):
    """Tokens per side of the packed latents: FLUX packs each 2x2 patch of the VAE's latents into one token."""
    return resolution // pipe.vae_scale_factor // 2


def latent_shape(pipe, resolution):
    """(L, C) of the packed latents: 2x2 latent patches become tokens of 4 * latent_channels."""
    return packed_side(pipe, resolution) ** 2, pipe.transformer.config.in_channels


@torch.no_grad()
def encode_prompt(pipe, prompt, cfg, cache):
    """CLIP pooled + T5 embeddings of one prompt, computed once and cached on the CPU."""
    device = pipe.vae.device
    if prompt not in cache:  # on the text encoders' device: the CPU once offloaded, for a prompt met late
        embeds, pooled, _ = pipe.encode_prompt(prompt, prompt_2=prompt, device=pipe.text_encoder_2.device,
                                               max_sequence_length=cfg.max_sequence_length)
        cache[prompt] = (embeds.cpu(), pooled.cpu())
    embeds, pooled = cache[prompt]
    side = packed_side(pipe, cfg.resolution)
    img_ids = pipe._prepare_latent_image_ids(1, side, side, device, torch.float32)
    txt_ids = torch.zeros(embeds.shape[1], 3, device=device)
    guidance = torch.full([1], cfg.guidance_scale, device=device) if pipe.transformer.config.guidance_embeds else None
    return Condition(embeds.to(device), pooled.to(device), txt_ids, img_ids, guidance)


def stack_conditions(conds):
    """One Condition for a batch whose samples have these conditions (one prompt's is kept as it is, batch 1)."""
    if all(c is conds[0] for c in conds):
        return conds[0]
    guidance = None if conds[0].guidance is None else torch.cat([c.guidance for c in conds])
    return Condition(torch.cat([c.prompt_embeds for c in conds]), torch.cat([c.pooled for c in conds]),
                     conds[0].txt_ids, conds[0].img_ids, guidance)


def velocity(transformer, x, t, cond, dtype=torch.float32):
    """v_theta(x, t, c) for a batch x [N, L, C] at time t (one for all, or one per sample: FLUX embeds a timestep per
    batch element), called exactly as FluxPipeline calls it; cond of batch 1 (one prompt) or N."""
    n = x.shape[0]
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        v = transformer(
            hidden_states=x,
            timestep=torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(n),  # FluxPipeline: sigma
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


def export_transformer(model, path, rank, dtype):
    """The full transformer as safetensors + config.json, loadable by FluxTransformer2DModel.from_pretrained."""
    from huggingface_hub import save_torch_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        Path(path).mkdir(parents=True, exist_ok=True)
        save_torch_state_dict({k: v.to(dtype) for k, v in state.items()}, path, max_shard_size="10GB",
                              filename_pattern="diffusion_pytorch_model{suffix}.safetensors")
        getattr(model, "module", model).save_config(path)


def export_lora(model, path, rank):
    """The adapter as FluxPipeline.save_lora_weights writes it, with its LoraConfig (alpha included), so that
    FluxPipeline.load_lora_weights(path) reproduces the trained model."""
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    transformer = getattr(model, "module", model)  # DDP wraps it
    if rank == 0:
        layers = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(transformer).items()}
        FluxPipeline.save_lora_weights(path, transformer_lora_layers=layers,
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
    """The same transformer with its LoRA adapters switched off (the base model), at no memory; back on after."""
    transformer = getattr(model, "module", model)  # DDP wraps it
    transformer.disable_adapters()
    try:
        yield transformer
    finally:
        transformer.enable_adapters()
