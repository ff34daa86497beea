"""A data set and a model added from outside bigbatch, one file each (tests/extra_source.py,
tests/extra_model.py), through the public registries and nothing else: the config checks them,
derives the run's numbers, shrinks them for a CPU smoke run that trains two steps, and lowers
their train step, as it does for the built-in ones. Names that are not registered stay one-line
config errors listing the registered choices."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from bigbatch import config_lib
from bigbatch import data
from bigbatch import derive
from bigbatch import loop
from bigbatch import models
from bigbatch import sharding
from bigbatch import trainer as trainer_lib
import extra_model  # tests/ is on sys.path under pytest
import extra_source

DATA, MODEL = 'extra_blobs', 'extra_mlp'


@pytest.fixture
def registered():
  """The extra data set and model, registered for one test only (other tests see the built-in
  choices)."""
  data.register(DATA, extra_source)
  models.register(MODEL, extra_model)
  yield
  data.unregister(DATA)
  models.unregister(MODEL)


def _config():
  c = config_lib.base_config()  # after registration: it holds the source's own fields
  c.data.name = DATA
  c.model.name = MODEL
  c.model.depth = 2
  c.model.width = 16
  c.global_batch = 64
  c.eval_batch = 64
  c.data.num_eval = 64
  c.num_epochs = 2.0
  return c


def test_derived_values_are_the_data_sets_and_the_models(registered):
  del registered
  config = _config()
  assert config.data.blob_classes == 4  # the source's field, with its default
  config_lib.validate(config, jax.device_count())
  d = derive.derive(config)
  dataset = data.create(config)
  assert d['data'] == {'num_train': dataset.num_train, 'num_eval': dataset.num_eval,
                       'image_shape': tuple(dataset.image_shape),
                       'num_classes': dataset.num_classes,
                       'source': 'generated blobs (tests/extra_source.py)'}
  assert (dataset.num_train, dataset.num_eval, dataset.image_shape) == (512, 64, (8, 8, 1))
  assert (d['schedule']['steps_per_epoch'], d['schedule']['total_steps']) == (8, 16)
  # model.depth=2 reached the model: two hidden dense-BN layers of 16, a head to 4 classes.
  assert d['parameters']['by_module'] == {'dense0': 64 * 16, 'norm0': 32, 'dense1': 16 * 16,
                                          'norm1': 32, 'head': 16 * 4 + 4}
  text = derive.format(d)
  assert DATA in text and MODEL in text and '512' in text


def test_runlocal_keeps_them_and_trains_two_steps(registered, tmp_path):
  del registered
  config = config_lib.runlocal(_config())
  # Each one's own smoke form (neither is replaced by a built-in).
  assert (config.data.name, config.data.image_size, config.data.blob_train) == (DATA, 4, 256)
  assert (config.model.name, config.model.depth, config.model.width) == (MODEL, 1, 8)
  result = loop.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(result['eval/loss'])
  assert result['eval/examples'] == config.data.num_eval == 64


def test_train_step_lowers(registered):
  del registered
  config = _config()
  config.accumulation_steps = 2
  config_lib.validate(config, jax.device_count())
  facts = derive.data_facts(config)
  trainer = trainer_lib.build(config, sharding.make_mesh(config), num_train=facts.num_train,
                              image_shape=facts.image_shape, num_classes=facts.num_classes,
                              initialize=False)
  text = trainer.train_step.lower(
      trainer.state, derive.abstract_batch(config, trainer, facts.image_shape)).as_text()
  assert 'all-reduce' in text or 'all_reduce' in text


def _config_error(config) -> str:
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config, jax.device_count())
  assert '\n' not in str(e.value)
  return str(e.value)


def test_unregistered_names_are_one_line_config_errors(registered):
  del registered
  config = _config()
  config.model.name = 'no_such_model'
  assert _config_error(config) == (
      f"config.model.name='no_such_model' is unknown; choose one of "
      f"{', '.join(models.names())}")
  assert MODEL in models.names() and 'resnet' in models.names()
  config.model.name = MODEL
  config.model.depth = 50  # not one of the model's DEPTHS
  assert _config_error(config) == f'config.model.depth=50 for {MODEL}; choose 1, 2, 3'
  config.model.depth = 2
  config.model.stage_depths = (1, 1)
  assert _config_error(config).startswith(f'config.model.stage_depths=(1, 1): {MODEL} has no')
  config.model.stage_depths = None
  config.data.name = 'no_such_data'
  assert _config_error(config) == (
      f"config.data.name='no_such_data' is unknown; choose one of {', '.join(data.names())}")
  assert DATA in data.names() and 'digits' in data.names()
  config.data.name = DATA
  config.data.blob_spread = -1.0  # the source's own check
  assert 'config.data.blob_spread' in _config_error(config)
  config.data.blob_spread = 0.5
  models.unregister(MODEL)
  assert _config_error(config).startswith(f"config.model.name='{MODEL}' is unknown")
  config.model.name = 'mlp'
  data.unregister(DATA)
  assert _config_error(config).startswith(f"config.data.name='{DATA}' is unknown")


def test_registration_refuses_clashes(registered):
  del registered
  data.register(DATA, extra_source)  # the same source again: nothing changes
  with pytest.raises(ValueError, match=f'{DATA!r} is already registered'):
    data.register(DATA, data.get('synthetic'))
  with pytest.raises(ValueError, match=f'{MODEL!r} is already registered'):
    models.register(MODEL, models.get('mlp'))
  with pytest.raises(TypeError, match='create'):
    data.register('no_create', extra_model)
  with pytest.raises(TypeError, match='Model'):
    models.register('no_model', extra_source)

  class Clash:  # a second source claiming a field the synthetic set owns
    create, facts = extra_source.create, extra_source.facts

    @staticmethod
    def defaults():
      return {'num_classes': 3}

  data.register('clash', Clash)
  try:
    with pytest.raises(ValueError, match="config.data.num_classes of data set 'clash'"):
      config_lib.base_config()
  finally:
    data.unregister('clash')
