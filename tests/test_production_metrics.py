"""Production metric backends from local weights: FID through torchmetrics + torch-fidelity's InceptionV3, CLIP score
with open_clip; absent weights are reported as not computed (tiny random weights stand in for the real files)."""
import json

import pytest
import torch
from safetensors.torch import save_file

from anima_lib import config, metrics


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A state dict with the real InceptionV3 layout (random values), written the way the real .pth is."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe
    with pytest.MonkeyPatch.context() as patch:  # build the architecture without fetching the real weights
        patch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        torch.manual_seed(0)
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in model.modules():  # variance-preserving init, so features do not vanish through ~40 random layers
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "pt_inception.pth"
    torch.save(model.state_dict(), path)
    return path


def _images(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g)


def test_fid_loads_local_inception_weights_and_separates_sets(inception_weights):
    reference = _images(0)
    fid = metrics.fid_inception(reference, {"same": reference.clone(), "other": _images(1).pow(3)}, inception_weights)
    assert abs(fid["same"]) < 1e-2
    assert fid["other"] > 10 * max(abs(fid["same"]), 1e-3)


def test_missing_weights_are_reported_not_replaced(tmp_path):
    with pytest.raises(metrics.MetricUnavailable, match="gate.inception_weights is not set"):
        metrics.fid_inception(_images(0), {"x": _images(1)}, None)
    with pytest.raises(metrics.MetricUnavailable, match="no such file"):
        metrics.ClipScorer("ViT-B-32", tmp_path / "absent.safetensors")
    rows, status = metrics.production_metrics({"teacher@20": _images(0), "student@1": _images(1)}, "teacher@20",
                                              ["a red round creature"], [0] * 6)
    assert rows == {"teacher@20": {}, "student@1": {}}
    assert status["fid"].startswith("not computed") and status["clip_score"].startswith("not computed")
    with pytest.raises(config.ConfigError, match="gate.clip_checkpoint"):
        config.load_config("nano", {"gate.clip_checkpoint": str(tmp_path / "absent.safetensors")})


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import open_clip
    folder = tmp_path_factory.mktemp("clip")
    (folder / "tiny-test-clip.json").write_text(json.dumps({
        "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-test-clip")
    path = folder / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def test_clip_score_from_a_local_open_clip_checkpoint(tiny_clip):
    scorer = metrics.ClipScorer("tiny-test-clip", tiny_clip)
    images = _images(2, n=5)
    prompts = [f"a {c} round creature" for c in ("red", "blue", "green", "yellow", "purple")]
    scores = scorer.scores(images, prompts, batch_size=2)
    assert scores.shape == (5,) and bool(((scores >= 0) & (scores <= 100)).all())
    one_by_one = torch.cat([scorer.scores(images[i:i + 1], prompts[i:i + 1]) for i in range(5)])
    assert torch.allclose(scores, one_by_one, atol=1e-4)  # each image is scored against its own prompt
    swapped = scorer.scores(images, prompts[::-1], batch_size=2)
    assert not torch.allclose(scores, swapped)
    rows, status = metrics.production_metrics({"teacher@20": images, "student@1": images.flip(-1)}, "teacher@20",
                                              prompts, list(range(5)), clip_model="tiny-test-clip",
                                              clip_checkpoint=tiny_clip)
    assert status["clip_score"].startswith("computed") and status["fid"].startswith("not computed")
    assert rows["teacher@20"]["clip_score"] == pytest.approx(float(scores.mean()), abs=1e-4)
