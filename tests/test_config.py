"""Config loading, command-line overrides and every validation error."""

import pytest
from absl import flags
from ml_collections import config_flags

from configs import bagel_7b_mot, tiny
from unijax import config as config_lib


@pytest.mark.parametrize("module,arg", [(tiny, None), (bagel_7b_mot, None),
                                        (bagel_7b_mot, "runlocal")])
def test_shipped_configs_validate(module, arg):
    config = module.get_config(arg)
    config_lib.validate(config, num_devices=8)


def test_grad_accum_must_leave_whole_rows_per_batch_shard(tiny_config):
    tiny_config.train.grad_accum = 2  # 8 rows over 8 batch shards: 1 row each, not 2 x 0.5
    with pytest.raises(config_lib.ConfigError, match="does not split into config.train."
                                                     "grad_accum=2 micro-batches"):
        config_lib.validate(tiny_config, num_devices=8)
    config_lib.validate(tiny_config, num_devices=4)


def test_bagel_shapes_match_official_release():
    llm = bagel_7b_mot.get_config().model.llm
    assert (llm.hidden_size, llm.num_layers, llm.num_heads, llm.num_kv_heads) == (3584, 28, 28, 4)
    assert (llm.head_dim, llm.intermediate_size, llm.vocab_size) == (128, 18944, 152064)
    assert llm.rope_theta == 1e6 and llm.qk_norm and not llm.tie_embeddings
    vit = bagel_7b_mot.get_config().model.vit
    assert (vit.hidden_size, vit.num_layers, vit.num_heads, vit.patch_size) == (1152, 26, 16, 14)
    assert vit.intermediate_size == 4304 and vit.max_grid == 70


def _load(argv):
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv,
                                    lock_config=True)
    values(argv)
    return values.config


def test_command_line_overrides():
    config = _load(["prog", "--config=configs/tiny.py", "--config.train.steps=5",
                    "--config.model.llm.num_layers=2", "--config.attention.impl=pallas_gpu"])
    assert config.train.steps == 5
    assert config.model.llm.num_layers == 2
    assert config.attention.impl == "pallas_gpu"


def test_command_line_sets_parameter_patterns():
    config = _load(["prog", "--config=configs/tiny.py", "--config.train.freeze=('vit/.*',)",
                    "--config.train.lr_multipliers=(('connector/.*', 10.0),)"])
    assert config.train.freeze == ("vit/.*",)
    assert config.train.lr_multipliers == (("connector/.*", 10.0),)
    config_lib.validate(config)


def test_config_arg_selects_variant():
    config = _load(["prog", "--config=configs/bagel_7b_mot.py:runlocal"])
    assert config.model.llm.hidden_size == 64


def test_misspelt_override_is_rejected():
    with pytest.raises(Exception, match="lrr"):
        _load(["prog", "--config=configs/tiny.py", "--config.train.lrr=1.0"])


# (field path, bad value, text the error must contain)
_BAD = [
    ("model.llm.num_heads", 5, "config.model.llm.num_heads=5 must be a multiple of"),
    ("model.llm.hidden_size", 0, "config.model.llm.hidden_size must be positive"),
    ("model.llm.num_experts", 3, "config.model.llm.num_experts must be 1 (dense) or 2"),
    ("model.llm.remat_policy", "most", "config.model.llm.remat_policy must be one of"),
    ("model.llm.rope_theta", -1.0, "config.model.llm.rope_theta must be positive"),
    ("model.dtype", "float8", "config.model.dtype must be one of"),
    ("attention.impl", "flash", "config.attention.impl must be one of"),
    ("attention.chunk_size", 0, "config.attention.chunk_size must be positive"),
    ("model.vit.num_heads", 3, "config.model.vit.hidden_size=64 is not divisible by"),
    ("model.vit.position_mode", "nearest", "config.model.vit.position_mode must be"),
    ("data.vit_image_size", 30, "config.data.vit_image_size=30 is not a multiple of"),
    ("data.max_vit_patches", 10, "config.data.max_vit_patches=10 cannot hold one 16px"),
    ("data.und_capacity", 12, "config.data.und_capacity=12 cannot hold one 16px"),
    ("data.gen_capacity", 8, "config.data.gen_capacity=8 cannot hold one 16px"),
    ("data.vae_image_size", 30, "config.data.vae_image_size=30 is not a multiple of"),
    ("model.max_latent_size", 4, "more than config.model.max_latent_size=4"),
    ("model.latent_channels", 16, "config.model.latent_channels must be 3"),
    ("data.batch_size", 0, "config.data.batch_size must be positive"),
    ("train.steps", 0, "config.train.steps must be positive"),
    ("train.lr", -1.0, "config.train.lr must be >= 0"),
    ("train.warmup_steps", -1, "config.train.warmup_steps must be >= 0"),
    ("train.ema_decay", 1.0, "config.train.ema_decay must be in [0, 1)"),
    ("train.timestep_shift", 0.0, "config.train.timestep_shift must be positive"),
    ("train.mse_weight", -1.0, "config.train.ce_weight and mse_weight must be >= 0"),
]


