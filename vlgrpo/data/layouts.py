"""Row layouts: every multimodal row shape ms-swift trains on, mapped onto one :class:`Item`.

A *row* is one JSON object (a JSON-lines line, an element of a ``.json`` array, or a Hugging Face dataset
row). Its layout is detected by content (:func:`detect_layout`, first matching rule wins) unless
``data.format`` forces one:

==================  =========================================================================================
layout              recognised by / what it reads
==================  =========================================================================================
``messages``        ``messages`` (or ``conversations``) of ``{"role", "content"}`` turns; roles ``system``,
                    ``user``, ``assistant``, ``tool`` / ``tool_response`` (a tool's answer, rendered as a
                    ``tool`` turn), ``tool_call`` (an assistant turn). Content is text or a list of
                    ``{"type": "text"|"image", ...}`` parts (an image part's own ``image`` /
                    ``image_url`` source is used when the row has no images column).
``llava``           ``conversations`` (or ``messages``) of ``{"from", "value"}`` turns (``human``/``gpt``).
``sharegpt``        ``conversation`` (or ``conversations``) of ``{"human", "assistant"}`` pairs + ``system``.
``alpaca``          ``instruction`` + ``input`` (joined by a newline when both are non-empty) + ``output``.
``query_response``  ``query`` + ``response`` (+ ``history`` as ``[[query, response], ...]``, + ``system``).
``problem_solution`` R1-V / open-r1-multimodal: ``problem`` (or ``question`` / ``prompt`` / ``query``) +
                    ``solution`` (or ``answer``) + ``image`` / ``images``.
==================  =========================================================================================

Every layout also reads ``images`` or ``image`` (a path, ``{"path": ...}``, ``{"bytes": ...}`` or raw bytes,
or a list of them), ``system``, ``solution`` (the reward target; else the last assistant turn / response /
output / answer), and the vlgrpo columns ``id``, ``split``, ``task``, ``references``. Every other column is
kept in ``Item.extra`` and handed to reward functions (as ms-swift's GRPO does).

The prompt is every turn up to the last non-assistant one (earlier turns included, the chat template renders
them); assistant turns after it are the answer. ``<image>`` tags are counted across all prompt turns, tool
responses included; rows without any tag get one per image at the start of the first turn (ms-swift's rule).

Nothing is dropped silently: ``videos`` / ``audios`` (not supported yet; their tags are removed from the
prompt), ``rejected_response`` / ``rejected_messages`` / ``rejected_images`` (preference data) and ``tools``
(agent schemas; kept as an extra column but not rendered) each raise a warning naming what is not used.
Grounding rows whose text has ms-swift's ``<ref-object>`` / ``<bbox>`` placeholders are refused
(``unsupported_grounding``): the box text depends on the model family's coordinate convention, so write
boxes into the text in the model's own format; an ``objects`` column without placeholders is an extra column.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from vlgrpo.data.images import Issue
from vlgrpo.data.manifest import IMAGE_TAG

LAYOUTS = ("messages", "llava", "sharegpt", "alpaca", "query_response", "problem_solution")
LAYOUT_HINTS = {
    "messages": "messages: [{role, content}, ...]",
    "llava": "conversations: [{from, value}, ...] + image",
    "sharegpt": "conversation: [{human, assistant}, ...]",
    "alpaca": "instruction + input + output",
    "query_response": "query + response (+ history)",
    "problem_solution": "problem|question|prompt + solution|answer + image|images",
}
PROMPT_KEYS = ("problem", "question", "prompt", "query")
SOLUTION_KEYS = ("solution", "answer")
IMAGE_KEYS = ("images", "image")
VIDEO_TAG, AUDIO_TAG = "<video>", "<audio>"
# Columns vlgrpo reads itself on every layout (never copied to ``extra``).
COMMON_KEYS = {"images", "image", "system", "system_prompt", "solution", "id", "split", "task", "references"}
# Present but not used by GRPO on images: warned about, never silently dropped.
IGNORED = {"videos": "ignored_videos", "video": "ignored_videos", "audios": "ignored_audios",
           "audio": "ignored_audios", "rejected_response": "ignored_rejected_response",
           "rejected_messages": "ignored_rejected_response", "rejected_images": "ignored_rejected_response",
           "tools": "ignored_tools"}
WARNING_CHECKS = ("ignored_videos", "ignored_audios", "ignored_rejected_response", "ignored_tools",
                  "unused_column")
_USER = {"user", "human"}
_ASSISTANT = {"assistant", "gpt", "bot", "model", "tool_call", "function_call"}
_TOOL = {"tool", "tool_response", "observation", "function"}
_TURN_KEYS = ("messages", "conversations", "conversation")


@dataclass
class Parsed:
    """One row in layout-neutral form (before image paths are resolved)."""
    turns: list[dict[str, str]] = field(default_factory=list)   # prompt turns, system excluded
    answer: str | None = None
    system: str | None = None
    images: list[Any] = field(default_factory=list)              # raw entries: path str / dict / bytes
    extra: dict[str, Any] = field(default_factory=dict)
    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- detecting


def _turn_list(row: dict[str, Any]) -> tuple[str, list] | None:
    for key in _TURN_KEYS:
        v = row.get(key)
        if isinstance(v, list) and v:
            return key, v
    return None


def detect_layout(row: dict[str, Any]) -> str | None:
    """The layout of one row by its keys (None: no layout fits)."""
    found = _turn_list(row)
    if found is not None:
        first = next((t for t in found[1] if isinstance(t, dict)), {})
        if "from" in first or "value" in first:
            return "llava"
        if "role" in first or "content" in first:
            return "messages"
        if first.keys() & ({"human", "assistant", "user", "tool"}):
            return "sharegpt"
        return None
    if any(k in row for k in _TURN_KEYS):
        return "messages"  # empty or not a list: the reader says what is wrong with it
    if "instruction" in row and ("input" in row or "output" in row):
        return "alpaca"
    if "query" in row and ("response" in row or "history" in row):
        return "query_response"
    if any(k in row for k in PROMPT_KEYS):
        return "problem_solution"
    return None


def unknown_layout_message(keys: list[str], where: str) -> str:
    layouts = "; ".join(f"{name} ({hint})" for name, hint in LAYOUT_HINTS.items())
    return (f"{where}: unknown row layout; keys seen: {', '.join(sorted(keys)) or '(none)'}. Supported layouts: "
            f"{layouts}. Rename columns with data.columns or force one with data.format")


# -------------------------------------------------------------------------------------------- readers


def content_text(content: Any) -> str:
    """Chat content as text: a string, or a list of parts where image parts become ``<image>`` tags."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                kind = part.get("type")
                if kind == "text":
                    parts.append(str(part.get("text", "")))
                elif kind in ("image", "image_url"):
                    parts.append(IMAGE_TAG)
                elif kind in ("video", "video_url"):
                    parts.append(VIDEO_TAG)
                elif kind in ("audio", "input_audio"):
                    parts.append(AUDIO_TAG)
        return "".join(parts)
    return str(content)


