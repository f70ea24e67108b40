"""Every Python snippet in README.md runs, as a reader would paste it.

The snippets run in order in one fresh interpreter (a later one may use what
an earlier one made), at small sizes: each replacement below shrinks a
number and must match the README's text, so a README edit that a
replacement no longer matches fails here instead of going untested. Between
snippets, GLUE writes what the next one reads from disk.
"""

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (snippet index, README text, what runs instead).
SMALLER = [
    (0, 'build_backbone("resnet18", ', 'build_backbone("resnet18x0.25", '),
    (0, "ProjectionHead(512, 128, ", "ProjectionHead(32, 16, "),
    (0, "pipeline.pretrain_dataset(strategy, source, 256, views)",
     "pipeline.pretrain_dataset(strategy, source, 16, views)"),
    (0, "augment.SimCLRAugment(32, ", "augment.SimCLRAugment(16, "),
    (0, "steps_per_epoch=100, epochs=10", "steps_per_epoch=2, epochs=2"),
    (1, 'build_backbone("resnet18", ', 'build_backbone("resnet18x0.25", '),
    (1, "hidden_dim=1024, output_dim=256", "hidden_dim=32, output_dim=16"),
    (1, "pipeline.pretrain_dataset(strategy, source, 256, byol_views)",
     "pipeline.pretrain_dataset(strategy, source, 16, byol_views)"),
    (1, "SimCLRAugment.asymmetric(32)", "SimCLRAugment.asymmetric(16)"),
    (1, "steps_per_epoch=100, epochs=10", "steps_per_epoch=2, epochs=2"),
]
# Runs after snippet i: the export that a later snippet loads.
GLUE = {0: 'from tf_ssl import export as _export\n'
           '_export.export_saved_model(model, "runs/fm/saved_model")\n'}


def snippets():
  with open(os.path.join(REPO, "README.md")) as f:
    return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_every_readme_snippet_runs(tmp_path):
  code = snippets()
  assert len(code) >= 3, "README.md lost its Python examples"
  for index, old, new in SMALLER:
    assert old in code[index], f"README snippet {index} no longer has {old!r}"
    code[index] = code[index].replace(old, new)
  program = "".join(c + GLUE.get(i, "") for i, c in enumerate(code))
  program += '\nprint("README snippets ran")\n'
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "README snippets ran" in result.stdout
