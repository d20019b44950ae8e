"""The command `python -m controller.benchmark` (its code: `controller.experiments.benchmark`)."""
import sys

from controller.experiments.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
