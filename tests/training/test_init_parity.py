"""config.init from tiny random HF Qwen2 / SigLIP / diffusers AutoencoderKL models saved in
their own formats: the unijax model built from the initialised state gives their outputs."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from configs import base
from tests.training import small_config
from tests.training.test_init import random_state
from unijax.convert import safetensors_io, vision
from unijax.training import init as init_lib
from unijax.training import sharding

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from tests.models import test_mot_parity as mot_parity  # noqa: E402  (needs torch)
from tests.models import test_vit as vit_parity  # noqa: E402

pytestmark = pytest.mark.parity
HF_VOCAB = 128  # mot_parity's Qwen2; the config's 320 rows: the rest keep their fresh init


def _config(**init):
    """The small config with the saved models' shapes: Qwen2 (no QK-norm), a 2-layer SigLIP
    with a 6 x 6 position table, a 2-level FLUX-layout VAE; 8 devices (2 x fsdp 4)."""
    c = small_config.get_config()
    c.mesh.data, c.mesh.fsdp = 2, 4
    c.model.llm.qk_norm = False
    vit = c.model.vit
    vit.num_layers, vit.intermediate_size, vit.max_grid = 2, 48, vit_parity.GRID
    vit.position_mode = "interpolate"
    vae = c.model.vae = base.flux_vae()
    vae.base_channels, vae.channel_mult, vae.norm_groups, vae.num_res_blocks = 16, (1, 2), 8, 1
    c.model.latent_channels = 16
    for key, value in init.items():
        c.init[key] = value
    return c


def _vae_model():
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
        layers_per_block=1, latent_channels=16, norm_num_groups=8, use_quant_conv=False,
        use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159).eval()
    with torch.no_grad():  # non-trivial norms and biases so every parameter is exercised
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def released(tmp_path_factory, cpu_devices):
    """The three reference models, saved (Qwen2 in bf16, sharded) and read by config.init."""
    root = tmp_path_factory.mktemp("released")
    qwen = mot_parity._hf_model("qwen2")
    with torch.no_grad():  # bf16 weights run in float32, as unijax runs them
        for p in qwen.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    copy.deepcopy(qwen).to(torch.bfloat16).save_pretrained(str(root / "qwen2"),
                                                           max_shard_size="100KB")
    siglip = vit_parity._hf_model(torch, transformers)
    siglip.save_pretrained(str(root / "siglip"))
    vae = _vae_model()
    vae.save_pretrained(str(root / "vae"), safe_serialization=True)
    vae_tensors = {k: v.numpy() for k, v in vae.state_dict().items()}
    save_file(vision.diffusers_to_flux_ae(vae_tensors, num_levels=2),
              str(root / "ae.safetensors"))

    config = _config(llm=str(root / "qwen2"), vit=str(root / "siglip"), vae=str(root / "vae"))
    mesh = sharding.make_mesh(config.mesh)
    spec, _, state = random_state(config, mesh)
    state, sources = init_lib.initialize(config, state, mesh)
    params, frozen = jax.tree.map(jnp.asarray, jax.device_get((state.params, state.frozen)))
    return dict(root=root, qwen=qwen, siglip=siglip, vae=vae, vae_tensors=vae_tensors,
                model=spec.model(params, frozen), frozen=jax.device_get(state.frozen),
                sources=sources, mesh=mesh)


def test_qwen2_logits_match_for_both_experts(released):
    assert any(p.name.startswith("model-00002") for p in (released["root"] / "qwen2").iterdir())
    llm, qwen, batch = released["model"].llm, released["qwen"], mot_parity._batch()
    x = llm.embed(jnp.asarray(batch.text_ids))
    for num_und in (mot_parity.NUM_UND, 13):  # gen = und: any split of the row gives HF's
        hidden = llm(x, jnp.asarray(batch.position), batch.token_meta(), num_und)
        logits = np.asarray(llm.logits(hidden))
        assert logits.shape[-1] == 320
        for row in range(batch.batch_size):
            for doc in np.unique(batch.doc_id[row][batch.doc_id[row] > 0]):
                idx = np.nonzero(batch.doc_id[row] == doc)[0]
                idx = idx[np.argsort(batch.order[row][idx])]
                with torch.no_grad():
                    ref = qwen(input_ids=torch.tensor(batch.text_ids[row][idx][None]),
                               position_ids=torch.tensor(batch.position[row][idx][None]),
                               ).logits[0].numpy()
                np.testing.assert_allclose(logits[row, idx, :HF_VOCAB], ref, atol=2e-5, rtol=0)
    sources, qwen_dir = released["sources"], released["root"] / "qwen2"
    assert sources["llm/layers/gen"] == f"HF qwen2 {qwen_dir} (gen expert = und)"
    assert sources["connector"] == sources["vae2llm"] == "fresh"


def test_siglip_features_match(released):
    image = np.random.default_rng(1).uniform(-1, 1, (3 * 4, 5 * 4, 3)).astype(np.float32)
    with torch.no_grad():
        ref = released["siglip"](torch.from_numpy(image.transpose(2, 0, 1)[None]),
                                 interpolate_pos_encoding=True).last_hidden_state[0].numpy()
    payload, _ = vit_parity._pack([image], vit_parity.SLOTS)
    out = np.asarray(vit_parity._forward(released["model"].vit, *payload))[0]
    np.testing.assert_allclose(out[:15], ref, atol=1e-5, rtol=1e-5)
    # Every tensor of the saved vision tower is read (transformers saves it unprefixed).
    saved = safetensors_io.open_safetensors(str(released["root"] / "siglip"))
    names = {k for n in jax.tree_util.tree_flatten_with_path(
        nnx.to_pure_dict(nnx.state(released["model"].vit)))[0]
        for k in vision.vit_hf_names(_name(n[0]), num_layers=2, prefix="")}
    assert names == set(saved)
    assert released["sources"]["vit"] == f"HF SigLIP {released['root'] / 'siglip'}"


def test_vae_latents_match_and_flux_names_load_the_same(released):
    vae, model = released["vae"], released["model"].vae
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
    mean, logvar = nnx.jit(lambda m, v: m.encode_moments(v))(model, x)
    np.testing.assert_allclose(mean, dist.mean.numpy().transpose(0, 2, 3, 1), atol=1e-4)
    np.testing.assert_allclose(logvar, dist.logvar.numpy().transpose(0, 2, 3, 1), atol=1e-4)
    tree = nnx.to_pure_dict(nnx.state(model))
    names = {vision.vae_diffusers_name(_name(p)) for p, _ in
             jax.tree_util.tree_flatten_with_path(tree)[0]}
    assert names == set(released["vae_tensors"])
    assert names == set(safetensors_io.open_safetensors(str(released["root"] / "vae")))

    # The original FLUX names (written by renaming; diffusers' own LDM converter agrees).
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    flux = vision.diffusers_to_flux_ae(released["vae_tensors"], num_levels=2)
    back = convert_ldm_vae_checkpoint(flux, dict(vae.config))
    assert set(back) == set(released["vae_tensors"])
    for key, value in released["vae_tensors"].items():
        np.testing.assert_array_equal(np.asarray(back[key]), value, err_msg=key)
    ae_file = str(released["root"] / "ae.safetensors")
    config = _config(vae=ae_file)
    _, _, state = random_state(config, released["mesh"], seed=3)
    state, sources = init_lib.initialize(config, state, released["mesh"])
    assert sources["vae"] == f"FLUX autoencoder {ae_file}"
    assert sources["llm/layers/und"] == "fresh"
    flux_vae = jax.device_get(state.frozen["vae"])
    for a, b in zip(jax.tree.leaves(flux_vae), jax.tree.leaves(released["frozen"]["vae"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def _name(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)
