"""Image modality with a tiny randomly initialised ViT built from a config (no weights download)."""

import warnings

import numpy as np
import pytest

from dsom.data import KGDataset, Vocabulary
from dsom.errors import DsomError
from dsom.features.cache import FeatureCache
from dsom.features.image import build_image, encode_images, read_images_tsv

pytest.importorskip("transformers", reason="install the [features] extra for image features")
PIL = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("tiny-vit")
    cfg = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return str(folder)


def _folder(tmp_path):
    d = tmp_path / "imgkg"
    (d / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a1", "a2", "b1"):
        PIL.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(d / "images" / f"{name}.jpg")
    (d / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    (d / "images.tsv").write_text("entity\tpath\n"
                                  "a\timages/a1.jpg\na\timages/a2.jpg\n"
                                  "b\timages/b1.jpg\nb\timages/broken.jpg\n"
                                  "c\timages/missing.jpg\nzz\timages/a1.jpg\n")
    ds = KGDataset("imgkg", Vocabulary(["a", "b", "c", "d"]), Vocabulary(["r"]), {"train": np.array([[0, 0, 1]])},
                   root=d)
    return ds, d


def _cls(model, paths):
    import torch
    from transformers import AutoImageProcessor, AutoModel

    proc, net = AutoImageProcessor.from_pretrained(model), AutoModel.from_pretrained(model)
    with torch.no_grad():
        out = [net(**proc(images=[PIL.open(p).convert("RGB")], return_tensors="pt")).last_hidden_state[0, 0].numpy()
               for p in paths]
    return np.stack(out)


def test_mean_of_cls_tokens_with_unreadable_and_missing_images_masked(tiny_vit, tmp_path):
    ds, d = _folder(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = read_images_tsv(ds)
        feats, present, bad = encode_images(images, 4, tiny_vit, "mean", batch_size=2, progress=False)
    assert images.unknown_rows == 1 and bad == 2
    assert any("unreadable" in str(w.message) for w in caught)
    assert present.tolist() == [True, True, False, False]
    ref = _cls(tiny_vit, [d / "images" / "a1.jpg", d / "images" / "a2.jpg", d / "images" / "b1.jpg"])
    np.testing.assert_allclose(feats[0], ref[:2].mean(0), atol=1e-5)
    np.testing.assert_allclose(feats[1], ref[2], atol=1e-5)
    first, _, _ = encode_images(images, 4, tiny_vit, "first", progress=False)
    np.testing.assert_allclose(first[0], ref[0], atol=1e-5)


def test_build_image_imputes_and_caches(tiny_vit, tmp_path):
    ds, _ = _folder(tmp_path)
    cache = FeatureCache(tmp_path / "cache")
    t = build_image(ds, tiny_vit, cache=cache, progress=False)
    assert t.features.shape == (4, 16) and t.present.sum() == 2
    assert np.abs(t.features[2]).sum() > 0  # imputed N(0,1)
    again = build_image(ds, tiny_vit, cache=cache, progress=False)
    np.testing.assert_array_equal(t.features, again.features)


def test_real_sample_images(tiny_vit, shared_data, tmp_path):
    from dsom.data.readers import load_dataset

    ds = load_dataset(shared_data / "FB15K-237")
    t = build_image(ds, tiny_vit, cache=FeatureCache(tmp_path), progress=False)
    assert t.features.shape == (ds.num_entities, 16)
    assert int(t.present.sum()) == 10  # 30 JPEGs of 10 entities


def test_missing_model_is_a_clear_error(tmp_path):
    ds, _ = _folder(tmp_path)
    with pytest.raises(DsomError, match="cannot load image model"):
        encode_images(read_images_tsv(ds), 4, str(tmp_path / "nope"), progress=False)
