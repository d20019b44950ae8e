"""The command `python -m controller.holdout` (its code: `controller.experiments.holdout`)."""
import sys

from controller.experiments.holdout import main

if __name__ == "__main__":
    sys.exit(main())
