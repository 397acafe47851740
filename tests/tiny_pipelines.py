"""Tiny random-weight diffusers pipelines, built offline from configs, for end-to-end tests.

`build_pipeline(kind, folder)` saves a pipeline that `DiffusionPipeline.from_pretrained(folder)`
loads without any hub access. `CALL_ARGS[kind]` are the call arguments for a small, fast run:
token grids of 3 frames x 4x6 for the video kinds and 6x8 for Flux (distinct axis sizes, so a
mixed-up axis order shows). `example_image(kind)` is the conditioning image a kind needs (None
for text-only kinds).

The transformers are tiny, but keep the layout of the real models where attention depends on it:
patch sizes, head dims that the RoPE splits accept, qk norms, text and image context streams.
Tokenizers are built from in-memory vocabularies (a transformers 5 API): ByT5 (byte level, no
vocab file) stands in for T5/UMT5, CLIP gets a byte-level BPE vocab without merges, Llama a
byte-fallback vocab.
"""

from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from PIL import Image
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    ByT5Tokenizer,
    CLIPImageProcessorPil,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaModel,
    LlamaTokenizer,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

KINDS = {
    "wan": "Wan 2.1 T2V: WanPipeline, one transformer, UMT5 text encoder, UniPC flow scheduler",
    "wan22": "Wan 2.2 A14B T2V: WanPipeline, high-noise `transformer`, low-noise `transformer_2`, boundary 0.875",
    "wan_i2v": "Wan 2.1 I2V: WanImageToVideoPipeline, 36 input channels, CLIP vision image encoder",
    "cogvideox": "CogVideoX-5B style: CogVideoXPipeline with rotary position embeddings, T5 text encoder",
    "hunyuanvideo": "HunyuanVideo T2V: HunyuanVideoPipeline, Llama + CLIP text encoders, guidance-distilled",
    "flux": "FLUX.1-dev style: FluxPipeline, CLIP + T5 text encoders, guidance embedding",
}

# 9 frames -> 3 latent frames (temporal compression 4); 64x96 pixels -> 8x12 latents (spatial
# compression 8) -> 4x6 tokens after the 2x2 patchify. Flux: 96x128 -> 12x16 latents -> 6x8 tokens.
_VIDEO = {"num_frames": 9, "height": 64, "width": 96}
# HunyuanVideo's prompt template: the Llama tokens of the prefix (<s> and "▁video:", one token per
# byte) are cropped off, as the real template's 95-token system prompt is.
_HUNYUAN_TEMPLATE = {"template": "video: {}", "crop_start": 8}
CALL_ARGS: dict[str, dict] = {
    "wan": dict(_VIDEO),
    "wan22": dict(_VIDEO),
    "wan_i2v": dict(_VIDEO),  # Wan 2.1 I2V attention assumes 512 text tokens: keep the default max_sequence_length
    "cogvideox": {**_VIDEO, "max_sequence_length": 16},  # = the transformer's max_text_seq_length
    "hunyuanvideo": {**_VIDEO, "max_sequence_length": 16, "prompt_template": _HUNYUAN_TEMPLATE},
    "flux": {"height": 96, "width": 128, "max_sequence_length": 16},
}

_TEXT_DIM = 32  # hidden size of every tiny T5/UMT5/CLIP text encoder


