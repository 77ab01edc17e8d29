"""Video input end to end: ms-swift ``videos`` rows (frame folders, frame lists) through validation and the
data stage into the cache, the synthetic ``motion`` task, the Qwen-VL video tokens, and the trainer's shared
work on video prompts (equal to a plain forward)."""
import dataclasses
import io
import json

import pytest
import torch
from PIL import Image


from vlgrpo.model import decoding, loading, prompt_encoding, tiny_model
from vlgrpo.data.build import build_dataset
from vlgrpo.data.images import png_bytes
from vlgrpo.data.manifest import read_manifest
from vlgrpo.data.sources import iter_records, read_options
from vlgrpo.train.loop import train_grpo
from vlgrpo.train.paths import RunPaths
from vlgrpo.train.batches import PromptBatch, micro_batches
from vlgrpo.train.generation import SamplingSpec, generate_group_completions
from vlgrpo.train.data_order import step_generator
from vlgrpo.train.scoring import CompletionScorer, score_micro_batch
from vlgrpo.data.validation import validate_file
from tests.fixtures_data import write_video
from tests.settings import tuned_config


# A reward with spread on an untrained model (longer text scores more), so that the steps update the weights.
PLUGIN = """
from vlgrpo.rewards import register

@register("text_length")
def text_length(prompts, completions, **columns):
    return [min(len(c), 20) / 20.0 for c in completions]
"""


def make_cfg(**train):
    t = {"max_steps": 2, "prompts_per_step": 2, "num_generations": 4, "micro_batch_size": 4,
         "mixed_precision": "no", "max_completion_length": 4, "save_steps": 2, "learning_rate": 0.01,
         "warmup_ratio": 0.0}
    t.update(train)
    # motion (videos) mixed with colour (images): batches hold both kinds of prompt
    return tuned_config({"data": {"num_train": 8, "num_val": 2, "num_test": 2,
                                      "task_mix": {"motion": 2.0, "color": 1.0}},
                             "rewards": {"weights": {"accuracy": 1.0, "format": 0.1}}, "train": t})


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    cfg = make_cfg()
    summary = build_dataset(cfg, root)
    assert summary["tasks"]["motion"] > 0 and summary["tasks"]["color"] > 0
    items = read_manifest(root / "data/manifest.jsonl")
    model, proc = tiny_model.build_tiny([it.question + " " + it.solution for it in items], cfg.base.tiny, 0)
    loading.save_model(model, proc, root / "models/base")
    return root


def test_motion_items_are_cached_videos_the_model_sees_as_video_tokens(project):
    items = read_manifest(project / "data/manifest.jsonl")
    motion = [it for it in items if it.task == "motion"]
    it = motion[0]
    assert it.images == [] and len(it.videos) == 1 and len(it.videos[0]) == 4
    assert it.question.startswith("<video>") and it.solution in ("left", "right", "up", "down")
    frames = [Image.open(project / "data" / f) for f in it.videos[0]]
    assert {f.size for f in frames} == {(56, 56)}                   # data.video_max_pixels = 56*56
    assert len({f.tobytes() for f in frames}) == 4                  # the shape moves
    model, proc = loading.load_model(project / "models/base")
    enc = prompt_encoding.encode_prompts(proc, [it], project / "data", 3136, 12544)
    text = proc.tokenizer.decode(enc["input_ids"][0])
    # 4 frames of 56x56: 2 temporal patches x (2x2 merged patches) = 8 video tokens
    assert "<|vision_start|>" + "<|video_pad|>" * 8 + "<|vision_end|>Which way does the" in text
    assert enc["video_grid_thw"].tolist() == [[2, 4, 4]] and "pixel_values" not in enc
    assert enc["pixel_values_videos"].shape[0] == 2 * 4 * 4
    # the other consumers of a prompt: evaluation's decoding and the base stage's supervised batch
    (ans,) = decoding.generate_answers(model, proc, [it], project / "data", decoding.Decoding(1, 3, 3136, 12544))
    assert 1 <= len(ans.token_ids) <= 3
    sup = prompt_encoding.supervised_batch(proc, [it], project / "data", 3136, 12544)
    assert int((sup["labels"] != prompt_encoding.IGNORE_INDEX).sum()) >= 2 and "pixel_values_videos" in sup
    assert torch.isfinite(model(**sup).loss)
    # the validate stage on the manifest: frames checked in the video budget, video tokens counted
    res = validate_file(project / "data/manifest.jsonl", make_cfg())
    assert res.ok and res.valid_rows == len(items) and res.counts == {}


