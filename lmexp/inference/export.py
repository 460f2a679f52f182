"""``python -m lmexp.export ckpt_path=<.ckpt> out=<dir>``: a Hugging Face transformers model directory.

gpt (task=clm or sft) becomes ``GPT2LMHeadModel``; llama ``LlamaForCausalLM``; bert ``BertForMaskedLM``
(pre-trained), ``BertForSequenceClassification`` (task=classify), ``BertForTokenClassification``
(task=ner) or ``BertForQuestionAnswering`` (task=qa); a ``model=hf`` language model is its own transformers
class, saved as it is (task=clm, mlm, sft), and a model=hf qa run becomes its model type's
``...ForQuestionAnswering``. LoRA adapters are merged into the weights first (the directory holds a
plain model).
Each model kind's adapter (lmexp/models/<kind>_hf.py, named in the model registry) renames the weights,
transposes GPT-2's Conv1D matrices, splits BERT's fused qkv and drops the padded vocabulary rows.
The tokenizer is the run's sentencepiece model rebuilt as a ``tokenizers`` tokenizer (same normalizer,
pieces, byte fallback and special tokens), so ``AutoTokenizer.from_pretrained(out)`` gives lmexp's ids; a
run with a Hugging Face tokenizer (model=hf, init_from=hf:...) saves that one.
The exported model's logits are compared with lmexp's before the directory is put in place (a model=hf
model's after it is read back from the staging directory).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lmexp.errors import ConfigError

PARITY_TOLERANCE = 1e-4  # max |logit difference| (fp32) accepted between lmexp and the exported model


def _require_transformers() -> None:
    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError(
            "export needs the transformers package, which is not installed: pip install -e '.[dev]' "
            "(or pip install transformers)"
        ) from None


# ------------------------------------------------------------------------------------------ tokenizer
def hf_tokenizer(model_file: Path, bert: bool, max_length: int | None) -> Any:
    """A ``PreTrainedTokenizerFast`` that encodes like the sentencepiece model at ``model_file``.

    sentencepiece's defaults are rebuilt step by step: its precompiled NFKC map, stripped and collapsed
    whitespace, a "▁" before every word (Metaspace), BPE merges ordered by piece score (or the unigram
    pieces and scores), byte fallback, and the run's special tokens kept whole. For BERT the post-
    processor adds ``[CLS] A [SEP] (B [SEP])`` with segment ids, as lmexp's BERT examples do.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    spec = proto.trainer_spec
    tokenizer = Tokenizer(_tokenizer_model(proto, models))
    steps = [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if proto.normalizer_spec.precompiled_charsmap:
        steps.insert(0, normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Metaspace(replacement="▁", prepend_scheme="always"),
            decoders.ByteFallback(),
            decoders.Fuse(),
        ]
    )
    # Control (3), unknown (2) and user-defined (4) pieces: whole tokens, never split or normalized.
    specials = [p.piece for p in proto.pieces if p.type in (2, 3, 4)]
    tokenizer.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in specials])
    names = {"unk_token": spec.unk_piece, "pad_token": spec.pad_piece, "bos_token": spec.bos_piece}
    names["eos_token"] = spec.eos_piece
    if bert:
        cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS]:0 $A:0 [SEP]:0",
            pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        names |= {"cls_token": "[CLS]", "sep_token": "[SEP]"}
        if tokenizer.token_to_id("[MASK]") is not None:
            names["mask_token"] = "[MASK]"
    extra = {"model_max_length": max_length} if max_length else {}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **names, **extra)


def _tokenizer_model(proto: Any, models: Any) -> Any:
    pieces = [(p.piece, p.score) for p in proto.pieces]
    spec = proto.trainer_spec
    if spec.model_type == 1:  # unigram
        return models.Unigram(pieces, unk_id=spec.unk_id, byte_fallback=spec.byte_fallback)
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    # sentencepiece BPE applies the merge whose result has the best score (lowest id) first.
    merges = sorted(
        (vocab[piece], vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:])
        for piece in vocab
        for k in range(1, len(piece))
        if piece[:k] in vocab and piece[k:] in vocab
    )
    return models.BPE(
        vocab,
        [(left, right) for *_, left, right in merges],
        unk_token=spec.unk_piece,
        fuse_unk=True,
        byte_fallback=spec.byte_fallback,
    )


