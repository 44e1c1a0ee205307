"""From training runs to what inference reads: pipeline checkpoints and Hugging Face GPT-2 directories.

    assemble_pipeline_checkpoint   a classifier run (its CNN, class names, normalisation) + an LM → pipeline
    export_pipeline_checkpoint     a captioner run (CNN, visual prefix, LM, tokenizer, class-prompt templates)
    export_hf                      an LM run → a directory transformers loads (GPT2LMHeadModel, LlamaForCausalLM)

These live on the trainer's side so that inference (`imgllm.pipeline`) never imports training code: a pipeline
checkpoint is self-contained (format in `imgllm.pipeline.checkpoint`).
"""

from __future__ import annotations

import os

import jax

from imgllm import calibration
from imgllm.language.load import load_lm, save_lm
from imgllm.language.tokenizer import check_vocabulary
from imgllm.pipeline import checkpoint as pipeline_checkpoint
from imgllm.pipeline.prompts import DEFAULT_TEMPLATE
from imgllm.train.captioner import FROZEN
from imgllm.train.checkpoint import load_classifier
from imgllm.train.evaluation import restore_for_eval
from imgllm.train.lm_task import tokenizer_from_metadata
from imgllm.train.model_card import model_card


def assemble_pipeline_checkpoint(
    out_dir: str | os.PathLike,
    *,
    classifier: str | os.PathLike,
    lm: str,
    tokenizer: str | None = None,
    template: str = DEFAULT_TEMPLATE,
    top_k: int = 1,
    max_new_tokens: int = 20,
    overwrite: bool = False,
) -> str:
    """Builds a pipeline checkpoint from a classifier's train.py work directory and a language model: a GGUF file, a
    Hugging Face directory or a hub name of GPT-2 or the Llama family (`imgllm.language.load.load_lm`).

    The tokenizer comes from `tokenizer` when given, else from the LM (its directory, or the GGUF file's own
    vocabulary); prompts start with BOS exactly when that tokenizer adds it by default (its own rule), so a greedy
    caption is what transformers' ``generate`` writes after the same prompt. The class names, image size,
    normalisation and the CNN head's fitted temperature come from the classifier run's checkpoint (config, meta).
    """
    cnn_variables, run_config, meta = load_classifier(os.fspath(classifier))
    loaded = load_lm(lm, tokenizer=tokenizer)
    lm_config, lm_params, text_tokenizer = loaded.config, loaded.params, loaded.tokenizer
    class_names = meta.get("task", {}).get("class_names")
    if not class_names:
        raise ValueError(f"{classifier}: the checkpoint's meta has no task.class_names (meta keys: {sorted(meta)})")
    cnn_config = run_config.get("model")
    if not cnn_config:
        raise ValueError(f"{classifier}: the run config has no 'model' section (keys: {sorted(run_config)})")
    normalization = run_config.get("normalization") or {}
    config = pipeline_checkpoint.make_pipeline_config(
        cnn=cnn_config,
        lm=lm_config.to_dict(),
        class_names=class_names,
        eos_id=text_tokenizer.eos_token_id,
        pad_id=text_tokenizer.pad_token_id,
        bos_id=text_tokenizer.bos_token_id,
        prepend_bos=loaded.prepend_bos,
        template=template,
        top_k=top_k,
        image_size=int(run_config.get("image_size") or 32),
        mean=normalization.get("mean"),
        std=normalization.get("std"),
        max_new_tokens=max_new_tokens,
        cnn_temperature=calibration.stored_head_temperature(meta.get("calibration")),
        train_flip=train_flip(run_config),
    )
    check_vocabulary(text_tokenizer, lm_config.vocab_size, lm)
    card = model_card(config, runs=[("classifier", os.path.abspath(classifier), run_config, meta)], lm_source=lm)
    return pipeline_checkpoint.save_pipeline_checkpoint(
        out_dir, {"cnn": cnn_variables, "lm": lm_params}, config, text_tokenizer, overwrite=overwrite, card=card
    )


