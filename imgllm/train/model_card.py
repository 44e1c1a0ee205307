"""The model card (README.md) written into every pipeline checkpoint: what it is, what made it, how well it does.

    model_card(pipeline_config, runs=[("classifier", workdir, run_config, meta), ...], lm_source="smollm2")

Sections: the models (CNN, LM, visual prefix) and classes; the runs it comes from with their training data (source,
example count, fingerprint of the arrays, checkpoint step); the scores stored with the last run (held-out accuracy
with its 95% interval, calibration error, McNemar tests); the calibration applied at inference; the command and
imgllm version that wrote it. Everything is read from what the checkpoint and its runs recorded; nothing is
estimated.
"""

from __future__ import annotations

import datetime
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import imgllm

Run = tuple[str, str, Mapping[str, Any], Mapping[str, Any]]  # (role, work directory, run config, checkpoint meta)
SCORED = (("head", "CNN head"), ("lm", "LM (class prompts after the visual prefix)"), ("fused", "CNN + LM fused"))


def model_card(
    config: Mapping[str, Any],
    *,
    runs: Sequence[Run],
    lm_source: str | None = None,
    command: Sequence[str] | None = None,
) -> str:
    """The Markdown text of a pipeline checkpoint's README.md (see the module docstring)."""
    command = list(sys.argv if command is None else command)
    lines = [
        "# imgllm pipeline checkpoint",
        "",
        f"Written by imgllm {imgllm.__version__} on {datetime.date.today().isoformat()} with:",
        "",
        f"    {shlex.join(command)}",
        "",
        "## Models",
        "",
        *models_section(config, lm_source),
        "",
        "## Training data",
        "",
        *[line for run in runs for line in run_lines(*run)],
    ]
    stored = runs[-1][3].get("calibration") if runs else None
    if stored:
        lines += ["", "## Scores", "", *score_lines(stored)]
    lines += [
        "",
        "## Calibration applied at inference",
        "",
        *calibration_lines(config),
        "",
        "## Use",
        "",
        "    python infer.py --checkpoint=THIS_DIRECTORY images/ --output=captions.jsonl",
        "",
        "    from imgllm.pipeline import ImageToText",
        '    ImageToText("THIS_DIRECTORY")(["photo.jpg"])',
        "",
    ]
    return "\n".join(lines)


def models_section(config: Mapping[str, Any], lm_source: str | None) -> list[str]:
    """The CNN, the LM, the bridge and the classes, one bullet each."""
    cnn, lm, bridge = config["cnn"], config["lm"], config.get("bridge")
    names = config["class_names"]
    lines = [
        f"- CNN: preset `{cnn.get('preset')}`, {config['image_size']}x{config['image_size']} pixels, "
        f"{len(names)} classes: {', '.join(names[:50])}{' ...' if len(names) > 50 else ''}",
        f"- LM: {lm.get('model_type', 'gpt2')}, {lm.get('n_layer', lm.get('num_hidden_layers'))} layers, "
        f"width {lm.get('n_embd', lm.get('hidden_size'))}, vocabulary {lm.get('vocab_size')}"
        + (f", from `{lm_source}`" if lm_source else ""),
    ]
    if bridge:
        lines.append(
            f"- Visual prefix: {bridge['prefix_length']} embeddings from the CNN's "
            f"{bridge.get('feature_source', 'pooled')} features"
        )
    template = config.get("template") or "(none: the caption follows the visual prefix)"
    lines.append(
        f"- Caption prompt: `{template}`, up to {config['max_new_tokens']} new tokens; labels from "
        f"`{config['classify']}`; the CNN trained with flips: {config.get('train_flip') or 'unknown'}"
    )
    if config.get("class_prompt_templates"):
        lines.append(f"- LM classification prompts: {', '.join(f'`{t}`' for t in config['class_prompt_templates'])}")
    return lines


def run_lines(role: str, workdir: str, run_config: Mapping[str, Any], meta: Mapping[str, Any]) -> list[str]:
    """One bullet for a training run: its data source, examples, fingerprint and checkpoint step."""
    data = meta.get("data") or {}
    source = run_config.get("dataset", "?")
    limit = run_config.get("num_train_examples")
    return [
        f"- {role}: `{workdir}` (step {meta.get('step', '?')}), trained on `{source}` split "
        f"`{run_config.get('train_split', 'train')}`{f' (first {limit} examples)' if limit else ''}: "
        f"{data.get('num_examples', '?')} examples, fingerprint `{data.get('fingerprint', '?')}`"
    ]


def score_lines(report: Mapping[str, Any]) -> list[str]:
    """The stored evaluation as a table: accuracy, its interval and calibrated ECE per classifier, and McNemar."""
    lines = [
        "On the validation split at the end of training (calibrated figures held out, 2-fold):",
        "",
        "| classifier | accuracy | 95% interval | ECE calibrated |",
        "|---|---|---|---|",
    ]
    for key, name in SCORED:
        if f"{key}_accuracy" in report:
            ece = report.get(f"{key}_ece_calibrated")
            lines.append(
                f"| {name} | {100 * report[f'{key}_accuracy']:.2f}% | "
                f"{100 * report[f'{key}_accuracy_ci_low']:.2f}-{100 * report[f'{key}_accuracy_ci_high']:.2f}% "
                f"| {'' if ece is None else f'{ece:.4f}'} |"
            )
    for first, second in (("head", "lm"), ("head", "fused"), ("lm", "fused")):
        key = f"mcnemar_{first}_{second}"
        if f"{key}_p" in report:
            lines.append(
                f"\nMcNemar {first} vs {second}: p = {report[f'{key}_p']:.3g} "
                f"({report[f'{key}_{first}_only']:.0f} images only {first} gets right, "
                f"{report[f'{key}_{second}_only']:.0f} only {second})"
            )
    return lines


def calibration_lines(config: Mapping[str, Any]) -> list[str]:
    """The temperatures and fusion weight inference uses."""
    lines = [f"- CNN temperature {config['cnn_temperature']:.4g}"]
    if config.get("bridge"):
        lines.append(
            f"- LM temperature {config['lm_temperature']:.4g}; fusion weight {config['fusion_weight']:.4g}, "
            f"temperature {config['fusion_temperature']:.4g}"
        )
    return lines
