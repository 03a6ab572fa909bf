"""configs/bagel_7b_mot.py against the released BAGEL-7B-MoT: the config its JSON files and
BAGEL's hard-coded model arguments give, and the state dict it maps to (1223 tensors)."""

import math

import ml_collections

from configs import bagel_7b_mot
from tests.convert import official_layout
from unijax import config as config_lib
from unijax.convert import bagel_layout as layout

# llm_config.json / vit_config.json of ByteDance-Seed/BAGEL-7B-MoT (Qwen2.5-7B-Instruct's LLM
# config; SigLIP so400m/14 at 980 px, 27 layers of which BAGEL uses 26).
LLM_CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
              "hidden_act": "silu", "hidden_size": 3584, "intermediate_size": 18944,
              "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
              "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 152064,
              "tie_word_embeddings": False, "max_position_embeddings": 32768,
              "torch_dtype": "bfloat16", "use_sliding_window": False}
VIT_CONFIG = {"model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh",
              "hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16,
              "num_hidden_layers": 27, "patch_size": 14, "image_size": 980,
              "layer_norm_eps": 1e-6, "num_channels": 3, "attention_dropout": 0.0}
# The unijax values they give (bagel.md section 0; app.py's BagelConfig arguments; load_ae).
RELEASED_MODEL = {
    "llm": dict(vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28,
                num_kv_heads=4, head_dim=128, intermediate_size=18944, rope_theta=1e6,
                rms_norm_eps=1e-6, qk_norm=True, qkv_bias=True, tie_embeddings=False,
                num_experts=2),
    "vit": dict(hidden_size=1152, num_layers=26, num_heads=16, intermediate_size=4304,
                patch_size=14, max_grid=70, layer_norm_eps=1e-6, position_mode="extrapolate"),
    "vae": dict(in_channels=3, latent_channels=16, base_channels=128, channel_mult=(1, 2, 4, 4),
                num_res_blocks=2, norm_groups=32, norm_eps=1e-6, scaling_factor=0.3611,
                shift_factor=0.1159, sample_posterior=True),
    "max_latent_size": 64, "latent_patch_size": 2, "latent_channels": 16}


def _released_config() -> ml_collections.ConfigDict:
    config, problems = layout.build_config(LLM_CONFIG, VIT_CONFIG, bagel_7b_mot.get_config())
    assert problems == []
    return config


def test_config_file_has_the_released_model():
    ours, released = bagel_7b_mot.get_config().model, _released_config().model
    for section in ("llm", "vit", "vae"):
        for field, value in RELEASED_MODEL[section].items():
            assert released[section][field] == value, (section, field)
            assert ours[section][field] == value, f"configs/bagel_7b_mot.py model.{section}.{field}"
    for field in ("max_latent_size", "latent_patch_size", "latent_channels"):
        assert released[field] == ours[field] == RELEASED_MODEL[field], field
    config_lib.validate(_released_config(), num_devices=256)
    assert _released_config().train.timestep_shift == 1.0
    assert _released_config().data.vit_image_size == 980
    assert _released_config().data.vae_image_size == 1024


def test_released_state_dict_is_what_the_model_maps_to():
    """1223 tensors and 14.61 B values in ema.safetensors, 244 and 83.8 M in ae.safetensors
    (bagel.md section 6, counted on the meta device)."""
    config = _released_config()
    _, _, _, abstract, _ = layout.abstract_model(config)
    shapes = {n: tuple(a.shape) for n, a in abstract.items()}
    sources, unmapped = layout.plan(config, shapes)
    assert unmapped == []
    official = {layout.EMA: {}, layout.AE: {}}
    for name, src in sources.items():
        for key in src.keys:
            official[src.file][key] = src.official_shape(shapes[name])
    dim = config.model.llm.hidden_size
    for key, side in layout.table_sides(config).items():
        official[layout.EMA][key] = (side * side, dim)
    dims = official_layout.RELEASED
    assert official[layout.EMA] == official_layout.ema_shapes(dims)
    assert official[layout.AE] == official_layout.ae_shapes(dims)
    assert len(official[layout.EMA]) == 1223 and len(official[layout.AE]) == 244
    count = lambda part: sum(math.prod(s) for s in official[part].values())
    assert round(count(layout.EMA) / 1e9, 2) == 14.61
    assert round(count(layout.AE) / 1e6, 1) == 83.8
