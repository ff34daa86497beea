# TEMPORARY (uncommitted) shim while helpers finish; removed before the last commit.
from bigbatch.loop import train_and_evaluate, NonFiniteError, Preempted, DataError  # noqa
from bigbatch.step import TrainState, train_step  # noqa
from bigbatch.tasks.classification import loss_fn, eval_step  # noqa
from bigbatch.trainer import build, Trainer, model_flops_per_example, precise_bn, init_from_workdir, CompileCache  # noqa
