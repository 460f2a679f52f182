"""``python -m lmexp.export ckpt_path=<.ckpt> out=<dir>``: a Hugging Face transformers model directory.

gpt (task=clm) becomes ``GPT2LMHeadModel``; bert becomes ``BertForMaskedLM`` (pre-trained),
``BertForSequenceClassification`` (task=classify) or ``BertForTokenClassification`` (task=ner). lmexp's
layouts mirror these classes (see the docstrings of lmexp/models/gpt.py and bert.py), so export renames
weights, transposes GPT-2's Conv1D matrices, splits BERT's fused qkv and drops the padded vocabulary rows.
The tokenizer is the run's sentencepiece model rebuilt as a ``tokenizers`` tokenizer (same normalizer,
pieces, byte fallback and special tokens), so ``AutoTokenizer.from_pretrained(out)`` gives lmexp's ids.
The exported model's logits are compared with lmexp's before the directory is put in place.
"""

from __future__ import annotations

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
def gpt2_config(config: Any, vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> Any:
    """The ``GPT2Config`` of the same architecture as an lmexp :class:`GPTConfig`."""
    from transformers import GPT2Config

    if not config.bias:
        raise ConfigError(
            "model.bias=false cannot be expressed as GPT2LMHeadModel (GPT-2 always has biases); "
            "export needs a gpt trained with model.bias=true (the default)"
        )
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=config.max_seq_len,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=4 * config.n_embd,
        activation_function="gelu_new",
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=config.layer_norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def _gpt_model(model: Any, vocab_size: int, tokenizer: Any) -> Any:
    from transformers import GPT2LMHeadModel

    config = model.config
    # An lmexp document starts after eos, so eos doubles as GPT-2's bos.
    hf_config = gpt2_config(config, vocab_size, tokenizer.eos_id, tokenizer.eos_id, tokenizer.pad_id)
    source = model.state_dict()
    weights = {
        "transformer.wte.weight": source["tok_emb.weight"][:vocab_size],
        "transformer.wpe.weight": source["pos_emb.weight"],
        "transformer.ln_f.weight": source["ln_f.weight"],
        "transformer.ln_f.bias": source["ln_f.bias"],
        "lm_head.weight": source["lm_head.weight"][:vocab_size],
    }
    names = {"ln1": "ln_1", "ln2": "ln_2", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj"}
    names |= {"mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
    for i in range(config.n_layer):
        for ours, theirs in names.items():
            weight, bias = source[f"blocks.{i}.{ours}.weight"], source[f"blocks.{i}.{ours}.bias"]
            is_conv1d = not ours.startswith("ln")  # GPT-2's Conv1D stores (in, out): transpose
            weights[f"transformer.h.{i}.{theirs}.weight"] = weight.t() if is_conv1d else weight
            weights[f"transformer.h.{i}.{theirs}.bias"] = bias
    return _loaded(GPT2LMHeadModel(hf_config), weights)


def bert_config(config: Any, vocab_size: int, pad_id: int, labels: list[str] | None) -> Any:
    """The ``BertConfig`` of an lmexp :class:`BERTConfig`'s architecture (with ``labels``: a classifier's)."""
    from transformers import BertConfig

    if config.norm_first:
        raise ConfigError(
            "model.norm_first=true (pre-LN) cannot be expressed as a Hugging Face BERT (post-LN); "
            "export needs a bert trained with model.norm_first=false (the default)"
        )
    extra = {}
    if labels is not None:
        extra = {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)},
        }
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=config.n_embd,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        intermediate_size=config.mlp_ratio * config.n_embd,
        hidden_act="gelu",
        hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.dropout,
        max_position_embeddings=config.max_seq_len,
        type_vocab_size=config.type_vocab_size,
        layer_norm_eps=config.layer_norm_eps,
        pad_token_id=pad_id,
        **extra,
    )


def _bert_weights(source: dict[str, Any], n_layer: int, vocab_size: int, pooler: bool) -> dict[str, Any]:
    """``bert.*`` weights (embeddings, encoder, and with ``pooler`` the pooler) from an lmexp BERT's."""
    weights = {
        "bert.embeddings.word_embeddings.weight": source["tok_emb.weight"][:vocab_size],
        "bert.embeddings.position_embeddings.weight": source["pos_emb.weight"],
        "bert.embeddings.token_type_embeddings.weight": source["type_emb.weight"],
        "bert.embeddings.LayerNorm.weight": source["emb_ln.weight"],
        "bert.embeddings.LayerNorm.bias": source["emb_ln.bias"],
    }
    names = {
        "attn.proj": "attention.output.dense",
        "ln1": "attention.output.LayerNorm",
        "mlp.fc": "intermediate.dense",
        "mlp.proj": "output.dense",
        "ln2": "output.LayerNorm",
    }
    for i in range(n_layer):
        prefix = f"bert.encoder.layer.{i}"
        for part in ("weight", "bias"):
            qkv = source[f"blocks.{i}.attn.qkv.{part}"]
            for name, chunk in zip(("query", "key", "value"), qkv.chunk(3, dim=0), strict=True):
                weights[f"{prefix}.attention.self.{name}.{part}"] = chunk
            for ours, theirs in names.items():
                weights[f"{prefix}.{theirs}.{part}"] = source[f"blocks.{i}.{ours}.{part}"]
    if "pooler.dense.weight" in source and pooler:
        weights["bert.pooler.dense.weight"] = source["pooler.dense.weight"]
        weights["bert.pooler.dense.bias"] = source["pooler.dense.bias"]
    return weights