# Errors of the fields that the attention kernels, the vision towers and the data pipeline add.
_BAD_MORE = [
    ("attention.block_q", 12, "config.attention.block_q must be 0 (platform default) or a "
                              "positive multiple of 8, got 12"),
    ("model.llm.hidden_size", 130, "config.model.llm.hidden_size=130 must be a multiple of 4"),
    ("data.overlong", "wrap", "config.data.overlong must be one of"),
    ("data.num_workers", -1, "config.data.num_workers must be >= 0, got -1"),
    ("data.read_threads", 0, "config.data.read_threads must be positive, got 0"),
    ("data.max_image_pixels", 0, "config.data.max_image_pixels must be positive, got 0"),
    ("data.gen_capacity", -1, "config.data.gen_capacity must be >= 0, got -1"),
]

# Errors of the trainer's fields.
_BAD_TRAIN = [
    ("train.schedule", "step", "config.train.schedule must be one of"),
    ("train.min_lr", 1.0, "config.train.min_lr must be in [0, config.train.lr="),
    ("train.b2", 1.0, "config.train.b2 must be in [0, 1), got 1.0"),
    ("train.eps", 0.0, "config.train.eps must be positive"),
    ("train.grad_clip", -1.0, "config.train.grad_clip must be >= 0"),
    ("train.z_loss_weight", -0.1, "config.train.z_loss_weight must be >= 0"),
    ("train.grad_accum", 0, "config.train.grad_accum must be an int >= 1, got 0"),
    ("train.grad_accum", 3, "config.data.batch_size=8 is not divisible by "
                            "config.train.grad_accum=3"),
    ("train.ce_chunk_size", 0, "config.train.ce_chunk_size must be an int >= 1"),
    ("train.eval_batches", -1, "config.train.eval_batches must be an int >= 0"),
    ("train.eval_timesteps", (0.5, 1.5), "config.train.eval_timesteps must be flow times in "
                                         "(0, 1]"),
    ("train.freeze", ("vit/.*", 3), "config.train.freeze must be a tuple of regex strings"),
    ("train.lr_multipliers", (("vit/.*",),), "config.train.lr_multipliers must be (regex, "
                                             "factor) pairs"),
    ("checkpoint.every_steps", 0, "config.checkpoint.every_steps must be an int >= 1"),
    ("data.eval_datasets.shapes.weight", -1.0, "config.data.eval_datasets.shapes.weight must "
                                               "be positive"),
]


def _set(config, path, value):
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


@pytest.mark.parametrize("path,value,message", _BAD + _BAD_MORE + _BAD_TRAIN,
                         ids=[b[0] for b in _BAD + _BAD_MORE + _BAD_TRAIN])
def test_each_validation_error_names_the_field(tiny_config, path, value, message):
    _set(tiny_config, path, value)
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(tiny_config)
    assert message in str(e.value)


def test_freezing_the_only_expert_is_rejected(tiny_config):
    tiny_config.model.llm.num_experts = 1
    tiny_config.model.llm.freeze_und_expert = True
    with pytest.raises(config_lib.ConfigError, match="freeze_und_expert=True needs"):
        config_lib.validate(tiny_config)


def test_vit_grid_beyond_position_table_is_rejected(tiny_config):
    tiny_config.model.vit.max_grid = 4
    with pytest.raises(config_lib.ConfigError, match="more than config.model.vit.max_grid=4"):
        config_lib.validate(tiny_config)
    tiny_config.model.vit.position_mode = "interpolate"
    config_lib.validate(tiny_config)


def test_vae_channels_must_agree():
    config = bagel_7b_mot.get_config()
    config.model.vae.latent_channels = 4
    with pytest.raises(config_lib.ConfigError, match="config.model.vae.latent_channels=4"):
        config_lib.validate(config)


def test_heads_not_divisible_by_tensor_axis(tiny_config):
    tiny_config.mesh.tensor = 8
    tiny_config.mesh.data = 1
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(tiny_config, num_devices=8)
    assert "config.model.llm.num_heads=4 is not divisible by config.mesh.tensor=8" in str(e.value)
    tiny_config.mesh.tensor = 3
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(tiny_config)
    assert "num_kv_heads=2 and config.mesh.tensor=3 must divide one another" in str(e.value)
    assert "config.model.llm.intermediate_size=384" not in str(e.value)


