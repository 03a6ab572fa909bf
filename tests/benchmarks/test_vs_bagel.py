"""benchmarks/vs_bagel.py: the packed row it compares on, and its unijax half end to end at the
tiny size. The comparison with the official BAGEL code runs only with a checkout of it in
$BAGEL_SRC (and torch)."""

import os

import numpy as np
import pytest

from benchmarks import vs_bagel, vs_bagel_row
from unijax import batch as batch_lib


def _table_rows(path) -> list[list[str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    assert lines[0] == "| " + " | ".join(vs_bagel.COLUMNS) + " |"  # the header, once
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[1:]]


@pytest.mark.parametrize("length,documents", [(2048, 4), (512, 3)])
def test_row_has_the_length_documents_and_token_kinds(length, documents):
    """Exactly L real tokens in `documents` documents, the und/gen split at the VAE tokens,
    CE targets on text only, flow targets on the noisy latents of the t2i and edit targets,
    a clean conditioning latent image (edit), and flow inputs laid out on the latent grid."""
    row = vs_bagel_row.build_row(length, documents)
    b = row.batch
    batch_lib.validate(b, latent_tokens_per_image=row.latent_grid[0] * row.latent_grid[1])
    assert b.length == length and (b.doc_id > 0).all()
    assert sorted(np.unique(b.doc_id)) == list(range(1, documents + 1))
    assert row.kinds == vs_bagel_row.KINDS[:documents]
    mod = b.modality[0]
    assert b.num_und == int((mod != batch_lib.VAE).sum())
    assert {batch_lib.TEXT, batch_lib.VIT, batch_lib.VAE} == set(np.unique(mod))
    assert (b.text_weight > 0).sum() > length // 8  # the VQA answer (and the text document)
    vae = mod == batch_lib.VAE
    noisy_vae, clean_vae = vae & b.noisy[0], vae & ~b.noisy[0]
    assert (b.flow_weight[0] > 0).sum() == noisy_vae.sum() > 0 and clean_vae.sum() > 0
    # Times: one per image, t in (0, 1) exactly on the noisy ones, matching the batch's.
    grid = row.latent_grid[0] * row.latent_grid[1]
    image = b.payload_index[0, vae] // grid
    assert ((row.image_times[0, image] > 0) == b.noisy[0, vae]).all()
    np.testing.assert_array_equal(row.image_times, b.vae_timestep)
    assert (row.image_times < 1).all()
    # Latents and noise are zero off the images; every VAE token reads its own grid token.
    index = row.grid_index()
    assert len(np.unique(index)) == vae.sum()
    used = np.zeros(row.x0.shape[1], bool)
    used[index] = True
    assert (row.x0[0, ~used] == 0).all() and (row.x0[0, used] != 0).all()
    assert (row.noise[0, ~used] == 0).all()
    n, (gh, gw) = b.vae_grid_hw.shape[1], row.latent_grid
    assert row.padded_latent().shape == (n, vs_bagel_row.LATENT_CHANNELS, 2 * gh, 2 * gw)
    # BAGEL's draws replace the row's: noise given in sequence order lands on the grid.
    packed = np.arange(vae.sum() * row.x0.shape[2], dtype=np.float32).reshape(vae.sum(), -1)
    drawn = row.with_draws(packed, row.image_times[0] / 2)
    np.testing.assert_array_equal(drawn.noise[0, index], packed)
    np.testing.assert_array_equal(drawn.batch.vae_timestep, row.image_times / 2)


def test_unijax_half_writes_a_well_formed_row(tmp_path):
    """Without a BAGEL checkout: the tiny model on a 256-token row, the trainer's loss jitted
    (forward, forward + backward), one row with '-' in BAGEL's cells."""
    out = tmp_path / "results.md"
    argv = ["--model=tiny", "--lengths=256", "--repeats=1", f"--out={out}"]
    vs_bagel.main(argv)
    (row,) = _table_rows(out)
    cells = dict(zip(vs_bagel.COLUMNS, row, strict=True))
    assert cells["device"].startswith(f"cpu ({os.cpu_count()} cores")
    assert cells["L"] == "256" and cells["documents"] == "vqa+t2i+edit+text"
    assert cells["unijax attention"] == "xla, chunk 512"
    assert float(cells["fwd ms unijax"]) > 0 and float(cells["fwd+bwd ms unijax"]) > 0
    for key in ("fwd ms BAGEL", "fwd ratio", "fwd+bwd ms BAGEL", "fwd+bwd ratio",
                "BAGEL attention", "loss rel. diff"):
        assert cells[key] == "-"
    assert cells["command"] == f"`python benchmarks/vs_bagel.py {' '.join(argv)}`"


def test_forward_and_step_agree_on_the_loss():
    """The two jitted halves compute one loss: the CE of a near-uniform random model is about
    log(vocab) and the MSE of the zero-ish velocity about E|noise - x0|^2 = 2."""
    row = vs_bagel_row.build_row(256, 4, vs_bagel_row.MODELS["tiny"])
    step = vs_bagel.UnijaxStep(vs_bagel.unijax_config("tiny"), row)
    loss, (ce, mse) = step.forward()
    (loss2, _), grads = step.forward_backward()
    assert float(loss) == pytest.approx(float(loss2), rel=1e-6)
    assert float(loss) == pytest.approx(float(ce) + float(mse), rel=1e-6)
    assert float(ce) == pytest.approx(np.log(vs_bagel_row.MODELS["tiny"]["vocab_size"]), rel=0.05)
    assert float(mse) == pytest.approx(2.0, rel=0.25)
    hf = step.llm_grads_hf(grads)
    assert "language_model.model.layers.1.mlp_moe_gen.down_proj.weight" in hf


@pytest.mark.slow
@pytest.mark.parity
def test_matches_the_official_bagel_step(tmp_path):
    """With $BAGEL_SRC (a ByteDance-Seed/Bagel checkout): the tiny model, dense per-sample
    masks; the script exits non-zero unless CE, MSE and the compared gradients agree to 1e-4."""
    src = os.environ.get("BAGEL_SRC")
    if not src:
        pytest.skip("set BAGEL_SRC to a ByteDance-Seed/Bagel checkout")
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "results.md"
    vs_bagel.main([f"--bagel_src={src}", "--model=tiny", "--lengths=256", "--repeats=1",
                   "--bagel_attention=dense", f"--out={out}"])
    (row,) = _table_rows(out)
    cells = dict(zip(vs_bagel.COLUMNS, row, strict=True))
    assert cells["BAGEL attention"].startswith("dense")
    assert float(cells["loss rel. diff"]) <= vs_bagel.TOLERANCE
    assert float(cells["fwd ms BAGEL"]) > 0 and float(cells["fwd+bwd ms BAGEL"]) > 0
