"""The command lines: `imgllm-train` (train.py) and `imgllm-infer` (infer.py), each a `main` over the library.

They sit below everything else in the data flow (they may import the trainer and the pipeline); the repository's
train.py and infer.py are thin shims over them, and pip installs them as console scripts.
"""