def _role(raw: Any) -> str | None:
    r = str(raw).lower() if raw is not None else ""
    if r == "system":
        return "system"
    if r in _USER:
        return "user"
    if r in _ASSISTANT:
        return "assistant"
    if r in _TOOL:
        return "tool"
    return None


def _turns_reader(role_key: str, content_key: str) -> Callable[[dict, Parsed], set[str]]:
    def read(row: dict[str, Any], out: Parsed) -> set[str]:
        key = next((k for k in _TURN_KEYS if k in row), "messages")
        turns = row.get(key)
        if not isinstance(turns, list):
            out.errors.append(Issue("bad_schema", f"'{key}' must be a list of turns, got "
                                                  f"{type(turns).__name__}"))
            return {key}
        for i, t in enumerate(turns):
            if not isinstance(t, dict):
                out.errors.append(Issue("bad_schema", f"'{key}'[{i}] must be an object, got {type(t).__name__}"))
                continue
            raw_role = t.get(role_key, t.get("role", t.get("from")))
            role = _role(raw_role)
            if role is None:
                out.errors.append(Issue("bad_schema", f"'{key}'[{i}]: unknown role {raw_role!r}; expected "
                                                      "system, user/human, assistant/gpt, tool/tool_response"))
                continue
            content = t.get(content_key, t.get("content", t.get("value")))
            if not any(k in row for k in IMAGE_KEYS):
                out.images += _inline_images(content)
            text = content_text(content)
            if str(raw_role).lower() in ("tool_call", "function_call"):
                text = f"<tool_call>\n{text}\n</tool_call>"  # Qwen's (hermes) rendering of a tool call
            _add_turn(out, role, text)
        return {key}
    return read


def _inline_images(content: Any) -> list[Any]:
    """Image sources written inside OpenAI-style parts (``{"type": "image", "image": "a.png"}``,
    ``{"type": "image_url", "image_url": {"url": ...}}``), for rows without an images column."""
    if not isinstance(content, list):
        return []
    found = []
    for part in content:
        if isinstance(part, dict) and part.get("type") in ("image", "image_url"):
            src = part.get("image", part.get("image_url"))
            src = src.get("url") if isinstance(src, dict) and "url" in src else src
            if src is not None:
                found.append(src)
    return found


