"""Every config field, walked with out-of-range values: each is either valid (listed in VALID,
with the reason) or refused by config_lib.validate with a ConfigError naming the field (exit 2,
before anything is written: validation reads no data and writes nothing), never another
exception from a library later. The fields are the leaves of the configs below, which between
them switch on every part that reads its own fields (tasks, data sets, models, study
measurements); a value counts as refused if some context where the field is read refuses it.
Validation only: a second or two."""
from __future__ import annotations

import copy
import math
import os
import sys

from ml_collections import config_dict
import pytest

from bigbatch import config_lib

ROOT = os.path.join(os.path.dirname(__file__), '..')
sys.path.insert(0, ROOT)
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import cifar10_small_batch  # noqa: E402
from configs import face_r100_cosface_4k  # noqa: E402
from configs import face_synthetic  # noqa: E402
from configs import quickstart  # noqa: E402
from configs import r50_32k_lamb  # noqa: E402

DEVICES = 8


def _contexts() -> dict[str, config_dict.ConfigDict]:
  study = quickstart.get_config()
  study.noise_scale.enabled = True
  study.sharpness.every_steps = 10
  study.sharpness.at_end = True
  study.target.value = 0.5
  study.ema_decay = 0.99
  study.model.norm = 'group'
  study.lr.decay = 'polynomial'
  step = quickstart.get_config()
  step.lr.decay = 'step'
  step.lr.boundaries_epochs = (10.0, 20.0)
  step.num_epochs = 40.0
  step.batch_schedule = ((30, 2),)
  step.profile_steps = (2, 3)
  table = quickstart.get_config()
  table.lr.scaling = 'table'
  table.lr.table = ((1024, 0.1, None),)
  return {
      'digits': quickstart.get_config(),
      'synthetic-resnet-lamb': config_lib.runlocal(r50_32k_lamb.get_config()),
      'images': cifar10_small_batch.get_config(),
      'face-synthetic': face_synthetic.get_config(),
      'face-recordio': face_r100_cosface_4k.get_config(),
      'study': study,
      'step-decay': step,
      'lr-table': table,
  }


def _leaves(node, prefix=''):
  for key in node.keys():
    value = node[key]
    if isinstance(value, config_dict.ConfigDict):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      # pylint: disable-next=protected-access  (a placeholder's declared type)
      field = node._fields[key]
      reference = isinstance(field, config_dict.FieldReference)
      kind = field._field_type if reference else type(value)  # pylint: disable=protected-access
      yield f'{prefix}{key}', kind


_INTS = (-1, 0, 2**31, 2**64, -2**64, 1.5, 'x', None)
_FLOATS = (-1.0, 0.0, -1, 0, 1e39, 1e300, math.nan, math.inf, -math.inf, 'x', None)
_STRS = ('bogus', '', None)
_TUPLES = ((), (-1,), (math.nan,), (0, 0), ('x',), ((1, 2, 3, 4),), None)


def _values(kind):
  return {int: _INTS, float: _FLOATS, str: _STRS, tuple: _TUPLES, bool: (None,)}[kind]


