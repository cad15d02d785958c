"""CPU runs of the text-to-image PEFT run (peft_jax/t2i) with a tiny SD pipeline (peft_jax.testing): LoRA with
label prompts on the real chest X-rays lowers the loss and writes results.json, adapter/ (with its diffusers export)
and checkpoints; report prompts of IU X-ray (real reports, generated images; MIMIC-CXR's are in
test_data_generated.py); a run killed on a 2-way data-parallel mesh continues on a 2-way FSDP mesh with the losses of
the uninterrupted single-device run."""
import json

import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from peft_jax.checkpoints.diffusers import load_tokenizer  # noqa: E402
from peft_jax.t2i import data as t2i_data  # noqa: E402
from peft_jax.t2i import train as t2i_train  # noqa: E402
from peft_jax.testing import iu_xray_subset  # noqa: E402
from peft_jax.train.workdir import Preempted, Workdir  # noqa: E402


@pytest.fixture(scope="module")
def chest_run(shared_data, tiny_pipeline, sd15_config, tmp_path_factory):
    """LoRA on 32 real chest X-rays with label prompts: 40 steps on one device (the reference run)."""
    cfg = sd15_config("lora")
    cfg.init.checkpoint = str(tiny_pipeline)
    cfg.model.image_size = 32
    cfg.dataset.update(manual_dir=str(shared_data / "chest_xray" / "train"), max_images=32)
    cfg.train.update(num_steps=40, batch_size=8, lr=1e-2, log_every=0, checkpoint_every=20)
    cfg.mesh.min_shard_size = 256  # small enough to shard the tiny U-Net's weights over fsdp
    workdir = tmp_path_factory.mktemp("chest_run")
    return cfg, workdir, t2i_train.train(cfg, workdir)


def test_label_prompts_lower_the_loss_and_write_the_contract_files(chest_run):
    cfg, workdir, results = chest_run
    losses = np.asarray(results["losses"])
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    assert results["num_prompts"] == 2 and results["num_images"] == 32  # "a chest x-ray showing normal" / "pneumonia"
    assert 0 < results["trainable_params"] < results["total_params"] and results["num_devices"] == 1
    assert json.loads((workdir / "results.json").read_text())["losses"] == results["losses"]
    meta = json.loads((workdir / "adapter" / "adapter_config.json").read_text())
    assert meta["peft"]["method"] == "lora" and len(meta["base_hash"]) == 64
    assert {p.name for p in (workdir / "adapter").iterdir()} == {"adapter.safetensors", "adapter_config.json",
                                                                 "diffusers"}
    assert (workdir / "adapter" / "diffusers" / "pytorch_lora_weights.safetensors").is_file()
    assert Workdir(workdir).latest_step("latest") == 40


def _report_cfg(get_config, name: str, manual, data_dir, **overrides):
    cfg = get_config().dataset
    cfg.update(name=name, manual_dir=str(manual), data_dir=str(data_dir), **overrides)
    return cfg


def _prompts(cfg, splits=("train", "validation", "test")) -> list[str]:
    prompts = []
    for split in splits:
        cfg.split = split
        examples = t2i_data.load_examples(cfg, 16)
        prompts += [examples.read(i)[1] for i in range(examples.count)]
    return prompts


def test_report_prompts_iu_xray(shared_data, sd15_config, tiny_pipeline, tmp_path):
    # IU X-ray: the real reports of 30 studies, generated images.
    manual = tmp_path / "iu"
    projections, reports = iu_xray_subset(shared_data, manual, 30)
    frontal = [reports[r["uid"]] for r in projections if r["projection"] == "Frontal"]
    cfg = _report_cfg(sd15_config, "iu_xray", manual, tmp_path / "tfds")
    assert sorted(_prompts(cfg)) == sorted(" ".join(r["impression"].split()) for r in frontal)
    cfg.prompt_field = "both"
    assert sorted(_prompts(cfg)) == sorted(" ".join(f"{r['findings']} {r['impression']}".split()) for r in frontal)
    examples = t2i_data.load_examples(cfg, 16)
    assert examples.read(0)[0].shape == (16, 16, 3)

    assert t2i_data.report_prompt({"findings": b" Heart size\n normal. ", "impression": "Clear.  "}, "both") == (
        "Heart size normal. Clear.")
    assert load_tokenizer(tiny_pipeline)([" ".join(["effusion"] * 200)]).shape == (1, 77)  # truncated to CLIP's 77