def _add_turn(out: Parsed, role: str, text: str) -> None:
    if role == "system":
        if out.system is None:
            out.system = text
    else:
        out.turns.append({"role": role, "content": text})


def _read_sharegpt(row: dict[str, Any], out: Parsed) -> set[str]:
    key = next((k for k in ("conversation", "conversations", "messages") if k in row), "conversation")
    pairs = row.get(key)
    if not isinstance(pairs, list):
        out.errors.append(Issue("bad_schema", f"'{key}' must be a list of {{human, assistant}} pairs"))
        return {key}
    for i, p in enumerate(pairs):
        if not isinstance(p, dict):
            out.errors.append(Issue("bad_schema", f"'{key}'[{i}] must be an object, got {type(p).__name__}"))
            continue
        if "tool" in p:
            _add_turn(out, "tool", content_text(p["tool"]))
        else:
            _add_turn(out, "user", content_text(p.get("human", p.get("user"))))
        if p.get("assistant") is not None:
            _add_turn(out, "assistant", content_text(p["assistant"]))
    return {key}


def _read_history(row: dict[str, Any], out: Parsed) -> None:
    history = row.get("history")
    if history is None:
        return
    if not isinstance(history, list):
        out.errors.append(Issue("bad_schema", "'history' must be a list of [query, response] pairs"))
        return
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            out.errors.append(Issue("bad_schema", f"'history'[{i}] must be a [query, response] pair"))
            continue
        _add_turn(out, "user", content_text(pair[0]))
        _add_turn(out, "assistant", content_text(pair[1]))


def _read_query_response(row: dict[str, Any], out: Parsed) -> set[str]:
    _read_history(row, out)
    _add_turn(out, "user", content_text(row.get("query")))
    if row.get("response") is not None:
        out.answer = _text_value(row["response"], "response", out)
    return {"query", "response", "history"}


def _read_alpaca(row: dict[str, Any], out: Parsed) -> set[str]:
    _read_history(row, out)
    parts = [content_text(row.get(k)) for k in ("instruction", "input")]
    _add_turn(out, "user", "\n".join(p for p in parts if p))
    if row.get("output") is not None:
        out.answer = _text_value(row["output"], "output", out)
    return {"instruction", "input", "output", "history"}


def _read_problem(row: dict[str, Any], out: Parsed) -> set[str]:
    key = next((k for k in PROMPT_KEYS if k in row), PROMPT_KEYS[0])
    value = row.get(key)
    if value is not None and not isinstance(value, (str, list)):
        out.errors.append(Issue("bad_schema", f"'{key}' must be text, got {type(value).__name__} ({value!r})"[:200]))
    else:
        _add_turn(out, "user", content_text(value))
    ans = next((k for k in SOLUTION_KEYS[1:] if k in row), None)
    if ans is not None and row[ans] is not None:
        out.answer = _text_value(row[ans], ans, out)
    elif ans is None and "solution" not in row:
        out.errors.append(Issue("bad_schema", f"no solution column (one of {', '.join(SOLUTION_KEYS)}); "
                                              "map yours with data.columns"))
    return {key} | ({ans} if ans else set())


def _text_value(v: Any, key: str, out: Parsed) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float, bool, list, dict)):
        return json.dumps(v, ensure_ascii=False)  # e.g. a numeric answer: compared as its JSON text
    out.errors.append(Issue("bad_schema", f"'{key}' must be text or a JSON value, got {type(v).__name__}"))
    return ""


READERS: dict[str, Callable[[dict, Parsed], set[str]]] = {
    "messages": _turns_reader("role", "content"),
    "llava": _turns_reader("from", "value"),
    "sharegpt": _read_sharegpt,
    "alpaca": _read_alpaca,
    "query_response": _read_query_response,
    "problem_solution": _read_problem,
}


# ------------------------------------------------------------------------------------------ one row


def _images(row: dict[str, Any], out: Parsed) -> None:
    key = next((k for k in IMAGE_KEYS if k in row and row[k] is not None), None)
    if key is None:
        entries, out.images, key = out.images, [], "image"  # only images written inside content parts
    else:
        v = row[key]
        entries = v if isinstance(v, list) else [v]
    for e in entries:
        if isinstance(e, (str, bytes, bytearray)) or (isinstance(e, dict) and (
                isinstance(e.get("path"), str) or isinstance(e.get("bytes"), (bytes, bytearray)))):
            out.images.append(e)
        elif hasattr(e, "save") and hasattr(e, "size"):  # a decoded PIL image (in-memory datasets)
            out.images.append(e)
        else:
            out.errors.append(Issue("bad_schema", f"an '{key}' entry must be a path, {{'path': ...}}, "
                                                  f"{{'bytes': ...}} or image bytes, got {e!r}"[:200]))


