"""gmpipe's own artifacts: atomic_dir under concurrent writers and after killed ones (one complete version, no
stray folders), and the readers (every damaged file is one line naming it and the stage that rewrites it)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from gmpipe.artifacts import ArtifactError, atomic_dir
from tests.conftest import REPO
from tests.hostile import assert_one_clear_line, run_limited, write_model_folders, write_student_folder

# Each writer replaces the folder many times with a version of 3 files that all carry the writer's id and round,
# so a half-swapped or mixed folder would show.
WRITER = """
import sys
from pathlib import Path
from gmpipe.artifacts import atomic_dir
target, writer = Path(sys.argv[1]), sys.argv[2]
for round_ in range(int(sys.argv[3])):
    with atomic_dir(target) as out:
        for i in range(3):
            (out / f"part{i}.txt").write_text(f"{writer}:{round_}")
"""


def _versions(folder: Path) -> set[str]:
    return {file.read_text() for file in folder.iterdir()}


def test_concurrent_writers_both_succeed_and_leave_one_complete_version(tmp_path):
    target = tmp_path / "data" / "prepared"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(target), name, "300"], env=env,
                                stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    errors = [writer.communicate(timeout=120)[1] for writer in writers]
    assert [writer.returncode for writer in writers] == [0, 0], errors
    assert len(_versions(target)) == 1 and len(list(target.iterdir())) == 3
    assert sorted(p.name for p in target.parent.iterdir()) == ["prepared"]  # no .tmp-* or .old-* left


def test_a_writer_that_starts_between_the_two_renames_of_another(tmp_path, monkeypatch):
    """The interleaving that once left the loser with a raw 'Directory not empty' and a stray temporary folder:
    writer B runs its whole atomic_dir just after writer A moved the old version aside."""
    import threading

    from gmpipe import artifacts

    target = tmp_path / "prepared"
    with atomic_dir(target) as out:
        (out / "v.txt").write_text("old")
    real_replace, started, errors = os.replace, [], []

    def writer_b():
        try:
            with atomic_dir(target) as out:
                (out / "v.txt").write_text("b")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def replace(src, dst):
        real_replace(src, dst)
        if Path(src) == target and not started:  # A has just moved the old version aside
            started.append(threading.Thread(target=writer_b))
            started[0].start()
            started[0].join(timeout=1.0)  # B finishes here unless a lock makes it wait for A

    monkeypatch.setattr(artifacts.os, "replace", replace)
    with atomic_dir(target) as out:
        (out / "v.txt").write_text("a")
    started[0].join(timeout=30)
    assert not errors
    assert (target / "v.txt").read_text() in ("a", "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_leftovers_of_a_killed_writer_are_removed(tmp_path):
    target = tmp_path / "prepared"
    with atomic_dir(target) as out:
        (out / "a.txt").write_text("good")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited: its folders are leftovers
    import socket

    host = socket.gethostname().replace("-", "_")
    for kind in ("tmp", "old"):
        (tmp_path / f".prepared.{kind}-{host}-{pid}-abc").mkdir()
    live = tmp_path / f".prepared.tmp-{host}-{os.getpid()}-xyz"  # a writer still running keeps its folder
    live.mkdir()
    with atomic_dir(target) as out:
        (out / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["prepared", live.name])


def test_a_run_killed_between_the_renames_is_repaired(tmp_path):
    target = tmp_path / "prepared"
    backup = tmp_path / ".prepared.old-otherhost-1-abc"
    backup.mkdir()
    (backup / "a.txt").write_text("previous")
    with pytest.raises(RuntimeError), atomic_dir(target):
        assert (target / "a.txt").read_text() == "previous"  # put back before the new version is written
        raise RuntimeError("the new run fails too")
    assert (target / "a.txt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


# Reading gmpipe's own artifacts back: every damaged file is one ArtifactError naming it and the stage that
# rewrites it. One small, real pipeline state is built once and copied for each damage.

@pytest.fixture(scope="module")
def pipeline_state(tmp_path_factory) -> Path:
    import torch

    from gmpipe.config.data import DataConfig
    from gmpipe.config.prepare import PrepareConfig
    from gmpipe.data import latents
    from gmpipe.paths import Paths
    from gmpipe.stages import prepare
    from tests.conftest import FIXTURE_FASHION_MNIST

    root = tmp_path_factory.mktemp("state")
    paths = Paths(root)
    prepare.run(DataConfig(path=str(FIXTURE_FASHION_MNIST)), PrepareConfig(max_per_class=2), paths)
    paths.latents.mkdir(parents=True)
    n = 20
    latents.save_split(paths.latents, "train", latents.LatentSplit(torch.zeros(n, 4, 4, 4), torch.ones(n, 4, 4, 4),
                                                                   torch.zeros(n, dtype=torch.long),
                                                                   torch.zeros(n, dtype=torch.long)))
    latents.LatentStats((0.0,) * 4, (1.0,) * 4).save(paths.latents / latents.STATS)
    latents.save_texts(paths.latents, ["a cat", "a dog"], torch.zeros(2, 3, 8), torch.ones(2, 3), "x", 3)
    ldm, _ = write_model_folders(root)
    write_student_folder(ldm, paths.student / "reflow")
    return root


def _load(kind: str, root: Path):
    from gmpipe.data import latents, prepared
    from gmpipe.distill.student import read_student_info
    from gmpipe.generator import load_generator
    from gmpipe.nn.autoencoder import load_autoencoder
    from gmpipe.paths import Paths

    paths = Paths(root)
    return {
        "split": lambda: prepared.load_split(paths.prepared, "train"),
        "manifest": lambda: prepared.load_manifest(paths.prepared),
        "latents": lambda: latents.load_split(paths.latents, "train"),
        "stats": lambda: latents.LatentStats.load(paths.latents / latents.STATS),
        "texts": lambda: latents.load_texts(paths.latents),
        "encoder": lambda: latents.load_text_encoder_info(paths.latents),
        "vae": lambda: load_autoencoder(paths.vae),
        "ldm": lambda: load_generator(paths.ldm, autoencoder=paths.vae),
        "student": lambda: load_generator(paths.student / "reflow"),
        "student_info": lambda: read_student_info(paths.student / "reflow"),
    }[kind]()


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def edit_json(**changes):
    def damage(path: Path) -> None:
        raw = json.loads(path.read_text())
        for key, value in changes.items():
            if value is ...:
                raw.pop(key)
            else:
                raw[key] = value
        path.write_text(json.dumps(raw))

    return damage


def replace_with(data: bytes):
    return lambda path: path.write_bytes(data)


def forged_npz(path: Path) -> None:
    """images.npy declares 10^12 bytes and holds 16: refused before anything is allocated."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (10**12,)})
    with zipfile.ZipFile(path, "a") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the forged member shadows the real one: that is the point
        archive.writestr("images.npy", header.getvalue() + bytes(16))