def test_all_errors_reported_at_once(tiny_config):
    tiny_config.train.steps = 0
    tiny_config.attention.impl = "nope"
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(tiny_config)
    assert "train.steps" in str(e.value) and "attention.impl" in str(e.value)


@pytest.mark.parametrize("sizes,devices,message", [
    ((3, 1, 1), 8, "covers 3 devices but 8 are available"),
    ((-1, -1, 1), 8, "at most one mesh axis may be -1"),
    ((-1, 3, 1), 8, "do not divide the 8 devices"),
    ((0, 1, 1), 8, "must be positive or -1"),
])
def test_mesh_errors(tiny_config, sizes, devices, message):
    tiny_config.mesh.data, tiny_config.mesh.fsdp, tiny_config.mesh.tensor = sizes
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(tiny_config, num_devices=devices)


def test_batch_must_split_over_batch_shards(tiny_config):
    tiny_config.data.batch_size = 6
    with pytest.raises(config_lib.ConfigError, match="batch_size=6 is not divisible by the 8"):
        config_lib.validate(tiny_config, num_devices=8)


def test_mesh_shape_resolves_free_axis(tiny_config):
    tiny_config.mesh.data, tiny_config.mesh.fsdp, tiny_config.mesh.tensor = -1, 2, 2
    assert config_lib.mesh_shape(tiny_config.mesh, 8) == {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("field,value,message", [
    ("channel_mult", (1, 0, 2, 2), "config.model.vae.channel_mult must be a non-empty tuple of "
                                   "positive ints"),
    ("norm_groups", 5, "config.model.vae.norm_groups=5 must divide every level width"),
])
def test_vae_layout_errors(field, value, message):
    config = bagel_7b_mot.get_config("runlocal")
    config.model.vae[field] = value
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config)
    assert message in str(e.value)


@pytest.mark.parametrize("option,value,message", [
    ("weight", 0.0, "config.data.datasets.shapes.weight must be positive, got 0.0"),
    ("text_cond_dropout", 1.5, "config.data.datasets.shapes.text_cond_dropout must be in [0, 1]"),
    ("video_noise", "per_pixel", "config.data.datasets.shapes.video_noise must be one of"),
    ("max_video_frames", 0, "config.data.datasets.shapes.max_video_frames must be >= 1"),
    ("video_context_frames", -1, "config.data.datasets.shapes.video_context_frames must be >= 0"),
    ("video_frame_size", -1, "config.data.datasets.shapes.video_frame_size must be >= 0"),
])
def test_dataset_entry_errors_name_the_dataset(tiny_config, option, value, message):
    from configs import base

    tiny_config.data.datasets.shapes = base.data_source("worlds/shapes-*.array_record")
    config_lib.validate(tiny_config)
    tiny_config.data.datasets.shapes[option] = value
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(tiny_config)
    assert message in str(e.value)


def test_dataset_entry_must_be_a_config_dict(tiny_config):
    tiny_config.data.datasets.wrong = 3
    with pytest.raises(config_lib.ConfigError, match="config.data.datasets.wrong must be a "
                                                     "ConfigDict"):
        config_lib.validate(tiny_config)


@pytest.mark.parametrize("impl,overrides,messages", [
    # tiny rows are 384 tokens: the TPU's default 256-token backward tiles do not divide them.
    ("pallas_tpu", {}, ["config.attention.block_q_bwd=0 with rows of config.data.und_capacity "
                        "+ gen_capacity = 384 tokens", "not a multiple of block_q_bwd=256",
                        "config.attention.block_kv_bwd=0"]),
    ("pallas_tpu", {"attention.block_q_bwd": 128, "attention.block_kv_bwd": 128}, []),
    ("pallas_gpu", {"attention.block_kv": 256}, ["config.attention.block_kv=256 with rows",
                                                 "not a multiple of block_kv=256"]),
    ("pallas_gpu", {"model.llm.head_dim": 24}, ["config.model.llm.head_dim=24",
                                               "head dim 24 is not supported"]),
    ("pallas_gpu", {"data.max_vit_patches": 100}, ["config.data.max_vit_patches=100 ViT patch "
                                                   "slots", "not a multiple of block_kv=64"]),
    ("xla", {"data.max_vit_patches": 100, "model.llm.head_dim": 24}, []),
])
def test_pallas_layouts_are_checked_before_compiling(tiny_config, impl, overrides, messages):
    tiny_config.attention.impl = impl
    for path, value in overrides.items():
        _set(tiny_config, path, value)
    if not messages:
        config_lib.validate(tiny_config)
        return
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(tiny_config)
    for message in messages:
        assert message in str(e.value)
