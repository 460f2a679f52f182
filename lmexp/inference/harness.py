"""Standard evaluations through EleutherAI's lm-evaluation-harness, for lmexp and Hugging Face causal LMs.

:class:`HarnessLM` is an ``lm_eval`` model over a small protocol instead of a model class:

- ``logits(input_ids (B, T)) -> (B, T, V)``: next-token logits of every position (an lmexp GPT or LSTM's
  forward, or ``lambda ids: hf_model(input_ids=ids).logits``);
- a :class:`TextTokenizer` (``encode(text) -> ids``, ``decode(ids) -> text``, ``eos_id``);
- ``max_length`` (the longest window the model reads), a device and a batch size;
- for generative tasks, a :data:`GenerateFn` (lmexp's key/value-cache decoding, or ``model.generate``).

It answers the harness's three request types: ``loglikelihood`` (summed log-probability of a continuation
and whether greedy decoding would produce it, batched, contexts cut from the left to fit ``max_length``),
``loglikelihood_rolling`` (a whole document in windows of ``max_length``, each token predicted once, as
``python -m lmexp.eval`` scores a document) and ``generate_until`` (greedy or sampled, until a stop string,
the end of text or ``max_gen_toks``).

:func:`run_harness` runs tasks by name (lm-eval's own, or YAML task files under ``include_path``) through
``lm_eval.simple_evaluate`` and returns flat ``harness/<task>/<metric>`` floats. Nothing is downloaded by
this module; a task whose dataset lives on the Hub downloads it through ``datasets`` as lm-eval always does.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from lmexp.errors import ConfigError, DataError

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default for generative tasks that do not set max_gen_toks


# ----------------------------------------------------------------------------------------- protocol
class TextTokenizer(Protocol):
    """What the adapter needs of a tokenizer: one text at a time, and the end-of-text id."""

    eos_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, special tokens left out."""
        ...


class SentencePieceText:
    """lmexp's sentencepiece :class:`~lmexp.data.tokenizer.Tokenizer` (encodes lists) as a TextTokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.eos_id: int = tokenizer.eos_id
        self.vocab_size: int = tokenizer.vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos)."""
        return list(self.tokenizer.encode([text])[0])

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; control tokens decode to nothing."""
        return self.tokenizer.decode(list(ids))


class HFText:
    """A Hugging Face tokenizer (``PreTrainedTokenizerBase``) as a TextTokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"{type(tokenizer).__name__} has no eos_token: expected a tokenizer with one")
        self.tokenizer = tokenizer
        self.eos_id: int = tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without the special tokens the tokenizer would add (bos, eos)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, special tokens skipped."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


@dataclass(frozen=True)
class Sampling:
    """How to pick each new token."""

    temperature: float = 0.0
    """0 = greedy (argmax); otherwise the softmax temperature of the sample."""
    top_k: int = 0
    """Sample among the ``top_k`` most likely tokens only (0 = all)."""
    top_p: float = 1.0
    """Sample within the smallest set of tokens whose probability reaches ``top_p`` (1 = all)."""


# generate(prompt_ids, max_new_tokens, sampling, should_stop) -> the new ids (without the prompt, cut before
# the end of text). ``should_stop(new_ids)`` says that a stop string has appeared, so decoding can end early.
GenerateFn = Callable[[list[int], int, Sampling, Callable[[list[int]], bool]], list[int]]