def _warn_ignored(row: dict[str, Any], out: Parsed) -> set[str]:
    seen = set()
    for key, check in IGNORED.items():
        v = row.get(key)
        if v is None or v == [] or v == "":
            continue
        seen.add(key)
        if check == "ignored_tools":
            out.warnings.append(Issue(check, "'tools' is kept as an extra column for rewards but not rendered "
                                             "into the prompt (tool schemas are not supported yet)"))
            out.extra[key] = v
        elif check == "ignored_rejected_response":
            out.warnings.append(Issue(check, f"'{key}' (preference data) is not used by GRPO"))
        else:
            n = len(v) if isinstance(v, list) else 1
            kind = key.rstrip("s")
            out.warnings.append(Issue(check, f"{n} {kind}(s) in '{key}' are not supported yet; dropped, and "
                                             f"their <{kind}> tags removed from the prompt"))
    return seen


def _strip_media_tags(out: Parsed) -> None:
    for t in out.turns:
        for tag, check in ((VIDEO_TAG, "ignored_videos"), (AUDIO_TAG, "ignored_audios")):
            if tag in t["content"]:
                t["content"] = t["content"].replace(tag, "")
                if not any(w.check == check for w in out.warnings):
                    out.warnings.append(Issue(check, f"{tag} tag(s) in the prompt refer to media that is not "
                                                     "supported yet; removed"))


def _check_grounding(out: Parsed, row: dict[str, Any]) -> None:
    texts = [t["content"] for t in out.turns] + [out.answer or "", _plain_text(row.get("solution"))]
    if any("<ref-object>" in s or "<bbox>" in s for s in texts):
        out.errors.append(Issue("unsupported_grounding",
                                "<ref-object>/<bbox> placeholders (ms-swift grounding 'objects') are not filled "
                                "in by vlgrpo: box text depends on the model family's coordinate convention; "
                                "write the object names and boxes into the text in the model's own format "
                                "(e.g. Qwen2.5-VL absolute pixel [x1, y1, x2, y2])"))


def _plain_text(v: Any) -> str:
    return v if isinstance(v, str) else ""


def _place_untagged(out: Parsed) -> None:
    """No tag anywhere: one ``<image>`` per image at the start of the first turn (ms-swift's rule)."""
    if not out.turns:
        return  # no prompt at all: reported as such (no_user_prompt), not as a tag mismatch
    tags = sum(t["content"].count(IMAGE_TAG) for t in out.turns)
    if tags == 0 and out.images:
        out.turns[0]["content"] = IMAGE_TAG * len(out.images) + out.turns[0]["content"]
    elif tags != len(out.images):
        out.errors.append(Issue("image_tag_mismatch",
                                f"{tags} {IMAGE_TAG} tag(s) across the prompt turns but {len(out.images)} "
                                "image(s); the model would see mismatched image tokens"))


def _split_answer(out: Parsed) -> None:
    """Trailing assistant turns are the answer, not part of the prompt."""
    while out.turns and out.turns[-1]["role"] == "assistant":
        last = out.turns.pop()
        if out.answer is None:
            out.answer = last["content"]


def parse_row(row: dict[str, Any], layout: str) -> Parsed:
    """Read one row in ``layout``; problems land in ``errors`` / ``warnings``, never as exceptions."""
    out = Parsed()
    consumed = READERS[layout](row, out)
    system = row.get("system", row.get("system_prompt"))
    if isinstance(system, str):
        out.system = system  # the column wins over a system turn, as in ms-swift
    _split_answer(out)
    _images(row, out)
    consumed |= _warn_ignored(row, out)
    _strip_media_tags(out)
    _check_grounding(out, row)
    _place_untagged(out)
    for k, v in row.items():
        if k in consumed or k in COMMON_KEYS or k in out.extra:
            continue
        if not _jsonable(v):
            out.warnings.append(Issue("unused_column", f"column {k!r} ({type(v).__name__}) cannot be stored "
                                                       "as JSON; not passed to rewards"))
            continue
        out.extra[k] = v
    return out


def _jsonable(v: Any) -> bool:
    if v is None or isinstance(v, (str, int, float, bool)):
        return True
    if isinstance(v, list):
        return all(_jsonable(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _jsonable(x) for k, x in v.items())
    return False


__all__ = ["LAYOUTS", "LAYOUT_HINTS", "WARNING_CHECKS", "Parsed", "detect_layout",
           "parse_row", "content_text", "unknown_layout_message"]
