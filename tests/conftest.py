"""Test setup: 8 emulated CPU devices, set before jax is imported anywhere."""
import glob
import os
import shutil
import tempfile
import time

# Must precede the first `import jax` in the process (pytest imports conftest first).
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# TensorFlow must not grab the two cores' thread pools beyond what the tests need.
os.environ.setdefault('TF_NUM_INTEROP_THREADS', '1')

# One persistent compilation cache per test run, shared by the xdist workers and the commands
# they start (jax reads these variables), fresh for every run so that nothing carries over from
# one run to the next: the suite compiles the same small train and eval steps in many tests, and
# compiling them is most of its time. Directories of runs older than a day are removed.
_RUN = os.environ.get('PYTEST_XDIST_TESTRUNUID') or f'{os.getpid()}'
_CACHE_PREFIX = os.path.join(tempfile.gettempdir(), 'bigbatch-tests-jax-cache-')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _CACHE_PREFIX + _RUN)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
if not os.environ.get('PYTEST_XDIST_WORKER'):
  for _old in glob.glob(_CACHE_PREFIX + '*'):
    if time.time() - os.path.getmtime(_old) > 86400:
      shutil.rmtree(_old, ignore_errors=True)

import jax  # noqa: E402

jax.config.update('jax_numpy_rank_promotion', 'raise')


# Files holding the longest tests (minutes each on 2 cores: the signal sweep, the loopback
# multi-host runs, the face runs, the layouts), collected first: xdist hands tests out in
# collection order, and one of these started last would leave the other worker idle for its
# whole length. Each file keeps its own order.
_LONGEST_FIRST = ('test_signals.py', 'test_multihost.py', 'test_face_data.py',
                  'test_layouts.py', 'test_face_train.py', 'test_export.py',
                  'test_study_faces.py', 'test_configs.py')


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(rank)))
