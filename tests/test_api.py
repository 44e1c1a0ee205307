"""imgllm.pipeline.ImageToText: one call on paths, PIL images or arrays gives infer.py's records."""

import numpy as np
import pytest
from PIL import Image

from imgllm.pipeline import CaptionOptions, ImageToText, caption_files


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_paths_give_caption_files_records(checkpoint, image_files):
    options = CaptionOptions(method="sample", num_captions=2, batch_size=2, seed=3)  # sampled: the keys must match
    records = ImageToText(checkpoint, options)(image_files)
    expected = list(caption_files(checkpoint, image_files, options))
    assert records == expected and len(records) == 5 and all("error" not in r for r in records)


def test_pil_images_and_arrays_give_the_records_of_their_files(checkpoint, image_files):
    captioner = ImageToText(checkpoint, CaptionOptions(batch_size=8))
    from_files = captioner(image_files)
    pil_images = [Image.open(path) for path in image_files]
    arrays = [np.asarray(image.convert("RGB")) for image in pil_images]
    strip = lambda records: [{k: v for k, v in r.items() if k != "path"} for r in records]
    assert strip(captioner(pil_images)) == strip(from_files)
    assert strip(captioner(arrays)) == strip(from_files)
    assert [r["path"] for r in captioner(arrays)] == [f"<image {i}>" for i in range(5)]
    assert strip(captioner(arrays[0])) == strip(from_files[:1])  # one image: a list of one
    same_size = np.stack([np.asarray(Image.open(image_files[0]))] * 3)  # a uint8 batch [N, H, W, 3]
    assert strip(captioner(same_size)) == strip(from_files[:1]) * 3


def test_an_unreadable_input_is_reported_and_the_others_captioned(checkpoint, image_files, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    records = ImageToText(checkpoint, CaptionOptions(batch_size=2))(
        [image_files[0], str(broken), np.zeros((4, 4, 2), np.float32), image_files[1]]
    )
    assert "error" not in records[0] and "error" not in records[3]
    assert records[1]["path"] == str(broken) and "broken.png" in records[1]["error"]
    assert records[2]["path"] == "<image 2>" and "cannot convert" in records[2]["error"]
    with pytest.raises(ValueError, match="batch_size"):
        ImageToText(checkpoint, CaptionOptions(batch_size=0))
