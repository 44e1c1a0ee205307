"""TensorBoard pictures and text (`imgllm.train.metrics_log`), and the confusion matrix a classifier run leaves there.

Event files are read back with tensorboardX's own protos (TensorBoard itself is not a dependency).
"""

import glob
import io
import os
import struct

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image
from tensorboardX.proto.event_pb2 import Event

from imgllm.configs import cnn_tiny
from imgllm.train import evaluation, loop, metrics_log
from imgllm.train.task_protocol import Task


def read_events(folder: str) -> list[Event]:
    """Every event of the event files in `folder` (TFRecord framing: length, its CRC, the data, its CRC)."""
    events = []
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents*"))):
        with open(path, "rb") as f:
            data = f.read()
        position = 0
        while position < len(data):
            (length,) = struct.unpack("<Q", data[position : position + 8])
            events.append(Event.FromString(data[position + 12 : position + 12 + length]))
            position += 12 + length + 4
    return events


def summaries(folder: str) -> dict[str, list[tuple[int, object]]]:
    """tag -> [(step, summary value)] of the events in `folder`."""
    found = {}
    for event in read_events(folder):
        for value in event.summary.value:
            found.setdefault(value.tag, []).append((event.step, value))
    return found


def picture(value) -> Image.Image:
    """The PNG of an image summary value, decoded."""
    return Image.open(io.BytesIO(value.image.encoded_image_string))


def test_image_and_text_go_to_the_split_folder(tmp_path):
    writer = metrics_log.MetricsWriter(str(tmp_path))
    pixels = np.zeros((4, 5, 3), np.uint8)
    pixels[1, 2] = (255, 0, 0)
    writer.image("eval", "array", pixels, 3)
    figure = plt.figure(figsize=(2, 1), dpi=50)
    writer.image("eval", "figure", figure, 4)
    writer.text("eval", "note", "a **cat**", 5)
    writer.close()
    assert not plt.fignum_exists(figure.number)  # rendered, then closed
    found = summaries(str(tmp_path / metrics_log.TENSORBOARD_DIR / "eval"))
    [(step, array)] = found["array"]
    assert step == 3 and (array.image.height, array.image.width) == (4, 5)
    np.testing.assert_array_equal(np.asarray(picture(array).convert("RGB")), pixels)
    [(step, drawn)] = found["figure"]
    assert step == 4 and (drawn.image.height, drawn.image.width) == (50, 100)
    [(step, note)] = found["note/text_summary"]  # tensorboardX's tag for text
    assert step == 5 and note.tensor.string_val == [b"a **cat**"]
    assert not os.path.exists(tmp_path / "metrics.jsonl")  # pictures and text are TensorBoard's only


def test_without_tensorboard_nothing_is_written_and_no_confusion_is_computed(tmp_path):
    class NoConfusion(Task):
        def checkpoint_metadata(self):
            return {"class_names": ["a", "b"]}

    class Confusion(NoConfusion):
        def confusion(self, *args, **kwargs):
            raise AssertionError("computed for nothing")

    writer = metrics_log.MetricsWriter(str(tmp_path), tensorboard=False)
    writer.image("final_eval", "x", np.zeros((2, 2, 3), np.uint8), 1)
    writer.text("final_eval", "x", "x", 1)
    evaluation.write_confusion_image(writer, Confusion(), None, {}, batch_size=1, tta=False, step=1)
    with_tensorboard = metrics_log.MetricsWriter(str(tmp_path))
    evaluation.write_confusion_image(with_tensorboard, NoConfusion(), None, {}, batch_size=1, tta=False, step=1)
    with_tensorboard.close()
    assert not os.path.exists(tmp_path / metrics_log.TENSORBOARD_DIR)


def test_classifier_run_writes_its_final_confusion_matrix_to_tensorboard(tmp_path):
    config = cnn_tiny.get_config()
    config.num_epochs = 1.0
    result = loop.train_and_evaluate(config, str(tmp_path))
    found = summaries(str(tmp_path / metrics_log.TENSORBOARD_DIR / "final_eval"))
    [(step, value)] = found["confusion_matrix"]
    assert step == result.total_steps == 8
    with picture(value) as image:
        assert min(image.size) > 300 and image.size == (value.image.width, value.image.height)
    assert found["accuracy"][0][1].simple_value == np.float32(result.final_eval["accuracy"])  # beside the scalars


def test_a_phase_after_training_replaces_the_stale_step_figures_on_the_bar():
    from tqdm import tqdm

    out = io.StringIO()
    bar = tqdm(total=750, file=out)
    bar.update(750)
    bar.set_postfix(loss="0.1234", acc="0.900")
    loop.show_phase(bar, "calibrating", {"images": np.zeros((5000, 2, 2, 3), np.uint8), "labels": np.zeros(5000)})
    assert bar.desc.startswith("calibrating") and bar.postfix == "5000 images"
    bar.close()
    assert "calibrating" in out.getvalue().splitlines()[-1].split("\r")[-1]
