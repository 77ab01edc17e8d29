"""Generate and decode answers: stop and vision-token ids, cutting generated ids into completions, and
``generate_answers`` with neutral decoding (the model's own distribution, whatever its generation config
says)::

    completions = generate_answers(model, processor, items, manifest_dir, Decoding(32, 8, min_px, max_px))
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from vlgrpo.data.manifest import Item
from vlgrpo.model.prompt_encoding import encode_prompts


@dataclass
class Completion:
    text: str                 # decoded, special tokens stripped, whitespace stripped
    token_ids: list[int]      # generated ids up to and including the terminating token, no padding
    terminated: bool          # ended with eos / <|im_end|> (not cut at max_new_tokens)


def stop_token_ids(processor, model=None) -> list[int]:
    """Ids that end an assistant turn: <|im_end|>, the tokenizer's eos, and the generation config's."""
    tok = processor.tokenizer
    ids = set()
    for t in ("<|im_end|>", "<|endoftext|>"):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i >= 0 and i != tok.unk_token_id:
            ids.add(i)
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    if model is not None:
        eos = getattr(model.generation_config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    return sorted(ids)


def vision_token_ids(processor, model=None) -> list[int]:
    """Ids of the vision placeholder and delimiter tokens, which no sampled completion may contain: the next
    forward pass would count one as an image slot ("Image features and image tokens do not match").

    The one list both training and evaluation suppress: the tokenizer's ``<|vision_start|>``,
    ``<|vision_end|>``, ``<|vision_pad|>``, ``<|image_pad|>``, ``<|video_pad|>`` and, when ``model`` is given,
    the ids its config names (``image_token_id``, ``video_token_id``, ``vision_start_token_id``,
    ``vision_end_token_id``), which a checkpoint may map differently from its tokenizer.
    """
    tok = processor.tokenizer
    names = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
    ids = {tok.convert_tokens_to_ids(n) for n in names}
    if model is not None:
        c = model.module.config if hasattr(model, "module") else model.config
        keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        ids |= {getattr(c, k) for k in keys if getattr(c, k, None) is not None}
    return sorted(int(i) for i in ids if isinstance(i, int) and i >= 0 and i != tok.unk_token_id)


def split_completions(processor, sequences: torch.Tensor, stop_ids: Sequence[int]) -> list[Completion]:
    """Cut each row of generated ids (B, L) at its first stop token; decode the rest."""
    tok = processor.tokenizer
    stops = set(stop_ids)
    out = []
    for row in sequences.tolist():
        ids, terminated = [], False
        for t in row:
            ids.append(t)
            if t in stops:
                terminated = True
                break
        text = tok.decode(ids, skip_special_tokens=True).strip()
        out.append(Completion(text=text, token_ids=ids, terminated=terminated))
    return out


# Decoding settings a checkpoint's generation_config.json may carry (Qwen2.5-VL ships repetition_penalty 1.05,
# others no_repeat_ngram_size, min_length, beams, ...). ``generate`` applies whatever the checkpoint sets unless
# the call sets it, so each is pinned here to the value that leaves the model's distribution untouched:
# evaluation's greedy answers are then the argmax of the model's logits and its samples come from
# softmax(logits / T) restricted only by top_p, the same distribution the trainer samples from.
NEUTRAL_DECODING: dict[str, Any] = dict(
    repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
    encoder_no_repeat_ngram_size=0, num_beams=1, num_beam_groups=1, diversity_penalty=0.0, penalty_alpha=None,
    length_penalty=1.0, min_length=0, min_new_tokens=None, bad_words_ids=None, force_words_ids=None,
    constraints=None, sequence_bias=None, forced_bos_token_id=None, forced_eos_token_id=None,
    exponential_decay_length_penalty=None, begin_suppress_tokens=None, typical_p=1.0, min_p=None, top_h=None,
    epsilon_cutoff=0.0, eta_cutoff=0.0, renormalize_logits=False, guidance_scale=None, watermarking_config=None,
    dola_layers=None, stop_strings=None, prompt_lookup_num_tokens=None, low_memory=None, token_healing=False,
    max_time=None,
)


def _neutral_decoding() -> dict[str, Any]:
    """:data:`NEUTRAL_DECODING`, limited to the fields this transformers version's GenerationConfig has (an
    unknown key would be passed on to the model's forward)."""
    from transformers import GenerationConfig

    known = vars(GenerationConfig())
    return {k: v for k, v in NEUTRAL_DECODING.items() if k in known}


@dataclass(frozen=True)
class Decoding:
    """How ``generate_answers`` decodes: ``batch_size`` prompts at a time, at most ``max_new_tokens``, images
    resized into [``min_pixels``, ``max_pixels``]; greedy, or sampled (``do_sample``) at ``temperature`` /
    ``top_p`` with ``num_return_sequences`` answers per item."""
    batch_size: int
    max_new_tokens: int
    min_pixels: int
    max_pixels: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_return_sequences: int = 1


def generate_answers(model, processor, items: Sequence[Item], manifest_dir: Path, decoding: Decoding,
                     progress: str | None = None) -> list[Completion]:
    """Answers for ``items`` in order (``num_return_sequences`` consecutive completions per item);
    ``progress``: the label of a progress bar (None: no bar)."""
    from tqdm.auto import tqdm

    d = decoding
    stops = stop_token_ids(processor, model)
    pad = processor.tokenizer.pad_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[Completion] = []
    gen_kw: dict[str, Any] = dict(_neutral_decoding(), max_new_tokens=d.max_new_tokens, do_sample=d.do_sample,
                                  num_return_sequences=d.num_return_sequences, eos_token_id=stops,
                                  pad_token_id=pad, suppress_tokens=vision_token_ids(processor, model))
    if d.do_sample:
        gen_kw.update(temperature=d.temperature, top_p=d.top_p, top_k=0)
    else:
        gen_kw.update(temperature=None, top_p=None, top_k=None)
    bar = tqdm(total=len(items), desc=progress or "generate", disable=progress is None, leave=False)
    try:
        with torch.inference_mode():
            for start in range(0, len(items), d.batch_size):
                chunk = items[start:start + d.batch_size]
                batch = encode_prompts(processor, chunk, manifest_dir, d.min_pixels, d.max_pixels).to(device)
                out = model.generate(**batch, **gen_kw)       # (B*n, T + new)
                new = out[:, batch["input_ids"].shape[1]:]
                results.extend(split_completions(processor, new, stops))
                bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    return results
