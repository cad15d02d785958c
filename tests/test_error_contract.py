"""One error contract for every command in launch/ (issue 17): a user error is one ``error:`` line naming the
file or field, exit code 2, nothing left behind; a bug keeps its traceback (exit code 1)."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
CONFIG = str(ROOT / "configs" / "vit_b_lora.py")
TINY = ["--config.model.name=vit_ti16", "--config.model.image_size=28", "--config.model.patch_size=4",
        "--config.model.depth=1", "--config.dataset.name=breastmnist", "--config.train.batch_size=8",
        "--config.train.progress=False", "--config.dataset.download=False"]


def launch(script: str | pathlib.Path, *args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PEFT_JAX_ALLOCATOR="default", PEFT_JAX_TCMALLOC="0", PEFT_JAX_DEBUG="")
    env.pop("PEFT_JAX_DATA", None)
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def user_error(out: subprocess.CompletedProcess, *expected: str) -> str:
    """The one ``error:`` line of a run that exited with code 2 and no traceback; it holds each of ``expected``."""
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def write_medmnist(folder: pathlib.Path, val: int = 4) -> pathlib.Path:
    """breastmnist.npz with 8 / ``val`` / 4 random grey 28 px images of classes 0 and 1."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 8), ("val", val), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(-1, 1).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "breastmnist.npz", **arrays)
    return folder


# ------------------------------------------------------------------ config files and flags (before any JAX import)

CONFIG_FILES = {  # file content (None: no file), words of the error line
    "syntax error": ("def get_config(:\n", [", line 1: invalid syntax", "fix the config file"]),
    "missing file": (None, ["no such file", "give the path of a config file"]),
    "no get_config": ("X = 1\n", ["defines no get_config()"]),
    "error in get_config": ("def get_config():\n    return undefined_name\n",
                            [", line 2: NameError", "undefined_name", "fix the config file"]),
}
CONFIG_LAUNCHERS = {"train.py": ["--workdir"], "sweep.py": ["--workdir"], "benchmark.py": ["--workdir"],
                    "train_t2i.py": ["--workdir"], "quickstart.py": ["--workdir"]}


@pytest.mark.parametrize("script", sorted(CONFIG_LAUNCHERS))
@pytest.mark.parametrize("case", sorted(CONFIG_FILES))
def test_a_bad_config_file_is_one_error_line_naming_it(tmp_path, script, case):
    content, expected = CONFIG_FILES[case]
    path = tmp_path / "my_config.py"
    if content is not None:
        path.write_text(content)
    out = launch(LAUNCH / script, f"--config={path}", "--workdir", tmp_path / "w")
    assert str(path) in user_error(out, *expected)
    assert not (tmp_path / "w").exists()


FLAGS = {
    "override of the wrong type": (["--config.train.lr=fast"], ["--config.train.lr=fast", "could not convert"]),
    "unknown override": (["--config.train.lrr=1"], ["bad --config override", "lrr", "lr"]),
    "unknown flag": (["--wrkdir=x"], ["Unknown command line flag 'wrkdir'", "--helpshort"]),
    "extra argument": (["stray"], ["unexpected arguments: ['stray']"]),
}


@pytest.mark.parametrize("case", sorted(FLAGS))
def test_a_bad_flag_or_override_is_one_error_line(tmp_path, case):
    extra, expected = FLAGS[case]
    user_error(launch(LAUNCH / "train.py", f"--config={CONFIG}", *extra, "--workdir", tmp_path / "w"), *expected)
    assert not (tmp_path / "w").exists()


def test_a_missing_required_flag_is_one_error_line(tmp_path):
    user_error(launch(LAUNCH / "sweep.py", "--config", ROOT / "configs" / "sweep_quick.py"), "--workdir")


# ------------------------------------------------------------------ input files (checkpoints, data, adapters)


@pytest.mark.parametrize("case", ["checkpoint file", "full run's adapter folder"])
def test_a_fake_safetensors_checkpoint_is_named(tmp_path, case):
    fake = tmp_path / "vit.safetensors"
    if case != "checkpoint file":
        fake = tmp_path / "pretrained" / "adapter.safetensors"
        fake.parent.mkdir()
        meta = {"peft": {"method": "full"}, "model": {"name": "vit_ti16"}, "base_hash": "0" * 64}
        (fake.parent / "adapter_config.json").write_text(json.dumps(meta))
    fake.write_bytes(np.random.default_rng(0).bytes(256))
    init = fake if case == "checkpoint file" else fake.parent
    out = launch(LAUNCH / "train.py", f"--config={CONFIG}", *TINY, f"--config.dataset.data_dir={write_medmnist(tmp_path)}",
                 f"--config.init.checkpoint={init}", "--workdir", tmp_path / "w")
    user_error(out, str(fake), "not a readable safetensors file", "again")
    assert not (tmp_path / "w" / "config.json").exists()


def test_invalid_json_in_a_checkpoint_folder_names_the_file(tmp_path):
    folder = tmp_path / "hf_vit"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": ')
    out = launch(LAUNCH / "train.py", f"--config={CONFIG}", *TINY, f"--config.dataset.data_dir={write_medmnist(tmp_path)}",
                 f"--config.init.checkpoint={folder}", "--workdir", tmp_path / "w")
    user_error(out, str(folder / "config.json"), "is not valid JSON")
    assert not (tmp_path / "w" / "config.json").exists()


