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

import inspect
from collections.abc import Sequence
from pathlib import Path

import torch

from tvbasis.errors import ConfigError
from tvbasis.eval.encoder import CHARS_PER_TOKEN, EVAL_BATCH_SIZE, autocast_to, set_threads
from tvbasis.eval.inplace import InPlaceEdit

#: the prompt every text is put in; the label text follows it after one space
DEFAULT_TEMPLATE = "Text: {text}\nLabel:"


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


class Sequences:
    """Prompt + label token sequences: ids, where each label starts and how long it is."""

    def __init__(self, ids: list[list[int]], label_start: list[int], label_len: list[int]) -> None:
        self.ids, self.label_start, self.label_len = ids, label_start, label_len


def label_token_ids(tokenizer: object, label_texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Each label text's tokens (after one space, no special tokens); ConfigError for an empty label or one that
    leaves no room for the text."""
    labels = [tokenizer(" " + lab, add_special_tokens=False)["input_ids"] for lab in label_texts]  # type: ignore[operator]
    if any(not ids for ids in labels):
        raise ConfigError("a label text tokenises to nothing; give every class a non-empty name")
    longest = max(len(ids) for ids in labels)
    if longest >= max_length - 1:
        raise ConfigError(f"a label text has {longest} tokens; --max-length {max_length} leaves no room for the text")
    return labels


def prompt_ids(tokenizer: object, text: str, room: int, max_length: int, template: str = DEFAULT_TEMPLATE) -> list[int]:
    """The prompt of ``text`` as tokens, cut to ``room`` tokens (``_cut``) when longer."""
    prompt = tokenizer(template.format(text=text[: max_length * CHARS_PER_TOKEN]))["input_ids"]  # type: ignore[operator]
    return prompt if len(prompt) <= room else _cut(prompt, room, tokenizer)


def pair_sequences(tokenizer: object, texts: Sequence[str], label_texts: Sequence[str],
                   pairs: Sequence[tuple[int, int]], max_length: int, template: str = DEFAULT_TEMPLATE) -> Sequences:
    """The sequences ``prompt(texts[i]) + " " + label_texts[c]`` for (i, c) in ``pairs``; the prompt's text is cut
    so that the whole sequence fits ``max_length`` (the label and the prompt's tail are kept)."""
    labels = label_token_ids(tokenizer, label_texts, max_length)
    ids: list[list[int]] = []
    starts: list[int] = []
    lens: list[int] = []
    for i, c in pairs:
        lab = labels[c]
        p = prompt_ids(tokenizer, texts[i], max_length - len(lab), max_length, template)
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
    lp = _token_logprobs(model, head, hidden[torch.tensor(b_idx), torch.tensor(pos)], targets)
    return torch.zeros(len(rows), dtype=lp.dtype).index_add(0, torch.tensor(owner), lp)


def _token_logprobs(model: torch.nn.Module, head: torch.nn.Module, h: torch.Tensor, targets: Sequence[int]
                    ) -> torch.Tensor:
    """log p(target_j | hidden state h_j) through the LM head, with the model's logit soft-capping."""
    return _row_logprobs(model, head, h).gather(1, torch.tensor(targets).unsqueeze(1)).squeeze(1)


#: LM-head rows computed in one product (the head is the vocabulary × hidden matrix, 168 M entries for Gemma's
#: 262 k tokens: reading it once per 64 rows instead of once per text; 64 rows of float32 logits = 67 MB)
HEAD_ROWS = 64


def _row_logprobs(model: torch.nn.Module, head: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """log p(· | hidden state) over the vocabulary for each row of ``h``, with the model's logit soft-capping."""
    logits = head(h).float()
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, dim=-1)


def _forward_kw(base: torch.nn.Module) -> str:
    # transformers names the forward argument ``cache`` from 5.40 on (``past_key_values`` before; still accepted)
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def prompts_label_rows(base: torch.nn.Module, prompts: Sequence[list[int]], labels: Sequence[list[int]],
                       pad_id: int) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
    """The hidden states that predict the label tokens after each of ``prompts``, every prompt run once, in one
    left-padded batch (explicit positions, so each prompt is positioned as if alone): (R, H) rows — each prompt's
    last state (it predicts every label's first token), then each later label token's predecessor — and the
    (row, token, prompt, class) quadruples whose log-probabilities sum to each (prompt, class) score. The prompts'
    key/value cache, each entry repeated once per label with more than one token, carries those labels' other
    tokens in one right-padded batch (padding after a label's last token is never attended to by its real tokens:
    the attention is causal)."""
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    mask = torch.zeros((B, P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    rows = [out.last_hidden_state[:, -1]]
    gathers = [(i, lab[0], i, c) for i in range(B) for c, lab in enumerate(labels)]
    multi = [c for c, lab in enumerate(labels) if len(lab) > 1]
    if not multi:
        return rows[0], gathers
    M, width = len(multi), max(len(labels[c]) - 1 for c in multi)
    cont = torch.full((M, width), pad_id, dtype=torch.long)
    cont_mask = torch.zeros((M, width), dtype=torch.long)
    for j, c in enumerate(multi):
        n = len(labels[c]) - 1
        cont[j, :n] = torch.tensor(labels[c][:-1])
        cont_mask[j, :n] = 1
    lengths = torch.tensor([len(p) for p in prompts])
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    if cache is None:
        raise ConfigError(f"{type(base).__name__} returned no key/value cache; cannot score label texts after a prompt")
    cache.batch_repeat_interleave(M)  # prompt i's entry at rows i·M … i·M + M − 1
    hidden = base(input_ids=cont.repeat(B, 1), use_cache=False,
                  attention_mask=torch.cat([mask.repeat_interleave(M, 0), cont_mask.repeat(B, 1)], 1),
                  position_ids=(lengths.repeat_interleave(M)[:, None] + torch.arange(width)),
                  **{_forward_kw(base): cache}).last_hidden_state
    at = [(i * M + j, k) for i in range(B) for j, c in enumerate(multi) for k in range(len(labels[c]) - 1)]
    rows.append(hidden[torch.tensor([r for r, _ in at]), torch.tensor([k for _, k in at])])
    gathers += [(B + n, labels[multi[r % M]][k + 1], r // M, multi[r % M]) for n, (r, k) in enumerate(at)]
    return torch.cat(rows), gathers


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
        #: precision of scoring: float32, or bfloat16 matrix products through autocast (``Encoder.eval_dtype``)
        self.eval_dtype: torch.dtype = torch.float32

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))

    @torch.inference_mode()
    def scores(self, texts: Sequence[str], label_texts: Sequence[str], progress: bool | str = False) -> torch.Tensor:
        """(N texts, C classes) summed log-likelihoods of each label text after each text's prompt.

        Each prompt runs once (``prompts_label_rows``, ``batch_size`` prompts of similar length per left-padded
        batch): its last hidden state scores every label's first token, and its key/value cache, repeated once per
        label, feeds the labels' remaining tokens — the prompt's tokens are not run again per class (C times fewer
        prompt tokens than one sequence per (text, label) pair); the LM head then runs on the rows of several
        texts at once (``HEAD_ROWS``). A long text is cut so that the prompt leaves room for the longest label,
        the same cut for every class."""
        labels = label_token_ids(self.tokenizer, label_texts, self.max_length)
        room = self.max_length - max(len(lab) for lab in labels)
        base, head = _base_and_head(self.model)
        out = torch.zeros((len(texts), len(label_texts)), dtype=torch.float32)
        pending: list[torch.Tensor] = []  # hidden rows of the texts not yet through the head
        where: list[tuple[int, int, int, int]] = []  # (row in pending, token, text, class)
        n_rows = 0

        def flush() -> None:
            nonlocal n_rows
            if not pending:
                return
            lp = _row_logprobs(self.model, head, torch.cat(pending))
            row, tok, txt, cls = (torch.tensor(x) for x in zip(*where))
            out.index_put_((txt, cls), lp[row, tok].float(), accumulate=True)
            pending.clear()
            where.clear()
            n_rows = 0

        prompts = [prompt_ids(self.tokenizer, t, room, self.max_length, self.template) for t in texts]
        by_length = sorted(range(len(texts)), key=lambda i: len(prompts[i]))  # little left padding per batch
        groups: Sequence[list[int]] = [by_length[g:g + self.batch_size]
                                       for g in range(0, len(by_length), self.batch_size)]
        if progress:
            from tqdm.auto import tqdm
            groups = tqdm(groups, desc=progress if isinstance(progress, str) else "score", unit="batch", leave=False)
        with autocast_to(self.model, self.eval_dtype):
            for group in groups:
                h, gathers = prompts_label_rows(base, [prompts[i] for i in group], labels, self.pad_id)
                where.extend((n_rows + r, t, group[b], c) for r, t, b, c in gathers)
                pending.append(h)
                n_rows += h.shape[0]
                if n_rows >= HEAD_ROWS:
                    flush()
            flush()
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
