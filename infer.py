#!/usr/bin/env python3
"""Caption images with a pipeline checkpoint, or assemble one: a shim over `imgllm.commands.infer` (installed as
the console script `imgllm-infer`). `python infer.py --help` lists the flags; the module's docstring explains them.
"""

import sys

from imgllm.commands.infer import main

if __name__ == "__main__":
    sys.exit(main())