def kv_cache_generate(model: torch.nn.Module, vocab_size: int, eos_id: int | None) -> GenerateFn:
    """A :data:`GenerateFn` over an lmexp gpt (key/value cache) or lstm (carried state), one prompt at a time.

    lmexp's models take no attention mask, so prompts of different lengths are not batched. Samples come
    from torch's global generator, which :func:`run_harness` seeds.
    """
    from lmexp.inference.generate import next_tokens, stepper

    def generate(
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: Sampling,
        should_stop: Callable[[list[int]], bool],
    ) -> list[int]:
        device = next(model.parameters()).device
        new: list[int] = []
        with torch.no_grad():
            logits, step = stepper(model, torch.tensor([prompt_ids], device=device))  # (1, V')
            while len(new) < max_new_tokens:
                chosen = next_tokens(
                    logits[:, :vocab_size], sampling.temperature, sampling.top_k, sampling.top_p, None
                )  # (1,)
                token = int(chosen[0])
                if token == eos_id:
                    break
                new.append(token)
                if len(new) == max_new_tokens or should_stop(new):
                    break
                logits = step(chosen[:, None])  # (1, V')
        return new

    return generate


def hf_generate(model: Any, eos_id: int, pad_id: int | None = None) -> GenerateFn:
    """A :data:`GenerateFn` over a Hugging Face model's own ``generate``, one prompt at a time.

    One prompt per call keeps absolute-position models (GPT-2) exact: left padding would shift positions.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopWhen(StoppingCriteria):
        """Ends generation as soon as ``should_stop`` sees a stop string in the new tokens."""

        def __init__(self, prompt_length: int, should_stop: Callable[[list[int]], bool]) -> None:
            self.prompt_length, self.should_stop = prompt_length, should_stop

        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            stop = self.should_stop(input_ids[0, self.prompt_length :].tolist())
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    def generate(
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: Sampling,
        should_stop: Callable[[list[int]], bool],
    ) -> list[int]:
        device = next(model.parameters()).device
        prompt = torch.tensor([prompt_ids], device=device)  # (1, P)
        options: dict[str, Any] = {"do_sample": sampling.temperature > 0}
        if options["do_sample"]:  # HF warns about sampling settings given to greedy decoding
            # top_k=0 turns top-k off; None would fall back to the generation config (often 50).
            options.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        with torch.no_grad():
            output = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_id,
                pad_token_id=eos_id if pad_id is None else pad_id,
                stopping_criteria=StoppingCriteriaList([StopWhen(len(prompt_ids), should_stop)]),
                **options,
            )  # (1, P + new)
        new = output[0, len(prompt_ids) :].tolist()
        return new[: new.index(eos_id)] if eos_id in new else new

    return generate


# ------------------------------------------------------------------------------------------ adapter
class HarnessLM(TemplateLM):
    """An lm-eval model (``lm_eval.api.model.LM``) over a logits function, a tokenizer, a generate function.

    Args:
        logits: ``logits(input_ids (B, T)) -> (B, T, V')``; V' may exceed the vocabulary (padded rows).
        tokenizer: a :class:`TextTokenizer`.
        max_length: the longest window the model reads, in tokens (its context length).
        batch_size: windows per forward pass in ``loglikelihood`` and ``loglikelihood_rolling``.
        device: where input ids are put (the model's device).
        generate: decoding for ``generate_until``; None = generative tasks are refused.
        vocab_size: greedy checks look at the first ``vocab_size`` logits only (the real vocabulary of a
            padded one); log-probabilities are normalised over all V' logits, as lmexp's loss is.
        prefix_id: the token every scored text is conditioned on at its start (the document start);
            None = ``tokenizer.eos_id``, the separator lmexp's packed pre-training puts before each document.
        add_prefix: put ``prefix_id`` before every context, as lmexp's pre-training saw each document.
            False (for Hugging Face models, like lm-eval's own ``hf`` model) only for an empty context.
        max_gen_toks: new tokens per generation when a task does not say; None = min(256, max_length // 2).
    """

    def __init__(
        self,
        logits: Callable[[torch.Tensor], torch.Tensor],
        tokenizer: TextTokenizer,
        max_length: int,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        generate: GenerateFn | None = None,
        vocab_size: int | None = None,
        prefix_id: int | None = None,
        add_prefix: bool = True,
        max_gen_toks: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(max_length, int) or max_length < 2:
            raise ConfigError(f"harness max_length={max_length!r}: expected an integer >= 2")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"harness batch_size={batch_size!r}: expected an integer >= 1")
        self.logits_fn = logits
        self.text_tokenizer = tokenizer
        self._max_length = max_length
        self._batch_size = batch_size
        self._device = torch.device(device)
        self.generate_fn = generate
        self.vocab_size = vocab_size
        self._prefix_id = tokenizer.eos_id if prefix_id is None else prefix_id
        self.add_prefix = add_prefix
        self.max_gen_toks = max_gen_toks or min(DEFAULT_MAX_GEN_TOKS, max_length // 2)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_lmexp(
        cls, model: torch.nn.Module, tokenizer: Any, max_length: int | None = None, batch_size: int = 8
    ) -> HarnessLM:
        """An lmexp gpt or lstm language model with its sentencepiece tokenizer, put in eval mode.

        ``max_length`` defaults to the gpt's ``max_seq_len``; pass the run's ``data.block_size`` when it is
        shorter (positions past it were never trained), and always for the lstm.
        """
        max_length = max_length or getattr(model.config, "max_seq_len", None)
        if max_length is None:
            raise ConfigError(f"{type(model).__name__} has no max_seq_len: pass max_length (data.block_size)")
        text = tokenizer if isinstance(tokenizer, SentencePieceText) else SentencePieceText(tokenizer)
        model = getattr(model, "_orig_mod", model).eval()  # torch.compile would recompile for every shape
        return cls(
            logits=model,
            tokenizer=text,
            max_length=max_length,
            batch_size=batch_size,
            device=next(model.parameters()).device,
            generate=kv_cache_generate(model, text.vocab_size, text.eos_id),
            vocab_size=text.vocab_size,
            add_prefix=True,
        )

    @classmethod
    def from_hf(
        cls, model: Any, tokenizer: Any, max_length: int | None = None, batch_size: int = 8
    ) -> HarnessLM:
        """A Hugging Face causal LM (``...ForCausalLM``, ``GPT2LMHeadModel``) and tokenizer, in eval mode."""
        config = model.config
        max_length = max_length or getattr(config, "n_positions", None) or config.max_position_embeddings
        text = HFText(tokenizer)
        model.eval()
        return cls(
            logits=lambda input_ids: model(input_ids=input_ids).logits,
            tokenizer=text,
            max_length=max_length,
            batch_size=batch_size,
            device=next(model.parameters()).device,
            generate=hf_generate(model, text.eos_id, tokenizer.pad_token_id),
            vocab_size=len(tokenizer),
            add_prefix=False,
        )

    # ------------------------------------------------------------------ lm-eval's interface
    @property
    def eot_token_id(self) -> int:
        return self.text_tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self._prefix_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return type(self.text_tokenizer).__name__

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Ids of ``string``, after ``prefix_id`` when ``add_special_tokens`` (None = ``add_prefix``)."""
        ids = self.text_tokenizer.encode(string)
        prefix = self.add_prefix if add_special_tokens is None else add_special_tokens
        return [self.prefix_token_id, *ids] if prefix else ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``."""
        return self.text_tokenizer.decode(ids)

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """(summed log-prob of ``continuation``, is it greedy) for each (key, context ids, continuation ids).

        Each sequence is cut from the left to the last ``max_length`` + 1 tokens (the last is only a
        target), sequences are sorted longest first so each batch pads little, and padding goes on the
        right, where a causal model's earlier positions cannot see it.
        """
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            inputs = [self._window(*requests[i][1:]) for i in batch]
            padded = torch.full((len(batch), max(map(len, inputs))), self.eot_token_id, dtype=torch.long)
            for row, ids in enumerate(inputs):
                padded[row, : len(ids)] = torch.tensor(ids)
            with torch.no_grad():
                logits = self.logits_fn(padded.to(self.device))  # (B, T, V')
            for row, i in enumerate(batch):
                key, _, continuation = requests[i]
                answer = self._score(logits[row, : len(inputs[row])], continuation)
                results[i] = answer
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
        return results  # type: ignore[return-value]

    def _window(self, context: list[int], continuation: list[int]) -> list[int]:
        """The model input for scoring ``continuation`` after ``context``: at most ``max_length`` tokens."""
        if not continuation:
            raise DataError("lm-eval asked for the log-likelihood of an empty continuation")
        if len(continuation) > self.max_length:
            raise DataError(
                f"a continuation of {len(continuation)} tokens is longer than the model's window of "
                f"{self.max_length}; it cannot be scored"
            )
        return (context + continuation)[-(self.max_length + 1) :][:-1]

    def _score(self, logits: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
        """Summed log-prob of ``continuation`` (the last tokens ``logits`` (T, V') predict), greedy or not."""
        predicting = logits[-len(continuation) :].float()  # (C, V'): the positions that predict it
        targets = torch.tensor(continuation, device=predicting.device)  # (C,)
        log_probs = F.log_softmax(predicting, dim=-1)  # (C, V')
        total = float(log_probs.gather(1, targets[:, None]).sum())
        greedy = bool((predicting[:, : self.vocab_size].argmax(dim=-1) == targets).all())
        return total, greedy

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text after ``prefix_id``, every token predicted once.

        Windows hold ``max_length`` tokens and do not overlap, except the last, which is filled with
        earlier tokens as context (lm-eval's ``get_rolling_token_windows``); windows of all texts are
        batched together.
        """
        windows: list[tuple[None, list[int], list[int]]] = []
        owners: list[int] = []
        for index, request in enumerate(requests):
            (text,) = request.args
            ids = self.tok_encode(text, add_special_tokens=False)
            rolling = get_rolling_token_windows(ids, self.prefix_token_id, self.max_length, context_len=1)
            for context, continuation in map(make_disjoint_window, rolling):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_likelihood, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
            totals[owner] += log_likelihood
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """The continuation of each context, cut at the first stop string (``until``), the end of text or
        ``max_gen_toks`` new tokens; greedy unless the task asks for ``do_sample`` with a temperature."""
        if self.generate_fn is None:
            raise ConfigError("a generative harness task needs a generate function; this HarnessLM has none")
        return [self._generate_one(context, gen_kwargs) for context, gen_kwargs in (r.args for r in requests)]

    def _generate_one(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = [stop for stop in kwargs["until"] if stop]
        max_new = kwargs["max_gen_toks"]
        if max_new >= self.max_length:
            raise ConfigError(
                f"harness task asks for max_gen_toks={max_new} new tokens; the model reads at most "
                f"{self.max_length}: expected max_gen_toks < {self.max_length}"
            )
        sampling = Sampling(
            temperature=float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0,
            top_k=int(kwargs.get("top_k") or 0),
            top_p=float(kwargs.get("top_p") or 1.0),
        )
        prompt = self.tok_encode(context)[-(self.max_length - max_new) :]  # room for the new tokens

        def should_stop(new: list[int]) -> bool:
            text = self.tok_decode(new)
            return any(stop in text for stop in until)

        new = self.generate_fn(prompt, max_new, sampling, should_stop)
        text = postprocess_generated_text(self.tok_decode(new), until, None)
        self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return text


# ------------------------------------------------------------------------------------------- running
@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None, include_defaults: bool) -> Any:
    """lm-eval's task index; cached, since indexing its ~15,000 built-in tasks takes ~15 s on one CPU core."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def task_manager(tasks: Sequence[str], include_path: str | Path | None = None, key: str = "harness") -> Any:
    """The ``TaskManager`` that knows every task in ``tasks``; ConfigError naming close names otherwise.

    When ``include_path`` alone defines all of them, lm-eval's built-in tasks are not indexed at all.
    """
    tasks = _task_names(tasks, key)
    where = ""
    if include_path is not None:
        include_path = str(Path(include_path).expanduser().resolve())
        if not Path(include_path).is_dir():
            raise ConfigError(f"{key}.include_path={include_path}: expected a directory of task YAML files")
        local = _task_manager(include_path, False)
        if all(name in local.all_tasks for name in tasks):
            return local
        where = f" (nor of {key}.include_path={include_path})"
    manager = _task_manager(include_path, True)
    problems = []
    for name in tasks:
        if name in manager.all_tasks or Path(name).is_file():  # lm-eval also takes a YAML file's path
            continue
        close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
        hint = f"close names: {', '.join(close)}" if close else "list them with `lm-eval ls tasks`"
        problems.append(f"{key}.tasks: {name!r} is not an lm-eval task{where}; {hint}")
    if problems:
        raise ConfigError(problems)
    return manager


def _task_names(tasks: Any, key: str) -> list[str]:
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks:
        raise ConfigError(f"{key}.tasks={tasks!r}: expected a non-empty list of task names, e.g. [hellaswag]")
    if not all(isinstance(name, str) and name for name in tasks):
        raise ConfigError(f"{key}.tasks={list(tasks)!r}: expected task names (non-empty strings)")
    return list(tasks)


@contextlib.contextmanager
def preserved_random_state() -> Iterator[None]:
    """Restore Python's, numpy's and torch's global random states on exit.

    ``simple_evaluate`` seeds all three; a harness run in the middle of training must not change the
    dropout, masks or data order that follow (a resumed run must see what an uninterrupted one sees).
    """
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _bootstrap_in_process() -> Iterator[None]:
    """lm-eval's bootstrap otherwise starts a pool of one process per CPU, also inside a training job."""
    before = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = before


def run_harness(
    lm: Any,
    tasks: Sequence[str],
    include_path: str | Path | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    seed: int = 0,
    *,
    bootstrap_iters: int = 100,
    key: str = "harness",
) -> dict[str, float]:
    """Run lm-eval ``tasks`` on ``lm`` and return flat ``harness/<task>/<metric>`` floats.

    Args:
        lm: an ``lm_eval.api.model.LM``, e.g. a :class:`HarnessLM`.
        tasks: lm-eval task, group or tag names, or names defined by the YAML files under ``include_path``.
        include_path: a directory of task YAML files, searched recursively; its tasks take precedence over
            lm-eval's built-in ones of the same name. A name defined twice under it is taken from the
            first file in path order (lm-eval only warns), so keep names unique there.
        limit: examples per task (a fraction of each task if < 1); None = all.
        num_fewshot: examples shown before each question; None = each task's own setting (0 if unset).
        seed: seeds Python, numpy, torch and the few-shot sampler; the global random states are restored
            afterwards.
        bootstrap_iters: resamples for the standard errors lm-eval bootstraps (BLEU, chrF, F1, ...);
            closed-form ones (acc) cost nothing; 0 = no ``*_stderr`` values at all.
        key: the config prefix named in error messages (``harness`` or ``callbacks.harness``).

    Returns:
        ``harness/<task>/<metric>`` (lm-eval's ``none`` filter) or ``harness/<task>/<metric>/<filter>``, and
        ``..._stderr`` where lm-eval computed one; groups appear like tasks.
    """
    from lm_eval import simple_evaluate

    manager = task_manager(tasks, include_path, key)
    with preserved_random_state(), _bootstrap_in_process():
        results = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            bootstrap_iters=bootstrap_iters,
            log_samples=False,
            task_manager=manager,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    return flat_metrics(results)


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``harness/<task>/<metric>[/<filter>]`` floats from ``simple_evaluate``'s ``results`` (no ``N/A``)."""
    flat = {}
    for task, values in results["results"].items():
        for name, value in values.items():
            if "," not in name or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # "alias", and "N/A" standard errors
            metric, filter_name = name.split(",", 1)
            suffix = metric if filter_name == "none" else f"{metric}/{filter_name}"
            flat[f"harness/{task}/{suffix}"] = float(value)
    return dict(sorted(flat.items()))
