"""``python -m imgllm.data.demo_images --out DIR [--num N] [--seed S]``: fresh demo images to caption.

Writes ``DIR/<shape>/<index>.png`` and ``DIR/captions.jsonl`` (`imgllm.data.demo.write_demo_images`). A module of
its own, which the package never imports, so that ``python -m`` runs it without importing it twice.
"""

from __future__ import annotations

import argparse

from imgllm.data.demo import write_demo_images


def main(argv=None) -> None:
    """Parses the flags and writes the images; prints the captions file's path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write <shape>/<index>.png and captions.jsonl into")
    parser.add_argument("--num", type=int, default=16, help="number of images")
    parser.add_argument("--seed", type=int, default=1, help="seed (training uses seed 0)")
    parser.add_argument("--split", default="test", help="demo split the images are drawn from")
    parser.add_argument("--image-size", type=int, default=32, help="image side in pixels")
    args = parser.parse_args(argv)
    print(
        write_demo_images(args.out, num_examples=args.num, seed=args.seed, split=args.split, image_size=args.image_size)
    )


if __name__ == "__main__":
    main()