def export_pipeline_checkpoint(
    workdir: str, out_dir: str, *, step: int | None = None, max_new_tokens: int = 0, overwrite: bool = False
) -> str:
    """Writes the pipeline checkpoint (imgllm.pipeline.checkpoint format) of a captioner run in `workdir`.

    params {"cnn", "lm", "bridge"}; config: the classifier's CNN and normalisation, the LM's config.json, the
    bridge fields, prompt = [BOS] only (empty template, prepend_bos) and "class_prompt_templates" for LM
    classification. max_new_tokens=0: captions.max_tokens + 1.
    """
    config, meta, task, variables = restore_for_eval(workdir, step)
    variables = jax.device_get(variables)
    task_meta = meta["task"]
    tokenizer = tokenizer_from_metadata(task_meta)
    params = {
        "cnn": variables[FROZEN]["cnn"],
        "lm": task.lm_params(variables["params"], variables),
        "bridge": variables["params"]["bridge"],
    }
    normalization = task.normalization
    pipeline_config = pipeline_checkpoint.make_pipeline_config(
        cnn=task.classifier_config["model"],
        lm=task.lm_config.to_dict(),
        class_names=task.class_names,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        bos_id=tokenizer.eos_token_id,
        bridge=task_meta["bridge"],
        template="",
        top_k=1,
        image_size=task.image_size,
        mean=normalization.get("mean"),
        std=normalization.get("std"),
        prepend_bos=True,
        max_new_tokens=max_new_tokens or config.captions.max_tokens + 1,
        class_prompt_templates=task_meta["templates"],
        train_flip=train_flip(task.classifier_config),
        **pipeline_calibration(meta.get("calibration"), task.cnn_temperature),
    )
    classifier_dir = os.path.abspath(config.classifier_workdir)
    card = model_card(
        pipeline_config,
        lm_source=config.lm.get("pretrained"),
        runs=[
            ("classifier", classifier_dir, task.classifier_config, task.classifier_meta),
            ("captioner", os.path.abspath(workdir), config.to_dict(), meta),
        ],
    )
    return pipeline_checkpoint.save_pipeline_checkpoint(
        out_dir, params, pipeline_config, tokenizer, overwrite=overwrite, card=card
    )


def train_flip(run_config: dict) -> str | None:
    """The flip augmentation a classifier run's config trained with ("random", "alternating", "none"), or None when
    the config does not say (`make_pipeline_config(train_flip=)`)."""
    flip = (run_config.get("augment") or {}).get("flip")
    return flip if flip in pipeline_checkpoint.TRAIN_FLIPS else None


def pipeline_calibration(report: dict | None, cnn_temperature: float) -> dict:
    """A captioner's stored calibration as `make_pipeline_config` arguments: the temperatures and the fusion weight
    fitted on its validation split, and classify="fused" when the fused classifier was more accurate there than the
    CNN head (held out: `imgllm.calibration.calibration_report`). Without a report: the classifier's head
    temperature, the CNN's labels."""
    fitted = calibration.stored_fit(report)
    if fitted is None or "lm_temperature" not in fitted:
        return {"cnn_temperature": cnn_temperature}
    fused_is_better = report.get("fused_accuracy", 0.0) > report.get("head_accuracy", 1.0)
    return {
        "cnn_temperature": fitted["head_temperature"],
        "lm_temperature": fitted["lm_temperature"],
        "fusion_weight": fitted["fusion_weight"],
        "fusion_temperature": fitted["fusion_temperature"],
        "classify": "fused" if fused_is_better else "cnn",
    }


def export_hf(workdir: str, out_dir: str, *, step: int | None = None) -> str:
    """Write the LM checkpoint in `workdir` (latest, or `step`) as a Hugging Face GPT-2 directory with its tokenizer."""
    _, meta, task, variables = restore_for_eval(workdir, step)
    tokenizer = tokenizer_from_metadata(meta["task"])
    return save_lm(out_dir, task.lm_config, jax.device_get(variables["params"]), tokenizer=tokenizer)
