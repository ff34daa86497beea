"""'face_synthetic': generated identities, no files; example i of a split from (split, i) alone.

Identities are latent prototypes rendered by a fixed random smooth network, half the images
mirrored; verification pairs come from held-out identities. Any size costs no memory and any
process builds any rows, bit-identical. How images are generated and how well raw pixels and a
small CNN verify: docs/design.md, "Sources and readers". Numpy only. Shape letters: N examples,
H W C image, L latent dimension.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from bigbatch import fields
from bigbatch import input_pipeline
from bigbatch.data import common

SPLIT_IDENTITY, SPLIT_HELDOUT_IDENTITY = 8, 9  # prototype spaces: training / held-out
SPLIT_TRAIN, SPLIT_EVAL, SPLIT_PAIRS = 10, 11, 12
_BLOCK_ROWS = 256  # rows rendered at once: bounds the float64 temporaries

# The renderer's matmuls are exact: inputs and weights are rounded to multiples of 2^-16 and
# bounded (|z| < 2^4, |w| < 2^4, |tanh| <= 1), so every product is a multiple of 2^-32 below 2^8
# and every partial sum of up to 2^12 terms fits float64's 53 bits. A sum that is exact is the
# same in any order, so a row is bit-identical whatever BLAS kernel, thread split or position in
# the batch computes it (float32 gemms are not: OpenBLAS rounds a row differently by where it
# sits in the block, ~5e-7).
_GRID = 2.0**16
_BOUND = 2.0**4


def _exact(x: np.ndarray) -> np.ndarray:
  """float64 copy of x on the 2^-16 grid, clipped inside the bound (a function of x alone)."""
  return np.round(np.clip(np.asarray(x, np.float64), -_BOUND + 1, _BOUND - 1) * _GRID) / _GRID


def validate(config) -> None:
  d = config.data
  if not isinstance(d.nuisance_dim, int) or d.nuisance_dim < 0:
    raise fields.ConfigError(f'config.data.nuisance_dim={d.nuisance_dim!r}: must be an integer '
                             '>= 0')
  for name in ('image_size', 'num_identities', 'images_per_identity', 'latent_dim',
               'verification_pairs'):
    if not isinstance(d[name], int) or d[name] <= 0:
      raise fields.ConfigError(f'config.data.{name}={d[name]!r}: must be a positive integer')
    fields.positive(config, f'data.{name}')  # and within int32
  if d.num_identities * d.images_per_identity > fields.INT_MAX:  # num_train: example indices
    raise fields.ConfigError(f'config.data.num_identities x images_per_identity = '
                             f'{d.num_identities * d.images_per_identity}: too many examples; '
                             f'must be at most 2**31 - 1')
  if d.latent_dim + d.nuisance_dim > 1024:  # 4x as many hidden units: _exact's 2^12 terms
    raise fields.ConfigError(f'config.data.latent_dim + nuisance_dim = '
                             f'{d.latent_dim + d.nuisance_dim}: must be <= 1024')
  for name in ('noise', 'pixel_noise'):
    fields.finite(config, f'data.{name}', low=0)
  if not isinstance(d.verification_identities, int) or d.verification_identities < 2:
    raise fields.ConfigError(f'config.data.verification_identities='
                             f'{d.verification_identities!r}: must be an integer >= 2')
  fields.positive(config, 'data.verification_identities')  # and within int32


def _upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_in, n_out] bilinear (align-corners) interpolation weights along one axis."""
  pos = np.linspace(0, n_in - 1, n_out)
  lo = np.minimum(np.floor(pos).astype(int), n_in - 2) if n_in > 1 else np.zeros(n_out, int)
  frac = pos - lo
  m = np.zeros((n_in, n_out))
  m[lo, np.arange(n_out)] += 1 - frac
  if n_in > 1:
    m[lo + 1, np.arange(n_out)] += frac
  return m


@dataclasses.dataclass(frozen=True, eq=False)
class FaceRenderer:
  """A fixed random map latent [L] -> image [H, W, C] in (-1, 1):
  tanh(2 * upsample(tanh(z @ w1) @ w2)), the upsampling folded into w2."""
  w1: np.ndarray  # float64 [L, hidden], on the exact grid
  w2: np.ndarray  # float64 [hidden, H*W*C], on the exact grid
  image_shape: tuple[int, int, int]

  def __call__(self, z_NxL: np.ndarray) -> np.ndarray:
    n = len(z_NxL)
    out = np.empty((n, self.w2.shape[1]), np.float32)
    for start in range(0, n, _BLOCK_ROWS):
      # Exact sums (module constants), rounded once to float32; tanh is elementwise.
      h = np.tanh((_exact(z_NxL[start:start + _BLOCK_ROWS]) @ self.w1).astype(np.float32))
      out[start:start + len(h)] = np.tanh((_exact(h) @ self.w2).astype(np.float32))
    return out.reshape(-1, *self.image_shape)


