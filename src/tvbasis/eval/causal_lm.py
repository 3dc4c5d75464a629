"""A causal LM as a zero-shot classifier: each class is scored by the log-likelihood of its label text after a
prompt, ``log p(label tokens | "Text: {text}\\nLabel:")`` summed over the label's tokens; the prediction is the
class with the highest score (the usual zero-shot classification of LLMs). The same label-token log-likelihood,
negated, is the fine-tuning loss of ``lm_label_loss`` (next-token label prediction).

Only the positions that predict a label token go through the LM head (``label_logprobs``): with a 262 k-token
vocabulary (Gemma) the head over every position would dominate the cost and the memory. Logit soft-capping
(``config.final_logit_softcapping``, Gemma) is applied as the model's own forward does. ``set_delta`` edits the
weights in place like ``SequenceClassifier`` (θ + scale·delta).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from tvbasis.errors import ConfigError
from tvbasis.eval.encoder import CHARS_PER_TOKEN, EVAL_BATCH_SIZE, set_threads
from tvbasis.eval.inplace import InPlaceEdit

#: the prompt every text is put in; the label text follows it after one space
DEFAULT_TEMPLATE = "Text: {text}\nLabel:"


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


class Sequences:
    """Prompt + label token sequences: ids, where each label starts and how long it is."""

    def __init__(self, ids: list[list[int]], label_start: list[int], label_len: list[int]) -> None:
        self.ids, self.label_start, self.label_len = ids, label_start, label_len


def build_sequences(tokenizer: object, texts: Sequence[str], label_texts: Sequence[str], max_length: int,
                    template: str = DEFAULT_TEMPLATE) -> tuple[Sequences, list[tuple[int, int]]]:
    """Every (text, label) pair as one token sequence ``prompt(text) + " " + label``; returns the sequences and,
    per sequence, (text index, label index)."""
    index = [(i, c) for i in range(len(texts)) for c in range(len(label_texts))]
    return pair_sequences(tokenizer, texts, label_texts, index, max_length, template), index


def pair_sequences(tokenizer: object, texts: Sequence[str], label_texts: Sequence[str],
                   pairs: Sequence[tuple[int, int]], max_length: int, template: str = DEFAULT_TEMPLATE) -> Sequences:
    """The sequences ``prompt(texts[i]) + " " + label_texts[c]`` for (i, c) in ``pairs``; the prompt's text is cut
    so that the whole sequence fits ``max_length`` (the label and the prompt's tail are kept)."""
    labels = [tokenizer(" " + lab, add_special_tokens=False)["input_ids"] for lab in label_texts]  # type: ignore[operator]
    if any(not ids for ids in labels):
        raise ConfigError("a label text tokenises to nothing; give every class a non-empty name")
    longest = max(len(ids) for ids in labels)
    if longest >= max_length - 1:
        raise ConfigError(f"a label text has {longest} tokens; --max-length {max_length} leaves no room for the text")
    prompts: dict[int, list[int]] = {}
    ids: list[list[int]] = []
    starts: list[int] = []
    lens: list[int] = []
    for i, c in pairs:
        if i not in prompts:
            prompts[i] = tokenizer(template.format(text=texts[i][: max_length * CHARS_PER_TOKEN]))["input_ids"]  # type: ignore[operator]
        prompt, lab = prompts[i], labels[c]
        room = max_length - len(lab)
        p = prompt if len(prompt) <= room else _cut(prompt, room, tokenizer)
        ids.append(p + lab)
        starts.append(len(p))
        lens.append(len(lab))
    return Sequences(ids, starts, lens)


def _cut(prompt: list[int], room: int, tokenizer: object) -> list[int]:
    """The prompt cut to ``room`` tokens: a leading BOS and the tail (``Label:``) kept, the text cut in the middle."""
    bos = getattr(tokenizer, "bos_token_id", None)
    head = [prompt[0]] if bos is not None and prompt and prompt[0] == bos else []
    tail = 4
    keep = room - len(head) - tail
    if keep < 1:
        return head + prompt[len(prompt) - (room - len(head)):]
    return head + prompt[len(head):len(head) + keep] + prompt[-tail:]


def _base_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    if hasattr(model, "get_base_model"):  # a PEFT wrapper: its LoRA layers are injected into the base model
        model = model.get_base_model()
    head = model.get_output_embeddings()
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if head is None or base is None:
        raise ConfigError(f"{type(model).__name__}: cannot find the decoder and its LM head")
    return base, head


def label_logprobs(model: torch.nn.Module, seqs: Sequences, rows: Sequence[int], pad_id: int) -> torch.Tensor:
    """Σ over each label's tokens of log p(token | everything before it), for the sequences ``rows`` (one padded
    batch, right padding); differentiable outside inference mode. Only the label positions reach the LM head."""
    base, head = _base_and_head(model)
    width = max(len(seqs.ids[r]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, :len(seqs.ids[r])] = torch.tensor(seqs.ids[r])
        mask[j, :len(seqs.ids[r])] = 1
    hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state
    b_idx, pos, targets, owner = [], [], [], []
    for j, r in enumerate(rows):
        s, n = seqs.label_start[r], seqs.label_len[r]
        for k in range(n):
            b_idx.append(j)
            pos.append(s + k - 1)  # the hidden state before a token predicts it
            targets.append(seqs.ids[r][s + k])
            owner.append(j)
    h = hidden[torch.tensor(b_idx), torch.tensor(pos)]
    logits = head(h).float()
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    lp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(targets).unsqueeze(1)).squeeze(1)
    return torch.zeros(len(rows), dtype=lp.dtype).index_add(0, torch.tensor(owner), lp)


class CausalLMScorer(InPlaceEdit):
    """A local causal LM (``*ForCausalLM``) scoring the classes of a task by their label texts' log-likelihood."""

    def __init__(self, model_dir: str | Path, max_length: int = 128, batch_size: int = EVAL_BATCH_SIZE,
                 template: str = DEFAULT_TEMPLATE) -> None:
        set_threads()
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise ConfigError(f"{self.model_dir}: not a Hugging Face model directory (no config.json)")
        if "{text}" not in template:
            raise ConfigError(f"prompt template {template!r} has no {{text}} placeholder")
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), local_files_only=True,
                                                              dtype=torch.float32)
        except Exception as e:
            raise ConfigError(f"{self.model_dir}: cannot load as a causal LM: {_short(e)}") from None
        self.model.eval()
        self.max_length, self.batch_size, self.template = int(max_length), int(batch_size), template
        self.class_names = ()
        self._params = dict(self.model.state_dict(keep_vars=True))
        self._base: dict[str, torch.Tensor] = {}

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))

    @torch.inference_mode()
    def scores(self, texts: Sequence[str], label_texts: Sequence[str], progress: bool | str = False) -> torch.Tensor:
        """(N texts, C classes) summed log-likelihoods of each label text after each text's prompt."""
        seqs, index = build_sequences(self.tokenizer, texts, label_texts, self.max_length, self.template)
        order = sorted(range(len(seqs.ids)), key=lambda r: len(seqs.ids[r]))
        out = torch.empty((len(texts), len(label_texts)), dtype=torch.float32)
        starts = range(0, len(order), self.batch_size)
        if progress:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc=progress if isinstance(progress, str) else "score", unit="batch", leave=False)
        for s in starts:
            rows = order[s:s + self.batch_size]
            lp = label_logprobs(self.model, seqs, rows, self.pad_id)
            for r, v in zip(rows, lp.tolist()):
                out[index[r]] = v
        return out

    def predict(self, texts: Sequence[str], progress: bool | str = False,
                label_texts: Sequence[str] = ()) -> torch.Tensor:
        if not label_texts:
            raise ConfigError("a causal LM needs the label texts of the classes to score")
        return self.scores(texts, label_texts, progress).argmax(-1)


def lm_label_loss(model: torch.nn.Module, tokenizer: object, texts: Sequence[str], label_texts: Sequence[str],
                  labels: Sequence[int], max_length: int, template: str = DEFAULT_TEMPLATE) -> torch.Tensor:
    """Mean over the examples of −log p(the true label's text | prompt): next-token prediction of the label only
    (the loss of a LoRA fine-tune of a causal LM on a classification task)."""
    seqs = pair_sequences(tokenizer, texts, label_texts, list(enumerate(labels)), max_length, template)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (getattr(tokenizer, "eos_token_id", None) or 0)
    return -label_logprobs(model, seqs, range(len(labels)), int(pad)).mean()
