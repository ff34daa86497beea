"""`python -m bigbatch.main` with the fault of $BIGBATCH_FAULT installed (tests/faults.py): the
command the fault-tolerance and multi-host tests start as a process."""
import faults  # tests/ is this script's directory, so sys.path[0]

from bigbatch import main

if __name__ == '__main__':
  main.cli(hooks=faults.from_env())