def _interrupt_at(step: int, monkeypatch) -> type:
    """Makes the checkpoint save of ``step`` fail: a run killed after the previous checkpoint."""
    class Killed(Exception):
        pass

    save = Workdir.save

    def failing(self, name, at, state, meta):
        if at == step:
            raise Killed(f"killed before saving step {step}")
        save(self, name, at, state, meta)

    monkeypatch.setattr(Workdir, "save", failing)
    return Killed


def test_killed_run_resumes_with_single_device_losses_on_data_and_fsdp_meshes(chest_run, monkeypatch):
    reference_cfg, workdir, reference = chest_run
    cfg = ml_collections.ConfigDict(reference_cfg.to_dict())
    # 6 of the reference's 40 steps (the learning rate is constant: the run length changes nothing before it),
    # killed before the checkpoint of step 4 on a 2-way data-parallel mesh, rerun on a 2-way FSDP mesh.
    cfg.train.update(num_steps=6, checkpoint_every=2)
    cfg.mesh.data = 2
    run = workdir.parent / "killed_run"
    killed = _interrupt_at(4, monkeypatch)
    with pytest.raises(killed):
        t2i_train.train(cfg, run)
    monkeypatch.undo()
    assert Workdir(run).latest_step("latest") == 2
    assert not (run / "results.json").exists()
    cfg.mesh.update(data=1, fsdp=2)  # the mesh may change between a run and its continuation
    resumed = t2i_train.train(cfg, run)
    assert resumed["num_devices"] == 2 and resumed["steps_run"] == 6
    np.testing.assert_allclose(resumed["losses"], reference["losses"][:6], rtol=0, atol=1e-5)


def test_sigterm_saves_the_current_step_and_the_rerun_continues(chest_run, monkeypatch):
    import os
    import signal

    reference_cfg, workdir, reference = chest_run
    cfg = ml_collections.ConfigDict(reference_cfg.to_dict())
    cfg.train.update(num_steps=6, checkpoint_every=0)  # no periodic checkpoints: only the preemption saves
    run = workdir.parent / "sigterm_run"
    step_fn = t2i_train.make_train_step
    calls = []

    def signalling(*args, **kwargs):
        step = step_fn(*args, **kwargs)

        def wrapped(*a):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives during step 3
            return step(*a)
        return wrapped

    monkeypatch.setattr(t2i_train, "make_train_step", signalling)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="SIGTERM at step 3"):
        t2i_train.train(cfg, run)
    monkeypatch.undo()
    assert Workdir(run).latest_step("latest") == 3
    assert signal.getsignal(signal.SIGTERM) is handler  # the previous handler is back
    resumed = t2i_train.train(cfg, run)
    assert resumed["steps_run"] == 6
    np.testing.assert_allclose(resumed["losses"], reference["losses"][:6], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["full", "attention", "bias", "norm", "norm_bias", "norm_bias_attention", "svdiff",
                                    "difffit"])
def test_every_unet_method_trains_on_the_chest_x_rays(shared_data, tiny_pipeline, sd15_config, tmp_path, method):
    """Each configs/sd15.py:<method> (LoRA: chest_run above) trains the tiny U-Net with label prompts: the loss falls."""
    cfg = sd15_config(method)
    cfg.init.checkpoint = str(tiny_pipeline)
    cfg.model.image_size = 32
    cfg.dataset.update(manual_dir=str(shared_data / "chest_xray" / "train"), max_images=16)
    cfg.train.update(num_steps=30, batch_size=8, lr=3e-3 if method == "full" else 1e-2, log_every=0,
                     checkpoint_every=0)
    losses = np.asarray(t2i_train.train(cfg, tmp_path)["losses"])
    assert len(losses) == 30 and np.all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10]), (method, losses)


def test_16_bit_training_images_are_refused(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((16, 16), 4000, np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(ValueError, match="deep.png: pixels of mode I;16"):
        t2i_data.load_image(tmp_path / "deep.png", 8)
