"""Both notebooks execute top to bottom in a local kernel (nbclient), with their parameters
overridden the way papermill injects them (a cell after the one tagged "parameters"): the
evaluation notebook against the small trained checkpoint (the `trained` fixture), sampling with
few steps and tiny grids; the data explorer on the small worlds. Their saved outputs must hold
the figures."""

import base64
import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.training import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG = b"\x89PNG\r\n\x1a\n"


def _execute(name: str, parameters: dict, out_dir) -> nbformat.NotebookNode:
    """Runs notebooks/<name> with `parameters`; returns the notebook as saved with its outputs."""
    nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name} needs exactly one cell tagged 'parameters'"
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in parameters.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(tagged[0] + 1, injected)
    saved = out_dir / name
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": ROOT}}).execute()
    finally:
        nbformat.write(nb, saved)  # kept for a look at what failed
    return nbformat.read(saved, as_version=4)


def _figures(cell) -> list[bytes]:
    return [base64.b64decode(o["data"]["image/png"]) for o in cell.get("outputs", [])
            if "image/png" in o.get("data", {})]


def _cell(nb, marker: str):
    """The code cell whose source contains `marker`."""
    return next(c for c in nb.cells if c.cell_type == "code" and marker in c.source)


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")


def test_notebooks_install_only_in_colab():
    for name in ("evaluate_checkpoint.ipynb", "data_explorer.ipynb"):
        nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
        nbformat.validate(nb)
        first = next(c for c in nb.cells if c.cell_type == "code")
        assert 'IN_COLAB = "google.colab" in sys.modules' in first.source
        assert "if IN_COLAB:" in first.source and "%pip install" in first.source
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stored clean


def test_evaluate_checkpoint_notebook(trained, tmp_path):
    workdir, _ = trained
    nb = _execute("evaluate_checkpoint.ipynb", dict(
        WORKDIR=workdir, SAMPLE_STEPS=2, PROMPTS=["a photo of a red circle",
                                                  "a handwritten digit 3"],
        IMAGES_PER_PROMPT=2, MAX_ANSWER_TOKENS=2, NUM_PER_CATEGORY=1, NUM_DIGITS=1), tmp_path)
    assert f"step 3: ema weights from {workdir}" in _stdout(_cell(nb, "Chat.from_workdir"))
    assert "llm/embed_tokens/embedding" in _stdout(_cell(nb, "parameter_overview"))
    for marker in ("metrics.jsonl", "chat.answer", "chat.generate", "chat.edit", "ax.bar("):
        figures = _figures(_cell(nb, marker))
        assert len(figures) == 1 and figures[0].startswith(PNG), marker
    results = json.loads(_stdout(_cell(nb, "evals_run.evaluate(")))
    assert results["step"] == 3
    assert results["num_items"] == {"generation": 7, "understanding": 9}  # 6 + 1, 8 + 1
    assert set(results["generation"]["shapes"]) >= {"single_object", "position", "overall"}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    return helpers.write_small_worlds(str(tmp_path_factory.mktemp("worlds")))


def test_data_explorer_notebook(worlds, tmp_path):
    nb = _execute("data_explorer.ipynb", dict(CONFIG="tests.training.small_config",
                                              WORLDS_DIR=worlds, NUM_SAMPLES=4), tmp_path)
    samples = _figures(_cell(nb, "images_of(record)"))
    assert len(samples) == 4 and all(f.startswith(PNG) for f in samples)
    plans = _cell(nb, "plan_lib.plan_record(")
    assert len(_figures(plans)) == 1
    assert "caption      und, gen, vit, vae = " in _stdout(plans)  # one sample per kind first
    layout = _cell(nb, "pipeline.make_iterator(config)")
    assert len(_figures(layout)) == 1
    assert "8 rows of 384 tokens (256 und + 128 gen)" in _stdout(layout)
    mask = _cell(nb, "mask_lib.dense_mask(")
    assert len(_figures(mask)) == 1 and "of the real query-key pairs are visible" in _stdout(mask)
