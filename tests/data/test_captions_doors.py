"""The captions door: every captions.jsonl line is used or listed with its reason; captions are capped and stored
once each, so a split's size follows what it holds."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gmpipe.config.data import DataConfig
from gmpipe.config.prepare import PrepareConfig
from gmpipe.data.captions import MAX_CAPTION_CHARS, MAX_LINE_BYTES, CaptionError, check_caption, read_captions
from gmpipe.data.prepared import load_split
from gmpipe.paths import Paths
from gmpipe.stages import prepare
from tests.data.test_image_folder_doors import good_folder, write


def record(file="cat/a.png", caption="a cat") -> bytes:
    return json.dumps({"file": file, "caption": caption}).encode()


# (id, the bad line, the reason rejected.json gives for it)
BAD_LINES = [
    ("not-json", b"{broken", "not a JSON line"),
    ("json-array", b"[1, 2]", "not a {\"file\""),
    ("json-string", b'"cat/a.png"', "not a {\"file\""),
    ("file-not-a-string", json.dumps({"file": 3, "caption": "x"}).encode(), "not a {\"file\""),
    ("no-caption-key", json.dumps({"file": "cat/a.png"}).encode(), "not a {\"file\""),
    ("caption-a-number", json.dumps({"file": "cat/a.png", "caption": 5}).encode(), "not a string"),
    ("caption-null", json.dumps({"file": "cat/a.png", "caption": None}).encode(), "not a string"),
    ("caption-empty", record(caption=""), "empty caption"),
    ("caption-whitespace", record(caption=" \t "), "empty caption"),
    ("lone-surrogate", b'{"file": "cat/a.png", "caption": "\\ud800"}', "lone surrogate"),
    ("not-utf8", b'{"file": "cat/a.png", "caption": "caf\xe9"}', "not UTF-8"),
    ("deep-nesting", b"[" * 100_000 + b"]" * 100_000, "not a JSON line"),
    ("longer-than-a-line", b'{"file": "cat/a.png", "caption": "' + b"x" * (MAX_LINE_BYTES + 10) + b'"}',
     "line longer than"),
    ("missing-file", record(file="cat/nope.png"), "is not an image of the folder"),
    ("path-escape", record(file="../../etc/passwd"), "is not an image of the folder"),
    ("rejected-file", record(file="cat/broken.png"), "was rejected"),
    ("hidden-file", record(file="cat/.secret.png"), "was rejected"),
    ("too-long", record(caption="y" * 250_000), f"truncated to {MAX_CAPTION_CHARS}"),
]


@pytest.mark.parametrize(("line", "reason"), [row[1:] for row in BAD_LINES], ids=[row[0] for row in BAD_LINES])
def test_bad_caption_line_is_listed(tmp_path, line, reason):
    root = good_folder(tmp_path / "images")
    write(root, "cat/broken.png", b"not an image")
    write(root, "cat/.secret.png", b"hidden")
    write(root, "captions.jsonl", record(file="dog/a.png", caption="a good dog") + b"\n" + line + b"\n")
    paths = Paths(tmp_path / "project")
    data = DataConfig(source="image_folder", path=str(root), image_size=8, channels=1)
    prepare.run(data, PrepareConfig(val_fraction=0.0, test_fraction=0.0), paths)
    rejected = {r["file"]: r["reason"] for r in json.loads((paths.prepared / "rejected.json").read_text())}
    assert reason in rejected.get("captions.jsonl:2", ""), rejected
    assert "captions.jsonl:1" not in rejected
    assert "a good dog" in set(load_split(paths.prepared, "train").captions)


def test_a_huge_caption_does_not_inflate_the_split(tmp_path):
    """One 250,000-character caption once made train.npz 86 MB: captions are capped and stored once each."""
    root = good_folder(tmp_path / "images")
    for i in range(200):
        write(root, f"cat/extra{i}.png", (root / "cat/a.png").read_bytes())
    write(root, "captions.jsonl", record(caption="z" * 250_000) + b"\n")
    paths = Paths(tmp_path / "project")
    data = DataConfig(source="image_folder", path=str(root), image_size=8, channels=1)
    prepare.run(data, PrepareConfig(val_fraction=0.0, test_fraction=0.0), paths)
    train = load_split(paths.prepared, "train")
    assert len(train) == 204 and max(map(len, train.captions)) == MAX_CAPTION_CHARS
    images_bytes = train.images.nbytes
    assert (paths.prepared / "train.npz").stat().st_size < images_bytes + 10_000  # 13 KB of images, 1 KB caption


def test_duplicates_later_line_wins_and_bom_and_dot_paths_are_fine(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + record(caption="first") + b"\n\n" + record(file="./cat/a.png",
                                                                                     caption="second") + b"\n")
    captions, problems = read_captions(path)
    assert captions["cat/a.png"].text == "second"
    assert [(p.file, "captioned again on line 3" in p.reason) for p in problems] == [("captions.jsonl:1", True)]


def test_check_caption_is_the_rule_for_prompts_too():
    assert check_caption("a sneaker") == "a sneaker"
    for bad in ("", "x" * (MAX_CAPTION_CHARS + 1), "\udcff", 3):
        with pytest.raises(CaptionError):
            check_caption(bad)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(
    st.binary(max_size=80),
    st.text(max_size=80).map(str.encode),
    st.builds(lambda f, c: json.dumps({"file": f, "caption": c}).encode(),
              st.one_of(st.text(max_size=20), st.just("cat/a.png"), st.integers()),
              st.one_of(st.text(max_size=40), st.none(), st.integers(), st.lists(st.integers(), max_size=2))),
), max_size=12))
def test_random_caption_files_never_crash(tmp_path, lines):
    path = tmp_path / "captions.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    captions, problems = read_captions(path)
    for caption in captions.values():
        assert check_caption(caption.text) == caption.text
    used_or_listed = {c.line for c in captions.values()} | {int(p.file.rsplit(":", 1)[1]) for p in problems}
    for number, line in enumerate(path.read_bytes().split(b"\n"), 1):
        assert not line.strip() or number in used_or_listed