def pickled_npz(path: Path) -> None:
    np.savez(path.with_suffix(""), images=np.array([{"x": 1}], dtype=object), labels=np.zeros(1),
             caption_bytes=np.zeros(0, np.uint8), caption_offsets=np.zeros(1, np.int64), caption_index=np.zeros(1))


def compressed_npz(path: Path) -> None:
    with np.load(path) as archive:
        arrays = dict(archive)
    np.savez_compressed(path.with_suffix(""), **arrays)


def float_images(path: Path) -> None:
    with np.load(path) as archive:
        arrays = dict(archive)
    arrays["images"] = arrays["images"].astype(np.float32)
    np.savez(path.with_suffix(""), **arrays)


def safetensors_missing_key(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    tensors.pop("std")
    save_file(tensors, path)


def safetensors_bad_shape(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    tensors["labels"] = tensors["labels"][:3]
    save_file(tensors, path)


# (id, file damaged, how, which loader, the stage named, what the message says)
DAMAGED = [
    ("manifest-truncated", "data/prepared/manifest.json", truncate, "manifest", "prepare", "not valid JSON"),
    ("manifest-a-list", "data/prepared/manifest.json", replace_with(b"[1, 2]"), "manifest", "prepare",
     "expected a JSON dict"),
    ("manifest-not-utf8", "data/prepared/manifest.json", replace_with(b'{"class_names": "\xff"}'), "manifest",
     "prepare", "not UTF-8"),
    ("manifest-class-names-number", "data/prepared/manifest.json", edit_json(class_names=7), "manifest", "prepare",
     "class_names"),
    ("manifest-no-image-size", "data/prepared/manifest.json", edit_json(image_size=...), "manifest", "prepare",
     "image_size"),
    ("manifest-deep-nesting", "data/prepared/manifest.json", replace_with(b"[" * 100_000 + b"]" * 100_000),
     "manifest", "prepare", "nested too deeply"),
    ("manifest-missing", "data/prepared/manifest.json", Path.unlink, "manifest", "prepare", "run the 'prepare'"),
    ("split-truncated", "data/prepared/train.npz", truncate, "split", "prepare", "not a readable .npz"),
    ("split-forged-header", "data/prepared/train.npz", forged_npz, "split", "prepare", "declares"),
    ("split-pickled", "data/prepared/train.npz", pickled_npz, "split", "prepare", "Python objects"),
    ("split-compressed", "data/prepared/train.npz", compressed_npz, "split", "prepare", "compressed"),
    ("split-float-images", "data/prepared/train.npz", float_images, "split", "prepare", "expected uint8"),
    ("split-not-zip", "data/prepared/train.npz", replace_with(b"PK\x03\x04junk"), "split", "prepare",
     "not a readable .npz"),
    ("stats-truncated", "data/latents/stats.json", truncate, "stats", "cache_latents", "not valid JSON"),
    ("stats-scale-0-x", "data/latents/stats.json", edit_json(scale=[0, "x"]), "stats", "cache_latents",
     "scale.0"),
    ("stats-scale-nan", "data/latents/stats.json", replace_with(b'{"shift": [0], "scale": [NaN]}'), "stats",
     "cache_latents", "scale.0"),
    ("stats-lengths-differ", "data/latents/stats.json", edit_json(shift=[0.0, 0.0]), "stats", "cache_latents",
     "2 shifts but 4 scales"),
    ("stats-empty", "data/latents/stats.json", replace_with(b""), "stats", "cache_latents", "not valid JSON"),
    ("latents-truncated", "data/latents/train.safetensors", truncate, "latents", "cache_latents",
     "not a readable safetensors"),
    ("latents-missing-key", "data/latents/train.safetensors", safetensors_missing_key, "latents", "cache_latents",
     "has no tensor 'std'"),
    ("latents-bad-shapes", "data/latents/train.safetensors", safetensors_bad_shape, "latents", "cache_latents",
     "inconsistent shapes"),
    ("texts-truncated", "data/latents/texts.safetensors", truncate, "texts", "cache_latents", "not a readable"),
    ("captions-count", "data/latents/captions.json", replace_with(b'["only one"]'), "texts", "cache_latents",
     "1 captions but states"),
    ("captions-not-strings", "data/latents/captions.json", replace_with(b"[1, 2]"), "texts", "cache_latents",
     "list of strings"),
    ("text-encoder-no-length", "data/latents/text_encoder.json", edit_json(max_length=...), "encoder",
     "cache_latents", "max_length"),
    ("vae-no-config", "models/vae/config.json", Path.unlink, "vae", "train_vae", "missing from the trained"),
    ("vae-config-truncated", "models/vae/config.json", truncate, "vae", "train_vae", "cannot be loaded"),
    ("vae-weights-truncated", "models/vae/diffusion_pytorch_model.safetensors", truncate, "vae", "train_vae",
     "cannot be loaded"),
    ("vae-weights-missing", "models/vae/diffusion_pytorch_model.safetensors", Path.unlink, "vae", "train_vae",
     "missing from the trained autoencoder folder"),
    ("ldm-stats-0-x", "models/ldm/latent_stats.json", edit_json(scale=[0, "x"]), "ldm", "train_ldm", "scale.0"),
    ("ldm-objective-unknown", "models/ldm/objective.json", edit_json(schedule="nonsense"), "ldm", "train_ldm",
     "objective.json"),
    ("ldm-objective-truncated", "models/ldm/objective.json", truncate, "ldm", "train_ldm", "not valid JSON"),
    ("ldm-sampling-steps-0", "models/ldm/sampling.json", edit_json(steps=0), "ldm", "train_ldm", "steps"),
    ("ldm-sampling-unknown-sampler", "models/ldm/sampling.json", edit_json(sampler="warp"), "ldm", "train_ldm",
     "unknown sampler"),
    ("ldm-guidance-string", "models/ldm/sampling.json", edit_json(guidance="1.0"), "ldm", "train_ldm", "guidance"),
    ("ldm-family-unknown", "models/ldm/family.json", edit_json(family="gan9000"), "ldm", "train_ldm",
     "unknown model family 'gan9000'"),
    ("ldm-family-missing", "models/ldm/family.json", Path.unlink, "ldm", "train_ldm", "no trained model here"),
    ("ldm-conditioning-mode", "models/ldm/conditioning.json", edit_json(mode="telepathy"), "ldm", "train_ldm",
     "mode"),
    ("ldm-text-without-encoder", "models/ldm/conditioning.json", edit_json(mode="text"), "ldm", "train_ldm",
     "text_encoder"),
    ("ldm-denoiser-config-missing", "models/ldm/denoiser/denoiser.json", Path.unlink, "ldm", "train_ldm",
     "missing from the denoiser folder"),
    ("ldm-denoiser-config-wrong", "models/ldm/denoiser/denoiser.json", edit_json(in_channels="four"), "ldm",
     "train_ldm", "denoiser cannot be loaded"),
    ("ldm-weights-truncated", "models/ldm/denoiser/diffusion_pytorch_model.safetensors", truncate, "ldm",
     "train_ldm", "denoiser cannot be loaded"),
    ("student-stats-truncated", "models/student/reflow/latent_stats.json", truncate, "student", "distill",
     "not valid JSON"),
    ("student-info-no-steps", "models/student/reflow/student.json", edit_json(steps=[]), "student_info", "distill",
     "steps"),
    ("student-info-guidance-inf", "models/student/reflow/student.json",
     replace_with(b'{"method": "reflow", "steps": [1], "guidance_folded": Infinity}'), "student_info", "distill",
     "guidance_folded"),
]


@pytest.mark.parametrize(("relative", "damage", "loader", "stage", "message"), [row[1:] for row in DAMAGED],
                         ids=[row[0] for row in DAMAGED])
def test_damaged_artifact_names_itself_and_its_stage(pipeline_state, tmp_path, relative, damage, loader, stage,
                                                     message):
    root = tmp_path / "state"
    shutil.copytree(pipeline_state, root)
    damage(root / relative)
    with pytest.raises(ArtifactError) as caught:
        _load(loader, root)
    text = str(caught.value)
    assert message in text and f"'{stage}' stage" in text and "\n" not in text
    named = Path(relative)
    assert str(root / named) in text or str(root / named.parent) in text


def test_every_loader_reads_the_undamaged_state(pipeline_state):
    for kind in ("split", "manifest", "latents", "stats", "texts", "encoder", "vae", "ldm", "student",
                 "student_info"):
        _load(kind, pipeline_state)


def test_sample_on_a_damaged_model_is_one_line(pipeline_state, tmp_path):
    root = tmp_path / "state"
    shutil.copytree(pipeline_state, root)
    (root / "models/ldm/latent_stats.json").write_text('{"shift": [0, 0, 0, 0], "scale": [0, "x", 1, 1]}')
    (root / "old.png").write_bytes(b"previous samples")
    result = run_limited(["gmpipe", "sample", "--out", "old.png"], root, timeout=120)
    assert_one_clear_line(result, str(Path("models/ldm/latent_stats.json")), "rerun the 'train_ldm' stage")
    assert (root / "old.png").read_bytes() == b"previous samples"
