"""benchmarks/aot.py: the BAGEL-width train step AOT-compiled on the 8 test devices through the
benchmark's own code path, its memory analysis checked against the analytic state bytes."""

import jax
import numpy as np
import pytest

from benchmarks import aot
from unijax.training import optim
from unijax.training import state as state_lib

BAGEL = "configs/bagel_7b_mot.py"
# BAGEL-7B-MoT's decoder width (hidden 3584, 28 / 4 heads of 128, MLP 18944, vocab 152,064) at
# 2 layers; so that the CPU compiles it in seconds, a 1-layer ViT of SigLIP's width and pixel
# space instead of the FLUX VAE (the VAE is frozen: no optimizer state, no gradient).
SMALL = ("model.vit.num_layers=1", "model.vae=None", "model.latent_channels=3",
         "data.vae_image_size=64", "data.vae_min_image_size=64")


def test_row_budgets_keep_the_config_proportions():
    config = aot.load_config(BAGEL)  # und 13,824 : gen 23,040 = 3 : 5; 12,288 patches; 11 slots
    assert aot.row_budgets(config.data, 16384) == {
        "und_capacity": 6144, "gen_capacity": 10240, "max_vit_patches": 5632,
        "max_vae_images": 5}
    for tokens in (8192, 32768, 36864):
        b = aot.row_budgets(config.data, tokens)
        assert b["und_capacity"] + b["gen_capacity"] == tokens
        assert b["und_capacity"] % 512 == 0 and b["max_vit_patches"] % 512 == 0
        assert b["und_capacity"] / tokens == pytest.approx(3 / 8, abs=512 / tokens)
    assert aot.row_budgets(config.data, 36864) == {  # the config's own row
        "und_capacity": 13824, "gen_capacity": 23040, "max_vit_patches": 12288,
        "max_vae_images": 11}
    with pytest.raises(ValueError, match="--row_tokens=1000"):
        aot.row_budgets(config.data, 1000)


def test_mesh_and_override_parsing():
    assert aot.parse_mesh("fsdp=16,tensor=4") == {"data": 1, "fsdp": 16, "tensor": 4}
    with pytest.raises(ValueError, match="expected axis=size"):
        aot.parse_mesh("fdsp=4")
    config = aot.load_config(BAGEL)
    aot.apply_override(config, "train.ema_decay=0")
    aot.apply_override(config, "train.optimizer_state_dtype=bfloat16")
    assert config.train.ema_decay == 0 and config.train.optimizer_state_dtype == "bfloat16"
    with pytest.raises(KeyError, match="train.ema_decya"):
        aot.apply_override(config, "train.ema_decya=0")


def test_bagel_width_step_compiles_and_its_memory_analysis_is_well_formed(cpu_devices):
    case = aot.Case(BAGEL, {"data": 1, "fsdp": 8, "tensor": 1}, "full", 2048, layers=2,
                    overrides=SMALL)
    result = aot.run_case(case)
    assert "error" not in result, result["error"]
    assert result["num_devices"] == 8 and result["batch_size"] == 8  # one row per device
    assert result["layers"] == 2 and result["budgets"]["und_capacity"] == 1024
    m, s = result["memory"], result["state"]
    params = result["trainable_params"]
    assert params > 1.9e9  # 2 layers x 2 experts x 233M, embedding + LM head 1.09B, ViT, ...
    # fsdp 8 splits (nearly) every float32 weight 8 ways: params, Adam's two moments, EMA.
    assert params * 4 / 8 <= s["params"] < params * 4 / 8 * 1.01
    assert s["opt_state"] == pytest.approx(2 * s["params"], rel=1e-6)
    assert s["ema"] == s["params"] and s["on_host"] == 0
    state = sum(s[k] for k in ("params", "frozen", "opt_state", "ema", "counters"))
    # The arguments are this device's shard of the state and of the batch (jit drops the
    # batch fields the step never reads).
    assert state < m["argument"] <= state + result["batch_bytes"]
    assert m["argument"] == pytest.approx(state + result["batch_bytes"], rel=1e-3)
    # The donated state is written in place: the outputs alias (almost) all of it.
    assert 0.99 * state <= m["alias"] <= m["output"] <= m["argument"]
    assert m["temp"] > 0
    assert m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"] + \
        m["generated_code"] == m["device_total"]
    assert result["fits"] == [c for c, gib in aot.HBM_GIB.items() if m["total"] <= gib * aot.GIB]
    assert result["compile_s"] > 0 and result["lower_s"] > 0
    assert result["host_rss_gib"] > 0
    row = aot.format_row(case, result, "8 fake CPU devices")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == len(aot.COLUMNS)
    assert cells[4] == "2,048 (1,024+1,024) / 1,024 / 1" and float(cells[14]) == pytest.approx(
        m["total"] / aot.GIB, abs=0.01)


def test_levers_change_the_state_bytes_the_rows_report(cpu_devices):
    """bf16 moments halve Adam's bytes; a host EMA is counted as off the device (abstract
    state only: nothing compiles)."""
    breakdown = {}
    for name, overrides in {"base": (), "levers": ("train.optimizer_state_dtype=bfloat16",
                                                   "train.ema_memory=host")}.items():
        case = aot.Case(BAGEL, {"data": 1, "fsdp": 8, "tensor": 1}, "full", 2048, layers=2,
                        overrides=SMALL + overrides)
        config = aot.case_config(case, len(cpu_devices))
        mesh = aot.sharding.make_mesh(config.mesh, cpu_devices)
        spec = state_lib.ModelSpec.build(config)
        tx = optim.make_optimizer(config, spec.abstract_params)
        target, _ = state_lib.abstract_state(config, mesh, spec, tx)
        breakdown[name] = aot.state_breakdown(target)
    base, levers = breakdown["base"], breakdown["levers"]
    assert levers["opt_state"] == pytest.approx(base["opt_state"] / 2, rel=1e-6)
    assert levers["on_host"] == levers["ema"] == base["ema"] and base["on_host"] == 0


def test_a_failing_case_is_a_row_not_a_crash():
    """A mesh the devices cannot hold, in a child process (the grid's path): the error comes
    back naming the config field, and the row carries it."""
    case = aot.Case(BAGEL, {"data": 1, "fsdp": 3, "tensor": 1}, "full", 8192)
    result = aot.run_in_subprocess(case, 8, timeout=300)
    assert "config.mesh" in result["error"] and result["host_rss_gib"] > 0
    row = aot.format_row(case, result, "8 fake CPU devices")
    assert "error: ConfigError" in row and row.count("|") == len(aot.COLUMNS) + 1
    if jax.default_backend() == "cpu":  # no TPU runtime here: the topology's exact error
        try:
            aot.topology_devices("v5p:2x2x1")
        except Exception as e:  # noqa: BLE001 (whatever jax raises is what the row reports)
            topology = aot.run_case(aot.Case(BAGEL, {"fsdp": -1}, "full", 8192,
                                             topology="v5p:2x2x1"))
            assert topology["error"] == f"{type(e).__name__}: {e}".strip()
    np.testing.assert_equal(aot.fits(33 * aot.GIB), ["v5p", "H100"])
