"""data_tools/shard.py: what it packs equals the encoders' own output; layouts, bad inputs, ranks, crashes
(inspect_shards.py, the scripts' command lines and the benchmark: tests/test_data_tools.py)."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLCogVideoX
from safetensors.torch import load_file
from transformers import AutoTokenizer, T5EncoderModel

from data_tools import packing, shard
from data_tools.inspect_shards import inspect_dataset
from data_tools.synth import caption
from data_tools.synth_videos import frames_for, write_synthetic_videos
from data_tools.video import Bucket, decode_clip
from helpers import REPO, free_port
from trainer.media import write_mp4
from trainer.rng import Stream, derive_seed
from trainer.shard_format import shard_samples

GEOMETRY = ["--frames", "9", "--height", "96", "--width", "128"]  # the same clip, given explicitly


def pack(videos: Path, model: Path, out: Path, *extra: str) -> int:
    """shard.main with the model's defaults (the tiny 5B-style model's native clip: 9x96x128 at 8 fps)."""
    return shard.main(["--input", str(videos), "--model", str(model), "--out", str(out), *extra])


def read_all(out: Path) -> dict[str, object]:
    return {s.key: s for tar in sorted(out.glob("*.tar")) for s in shard_samples(str(tar))}


def digests(out: Path) -> dict[str, str]:
    names = [*sorted(p.name for p in out.glob("*.tar")), "manifest.json", "rejected.jsonl", "empty_prompt.safetensors"]
    return {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in names}


@pytest.fixture(scope="module")
def packed(packed_5b) -> Path:
    return packed_5b


@torch.no_grad()
def test_packed_sample_equals_the_encoders_on_the_same_frames(packed, videos, tiny_5b):
    samples = read_all(packed)
    assert sorted(samples) == [f"{i:09d}" for i in range(6)]
    sample = samples["000000004"]
    assert sample.meta["caption"] == caption(4) and sample.meta["source"] == "videos/00004.mp4"
    meta = sample.meta
    assert (meta["num_frames"], meta["height"], meta["width"], meta["fps"]) == (9, 96, 128, 8)

    frames = decode_clip(videos / "videos" / "00004.mp4", [Bucket(9, 96, 128)], 8.0).frames  # same decode
    vae = AutoencoderKLCogVideoX.from_pretrained(tiny_5b / "vae").eval()
    posterior = vae.encode(frames.permute(1, 0, 2, 3).unsqueeze(0)).latent_dist
    noise = torch.Generator().manual_seed(derive_seed(0, Stream.VAE_NOISE, 4))  # same noise seed
    expected = (posterior.sample(generator=noise) * vae.config.scaling_factor)[0].to(torch.bfloat16)
    assert sample.latents.dtype == torch.bfloat16 and torch.equal(sample.latents, expected)

    tokenizer = AutoTokenizer.from_pretrained(tiny_5b / "tokenizer")
    encoder = T5EncoderModel.from_pretrained(tiny_5b / "text_encoder").eval()

    def t5(text: str) -> torch.Tensor:
        ids = tokenizer([text], padding="max_length", max_length=226, truncation=True, return_tensors="pt").input_ids
        return encoder(ids)[0][0].to(torch.bfloat16)

    assert torch.equal(sample.prompt_embeds, t5(caption(4)))
    assert torch.equal(load_file(packed / "empty_prompt.safetensors")["prompt_embeds"], t5(""))
    # different samples really differ (different videos, different noise)
    assert not torch.equal(samples["000000000"].latents, sample.latents)

    manifest = json.loads((packed / "manifest.json").read_text())
    assert manifest["samples"] == 6 and manifest["rejected_total"] == 0 and manifest["dtype"] == "bfloat16"
    assert manifest["buckets"] == {"9x96x128": {"frames": 9, "height": 96, "width": 128, "latents": [4, 3, 12, 16],
                                                "samples": 6}}
    assert manifest["prompt_embeds"] == [226, 32]
    assert [s["file"] for s in manifest["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    assert manifest["model"]["vae"]["scaling_factor"] == 0.7 and manifest["options"]["fps"] == 8.0
    assert manifest["kind"] == "text-to-video" and "image" not in manifest and sample.image is None
    assert "image" not in manifest["options"]  # the identity a text-to-video pack had before image-to-video


def test_an_image_to_video_pack_stores_each_clips_first_frame(packed_5b_i2v, packed, videos):
    """The same videos packed for the 5B-I2V-style model: the same samples, each with the clip's first frame as
    an 8-bit picture, as decoded for its latents; the manifest says image-to-video, and
    data_tools/inspect_shards.py checks every image."""
    samples, t2v = read_all(packed_5b_i2v), read_all(packed)
    frames = decode_clip(videos / "videos" / "00004.mp4", [Bucket(9, 96, 128)], 8.0).frames
    image = samples["000000004"].image
    assert image is not None and image.dtype == torch.uint8 and image.shape == (3, 96, 128)
    assert torch.equal(image, ((frames[0] + 1) * 127.5).round().to(torch.uint8))
    assert (image.float() / 127.5 - 1 - frames[0]).abs().max() <= 0.5 / 127.5 + 1e-6  # within half a level
    assert sorted(samples) == sorted(t2v) and samples["000000004"].meta == t2v["000000004"].meta
    manifest = json.loads((packed_5b_i2v / "manifest.json").read_text())
    assert manifest["kind"] == "image-to-video" and manifest["options"]["image"] is True
    assert manifest["image"] == {"member": "image.safetensors", "what": "the clip's first frame, uint8 [3, height, "
                                                                        "width]"}
    _, report = inspect_dataset(packed_5b_i2v)
    assert not report.problems and sum(report.samples.values()) == 6


def test_all_three_layouts_pack_the_same_samples(packed, videos, tiny_5b, tmp_path):
    captions = (videos / "prompts.txt").read_text().splitlines()
    paths = (videos / "videos.txt").read_text().splitlines()
    elsewhere = tmp_path / "lists"
    elsewhere.mkdir()
    # relative paths; a BOM, as Excel writes
    with (elsewhere / "data.csv").open("w", newline="", encoding="utf-8-sig") as f:
        writer = csv.writer(f)
        writer.writerow(["caption", "video"])
        writer.writerows([c, f"../{videos.name}/{p}"] for c, p in zip(captions, paths, strict=True))
    shutil.copytree(videos, tmp_path / videos.name)
    (elsewhere / "data.jsonl").write_text("".join(json.dumps({"video": f"../{videos.name}/{p}", "caption": c}) + "\n"
                                                  for c, p in zip(captions, paths, strict=True)))
    flat = tmp_path / "flat"
    flat.mkdir()
    for c, p in zip(captions, paths, strict=True):
        shutil.copy(videos / p, flat / Path(p).name)
        (flat / Path(p).name).with_suffix(".txt").write_text(c + "\n")

    reference = read_all(packed)
    for source in (elsewhere / "data.csv", elsewhere / "data.jsonl", flat):
        out = tmp_path / f"out-{source.name}"
        assert pack(source, tiny_5b, out, "--shard-size", "4") == 0
        got = read_all(out)
        assert sorted(got) == sorted(reference), source
        for key, sample in got.items():
            assert torch.equal(sample.latents, reference[key].latents), (source, key)
            assert sample.meta["caption"] == reference[key].meta["caption"]


def test_bad_inputs_are_listed_with_their_reason_and_the_rest_is_packed(videos, tiny_5b, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(videos / "videos", data / "videos")
    (data / "videos" / "garbage.mp4").write_bytes(b"\x00not a video" * 100)
    write_mp4(data / "videos" / "short.mp4", frames_for(0, 3, 120, 160), fps=8)  # 3 frames: 9 are needed
    rows = [["videos/00000.mp4", "a red ball moving left"],
            ["videos/missing.mp4", "a video that is not there"],
            ["videos/garbage.mp4", "random bytes"],
            ["videos/short.mp4", "three frames"],
            ["videos/00001.mp4", "   "],
            ["videos/00002.mp4"],  # a row without its caption column
            ["videos/00003.mp4", "a yellow ball moving down"]]
    with (data / "rows.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["video", "caption"], *rows])
    out = tmp_path / "out"
    assert pack(data / "rows.csv", tiny_5b, out, "--shard-size", "3") == 0
    rejected = {r["source"]: r for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}
    assert {s: r["reason"] for s, r in rejected.items()} == {
        "videos/missing.mp4": "missing_video", "videos/garbage.mp4": "unreadable_video",
        "videos/short.mp4": "too_short", "videos/00001.mp4": "empty_caption", "videos/00002.mp4": "missing_column"}
    assert "rows.csv line 7" in rejected["videos/00002.mp4"]["detail"]
    assert "3 frames" in rejected["videos/short.mp4"]["detail"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 2 and manifest["inputs"] == 7 and manifest["rejected_total"] == 5
    assert manifest["rejected"] == {"empty_caption": 1, "missing_column": 1, "missing_video": 1, "too_short": 1,
                                    "unreadable_video": 1}
    assert sorted(read_all(out)) == ["000000000", "000000006"]
    assert "5 of 7 inputs rejected" in capsys.readouterr().out

    # a JSONL row without a column, and --strict: everything packable is still packed, but the exit says no
    (data / "rows.jsonl").write_text('{"video": "videos/00000.mp4", "caption": "ok"}\n{"video": "videos/00001.mp4"}\n')
    assert pack(data / "rows.jsonl", tiny_5b, tmp_path / "strict", "--strict") == 1
    assert json.loads((tmp_path / "strict" / "manifest.json").read_text())["rejected"] == {"missing_column": 1}
    # nothing packable at all is an error
    (data / "none.jsonl").write_text('{"video": "videos/missing.mp4", "caption": "gone"}\n')
    assert pack(data / "none.jsonl", tiny_5b, tmp_path / "none") == 1
    assert "nothing could be packed" in capsys.readouterr().err


def test_input_and_option_mistakes_stop_before_any_work(videos, tiny_5b, tiny_15, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(videos, broken)
    (broken / "prompts.txt").write_text("only one caption\n")
    assert pack(broken, tiny_5b, tmp_path / "a") == 2
    assert "prompts.txt has 1 lines but videos.txt has 6" in capsys.readouterr().err
    assert shard.main(["--input", str(videos), "--model", str(tiny_5b), "--out", str(tmp_path / "b"),
                       "--buckets", "9x96x120"]) == 2
    assert "bucket 9x96x120 width: 120 is not a multiple of 16" in capsys.readouterr().err
    assert shard.main(["--input", str(videos), "--model", str(tiny_5b), "--out", str(tmp_path / "c"),
                       "--frames", "10"]) == 2
    assert "--frames: 10 frames is off CogVideoX 1.0's frame rule 8k+1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):  # argparse's exit
        shard.main(["--input", str(videos), "--model", str(tiny_5b), "--out", str(tmp_path / "c"), "--frames", "9",
                    "--buckets", "9x96x128"])
    assert "--buckets replaces --frames/--height/--width" in capsys.readouterr().err
    for flags, message in ((["--evenly", "--fps", "16"], "--evenly spreads the frames over each clip instead"),
                           (["--buckets", ""], "--buckets: no buckets given")):
        with pytest.raises(SystemExit, match="2"):
            shard.main(["--input", str(videos), "--model", str(tiny_5b), "--out", str(tmp_path / "c"), *flags])
        assert message in capsys.readouterr().err
    # 1.5: 16k+1 frames (41 is on 1.0's 8k+1, not on 1.5's), sides within its rotary position table
    for flags, message in ((["--frames", "41"], "--frames: 41 frames is off CogVideoX 1.5's frame rule 16k+1"),
                           (["--width", "160"], "--width: 160 is beyond the transformer's rotary position table "
                                                "(sample_width 16 latents = 128 pixels")):
        assert shard.main(["--input", str(videos), "--model", str(tiny_15), "--out", str(tmp_path / "f"),
                           *flags]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "f").exists()  # refused before any work
    (tmp_path / "header.csv").write_text("path,text\nvideos/00000.mp4,hello\n")
    assert pack(tmp_path / "header.csv", tiny_5b, tmp_path / "d") == 2
    assert "the header has no column ['video', 'caption']" in capsys.readouterr().err
    # packing into a directory packed with other options is refused, naming what changed
    assert pack(videos, tiny_5b, tmp_path / "e", "--shard-size", "4") == 0
    assert pack(videos, tiny_5b, tmp_path / "e", "--shard-size", "4", "--fps", "4") == 2
    assert "options.fps: 8.0 -> 4.0" in capsys.readouterr().err


def test_the_model_defaults_and_the_same_clip_spelled_out_are_one_dataset(packed, videos, tiny_5b, tmp_path):
    """A directory packed with the model's defaults takes a rerun that names the same clip and fps (the command
    line before the defaults came from the model): nothing is packed again, no byte changes."""
    again = tmp_path / "again"
    shutil.copytree(packed, again)
    before = digests(again)
    assert pack(videos, tiny_5b, again, *GEOMETRY, "--fps", "8", "--shard-size", "4") == 0
    assert digests(again) == before


def test_ranks_given_by_flags_pack_their_own_shards_into_the_same_dataset(packed, videos, tiny_5b, tmp_path, capsys):
    """--rank/--world-size (separate jobs, any order): each packs its chunks, the last one writes the manifest,
    and the result is byte for byte the single-process pack."""
    out = tmp_path / "out"
    assert pack(videos, tiny_5b, out, "--shard-size", "4", "--rank", "1", "--world-size", "2") == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000001.tar"]
    assert not (out / "manifest.json").exists()
    assert "other ranks are still packing" in capsys.readouterr().out
    assert pack(videos, tiny_5b, out, "--shard-size", "4", "--rank", "0", "--world-size", "2") == 0
    assert digests(out) == digests(packed)
    assert pack(videos, tiny_5b, out, "--shard-size", "4", "--rank", "2", "--world-size", "2") == 2
    assert "--rank 2 / --world-size 2" in capsys.readouterr().err


class Crash(Exception):
    """Stands for the process dying at an exact point."""


def test_a_crash_between_shard_and_record_reruns_to_the_same_dataset(packed, videos, tiny_5b, tmp_path,
                                                                       monkeypatch):
    out = tmp_path / "out"
    real = packing.atomic_write

    def die_on_second_record(path, data, tag):
        if path.name == "chunk-000001.json":
            raise Crash
        real(path, data, tag)

    monkeypatch.setattr(packing, "atomic_write", die_on_second_record)
    with pytest.raises(Crash):
        pack(videos, tiny_5b, out, "--shard-size", "4")
    assert (out / "shard-000001.tar").exists() and not packing.record_path(out, 1).exists()
    monkeypatch.setattr(packing, "atomic_write", real)
    assert pack(videos, tiny_5b, out, "--shard-size", "4") == 0
    assert digests(out) == digests(packed)


def test_a_crash_inside_a_shard_leaves_nothing_a_reader_sees(packed, videos, tiny_5b, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real, calls = packing.encode_sample, []

    def die_on_third_sample(*args):
        calls.append(1)
        if len(calls) == 3:
            raise Crash
        return real(*args)

    monkeypatch.setattr(packing, "encode_sample", die_on_third_sample)
    with pytest.raises(Crash):
        pack(videos, tiny_5b, out, "--shard-size", "4")
    assert not list(out.glob("*.tar")) and len(list(out.glob(".shard-000000.tar.partial-*"))) == 1
    monkeypatch.setattr(packing, "encode_sample", real)
    assert pack(videos, tiny_5b, out, "--shard-size", "4") == 0
    assert digests(out) == digests(packed)
    assert not list(out.glob(".*partial*"))  # the crashed run's partial shard is cleaned up


def run_shard(*args: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *launcher, "data_tools/shard.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_two_ranks_under_torchrun_pack_disjoint_halves(tiny_5b, tmp_path):
    data = tmp_path / "data"
    write_synthetic_videos(data, count=8)
    out = tmp_path / "out"
    proc = run_shard("--input", str(data), "--model", str(tiny_5b), "--out", str(out), *GEOMETRY, "--shard-size", "2",
                     launcher=("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                               str(free_port())))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert f"[rank {rank}] {data} (cogvideo (prompts.txt + videos.txt)): 8 inputs in 4 shards; this rank packs 2" \
               in proc.stdout
    for rank, shards in ((0, ("000000", "000002")), (1, ("000001", "000003"))):  # chunk j went to rank j % 2
        written = {line.split()[2].rstrip(":") for line in proc.stdout.splitlines()
                   if line.startswith(f"[rank {rank}] shard-")}
        assert written == {f"shard-{j}.tar" for j in shards}, proc.stdout
    by_shard = {tar.name: [s.meta["source"] for s in shard_samples(str(tar))] for tar in sorted(out.glob("*.tar"))}
    rank0 = by_shard["shard-000000.tar"] + by_shard["shard-000002.tar"]
    rank1 = by_shard["shard-000001.tar"] + by_shard["shard-000003.tar"]
    assert not set(rank0) & set(rank1)
    assert sorted(rank0 + rank1) == sorted((data / "videos.txt").read_text().split())
    assert json.loads((out / "manifest.json").read_text())["samples"] == 8


@pytest.mark.slow
def test_a_killed_pack_reruns_to_the_same_dataset(tiny_5b, tmp_path):
    data = tmp_path / "data"
    write_synthetic_videos(data, count=12)
    (data / "prompts.txt").write_text((data / "prompts.txt").read_text().replace(caption(5), ""))  # one rejection
    args = ("--input", str(data), "--model", str(tiny_5b), *GEOMETRY, "--shard-size", "2")
    whole = run_shard(*args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]

    crashed = tmp_path / "crashed"
    proc = subprocess.Popen([sys.executable, "data_tools/shard.py", *args, "--out", str(crashed)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # kill it as soon as its second shard is reported: mid-way through the third
        if line.startswith("shard-000001.tar"):
            proc.kill()
            break
    proc.wait()
    assert not (crashed / "manifest.json").exists()
    finished = sorted(p.name for p in crashed.glob("*.tar"))
    assert "shard-000000.tar" in finished and len(finished) < 6

    rerun = run_shard(*args, "--out", str(crashed))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"this rank packs 6, of which {len(finished)} are already finished" in rerun.stdout
    assert digests(crashed) == digests(tmp_path / "whole")  # byte for byte the uninterrupted dataset
    assert not list(crashed.glob(".*partial*"))


def test_clips_of_two_shapes_go_to_their_buckets(tiny_5b, tmp_path):
    """Landscape and portrait sources, two buckets: each clip lands in its own, the manifest counts both,
    and inspect.py checks every sample against its bucket's latent shape."""
    data = tmp_path / "data"
    write_synthetic_videos(data, count=3)  # 120x160: landscape
    write_synthetic_videos(data / "tall", count=2, height=160, width=120, first=3)  # portrait
    tall = "tall/videos/00003.mp4\ntall/videos/00004.mp4\n"
    (data / "videos.txt").write_text((data / "videos.txt").read_text() + tall)
    (data / "prompts.txt").write_text((data / "prompts.txt").read_text() + (data / "tall" / "prompts.txt").read_text())
    out = tmp_path / "out"
    assert shard.main(["--input", str(data), "--model", str(tiny_5b), "--out", str(out),
                       "--buckets", "9x96x128,9x128x96"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert {k: (v["samples"], v["latents"]) for k, v in manifest["buckets"].items()} == {
        "9x96x128": (3, [4, 3, 12, 16]), "9x128x96": (2, [4, 3, 16, 12])}
    shapes = {key: tuple(s.latents.shape) for key, s in read_all(out).items()}
    assert shapes == {**{f"{i:09d}": (4, 3, 12, 16) for i in range(3)}, **{f"{i:09d}": (4, 3, 16, 12) for i in (3, 4)}}
    _, report = inspect_dataset(out)
    assert not report.problems and report.samples == {"9x96x128": 3, "9x128x96": 2}


def test_a_blank_caption_line_is_its_videos_empty_caption_and_blank_lines_past_the_last_video_are_ignored(tmp_path):
    from data_tools.inputs import InputError, read_cogvideo

    (tmp_path / "videos.txt").write_text("a.mp4\nb.mp4\nc.mp4\n\n")
    for prompts, reasons in (("one\ntwo\n\n", [None, None, "empty_caption"]),  # the last caption is blank
                             ("one\ntwo\n\n\n\n", [None, None, "empty_caption"]),
                             ("one\n\nthree\n", [None, "empty_caption", None])):
        (tmp_path / "prompts.txt").write_text(prompts)
        entries = read_cogvideo(tmp_path)
        assert [e.reason for e in entries] == reasons and [e.source for e in entries] == ["a.mp4", "b.mp4", "c.mp4"]
    (tmp_path / "prompts.txt").write_text("one\ntwo\n")  # a caption missing, not blank: the files disagree
    with pytest.raises(InputError, match="prompts.txt has 2 lines but videos.txt has 3"):
        read_cogvideo(tmp_path)
    (tmp_path / "prompts.txt").write_text("one\ntwo\nthree\nfour\n")
    with pytest.raises(InputError, match="prompts.txt has 4 lines but videos.txt has 3"):
        read_cogvideo(tmp_path)
