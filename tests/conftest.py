"""Test setup: 8 emulated CPU devices, set before jax is imported anywhere."""
import os

# Must precede the first `import jax` in the process (pytest imports conftest first).
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# TensorFlow must not grab the two cores' thread pools beyond what the tests need.
os.environ.setdefault('TF_NUM_INTEROP_THREADS', '1')

import jax  # noqa: E402

jax.config.update('jax_numpy_rank_promotion', 'raise')