@functools.lru_cache(maxsize=4)
def renderer(image_shape: tuple[int, int, int], latent_dim: int) -> FaceRenderer:
  """The renderer of one image shape and latent size (cached: a fixed random draw)."""
  h, w, c = image_shape
  hidden = 4 * latent_dim
  h0, w0 = max(2, h // 4), max(2, w // 4)
  rng = np.random.default_rng([common.SYNTHETIC_SEED, 0xFACE, h, w, c, latent_dim])
  w1 = rng.standard_normal((latent_dim, hidden)) / math.sqrt(latent_dim)
  # tanh of unit-variance inputs has variance ~0.39: scale the coarse map back to unit variance,
  # then gain 2 so that the final tanh bends the image (neither linear nor saturated).
  coarse = rng.standard_normal((hidden, h0, w0, c)) * (2 / math.sqrt(0.39 * hidden))
  up = np.einsum('kyxc,yY,xX->kYXc', coarse, _upsample_matrix(h0, h), _upsample_matrix(w0, w))
  # Bilinear upsampling shrinks the variance between the coarse points; restore it per pixel.
  up /= up.std(axis=0, keepdims=True) / coarse.std()
  return FaceRenderer(_exact(w1), _exact(up.reshape(hidden, -1)), image_shape)


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticFaces:
  """Generated identities (docs/design.md, "Sources and readers"). Images are float32
  [N, H, W, C], normalized."""
  image_shape: tuple[int, int, int]
  num_identities: int
  latent_dim: int
  nuisance_dim: int
  noise: float
  pixel_noise: float

  @property
  def renderer(self) -> FaceRenderer:
    return renderer(self.image_shape, self.latent_dim + self.nuisance_dim)

  def images(self, split: int, idx_N: np.ndarray, identity_N: np.ndarray,
             heldout: bool = False) -> np.ndarray:
    """Image idx_N[n] of `split`, of identity identity_N[n] (of the held-out space if heldout)."""
    dim, latent, pixels = self.latent_dim, self.latent_dim + self.nuisance_dim, math.prod(
        self.image_shape)
    prototypes = common.synthetic_inputs(
        SPLIT_HELDOUT_IDENTITY if heldout else SPLIT_IDENTITY, identity_N, dim)
    r = common.synthetic_inputs(split, idx_N, latent + pixels + 1)
    # Identity part: the prototype moved by per-image noise (rescaled to unit variance);
    # nuisance part ("pose, light"): independent of the identity, to be ignored.
    z = np.concatenate([(prototypes + np.float32(self.noise) * r[:, :dim]) / np.float32(
        math.sqrt(1 + self.noise**2)), r[:, dim:latent]], axis=1)
    x = self.renderer(z) + np.float32(self.pixel_noise) * r[:, latent:latent + pixels].reshape(
        -1, *self.image_shape)
    return np.where((r[:, -1] > 0).reshape(-1, 1, 1, 1), x[:, :, ::-1], x)

  def source(self, split: int) -> input_pipeline.Source:
    """Example i of `split` is an image of identity i mod num_identities."""
    def fn(idx_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
      identity = np.asarray(idx_N, np.int64) % self.num_identities
      return self.images(split, idx_N, identity), identity.astype(np.int32)
    return fn

  def verification_pairs(self, num_pairs: int, num_identities: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [2N, H, W, C] as consecutive pairs, issame bool [N]) from `num_identities`
    held-out identities; exactly N // 2 pairs are of one identity, in a fixed random order."""
    if num_identities < 2:
      raise fields.ConfigError('config.data.verification_identities must be >= 2')
    rng = np.random.default_rng([common.SYNTHETIC_SEED, 0xFACE, num_pairs, num_identities])
    issame = rng.permutation(np.arange(num_pairs) < num_pairs // 2)
    first = rng.integers(num_identities, size=num_pairs)
    other = (first + 1 + rng.integers(num_identities - 1, size=num_pairs)) % num_identities
    identity = np.stack([first, np.where(issame, first, other)], axis=1).reshape(-1)
    return self.images(SPLIT_PAIRS, np.arange(2 * num_pairs), identity, heldout=True), issame


def from_config(config) -> SyntheticFaces:
  """The generated face set of config.data (validated first)."""
  validate(config)
  d = config.data
  # RGB like the real sets (data.channels, the plain synthetic set's field, does not apply).
  return SyntheticFaces((d.image_size, d.image_size, 3), d.num_identities, d.latent_dim,
                        d.nuisance_dim, float(d.noise), float(d.pixel_noise))
