"""Train a model from a config, or evaluate a saved checkpoint: a shim over `imgllm.commands.train` (installed as the
console script `imgllm-train`). `python train.py --help` prints the usage and the flags.
"""

import sys

from imgllm.commands.train import console_main

if __name__ == "__main__":
    sys.exit(console_main())
