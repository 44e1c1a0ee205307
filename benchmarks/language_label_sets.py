"""Classification by language on CIFAR-10 validation, over label sets no model here was trained on, and caption quality.

For each pipeline checkpoint given (a template captioner, the frozen-SmolLM2 captioner, a label-prompt pipeline
assembled from the CNN and SmolLM2), on the first --num-images images of the validation split the trainer carves:
  - per label set of imgllm/language/cifar10_label_sets.json (10 classes, superclasses, synonyms, attributes):
    the LM's accuracy by prompt likelihood after the image's visual prefix, its 95% interval, the CNN's (its class
    mapped to the set's label) and the exact McNemar test between them; prior-corrected scoring
    score - alpha * log p(prompt), log p(prompt) the log-mean over --prior-images training images, alpha fitted
    (on all images, and held out 2-fold for the accuracy shown); needs a visual prefix (a bridge);
  - the greedy captions' distinct-1/2, how often they name the CNN's class (or another class; a class is named by
    its CIFAR-10 name or the synonyms set's word), how many different captions there are and how many classes get a
    caption of their own, and their perplexity under --judge (SmolLM2 used only as a judge).

    python benchmarks/language_label_sets.py --data folder:/tmp/cifar \\
        --pipeline template=runs/cifar10_captioner/pipeline --pipeline smollm2=runs/cifar10_smollm2/pipeline \\
        --pipeline label_prompt=runs/cifar10_label_prompt --json runs/label_sets.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from imgllm.captions.metrics import distinct_n, read_back  # noqa: E402
from imgllm.data import load_dataset  # noqa: E402
from imgllm.data.batching import padded_batch_outputs  # noqa: E402
from imgllm.language import scoring  # noqa: E402
from imgllm.language.label_sets import label_set_report, read_label_sets  # noqa: E402
from imgllm.language.load import load_lm  # noqa: E402
from imgllm.pipeline import classify_images, inference_params, load_pipeline, make_captioner  # noqa: E402
from imgllm.pipeline.caption import decode_captions


def class_words(class_names, label_sets) -> list[tuple[str, ...]]:
    """The words that name each class in a caption: its name, and its word in the synonyms set if there is one."""
    synonyms = label_sets.get("synonyms")
    return [(name, synonyms.truth[name]) if synonyms and name in synonyms.truth else (name,) for name in class_names]


def greedy_captions(pipe, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, list[str]]:
    """(the CNN head's class of each image, the pipeline's default greedy caption of each image)."""
    captioner = make_captioner(pipe.spec())
    params, key = inference_params(pipe.params), jax.random.PRNGKey(0)
    out = padded_batch_outputs(lambda batch: captioner(params, batch, key), images, batch_size)
    texts = decode_captions(pipe.tokenizer.decode, out["caption_ids"], pipe.config["eos_id"], pipe.config["pad_id"])
    return out["logits"].argmax(-1), [captions[0] for captions in texts]


def caption_figures(captions, cnn_classes, labels, class_names, words, judge) -> dict[str, float]:
    """Diversity, read-back and judge perplexity of greedy captions (see the module docstring)."""
    per_class = [
        collections.Counter(c for c, y in zip(captions, labels) if y == k).most_common(1)
        for k in range(len(class_names))
    ]
    encode = lambda text: judge.tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = judge.tokenizer.bos_token_id if judge.tokenizer.bos_token_id is not None else judge.tokenizer.eos_token_id
    log_probs, tokens = scoring.text_log_likelihoods(
        judge.params, judge.config, encode, bos, judge.tokenizer.eos_token_id, captions
    )
    return {
        "distinct_1": distinct_n(captions, 1),
        "distinct_2": distinct_n(captions, 2),
        "different_captions": len(set(captions)),
        "classes_with_own_caption": len({top[0][0] for top in per_class if top}),
        **read_back(captions, cnn_classes, words),
        "judge_perplexity": float(np.exp(-log_probs.sum() / tokens.sum())),
    }


def evaluate_pipeline(name, directory, val, train, label_sets, judge, args) -> dict:
    """Every figure of one pipeline checkpoint (see the module docstring), printed as it is computed."""
    pipe = load_pipeline(directory)
    class_names = list(pipe.class_names)
    if list(val.class_names) != class_names:
        raise SystemExit(f"{directory}: its classes {class_names} are not the data's {list(val.class_names)}")
    start = time.perf_counter()
    cnn_classes, captions = greedy_captions(pipe, val.images, args.batch_size)
    print(
        f"[{name}] {len(captions)} captions in {time.perf_counter() - start:.0f} s; e.g. "
        + " | ".join(
            f"{class_names[val.labels[i]]}: {captions[i]!r}" for i in range(0, len(captions), len(captions) // 5)
        ),
        flush=True,
    )
    result = {
        "captions": caption_figures(
            captions, cnn_classes, val.labels, class_names, class_words(class_names, label_sets), judge
        ),
        "examples": captions[:20],
        "label_sets": {},
    }
    print(f"[{name}] captions: {json.dumps(result['captions'])}", flush=True)
    if pipe.config.get("bridge") is None:
        return result
    for set_name, label_set in label_sets.items():
        start = time.perf_counter()
        score = lambda images: (
            classify_images(pipe, images, label_set.labels, label_set.templates, batch_size=args.batch_size).scores
        )
        try:
            val_scores, prior_scores = score(val.images), score(train.images)
        except ValueError as error:  # e.g. prompts longer than a small LM's positions: said, and the rest go on
            result["label_sets"][set_name] = {"error": str(error)}
            print(f"[{name}] {set_name}: not scored: {error}", flush=True)
            continue
        report = label_set_report(
            val_scores,
            label_set.truth_ids(class_names, val.labels),
            prior_scores=prior_scores,
            cnn_predictions=label_set.truth_ids(class_names, cnn_classes),
        )
        report["seconds"] = time.perf_counter() - start
        result["label_sets"][set_name] = report
        print(f"[{name}] {set_name}: " + json.dumps({k: round(v, 4) for k, v in report.items()}), flush=True)
    return result


def markdown_tables(results: dict, num_images: int) -> str:
    """The label-set table and the caption table of every pipeline, as Markdown."""
    pct = lambda r, key: (
        f"{100 * r[key + '_accuracy']:.1f} [{100 * r[key + '_accuracy_ci_low']:.1f}, "
        f"{100 * r[key + '_accuracy_ci_high']:.1f}]"
    )
    lines = [
        f"CIFAR-10 validation, {num_images} images; accuracy % [95% Wilson interval]; McNemar exact p vs CNN",
        "",
        "| LM | label set | LM | McNemar p (CNN-only / LM-only) | prior-corrected (held out) | alpha | CNN |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        for set_name, r in result["label_sets"].items():
            if "error" in r:
                lines.append(f"| {name} | {set_name} | not scored: {r['error']} | | | | |")
                continue
            lines.append(
                f"| {name} | {set_name} | {pct(r, 'lm')} | {r['mcnemar_cnn_lm_p']:.2g} "
                f"({r['mcnemar_cnn_lm_cnn_only']:.0f} / {r['mcnemar_cnn_lm_lm_only']:.0f}) | "
                f"{pct(r, 'prior')} | {r['alpha']:.2f} | {pct(r, 'cnn')} |"
            )
    lines += [
        "",
        "| captions | distinct-1 | distinct-2 | different | classes with own caption | names CNN class | "
        "names another | names none | judge perplexity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        c = result["captions"]
        lines.append(
            f"| {name} | {c['distinct_1']:.3f} | {c['distinct_2']:.3f} | {c['different_captions']} | "
            f"{c['classes_with_own_caption']} | {100 * c['names_predicted']:.1f}% | "
            f"{100 * c['names_other']:.1f}% | {100 * c['names_none']:.1f}% | {c['judge_perplexity']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="the dataset spec the runs were trained on (folder:/tmp/cifar)")
    parser.add_argument("--pipeline", action="append", required=True, help="NAME=PIPELINE_DIR (repeatable)")
    parser.add_argument("--num-images", type=int, default=1000, help="validation images (a class-balanced prefix)")
    parser.add_argument("--prior-images", type=int, default=256, help="training images for log p(prompt)")
    parser.add_argument("--label-sets", default="cifar10", help="label-set file or packaged name")
    parser.add_argument("--judge", default="smollm2", help="the LM that judges caption perplexity")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--json", default=None, help="write every figure here")
    args = parser.parse_args(argv)
    runs = dict(item.split("=", 1) for item in args.pipeline)
    label_sets = read_label_sets(args.label_sets)
    val = load_dataset(args.data, "validation", seed=0, num_examples=args.num_images)
    train = load_dataset(args.data, "train", seed=0, num_examples=args.prior_images)
    judge = load_lm(args.judge)
    print(
        f"{len(val.labels)} validation images, {len(train.labels)} training images for the prior; "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results = {
        name: evaluate_pipeline(name, directory, val, train, label_sets, judge, args)
        for name, directory in runs.items()
    }
    print(markdown_tables(results, len(val.labels)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