# (field, value) pairs that validate in every context, and why that is right. A value given by
# repr so that nan compares.
VALID = {
    # Legitimately 0 (off, none, or a meaningful zero).
    ('seed', '0'): 'any seed in [0, 2**32)',
    ('precise_bn_batches', '0'): 'precise BN off',
    ('label_smoothing', '0.0'): 'no smoothing',
    ('label_smoothing', '0'): 'no smoothing',
    ('model.dropout', '0.0'): 'no dropout',
    ('model.dropout', '0'): 'no dropout',
    ('model.bn_momentum', '0.0'): 'statistics of the last batch only',
    ('model.bn_momentum', '0'): 'statistics of the last batch only',
    ('optimizer.b1', '0.0'): 'Adam without first-moment averaging (RMSProp-like)',
    ('optimizer.b1', '0'): 'Adam without first-moment averaging (RMSProp-like)',
    ('optimizer.b2', '0.0'): 'Adam without second-moment averaging',
    ('optimizer.b2', '0'): 'Adam without second-moment averaging',
    ('optimizer.momentum', '0.0'): 'plain SGD',
    ('optimizer.momentum', '0'): 'plain SGD',
    ('optimizer.weight_decay', '0.0'): 'no weight decay',
    ('optimizer.weight_decay', '0'): 'no weight decay',
    ('lr.end_lr', '0.0'): 'decay to zero',
    ('lr.end_lr', '0'): 'decay to zero',
    ('lr.warmup_init_lr', '0.0'): 'warm up from zero',
    ('lr.warmup_init_lr', '0'): 'warm up from zero',
    ('data.noise', '0.0'): 'noiseless synthetic faces',
    ('data.noise', '0'): 'noiseless synthetic faces',
    ('data.pixel_noise', '0.0'): 'noiseless synthetic pixels',
    ('data.pixel_noise', '0'): 'noiseless synthetic pixels',
    ('data.nuisance_dim', '0'): 'no nuisance latent',
    ('data.prefetch', '0'): 'no prefetching',
    ('data.num_parallel_calls', '-1'): 'AUTOTUNE',
    ('mesh.data', '-1'): 'the devices that are left',
    # Margins: any finite value is computable (cos is defined everywhere); the loss families
    # use either sign (CosFace's m3, ArcFace's m2, SphereFace's m1).
    **{(f'face.m{i}', v): 'any finite margin' for i in (1, 2, 3)
       for v in ('-1.0', '0.0', '-1', '0')},
    # A threshold on a metric (a loss may be a target too): any finite number.
    **{('target.value', v): 'any finite threshold' for v in ('-1.0', '0.0', '-1', '0')},
    # Empty tuples are "none", as None is.
    ('batch_schedule', '()'): 'a fixed batch',
    ('data.verification_bins', '()'): 'no verification sets',
    # Paths, split names, TFDS names and regexes: any string; they are checked where they are
    # opened (a missing data set: exit 6), '' is "unset" where None is.
    **{(f, v): 'a name or path, checked where it is opened' for f in (
        'compilation_cache_dir', 'data.data_dir', 'data.eval_split', 'data.face_cache',
        'data.face_root', 'data.tfds_name')
       for v in ("'bogus'", "''")},
    **{(f, v): 'a regex; bad patterns are refused' for f in (
        'optimizer.weight_decay_exclude', 'optimizer.trust_ratio_exclude')
       for v in ("'bogus'", "''")},
    ('seed', '2147483648'): 'seeds are 32-bit unsigned',
    ('data.train_split', "'bogus'"): 'a TFDS split, checked when the set is opened (exit 6)',
    ('data.verification_bins', "('x',)"): 'a file name, checked when the set is opened (exit 6)',
}
# Fields that may be None (unset): their defaults are None or None means "off".
NONE_VALID = {
    'batch_schedule', 'checkpoint_every_minutes', 'compilation_cache_dir', 'data.data_dir',
    'data.eval_split',
    'data.face_cache', 'data.face_root', 'data.file_format', 'data.ijb_root', 'data.tfds_name',
    'ema_decay',
    'eval_every_epochs', 'eval_every_steps', 'init_from', 'lr.boundaries_epochs',
    'lr.boundaries_steps', 'lr.table', 'lr.warmup_epochs', 'lr.warmup_steps',
    'model.bn_group_size', 'model.stage_depths', 'num_epochs', 'num_steps',
    'optimizer.clip_grad_norm', 'profile_steps', 'sharpness.every_steps', 'target.value',
    # An exclusion regex unset excludes nothing (trust_ratio.path_mask).
    'optimizer.weight_decay_exclude', 'optimizer.trust_ratio_exclude',
}


def _outcomes():
  """{(field, repr(value)): {context: 'ok' | 'refused' | error text}}."""
  out = {}
  kinds = dict(_leaves(config_lib.base_config()))  # each field's type, as the owners declare it
  for name, base in _contexts().items():
    config_lib.validate(base, DEVICES)  # each context is valid as it is
    for path, kind in _leaves(base):
      for value in _values(kinds.get(path, kind)):
        config = copy.deepcopy(base)
        try:
          config_lib.override(config, **{path: value})
        except TypeError:  # ConfigDict keeps a field's type: the command line refuses it (1)
          result = 'refused'
        else:
          try:
            config_lib.validate(config, DEVICES)
            result = 'ok'
          except config_lib.ConfigError as e:
            leaf = path.rsplit('.', 1)[-1]
            result = 'refused' if leaf in str(e) else f'ConfigError not naming {leaf}: {e}'
          except Exception as e:  # pylint: disable=broad-except
            result = f'{type(e).__name__}: {e}'
        out.setdefault((path, repr(value)), {})[name] = result
  return out


# None for a bool is False (optax, flax and the hooks test them for truth).
_BOOLS = {p for p, k in _leaves(config_lib.base_config()) if k is bool}


@pytest.fixture(scope='module')
def outcomes():
  return _outcomes()


def test_every_field_is_walked(outcomes):
  fields = {f for f, _ in outcomes}
  assert len(fields) >= 100, len(fields)
  default = {p for p, _ in _leaves(config_lib.base_config())}
  assert default <= fields, sorted(default - fields)


def test_no_value_escapes_validation(outcomes):
  """Nothing but a ConfigError naming the field (or a valid pass)."""
  bad = {k: r for k, by in outcomes.items() for r in by.values()
         if r not in ('ok', 'refused')}
  assert not bad, '\n'.join(f'{k}: {r}' for k, r in sorted(bad.items()))


def test_out_of_range_values_are_refused(outcomes):
  accepted = sorted(k for k, by in outcomes.items() if all(r == 'ok' for r in by.values()))
  unexplained = [k for k in accepted if k not in VALID
                 and not (k[1] == 'None' and (k[0] in NONE_VALID or k[0] in _BOOLS))]
  assert not unexplained, '\n'.join(map(str, unexplained))




def test_the_allow_list_is_current(outcomes):
  """Every VALID entry still validates: a validator that now refuses it removes the entry."""
  stale = [k for k in VALID if k in outcomes and not all(
      r == 'ok' for r in outcomes[k].values())]
  assert not stale, stale
