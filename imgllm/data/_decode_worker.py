"""Worker process for parallel image decoding: `python -m imgllm.data._decode_worker REQUEST RESULT`.

REQUEST is a JSON file {"paths": [...], "size": [h, w], "resize": "crop"|"stretch"}; RESULT is the
.npz written with the decoded images, the kept mask and the error messages of files that failed.
Started by `imgllm.data.images._decode_in_subprocesses`; imports only numpy and Pillow.
"""

import json
import sys

import numpy as np

from imgllm.data.images import as_size, decode_files_in_process


def main(request_path: str, result_path: str) -> None:
    with open(request_path) as f:
        request = json.load(f)
    images, kept, errors = decode_files_in_process(request["paths"], as_size(request["size"]), request["resize"])
    np.savez(result_path, images=images, kept=kept, errors=np.array(errors, dtype=str))


if __name__ == "__main__":
    main(*sys.argv[1:])
