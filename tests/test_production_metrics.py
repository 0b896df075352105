"""Production readers from local weights: FID through torchmetrics + torch-fidelity's InceptionV3, CLIP with open_clip
(tiny random weights stand in for the real files). Absent weights are a parameter error on a real preset (config)
and MetricUnavailable at the library level, never a stand-in metric."""
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


def test_inception_reader_is_torchmetrics_fid(inception_weights):
    """The gate reads each set once (InceptionFeatures) and applies torchmetrics' arithmetic: the same FID as
    torchmetrics' FrechetInceptionDistance module on the same weights."""
    from torchmetrics.image.fid import NoTrainInceptionV3
    reader = metrics.InceptionFeatures(inception_weights, batch_size=4)
    assert isinstance(reader.model, NoTrainInceptionV3) and str(inception_weights) in reader.name
    reference, other = _images(0), _images(1).pow(3)
    features = reader(reference)
    assert features.shape == (6, 2048) and features.dtype == torch.float64
    assert torch.equal(reader(metrics.as_uint8(reference)), features)  # uint8 in = what the FID module quantizes to
    expected = metrics.fid_inception(reference, {"other": other}, inception_weights)["other"]
    assert metrics.fid_from_features(features, reader(other)) == pytest.approx(expected, rel=1e-4)


def test_missing_weights_are_errors_not_replaced(tmp_path):
    with pytest.raises(metrics.MetricUnavailable, match="gate.inception_weights is not set"):
        metrics.InceptionFeatures(None)
    with pytest.raises(metrics.MetricUnavailable, match="gate.inception_weights is not set"):
        metrics.fid_inception(_images(0), {"x": _images(1)}, None)
    with pytest.raises(metrics.MetricUnavailable, match="no such file"):
        metrics.OpenClipEncoder("ViT-B-32", tmp_path / "absent.safetensors")
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
    encoder = scorer.encoder
    for embeddings in (encoder.images(images), encoder.texts(prompts)):
        assert embeddings.shape == (5, 32) and torch.allclose(embeddings.norm(dim=-1), torch.ones(5), atol=1e-5)


def test_a_real_preset_wires_in_the_production_readers(inception_weights, tiny_clip, tmp_path):
    """anima-2b's world reads with torchmetrics' InceptionV3 from gate.inception_weights and open_clip gate.clip_model
    from gate.clip_checkpoint; end to end on tiny random weights."""
    from torchmetrics.image.fid import NoTrainInceptionV3
    from anima_lib import worlds
    params = config.load_config("anima-2b", {"run.device": "cpu", "gate.inception_weights": str(inception_weights),
                                             "gate.clip_model": "tiny-test-clip", "gate.clip_checkpoint": str(tiny_clip),
                                             "gate.n_prompts": 2, "gate.seeds_per_prompt": 2, "gate.image_size": 32},
                            check_paths=False)
    readers = worlds.production_readers(params)
    assert isinstance(readers.inception, metrics.InceptionFeatures) and isinstance(readers.inception.model,
                                                                                   NoTrainInceptionV3)
    assert isinstance(readers.clip_image.__self__, metrics.OpenClipEncoder)
    assert readers.clip_text.__self__ is readers.clip_image.__self__
    assert str(inception_weights) in readers.names["fid"] and "tiny-test-clip" in readers.names["clip"]
    world = worlds.load_world(params, readers=readers)
    assert world.gate.ids == ["geneval-single-01", "geneval-colorattr-11"]  # the shipped files, evenly spaced
    samples = {"teacher@20": world.keep(_images(3, n=4)), "student@1": world.keep(_images(4, n=4))}
    rows = world.score_rows(samples, "teacher@20", world.keep(_images(5, n=4)))
    for row in rows.values():
        assert row["fid_vs_teacher"] >= 0 and 0 <= row["clip_score"] <= 100 and row["diversity_clip"] >= 0
