"""The colabs run top to bottom: each notebook is executed headlessly with
nbclient, in a fresh kernel of this very interpreter, with small parameters,
and the JSON summary its last cell prints is checked against chance.

The kernel is a kernelspec written to a temporary directory by ipykernel
(argv = sys.executable), so the test needs nothing but `pip install -e
.[cpu,dev]`: no registered or user-level kernel is used. Both notebooks run
at once (two kernels, one event loop), so their times overlap.
"""

import asyncio
import json
import os
import re
import sys

from ipykernel import kernelspec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
import nbclient
import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(REPO, "colabs")
NOTEBOOKS = ("load_and_inference.ipynb", "finetuning.ipynb")
FASHION_MNIST = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
KERNEL_NAME = "tf_ssl_colab_test"
CELL_TIMEOUT = 600  # seconds; generous for a loaded 2-core machine

# Small settings: a few hundred images, a few dozen steps.
PARAMETERS = {
    "load_and_inference.ipynb": dict(NUM_IMAGES=300, NUM_QUERIES=3,
                                     NUM_NEIGHBOURS=4),
    # Three well-separated classes (trouser, bag, ankle boot), 10 images each,
    # 30 steps at batch 16 (the rescaled schedule [6, 12, 18, 24, 30]). The
    # notebook's stand-in is a random network, which the HyperRule's base lr
    # (0.003 at batch 512) moves too little in 30 steps; 100 times that lr
    # reaches ~70% test accuracy. What is checked is that the notebook's
    # pieces work together; tests/test_hyperrule.py checks the rule itself.
    "finetuning.ipynb": dict(CLASSES=[1, 8, 9], EXAMPLES_PER_CLASS=10,
                             TEST_PER_CLASS=40, BATCH_SIZE=16, STEPS=30,
                             HYPERRULE_BASE_LR=0.3),
}


def _read(name):
  return nbformat.read(os.path.join(COLABS, name), as_version=4)


def _parameters_cell(notebook):
  cells = [c for c in notebook.cells
           if "parameters" in c.get("metadata", {}).get("tags", [])]
  assert len(cells) == 1, "a colab needs exactly one cell tagged 'parameters'"
  return cells[0]


def _inject(notebook, parameters):
  """Appends overrides to the parameters cell, so its defaults run too; every
  override must name a parameter the cell defines (catches renames)."""
  cell = _parameters_cell(notebook)
  defined = set(re.findall(r"^([A-Z_][A-Z0-9_]*) =", cell.source, re.M))
  unknown = sorted(set(parameters) - defined)
  assert not unknown, f"not in the parameters cell: {unknown}"
  cell.source += "\n# Injected by tests/test_colabs.py\n" + "".join(
      f"{k} = {v!r}\n" for k, v in parameters.items())


@pytest.fixture(scope="module")
def kernel_manager_factory(tmp_path_factory):
  """Makes KernelManagers of a kernelspec that runs sys.executable."""
  kernels = tmp_path_factory.mktemp("kernels")
  kernelspec.write_kernel_spec(
      str(kernels / KERNEL_NAME),
      overrides={
          "display_name": "tf_ssl colab test",
          # The inline backend renders with Agg (headless) and turns each
          # figure into an image/png output the test can see; set here so a
          # MPLBACKEND of the calling shell cannot pick a GUI backend.
          "env": {"MPLBACKEND": "module://matplotlib_inline.backend_inline",
                  "TF_CPP_MIN_LOG_LEVEL": "2"},
      })
  specs = KernelSpecManager(kernel_dirs=[str(kernels)])
  assert specs.get_kernel_spec(KERNEL_NAME).argv[0] == sys.executable
  return lambda: KernelManager(kernel_name=KERNEL_NAME,
                               kernel_spec_manager=specs)


def _outputs(notebook):
  return [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]


def _summary(notebook):
  """The JSON object the last code cell prints."""
  last = [c for c in notebook.cells if c.cell_type == "code"][-1]
  text = "".join(o.get("text", "") for o in last.outputs
                 if o.output_type == "stream" and o.name == "stdout")
  return json.loads(text.strip().splitlines()[-1])


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_are_stored_clean(name):
  notebook = _read(name)
  nbformat.validate(notebook)
  code = [c for c in notebook.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code), (
      f"{name} is stored with outputs; clear them before committing")
  parameters = _parameters_cell(notebook)
  assert parameters is code[0]
  assert re.search(r"^SAVED_MODEL = None\b", parameters.source, re.M)


@pytest.fixture(scope="module")
def executed(kernel_manager_factory, tmp_path_factory):
  """{notebook name: (executed notebook, exception or None)}, both notebooks
  run concurrently, each in its own kernel and temporary working directory."""
  if not os.path.exists(FASHION_MNIST):
    pytest.skip("Debian's dataset-fashion-mnist is not installed")
  clients = {}
  for name in NOTEBOOKS:
    notebook = _read(name)
    _inject(notebook, PARAMETERS[name])
    workdir = tmp_path_factory.mktemp(name.split(".")[0])
    clients[name] = nbclient.NotebookClient(
        notebook, km=kernel_manager_factory(), timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(workdir)}})

  async def run_all():
    # A failing cell raises CellExecutionError (with its traceback) from its
    # own notebook's execution only.
    return await asyncio.gather(
        *(c.async_execute() for c in clients.values()), return_exceptions=True)

  outcomes = asyncio.run(run_all())
  return {name: (clients[name].nb, e if isinstance(e, BaseException) else None)
          for name, e in zip(clients, outcomes)}


def _result(executed, name, min_figures):
  notebook, error = executed[name]
  if error is not None:
    raise error
  outputs = _outputs(notebook)
  assert not [o for o in outputs if o.output_type == "error"]
  figures = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(figures) >= min_figures, f"{name} showed {len(figures)} figures"
  return _summary(notebook)


@pytest.mark.slow
def test_load_and_inference_runs(executed):
  name = "load_and_inference.ipynb"
  summary = _result(executed, name, min_figures=2)  # neighbours, 2-D map
  assert summary["images"] == PARAMETERS[name]["NUM_IMAGES"]
  assert summary["feature_dim"] > 0
  # Balanced classes: a random other image has the query's class ~10% of
  # the time. Even the notebook's random stand-in network does clearly
  # better on Fashion-MNIST (~22% at these settings).
  assert 0.09 < summary["chance"] < 0.11
  assert summary["neighbour_precision"] > 1.5 * summary["chance"], summary


@pytest.mark.slow
def test_finetuning_runs(executed):
  name = "finetuning.ipynb"
  params = PARAMETERS[name]
  summary = _result(executed, name, min_figures=2)  # curves, predictions
  # The HyperRule plan of a 3 x 10 few-shot set, rescaled to 30 steps.
  assert summary["classes"] == 3 and summary["train_examples"] == 30
  assert summary["train_steps"] == params["STEPS"]
  assert summary["schedule"] == [6, 12, 18, 24, 30]
  assert summary["mixup_alpha"] == 0.0  # below 20k examples
  assert summary["peak_lr"] == pytest.approx(0.3 * 16 / 512)
  assert summary["resolution"] == [40, 32]
  assert summary["predictions_shown"] == 8
  assert summary["chance"] == pytest.approx(1 / 3, abs=1e-3)
  assert summary["test_top1"] > 1.5 * summary["chance"], summary
