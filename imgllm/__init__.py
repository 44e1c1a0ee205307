"""imgllm: a CNN classifier and an image captioner in JAX (see README.md).

`imgllm.__version__` is the package's version (pyproject.toml reads it from here).

Importing the package installs one logging filter: `import transformers` (imgllm uses only its tokenizers and
GPT-2 files) logs "PyTorch was not found. Models won't be available and only tokenizers, configuration and file/data
utilities can be used." when torch is not installed. imgllm never needs torch, so that one notice is dropped; every
other transformers message is shown as before.
"""

import logging

__version__ = "0.1.0"


def _is_torch_notice(record: logging.LogRecord) -> bool:
    """False (drop it) for transformers' "PyTorch was not found" notice; True for every other record."""
    return "Models won't be available and only tokenizers" not in record.getMessage()


# The notice is logged by the "transformers" logger itself (transformers/__init__.py), and a logger's filters see
# exactly its own records. Added once: the function is the same object on each import of this module.
logging.getLogger("transformers").addFilter(_is_torch_notice)
