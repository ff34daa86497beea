"""bigbatch: large-batch training research in JAX."""
import os as _os

# TensorFlow serves only the input pipelines. On CPUs where its oneDNN kernels are on (they are
# chosen by CPU features), they change the rounding of the preprocessing ops from one machine to
# the next and print an INFO line that TF_CPP_MIN_LOG_LEVEL does not silence (TensorFlow 2.21);
# the standard kernels give every machine the same input bytes. Before TensorFlow is imported;
# a value the user set wins.
_os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