# ------------------------------------------------------------------------------------------- weights
def special_ids(tokenizer: Any, layout: str) -> dict[str, int]:
    """The special ids of the exported config: a decoder's document starts after eos, so eos doubles as
    its bos; an encoder has pad only (its [CLS]/[SEP] are the tokenizer's post-processor's)."""
    if layout == "cls_sep":
        return {"pad_token_id": tokenizer.pad_id}
    return {
        "bos_token_id": tokenizer.eos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
    }


def hf_model(run: Any, cfg: DictConfig) -> Any:
    """The transformers model of a restored run, through its model kind's adapter (lmexp/models/*_hf.py)."""
    from lmexp.models.hf_common import to_hf_model

    spec, task = run.model_spec, run.task
    if spec.hf_adapter is None:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: a {spec.kind} cannot be expressed as a Hugging Face transformers "
            "model (transformers has no such model class)"
        )
    backbone = getattr(task.model, "backbone", task.model)
    return to_hf_model(
        spec.kind,
        backbone.config,
        task.model.state_dict(),
        run.tokenizer.vocab_size,
        special_ids(run.tokenizer, spec.layout),
        task=hf_task(task),
        labels=run.labels,
    )


def own_model(run: Any, cfg: DictConfig) -> Any:
    """A ``model=hf`` run's transformers model: the language model itself (task=clm, mlm, sft), or for
    task=qa its base model under the model type's ``...ForQuestionAnswering`` class."""
    if run.task_name == "qa":
        return question_answering_model(run.task.model, cfg)
    if run.task_name not in ("clm", "mlm", "sft"):
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: a model=hf fine-tuned with task={run.task_name} has an lmexp head "
            "that no transformers class holds; export writes model=hf language models (task=clm, mlm, sft) "
            "and question answering (task=qa)"
        )
    return run.task.model.hf.eval()


def question_answering_model(extractor: Any, cfg: DictConfig) -> Any:
    """``AutoModelForQuestionAnswering`` of a model=hf qa run's model type, holding its fine-tuned base
    model and span head (lmexp's (C, 2) head is transformers' start/end ``qa_outputs``)."""
    import torch
    from transformers import AutoModelForQuestionAnswering
    from transformers.models.auto.modeling_auto import MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES

    encoder = extractor.backbone.hf
    config = encoder.config
    if config.model_type not in MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: transformers has no question-answering class for model type "
            f"{config.model_type!r} (AutoModelForQuestionAnswering), so this qa run cannot be exported"
        )
    config = copy.deepcopy(config)
    config.num_labels = 2  # start, end
    model = AutoModelForQuestionAnswering.from_config(config, dtype=encoder.dtype)
    model.base_model.load_state_dict(encoder.base_model.state_dict())
    heads = [m for name, m in model.named_children() if m is not model.base_model]
    span = [m for m in heads if isinstance(m, torch.nn.Linear) and m.out_features == 2]
    if len(span) != 1:  # a class with more than one Linear beside its base model: which one is not known
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: {type(model).__name__} has no single start/end Linear head "
            "to hold the qa head; export is not available for it"
        )
    span[0].load_state_dict(extractor.classifier.state_dict())
    return model.eval()


def _reloaded(directory: Path, model: Any) -> Any:
    """The exported model read back with its own class's ``from_pretrained`` (as a user loads it)."""
    return type(model).from_pretrained(directory, dtype=model.dtype).eval()


def _tokenizer_of(run: Any, bert: bool, max_length: int | None) -> Any:
    """The run's tokenizer as transformers saves it: a Hugging Face one as it is, lmexp's sentencepiece
    model rebuilt (:func:`hf_tokenizer`)."""
    from lmexp.data.text_tokenizer import HFTokenizer

    if isinstance(run.tokenizer, HFTokenizer):
        return run.tokenizer.hf
    return hf_tokenizer(run.tokenizer.path, bert, max_length)