def example_image(kind: str) -> Image.Image | None:
    """The conditioning image for image-to-video kinds (a fixed colour gradient), else None."""
    if kind != "wan_i2v":
        return None
    height, width = CALL_ARGS[kind]["height"], CALL_ARGS[kind]["width"]
    ys, xs = np.mgrid[0:height, 0:width]
    rgb = np.stack([xs * 255 // width, ys * 255 // height, np.full_like(xs, 128)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def build_pipeline(kind: str, folder: Path) -> Path:
    """Build the tiny `kind` pipeline with fixed seeds, save it (safetensors) to `folder`, return `folder`."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(KINDS)}")
    folder = Path(folder)
    _BUILDERS[kind]().save_pretrained(folder, safe_serialization=True)
    return folder


def _seeded(seed: int, make):
    torch.manual_seed(seed)
    return make()


# ---- tokenizers and text encoders -------------------------------------------------------------


def _t5_tokenizer() -> ByT5Tokenizer:
    return ByT5Tokenizer()  # 256 bytes + 3 specials + 125 sentinels, no vocab file


def _t5_config(config_class):
    return config_class(
        vocab_size=len(_t5_tokenizer()),
        d_model=_TEXT_DIM,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def _clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE without merges: every byte is a token, with an end-of-word variant."""
    chars = sorted(ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def _clip_text_encoder(hidden_size: int) -> CLIPTextModel:
    tokenizer = _clip_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def _llama_tokenizer() -> LlamaTokenizer:
    """Byte-fallback Llama vocabulary: specials, the word marker, then one token per byte."""
    tokens = ["<unk>", "<s>", "</s>", "<pad>", "▁"] + [f"<0x{b:02X}>" for b in range(256)]
    return LlamaTokenizer(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=[],
        pad_token="<pad>",
        padding_side="right",
        add_bos_token=True,
    )


def _llama_text_encoder(hidden_size: int) -> LlamaModel:
    tokenizer = _llama_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaModel(config)


# ---- Wan -------------------------------------------------------------------------------------


def _wan_vae() -> AutoencoderKLWan:
    # z_dim 16: the pipeline's latents_mean/std (config defaults) have 16 entries.
    return AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


def _wan_transformer(in_channels: int = 16, **image_kwargs) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=in_channels,
        out_channels=16,
        text_dim=_TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=32,
        **image_kwargs,
    )


def _wan_scheduler(flow_shift: float) -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=flow_shift
    )


def _wan_text_components() -> dict:
    return {"tokenizer": _t5_tokenizer(), "text_encoder": _seeded(0, lambda: UMT5EncoderModel(_t5_config(UMT5Config)))}


def _wan() -> WanPipeline:
    return WanPipeline(
        **_wan_text_components(),
        vae=_seeded(0, _wan_vae),
        transformer=_seeded(0, _wan_transformer),
        scheduler=_wan_scheduler(flow_shift=3.0),  # Wan2.1-T2V-1.3B
    )


def _wan22() -> WanPipeline:
    # The real A14B samples with flow_shift 12, where a 2-step run stays above the 0.875 boundary
    # and never reaches `transformer_2`; shift 3 switches experts at the second of 2 steps.
    return WanPipeline(
        **_wan_text_components(),
        vae=_seeded(0, _wan_vae),
        transformer=_seeded(0, _wan_transformer),
        transformer_2=_seeded(1, _wan_transformer),
        scheduler=_wan_scheduler(flow_shift=3.0),
        boundary_ratio=0.875,
    )


def _wan_i2v() -> WanImageToVideoPipeline:
    # Wan 2.1 I2V: 16 noise + 4 mask + 16 image-latent channels in; the CLIP image tokens reach
    # the cross attention through added K/V projections (added_kv_proj_dim = inner dim, as in 14B).
    vision_config = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    return WanImageToVideoPipeline(
        **_wan_text_components(),
        vae=_seeded(0, _wan_vae),
        transformer=_seeded(0, lambda: _wan_transformer(in_channels=36, image_dim=16, added_kv_proj_dim=24)),
        scheduler=_wan_scheduler(flow_shift=3.0),  # Wan2.1-I2V-14B-480P
        image_encoder=_seeded(0, lambda: CLIPVisionModel(vision_config)),
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    )


# ---- CogVideoX -------------------------------------------------------------------------------


def _cogvideox() -> CogVideoXPipeline:
    vae = _seeded(
        0,
        lambda: AutoencoderKLCogVideoX(
            down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=2,
            temporal_compression_ratio=4,
            scaling_factor=0.7,
        ),
    )
    # sample_height/width: the latent grid of CALL_ARGS, the 3D RoPE's base grid. Head dim 16 splits
    # into 4/6/6 rotary channels for t/h/w; head dim 8 would give odd splits that RoPE rejects.
    transformer = _seeded(
        0,
        lambda: CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=4,
            time_embed_dim=16,
            text_embed_dim=_TEXT_DIM,
            num_layers=2,
            patch_size=2,
            temporal_compression_ratio=4,
            sample_height=_VIDEO["height"] // 8,
            sample_width=_VIDEO["width"] // 8,
            sample_frames=_VIDEO["num_frames"],
            max_text_seq_length=CALL_ARGS["cogvideox"]["max_sequence_length"],
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=False,
        ),
    )
    scheduler = CogVideoXDDIMScheduler(  # CogVideoX-5B
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
    )
    return CogVideoXPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=_seeded(0, lambda: T5EncoderModel(_t5_config(T5Config))),
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )


# ---- HunyuanVideo ----------------------------------------------------------------------------


def _hunyuanvideo() -> HunyuanVideoPipeline:
    vae = _seeded(
        0,
        lambda: AutoencoderKLHunyuanVideo(
            latent_channels=4,
            down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=4,
            scaling_factor=0.476986,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
        ),
    )
    transformer = _seeded(
        0,
        lambda: HunyuanVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=10,
            num_layers=2,
            num_single_layers=2,
            num_refiner_layers=1,
            patch_size=2,
            patch_size_t=1,
            guidance_embeds=True,
            text_embed_dim=16,
            pooled_projection_dim=8,
            rope_axes_dim=(2, 4, 4),
        ),
    )
    return HunyuanVideoPipeline(
        tokenizer=_llama_tokenizer(),
        text_encoder=_seeded(0, lambda: _llama_text_encoder(hidden_size=16)),
        tokenizer_2=_clip_tokenizer(),
        text_encoder_2=_seeded(0, lambda: _clip_text_encoder(hidden_size=8)),
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )


# ---- Flux ------------------------------------------------------------------------------------


def _flux() -> FluxPipeline:
    vae = _seeded(
        0,
        lambda: AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.1159,
            scaling_factor=0.3611,
        ),
    )
    # in_channels = latent_channels x the 2x2 latent packing; axes_dims_rope sum to the head dim.
    transformer = _seeded(
        0,
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=_TEXT_DIM,
            pooled_projection_dim=_TEXT_DIM,
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        ),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev: resolution-dependent shift
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        tokenizer=_clip_tokenizer(),
        text_encoder=_seeded(0, lambda: _clip_text_encoder(hidden_size=_TEXT_DIM)),
        tokenizer_2=_t5_tokenizer(),
        text_encoder_2=_seeded(0, lambda: T5EncoderModel(_t5_config(T5Config))),
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )


_BUILDERS = {
    "wan": _wan,
    "wan22": _wan22,
    "wan_i2v": _wan_i2v,
    "cogvideox": _cogvideox,
    "hunyuanvideo": _hunyuanvideo,
    "flux": _flux,
}
