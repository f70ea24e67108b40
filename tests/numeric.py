"""Numerical references shared by the loss tests."""

import numpy as np


def fd_grad(f, x, h=1e-6):
  """Central finite differences of the scalar f(x), in float64."""
  x = np.array(x, np.float64)
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    old = x[idx]
    x[idx] = old + h
    up = f(x)
    x[idx] = old - h
    down = f(x)
    x[idx] = old
    g[idx] = (up - down) / (2 * h)
  return g
