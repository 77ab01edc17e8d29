"""Learned rewards: reward models (a local sequence classifier, or a Qwen-VL judge) named in
``rewards.models``, and ``clip_score`` (a local CLIP, ``rewards.clip_model``). Every model is read from a
local folder, never downloaded."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from vlgrpo.io import under_root
from vlgrpo.rewards.columns import column, present
from vlgrpo.rewards.registry import RewardContext, RewardFn, register_factory


# Model types whose checkpoints are vision-language judges (generative Qwen-VL) rather than classifiers.
VL_JUDGE_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
# What a vision-language judge is asked; its reward is P(yes) / (P(yes) + P(no)) for the next token.
JUDGE_TEMPLATE = "Question: {prompt}\nAnswer: {completion}\nIs the answer correct? Answer yes or no."


def _model_type(path: Path) -> str | None:
    import json

    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None


def make_reward_model(name: str, path: str | Path, batch_size: int = 32, device: str = "cpu", *,
                      image_root: str | Path = ".", pixels: tuple[int, int] = (3136, 12544)) -> RewardFn:
    """A learned reward from a local checkpoint: a transformers sequence-classification model scores
    ``prompt + completion`` (logit 0, like TRL's reward models); a Qwen-VL checkpoint (``VL_JUDGE_TYPES``)
    is a vision-language judge (:func:`make_vl_judge`: the item's images under ``image_root``, in the
    ``pixels`` budget). ``batch_size`` texts per forward.

    ``path``: a directory with the model (safetensors) and its tokenizer; never downloaded, no remote code.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"reward model {name!r}: rewards.models.{name} = {path} is not a local directory")
    if _model_type(path) in VL_JUDGE_TYPES:
        return make_vl_judge(name, path, batch_size, device, image_root=image_root, pixels=pixels)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, local_files_only=True, trust_remote_code=False, use_safetensors=True).to(device).eval()
    if tokenizer.pad_token is None:                  # batches are padded; the model must know the pad id
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.config.pad_token_id = tokenizer.pad_token_id

    @torch.no_grad()
    def score(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        texts = [p + c for p, c in zip(prompts, completions)]
        out: list[float] = []
        for s in range(0, len(texts), batch_size):
            enc = tokenizer(texts[s:s + batch_size], return_tensors="pt", padding=True, truncation=True,
                            add_special_tokens=False).to(device)
            out += model(**enc).logits[:, 0].float().tolist()
        return out

    score.__name__ = score.__qualname__ = name
    return score


def _yes_no_ids(tokenizer: Any, name: str) -> tuple[int, int]:
    """The first token of "yes" and of "no" (one token each in Qwen's vocabulary)."""
    yes, no = (tokenizer.encode(w, add_special_tokens=False) for w in ("yes", "no"))
    if not yes or not no or yes[0] == no[0]:
        raise ValueError(f"reward model {name!r}: its tokenizer cannot tell 'yes' from 'no' by their first token")
    return yes[0], no[0]


def make_vl_judge(name: str, path: str | Path, batch_size: int = 32, device: str = "cpu", *,
                  image_root: str | Path = ".", pixels: tuple[int, int] = (3136, 12544)) -> RewardFn:
    """A vision-language judge: a local Qwen-VL checkpoint sees the item's images and ``JUDGE_TEMPLATE``
    (question, completion, "Is the answer correct? Answer yes or no.") as one user turn, and the reward is
    P(yes) / (P(yes) + P(no)) of its next token, in [0, 1]. Batches of ``batch_size`` prompts, left-padded
    (the Qwen-VL position ids follow the padding), so a batched score equals the one-at-a-time score.

    Images come from the ``images`` column (paths under ``image_root``, the manifest's folder) and are fitted
    into ``pixels`` (data.min_pixels, data.max_pixels) as the policy's are. Videos are not shown to it.
    """
    import torch

    from vlgrpo.model import loading, prompt_encoding
    from vlgrpo.data.manifest import Item

    model, processor = loading.load_model(path)
    model.to(device)
    yes, no = _yes_no_ids(processor.tokenizer, name)
    root = Path(image_root)

    @torch.no_grad()
    def judge(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        images = column(columns, "images", len(completions))
        items = [Item(id=str(i), split="test", task="vqa", images=list(im or []),
                      question=JUDGE_TEMPLATE.format(prompt=p, completion=c))
                 for i, (p, c, im) in enumerate(zip(prompts, completions, images))]
        out: list[float] = []
        for s in range(0, len(items), batch_size):
            enc = prompt_encoding.encode_prompts(processor, items[s:s + batch_size], root, *pixels).to(device)
            # left padding: the last position predicts the next token; only its logits are computed
            logits = model(**enc, logits_to_keep=1).logits[:, -1, [yes, no]].float()
            out += torch.softmax(logits, dim=-1)[:, 0].tolist()
        return out

    judge.__name__ = judge.__qualname__ = name
    return judge


# ---- clip_score


def make_clip_score(path: str | Path, root: str | Path = ".", device: str = "cpu") -> RewardFn:
    """Cosine similarity in [-1, 1] between a completion and its (first) image under a local CLIP.

    ``path``: a directory with a transformers ``CLIPModel`` and ``CLIPProcessor`` (never downloaded);
    ``root``: the folder the ``images`` column is relative to (the manifest's folder).
    """
    import torch
    from transformers import CLIPModel, CLIPProcessor

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"clip_score: rewards.clip_model {path} is not a local directory")
    model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
    processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    max_len = model.config.text_config.max_position_embeddings
    root = Path(root)

    def _features(out: Any) -> "torch.Tensor":
        # transformers 5 returns a model output whose pooler_output is the projected embedding.
        feats = out if isinstance(out, torch.Tensor) else out.pooler_output
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def clip_score(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float | None]:
        from PIL import Image

        images, idx = present(columns, "images", len(completions))
        out: list[float | None] = [None] * len(completions)
        if not idx:
            return out
        files = sorted({images[i][0] for i in idx})   # G completions share one image: embed it once
        pics = []
        for f in files:
            with Image.open(root / f) as im:
                pics.append(im.convert("RGB"))
        img_in = processor(images=pics, return_tensors="pt").to(device)
        img = _features(model.get_image_features(pixel_values=img_in["pixel_values"]))      # (F, D)
        txt_in = processor(text=[completions[i] for i in idx], return_tensors="pt", padding=True,
                           truncation=True, max_length=max_len).to(device)
        txt = _features(model.get_text_features(input_ids=txt_in["input_ids"],
                                                attention_mask=txt_in["attention_mask"]))     # (N, D)
        row = {f: k for k, f in enumerate(files)}
        sims = (txt * img[[row[images[i][0]] for i in idx]]).sum(-1)                         # (N,)
        for i, s in zip(idx, sims.tolist()):
            out[i] = float(s)
        return out

    clip_score.__name__ = clip_score.__qualname__ = "clip_score"
    return clip_score


@register_factory("clip_score")
def clip_score_factory(ctx: RewardContext) -> RewardFn:
    """``clip_score`` under the CLIP folder ``rewards.clip_model`` (relative to the project root)."""
    if not ctx.rewards.clip_model:
        raise KeyError("reward 'clip_score' needs rewards.clip_model (a local CLIP directory)")
    return make_clip_score(under_root(ctx.root, ctx.rewards.clip_model), root=ctx.image_dir, device=ctx.device)


def learned_reward(name: str, ctx: RewardContext) -> RewardFn:
    """The learned reward ``name`` of ``rewards.models`` (its folder relative to the project root)."""
    return make_reward_model(name, under_root(ctx.root, ctx.rewards.models[name]), ctx.rewards.model_batch_size,
                             ctx.device, image_root=ctx.image_dir, pixels=ctx.pixels)