def _bert_model(task: Any, tokenizer: Any, labels: list[str] | None) -> Any:
    from transformers import BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification

    vocab_size = tokenizer.vocab_size
    if task.name == "mlm":
        bert = task.model
        config = bert_config(bert.config, vocab_size, tokenizer.pad_id, None)
        source = bert.state_dict()
        weights = _bert_weights(source, bert.config.n_layer, vocab_size, pooler=False)
        weights |= {
            "cls.predictions.transform.dense.weight": source["mlm_head.dense.weight"],
            "cls.predictions.transform.dense.bias": source["mlm_head.dense.bias"],
            "cls.predictions.transform.LayerNorm.weight": source["mlm_head.ln.weight"],
            "cls.predictions.transform.LayerNorm.bias": source["mlm_head.ln.bias"],
            "cls.predictions.decoder.weight": source["mlm_head.decoder.weight"][:vocab_size],
            "cls.predictions.bias": source["mlm_head.decoder.bias"][:vocab_size],
            "cls.predictions.decoder.bias": source["mlm_head.decoder.bias"][:vocab_size],
        }
        return _loaded(BertForMaskedLM(config), weights)
    bert = task.model.backbone
    config = bert_config(bert.config, vocab_size, tokenizer.pad_id, labels)
    weights = _bert_weights(bert.state_dict(), bert.config.n_layer, vocab_size, pooler=True)
    weights["classifier.weight"] = task.model.classifier.weight
    weights["classifier.bias"] = task.model.classifier.bias
    hf_class = BertForSequenceClassification if task.name == "classify" else BertForTokenClassification
    return _loaded(hf_class(config), weights)


def _loaded(model: Any, weights: dict[str, Any]) -> Any:
    """``model`` with ``weights`` loaded; every one of its parameters must be among them."""
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    missing = sorted(params - set(weights))
    unknown = sorted(set(weights) - set(model.state_dict()))
    if missing or unknown:  # a programming error: the name mapping is out of date
        raise RuntimeError(f"export mapping: missing {missing[:5]}, unknown {unknown[:5]}")
    model.load_state_dict({k: v.detach().clone().contiguous() for k, v in weights.items()}, strict=False)
    return model.eval()


# -------------------------------------------------------------------------------------------- parity
def lmexp_logits(task: Any, input_ids: Any, attention_mask: Any) -> Any:
    """lmexp's logits for ``input_ids`` (B, T), the padded vocabulary rows dropped."""
    vocab = task.train_metrics.vocab_size if task.name in ("clm", "mlm") else None
    if task.name == "clm":
        return task.model(input_ids)[..., :vocab]  # (B, T, V)
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
        theirs = hf_model(input_ids=input_ids, attention_mask=mask).logits
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
        cfg, ckpt_path="a gpt or bert checkpoint (a .ckpt)", out="the directory to write, e.g. out=hf-model"
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
    hf_model = _hf_model(run, cfg)
    bert = run.model_spec.layout == "cls_sep"
    tokenizer = hf_tokenizer(run.tokenizer.path, bert, hf_model.config.max_position_embeddings)
    diff = check_parity(task, hf_model, run.tokenizer, PARITY_TEXTS, bert)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf_model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"{type(hf_model).__name__} + tokenizer written to {out} (max |logit diff| vs lmexp: {diff:.2g})")
    return out


def _hf_model(run: Any, cfg: DictConfig) -> Any:
    spec, task = run.model_spec, run.task
    if spec.hf_adapter is None:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: a {spec.kind} cannot be expressed as a Hugging Face transformers "
            "model (transformers has no such model class); export supports gpt (task=clm) and bert"
        )
    if spec.kind == "gpt" and task.name == "clm":
        return _gpt_model(task.model, run.tokenizer.vocab_size, run.tokenizer)
    if spec.kind == "bert":
        return _bert_model(task, run.tokenizer, run.labels)
    raise ConfigError(
        f"ckpt_path={cfg.ckpt_path}: export of a fine-tuned {spec.kind} (task={task.name}) is not supported; "
        "export supports gpt (task=clm) and bert (task=mlm, classify, ner)"
    )