def test_shared_work_equals_a_plain_forward_on_video_prompts(project):
    model, proc = loading.load_model(project / "models/base")
    train = read_manifest(project / "data/manifest.jsonl", split="train")
    # videos and images in one batch: 3 motion prompts and a colour prompt
    items = [it for it in train if it.task == "motion"][:2] + [next(it for it in train if it.task == "color")] \
        + [it for it in train if it.task == "motion"][2:3]
    assert len(items) == 4
    enc = prompt_encoding.encode_prompts(proc, items, project / "data", 3136, 12544)
    prompts = PromptBatch.from_encoded(enc, [len(i.images) for i in items], [len(i.videos) for i in items])
    spec = SamplingSpec(4, 5, 1.0, 1.0, tuple(decoding.stop_token_ids(proc, model)),
                        proc.tokenizer.pad_token_id, tuple(decoding.vision_token_ids(proc, model)))
    gens = [generate_group_completions(model, prompts, spec, [step_generator(0, 1, k, 0) for k in range(4)],
                                       shared=sh) for sh in (True, False)]
    for field in ("ids", "mask", "terminated"):
        assert torch.equal(getattr(gens[0], field), getattr(gens[1], field))
    ids, mask = gens[0].ids, gens[0].mask
    tc = make_cfg(micro_batch_size=8, max_completion_length=5).train
    out = {}
    for sh in (True, False):
        model.zero_grad(set_to_none=True)
        logps = []
        for mb in micro_batches(prompts, 4, 8):
            logp, _ = score_micro_batch(CompletionScorer(model), mb, ids, mask, dataclasses.replace(tc, shared_work=sh))
            (logp * mask[mb.start:mb.end]).sum().backward()
            logps.append(logp.detach())
        out[sh] = (torch.cat(logps), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert (out[True][0] - out[False][0]).abs().max() <= 1e-5
    for n, g in out[False][1].items():
        assert torch.allclose(out[True][1][n], g, atol=1e-5, rtol=1e-3), n
    assert any(g.abs().sum() > 0 for n, g in out[True][1].items() if "visual" in n)


def test_a_few_grpo_steps_on_the_video_task(project):
    (project / "plugin.py").write_text(PLUGIN)
    cfg = make_cfg()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, task_mix={"motion": 1.0}, out_dir="vdata"),
                              rewards=dataclasses.replace(cfg.rewards, weights={"text_length": 1.0, "accuracy": 1.0},
                                                          plugins=(str(project / "plugin.py"),)))
    build_dataset(cfg, project)
    assert {it.task for it in read_manifest(project / "vdata/manifest.jsonl")} == {"motion"}
    before = loading.load_model(project / "models/base")[0].state_dict()
    s = train_grpo(cfg, RunPaths.under(project, "vdata/manifest.jsonl", "models/base", "out/video",
                                       "reports/video.jsonl"), progress=False)
    assert s["finished"] and s["steps"] == 2
    lines = [json.loads(ln) for ln in (project / "reports/video.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines if "loss" in ln] == [1, 2]
    assert all(torch.isfinite(torch.tensor(ln["loss"])) for ln in lines if "loss" in ln)
    after = loading.load_model(project / "out/video")[0].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if "visual" in k)


# ------------------------------------------------------------------------------------- ms-swift rows


def _frame(k, green=90):
    return Image.new("RGB", (84, 84), (40 * k, green, 200 - 40 * k))


def _frames(folder, n, start=0, green=90):
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        (folder / f"f{start + k}.png").write_bytes(png_bytes(_frame(k, green)))   # f8, f9, f10: natural order


def _cfg(path, **data):
    return tuned_config({"data": {"source": "jsonl", "path": str(path), "video_max_frames": 4, **data}})


def test_layout_with_videos_gives_the_exact_prompt_and_frame_count(tmp_path):
    _frames(tmp_path / "clip1", 6, start=8)
    _frames(tmp_path / "clip2", 2, green=10)
    (tmp_path / "still.png").write_bytes(png_bytes(Image.new("RGB", (56, 56), (9, 9, 9))))
    rows = [{"messages": [{"role": "user", "content": "<video>Where does it go?"},
                          {"role": "assistant", "content": "left"}], "videos": ["clip1"]},
            {"messages": [{"role": "user", "content": "<image>Same as <video>?"},
                          {"role": "assistant", "content": "no"}],
             "images": ["still.png"], "videos": [["clip2/f0.png", "clip2/f1.png"]]}]
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(src)
    recs = list(iter_records(src, "jsonl", read_options(cfg.data, tmp_path)))
    assert [r.item.question for r in recs] == ["<video>Where does it go?", "<image>Same as <video>?"]
    assert [[len(v) for v in r.videos] for r in recs] == [[4], [2]]          # 6 frames sampled down to 4
    assert [f.path.name for f in recs[0].videos[0]] == ["f8.png", "f10.png", "f11.png", "f13.png"]
    assert [w.check for w in recs[0].warnings] == ["sampled_frames"]
    res = validate_file(src, cfg, root=tmp_path)
    assert res.ok and res.valid_rows == 2 and res.counts == {"sampled_frames": 1, "resized": 6}

    summary = build_dataset(cfg, tmp_path)
    items = read_manifest(tmp_path / "data/manifest.jsonl")
    assert summary["rows"] == 2 and [len(v) for it in items for v in it.videos] == [4, 2]
    assert all(f.startswith("cache/") for it in items for v in it.videos for f in v)
    assert Image.open(tmp_path / "data" / items[0].videos[0][0]).size == (56, 56)   # video_max_pixels
    model, proc = tiny_model.build_tiny(["where does it go same as"] * 4, cfg.base.tiny, 0)
    enc = prompt_encoding.encode_prompts(proc, items, tmp_path / "data", 3136, 12544)
    assert enc["video_grid_thw"].tolist() == [[2, 4, 4], [1, 4, 4]]
    assert enc["image_grid_thw"].tolist() == [[1, 4, 4]]
    text = proc.tokenizer.decode(enc["input_ids"][1], skip_special_tokens=False)
    assert text.endswith("user\n<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>Same as "
                         "<|vision_start|>" + "<|video_pad|>" * 4 + "<|vision_end|>?<|im_end|>\n"
                         "<|im_start|>assistant\n")


def test_bad_video_rows_are_findings_with_their_row_numbers(tmp_path):
    _frames(tmp_path / "ok", 2)
    _frames(tmp_path / "broken", 2)
    data = (tmp_path / "broken/f1.png").read_bytes()
    (tmp_path / "broken/f1.png").write_bytes(data[:len(data) // 2])            # truncated frame
    (tmp_path / "empty").mkdir()
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")             # not a video at all
    whole = write_video(tmp_path / "whole.mp4", [_frame(k) for k in range(6)]).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(whole[:len(whole) // 2])                 # a real video cut in half
    q = {"problem": "<video>Which way?", "solution": "up"}
    rows = [{**q, "videos": ["ok"]},                                          # 1: fine
            {**q, "videos": [["ok/f0.png", "ok/missing.png"]]},                # 2: missing frame
            {**q, "videos": ["broken"]},                                      # 3: unreadable frame
            {**q, "videos": ["nowhere"]},                                     # 4: no such folder
            {**q, "videos": ["empty"]},                                       # 5: no frames
            {**q, "videos": ["clip.mp4"]},                                    # 6: not a video
            {**q, "videos": ["ok", "ok"]},                                    # 7: 1 tag, 2 videos
            {**q, "videos": ["cut.mp4"]}]                                     # 8: truncated video file
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = validate_file(src, _cfg(src), root=tmp_path)
    errors = {(f["line"], f["check"]) for f in res.findings if f["severity"] == "error"}
    assert errors == {(2, "missing_image"), (3, "truncated_image"), (4, "missing_video"), (5, "missing_video"),
                      (6, "corrupt_video"), (7, "video_tag_mismatch"), (8, "corrupt_video")}
    by_line = {f["line"]: f["message"] for f in res.findings if f["severity"] == "error"}
    assert "video 1 frame 2" in by_line[2] and "missing.png" in by_line[2]
    assert "video 1 frame 2" in by_line[3] and "f1.png" in by_line[3]
    assert "video 1: video file 'clip.mp4' cannot be decoded" in by_line[6]
    assert "video 1: video file 'cut.mp4' cannot be decoded" in by_line[8]
    assert not res.ok and res.valid_rows == 1


def _moving_square(k, dx, dy):
    """Frame ``k`` of a 112x84 clip: a red square moving by (dx, dy) px a frame on grey."""
    img = Image.new("RGB", (112, 84), (128, 128, 128))
    x, y = 40 + dx * k, 30 + dy * k
    img.paste((220, 30, 30), (x, y, x + 24, y + 24))
    return img


def test_mp4_files_run_through_validate_data_and_a_training_forward(tmp_path):
    # real H.264 files (PyAV): 10 frames sampled to data.video_max_frames=4, frames resized into the video budget
    (tmp_path / "clips").mkdir()
    moves = {"left": (-3, 0), "right": (3, 0), "up": (0, -2), "down": (0, 2)}
    rows = []
    for name, (dx, dy) in moves.items():
        write_video(tmp_path / f"clips/{name}.mp4", [_moving_square(k, dx, dy) for k in range(10)])
        rows.append({"problem": "<video>Which way does the square move?", "solution": name,
                     "videos": [f"clips/{name}.mp4"]})
    src = tmp_path / "moves.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(src, num_val=0, num_test=0, val_fraction=0.0, test_fraction=0.0)

    recs = list(iter_records(src, "jsonl", read_options(cfg.data, tmp_path)))
    assert [[f.raw for f in r.videos[0]] for r in recs][0] == [f"clips/left.mp4#frame{k}" for k in (0, 3, 6, 9)]
    assert all(w.check == "sampled_frames" and "10 frames" in w.message for r in recs for w in r.warnings)
    first = Image.open(io.BytesIO(recs[1].videos[0][0].data))              # "right", frame 0, decoded
    assert first.size == (112, 84) and first.getpixel((50, 40))[0] > 180 and first.getpixel((5, 5))[0] < 150
    res = validate_file(src, cfg, root=tmp_path)
    assert res.ok and res.valid_rows == 4 and res.counts["sampled_frames"] == 4

    summary = build_dataset(cfg, tmp_path)
    items = read_manifest(tmp_path / "data/manifest.jsonl")
    assert summary["rows"] == 4 and [len(v) for it in items for v in it.videos] == [4] * 4
    sizes = {Image.open(tmp_path / "data" / f).size for it in items for f in it.videos[0]}
    assert len(sizes) == 1 and (lambda w, h: w * h <= cfg.data.video_max_pixels)(*sizes.pop())
    # the frames of different clips differ (the square moves differently)
    assert len({Image.open(tmp_path / "data" / it.videos[0][-1]).tobytes() for it in items}) == 4

    model, proc = tiny_model.build_tiny([r["problem"] + " " + r["solution"] for r in rows], cfg.base.tiny, 0)
    batch = prompt_encoding.supervised_batch(proc, items, tmp_path / "data", cfg.data.min_pixels, cfg.data.max_pixels)
    # 28x56 cached frames (84x112 in a 3136 px budget) stay 28x56: 2 temporal x 2x4 patches of 14 px
    assert batch["video_grid_thw"].tolist() == [[2, 2, 4]] * 4 and "pixel_values" not in batch
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "visual" in n)


def test_video_file_frames_are_sampled_evenly_and_bombs_refused(tmp_path, monkeypatch):
    from vlgrpo.data.video_files import VideoDecodeError, decode_video

    grey = [Image.new("RGB", (84, 56), (50 * k, 50 * k, 50 * k)) for k in range(5)]      # 0, 50, ..., 200
    path = write_video(tmp_path / "fade.mp4", grey)
    frames, total = decode_video(path, 4)
    assert total == 5 and [f.size for f in frames] == [(84, 56)] * 4
    # frames 0, 1, 3, 4 of 5 (evenly, first and last kept): their grey levels, within H.264's loss
    assert [f.getpixel((40, 28))[0] for f in frames] == pytest.approx([0, 50, 150, 200], abs=6)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 84 * 56 - 1)
    with pytest.raises(VideoDecodeError, match="84x56 px frames.*decompression bomb"):
        decode_video(path, 4)
