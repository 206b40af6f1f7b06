"""notebooks/quickstart.ipynb runs top to bottom, headless, and its figures are real PNGs.

The kernel is this interpreter (a kernelspec written into a temporary folder), so the notebook
sees the same installed packages as the tests, also inside CI's fresh virtual environment.
"""

import base64
import io
import os
import sys

import nbformat
import numpy as np
from ipykernel import kernelspec
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'quickstart.ipynb')
KERNEL = 'unet-jax-test'


def _figures(notebook):
  """(cell index, decoded PNG bytes) of every image/png output."""
  return [(index, base64.b64decode(output['data']['image/png']))
          for index, cell in enumerate(notebook.cells) if cell.cell_type == 'code'
          for output in cell.get('outputs', []) if 'image/png' in output.get('data', {})]


def test_committed_notebook_is_valid_and_has_no_outputs():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  code = [c for c in notebook.cells if c.cell_type == 'code']
  assert code and all(not c.outputs and c.execution_count is None for c in code)
  assert notebook.cells[0].cell_type == 'markdown'
  assert "os.environ.get('UNET_JAX_NOTEBOOK_SMOKE'" in code[0].source


def test_notebook_runs_headless_and_shows_figures(tmp_path, monkeypatch):
  kernelspec.install(kernel_name=KERNEL, prefix=str(tmp_path))
  # Searched first; the client then owns its kernel manager and shuts the kernel down at the end.
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'share' / 'jupyter'))
  assert KernelSpecManager().get_kernel_spec(KERNEL).argv[0] == sys.executable
  monkeypatch.setenv('UNET_JAX_NOTEBOOK_SMOKE', '1')
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(notebook, kernel_name=KERNEL, timeout=300, startup_timeout=120,
                          resources={'metadata': {'path': os.path.join(ROOT, 'notebooks')}})
  client.execute()  # raises CellExecutionError naming the cell if any cell fails

  errors = [o for c in notebook.cells if c.cell_type == 'code' for o in c.outputs
            if o.output_type == 'error']
  assert not errors
  text = ''.join(o.get('text', '') for c in notebook.cells if c.cell_type == 'code'
                 for o in c.outputs)
  assert 'smoke mode' in text and 'identical parameters and predictions' in text
  figures = _figures(notebook)
  # loss, metrics, predictions, attention gates, tiled prediction
  assert len(figures) >= 5, [index for index, _ in figures]
  for index, data in figures:
    image = Image.open(io.BytesIO(data))
    assert image.format == 'PNG'
    width, height = image.size
    assert 200 <= width <= 4000 and 150 <= height <= 4000, (index, image.size)
    pixels = np.asarray(image.convert('RGB'))
    assert pixels.std() > 0, f'figure of cell {index} is blank'
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1, f'figure of cell {index} is flat'