@pytest.mark.parametrize("case", ["not an npz", "empty validation split", "fewer labels than images"])
def test_a_bad_data_file_is_named(tmp_path, case):
    if case == "not an npz":
        tmp_path.joinpath("data").mkdir()
        (tmp_path / "data" / "breastmnist.npz").write_text("<html>a login page</html>\n")
        expected = [str(tmp_path / "data" / "breastmnist.npz"), "not a readable .npz file", "download"]
    elif case == "empty validation split":
        write_medmnist(tmp_path / "data", val=0)
        expected = ["'breastmnist'", "validation split is empty"]
    else:
        arrays = dict(np.load(write_medmnist(tmp_path / "data") / "breastmnist.npz"))
        np.savez(tmp_path / "data" / "breastmnist.npz", **dict(arrays, train_labels=arrays["train_labels"][:6]))
        expected = [f"{tmp_path / 'data' / 'breastmnist.npz'} train: (8, 28, 28) images for 6 labels"]
    out = launch(LAUNCH / "train.py", f"--config={CONFIG}", *TINY, f"--config.dataset.data_dir={tmp_path / 'data'}",
                 "--workdir", tmp_path / "w")
    line = user_error(out, *expected)
    assert "unsafely" not in line and "concatenate" not in line
    assert not (tmp_path / "w" / "config.json").exists()


@pytest.mark.parametrize("case", ["no base hash", "invalid json"])
def test_a_bad_adapter_folder_is_named(tmp_path, case):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    meta = {"peft": {"method": "lora"}, "model": {"name": "unet2d_condition"}, "base_hash": "0" * 64}
    if case == "no base hash":
        del meta["base_hash"]
    (adapter / "adapter_config.json").write_text("{" if case == "invalid json" else json.dumps(meta))
    (adapter / "adapter.safetensors").write_bytes(b"\x00" * 64)
    expected = {"no base hash": [str(adapter), "base hash"],
                "invalid json": [str(adapter / "adapter_config.json"), "not valid JSON"]}[case]
    out = launch(LAUNCH / "generate.py", "--base", tmp_path / "no_base", "--adapter", adapter, "--prompt", "x",
                 "--out", tmp_path / "samples")
    user_error(out, *expected)
    assert not (tmp_path / "samples").exists()


# ------------------------------------------------------------------ the other commands


def test_generate_without_a_base_folder(tmp_path):
    user_error(launch(LAUNCH / "generate.py", "--base", tmp_path / "missing", "--prompt", "x", "--out",
                      tmp_path / "samples"), str(tmp_path / "missing"), "no such folder")
    user_error(launch(LAUNCH / "generate.py", "--prompt", "x"), "--base")
    assert not (tmp_path / "samples").exists()


def test_fid_of_a_missing_folder(tmp_path):
    user_error(launch(LAUNCH / "fid.py", tmp_path / "real", tmp_path / "fake"), str(tmp_path / "real"), "no such folder")


def test_train_t2i_with_a_missing_data_folder(tmp_path):
    out = launch(LAUNCH / "train_t2i.py", f"--config={ROOT / 'configs' / 'sd15.py'}:lora",
                 f"--config.init.checkpoint={tmp_path / 'sd'}", "--config.dataset.name=image_folder",
                 f"--config.dataset.manual_dir={tmp_path / 'images'}", "--workdir", tmp_path / "w")
    user_error(out, f"dataset.manual_dir={tmp_path / 'images'}", "no such folder")
    assert not (tmp_path / "w" / "config.json").exists()


@pytest.mark.parametrize("case", ["unknown dataset", "missing manual dir"])
def test_prepare_data_errors(tmp_path, case):
    if case == "unknown dataset":
        out = launch(LAUNCH / "prepare_data.py", "--dataset", "bussi", "--data_dir", tmp_path / "prepared")
        user_error(out, "unknown dataset", "'bussi'", "busi")
    else:
        out = launch(LAUNCH / "prepare_data.py", "--dataset", "busi", "--manual_dir", tmp_path / "nowhere",
                     "--data_dir", tmp_path / "prepared")
        user_error(out, "busi", str(tmp_path / "nowhere"), "does not exist")
    assert not any((tmp_path / "prepared").rglob("*"))  # nothing half-prepared


# ------------------------------------------------------------------ a bug is not the user's fault


def test_a_bug_keeps_its_traceback(tmp_path):
    """A KeyError inside the library (here: a broken name check) is a traceback and exit code 1, not ``error:``."""
    script = tmp_path / "buggy_train.py"
    script.write_text(
        "import runpy, sys\nimport peft_jax.names\n\n\ndef broken(cfg):\n    raise KeyError('model')\n\n\n"
        f"peft_jax.names.check_names = broken\nsys.argv[0] = {str(LAUNCH / 'train.py')!r}\n"
        f"runpy.run_path({str(LAUNCH / 'train.py')!r}, run_name='__main__')\n")
    out = launch(script, f"--config={CONFIG}", "--workdir", tmp_path / "w")
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" in out.stderr and "KeyError: 'model'" in out.stderr
    assert not [line for line in out.stderr.splitlines() if line.startswith("error:")]
