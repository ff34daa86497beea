"""The device-memory fit estimator of benchmarks/fit.py: the linear rule on a small model, the
device table and the headroom verdict, and that every accelerator config names its hardware."""
import importlib
import pathlib
import sys

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not a package of the install
  sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402  pylint: disable=g-import-not-at-top
from benchmarks import fit  # noqa: E402  pylint: disable=g-import-not-at-top

# The rule's largest error on the accelerator configs is in docs/performance.md; this small CNN
# is held to the same order.
RULE_ERROR = 0.05


def test_linear_rule_recovers_a_third_microbatch():
  """Peaks compiled at 8 and 16 examples per device predict the peak compiled at 48."""
  config = common.config('cnn', microbatch=8)
  config.model.width = 8
  devices = jax.devices()[:1]
  peak = {m: fit.compiled_peak(fit.step_config(config, m, len(devices)), devices)
          ['peak_estimate'] for m in (8, 16, 48)}
  rule = fit.predict(fit.linear_fit({8: peak[8], 16: peak[16]}), 48)
  assert peak[48] > peak[16] > peak[8]
  assert abs(rule - peak[48]) / peak[48] < RULE_ERROR, (rule, peak)


def test_linear_fit_and_microbatch():
  a, b = fit.linear_fit({16: 300.0, 8: 200.0})
  assert (a, b) == (100.0, 12.5)
  assert fit.predict((a, b), 64) == 900.0
  assert fit.per_device_microbatch(65536, 1024) == 64
  assert fit.per_device_microbatch(65536, 64, 2) == 512
  with pytest.raises(ValueError, match='does not split'):
    fit.per_device_microbatch(4096, 48)


def test_device_table_and_headroom_verdict():
  v3 = fit.DEVICES['TPU v3'].memory_bytes
  assert v3 == 16 * 2**30
  assert fit.DEVICES['TPU v4'].memory_bytes == 32 * 2**30
  assert fit.DEVICES['H100 80GB'].memory_bytes == 80 * 10**9
  assert all(d.source for d in fit.DEVICES.values())
  assert fit.headroom(0.75 * v3, 'TPU v3') == pytest.approx(0.25)
  assert fit.fits(0.89 * v3, 'TPU v3')
  assert not fit.fits(0.91 * v3, 'TPU v3')


def test_step_config_keeps_the_per_device_shapes():
  config = importlib.import_module('configs.r50_64k').get_config()
  c = fit.step_config(config, 16, 8)
  assert c.global_batch == 128 and c.model.bn_group_size == 16 and c.model.conv_impl == 'xla'
  assert config.global_batch == 65536  # the original is untouched
  assert fit.emulated_devices(config, 1024) == 8
  face = importlib.import_module('configs.face_64k_lamb').get_config()
  assert fit.emulated_devices(face, 64) == 64


@pytest.mark.parametrize('name', sorted(fit.TOPOLOGIES))
def test_each_accelerator_config_names_its_hardware(name):
  """The docstring's Hardware paragraph names every topology benchmarks/fit.py checks."""
  doc = importlib.import_module(f'configs.{name}').__doc__
  hardware = doc[doc.index('Hardware:'):]
  hardware = ' '.join(hardware[:hardware.index('\nExpected:')].split())
  for topo in fit.TOPOLOGIES[name]:
    assert topo.label in hardware, (topo.label, hardware)