def hf_task(task: Any) -> str:
    """The adapter's task (``HF_CLASSES`` key) of an lmexp task: a fine-tuned causal LM (sft) is still a
    causal LM (``...ForCausalLM``); the others export under their own name."""
    return "clm" if task.language_model else task.name


# -------------------------------------------------------------------------------------------- parity
def lmexp_logits(task: Any, input_ids: Any, attention_mask: Any) -> Any:
    """lmexp's logits for ``input_ids`` (B, T), the padded vocabulary rows dropped."""
    vocab = task.train_metrics.vocab_size if task.name == "mlm" or task.language_model else None
    if task.language_model:
        return task.model(input_ids)[..., :vocab]  # (B, T, V); right padding never reaches a real position
    if task.name == "mlm":
        return task.model(input_ids, None, attention_mask)[0][..., :vocab]  # (B, T, V)
    return task.model(input_ids, attention_mask)  # (B, K) or (B, T, K)


def check_parity(task: Any, hf_model: Any, tokenizer: Any, texts: list[str], bert: bool) -> float:
    """Max |logit difference| between lmexp and the exported model on ``texts``; raises if too large."""
    import torch

    limit = hf_model.config.max_position_embeddings  # n_positions for GPT-2
    rows = []
    for ids in tokenizer.encode(texts):
        ids = ids[: limit - 2]
        cls, sep = (tokenizer.special_id("[CLS]"), tokenizer.special_id("[SEP]")) if bert else (None, None)
        rows.append([cls, *ids, sep] if bert else [tokenizer.eos_id, *ids])
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_id)  # (B, T)
    mask = torch.zeros_like(input_ids)  # (B, T)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    with torch.no_grad():
        ours = lmexp_logits(task, input_ids, mask)
        output = hf_model(input_ids=input_ids, attention_mask=mask)
        if hasattr(output, "start_logits"):  # ...ForQuestionAnswering: lmexp's (B, T, 2) is start, end
            theirs = torch.stack([output.start_logits, output.end_logits], dim=-1)  # (B, T, 2)
        else:
            theirs = output.logits[..., : ours.shape[-1]]
    if ours.dim() == 3:  # compare real positions only
        real = mask.bool()
        ours, theirs = ours[real], theirs[real]
    diff = float((ours - theirs).abs().max())
    if not diff <= PARITY_TOLERANCE:
        raise RuntimeError(f"exported logits differ from lmexp's by {diff:.3g} (> {PARITY_TOLERANCE})")
    return diff


PARITY_TEXTS = ["the cat sat on the mat.", "A longer sentence, with punctuation; and numbers 12345!", "x"]


# ---------------------------------------------------------------------------------------------- main
def export(cfg: DictConfig) -> Path:
    """Write the Hugging Face directory for ``cfg.ckpt_path`` to ``cfg.out``; return its path."""
    from lmexp.inference.restore import require, restore_run

    require(
        cfg,
        ckpt_path="a gpt, llama, bert or model=hf checkpoint (a .ckpt)",
        out="the directory to write, e.g. out=hf-model",
    )
    _require_transformers()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(str(cfg.out)).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise ConfigError(
            f"out={out} exists and is not an empty directory; choose another or set overwrite=true"
        )
    run = restore_run(cfg.ckpt_path, cfg.paths.cache_dir)
    task = run.task
    if task.adapters_only:
        from lmexp.models.lora import merge_lora

        merge_lora(task.model)  # adapters folded into the weights: a plain model
    own = run.model_spec.kind == "hf"
    model = own_model(run, cfg) if own else hf_model(run, cfg)
    bert = run.layout == "cls_sep"
    tokenizer = _tokenizer_of(run, bert, model.config.max_position_embeddings)
    diff = None if own else check_parity(task, model, run.tokenizer, PARITY_TEXTS, bert)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if own:  # what from_pretrained gives back must be what was trained
            diff = check_parity(task, _reloaded(staging, model), run.tokenizer, PARITY_TEXTS, bert)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"{type(model).__name__} + tokenizer written to {out} (max |logit diff| vs lmexp: {diff:.2g})")
    return out
