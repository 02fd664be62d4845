"""Image modality: images listed in ``images.tsv`` through a ``transformers`` vision model (SPEC §1.3).

The paper's recipe: ``google/vit-base-patch16-224`` with its image processor (224x224, mean/std 0.5),
feature = the CLS token of ``last_hidden_state`` (after the final layer norm; *not* ``pooler_output``,
whose weights that checkpoint does not have). Several images of one entity are averaged (``agg="mean"``)
or only the first is used (``agg="first"``). Images that are missing or unreadable are skipped and
counted; an entity with no readable image is marked not present and imputed. Needs the ``[features]``
extra (``transformers``, ``pillow``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dsom.config import FeaturesConfig
from dsom.data.graph import KGDataset
from dsom.data.modality import ModalityTable
from dsom.data.readers import DataWarning
from dsom.data.sidefiles import ImageList, read_images_tsv, regular_file
from dsom.errors import DsomError
from dsom.features.cache import FeatureCache, digest
from dsom.features.hf import load_pretrained

__all__ = ["PAPER_IMAGE_MODEL", "ImageList", "build_image", "encode_images", "read_images_tsv"]

PAPER_IMAGE_MODEL = "google/vit-base-patch16-224"


# Images larger than this are skipped (and counted as unreadable) before they are decoded: a small PNG can
# declare gigapixels (a "decompression bomb").
MAX_IMAGE_PIXELS = 64_000_000


def _open_rgb(p: Path) -> Any:
    """The image at ``p`` as RGB, or None when it is not a readable regular image file within the pixel limit."""
    from PIL import Image

    if not regular_file(p):  # a FIFO would block forever, a directory or device is no image
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    return None
                return im.convert("RGB")
    except Exception:  # noqa: BLE001 - whatever a corrupt or hostile file makes the decoder raise: skip it
        return None


def _load(model: str):
    return load_pretrained(model, "image", "AutoImageProcessor", "pass a local model folder with --image-model")


@torch.no_grad()
def encode_images(images: ImageList, num_entities: int, model: str, agg: str = "mean", batch_size: int = 16,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """``(features (E, hidden), present (E,), unreadable count)``; CLS token of the last hidden state."""
    if agg not in ("mean", "first"):
        raise DsomError(f"unknown image aggregation '{agg}'; choose mean or first")
    processor, net = _load(model)
    hidden = net.config.hidden_size
    sums = np.zeros((num_entities, hidden), dtype=np.float64)
    counts = np.zeros(num_entities, dtype=np.int64)
    jobs = [(e, p) for e, ps in sorted(images.paths.items()) for p in (ps[:1] if agg == "first" else ps)]
    bad = 0
    for s in tqdm(range(0, len(jobs), batch_size), desc="encode images", disable=not progress, leave=False):
        ents, pics = [], []
        for e, p in jobs[s:s + batch_size]:
            pic = _open_rgb(p)
            if pic is None:
                bad += 1
            else:
                pics.append(pic)
                ents.append(e)
        if not pics:
            continue
        inputs = processor(images=pics, return_tensors="pt")
        cls = net(**inputs).last_hidden_state[:, 0].double().numpy()
        np.add.at(sums, np.array(ents), cls)
        np.add.at(counts, np.array(ents), 1)
    present = counts > 0
    feats = np.zeros((num_entities, hidden), dtype=np.float32)
    feats[present] = (sums[present] / counts[present, None]).astype(np.float32)
    if bad:
        warnings.warn(f"{bad} images were missing or unreadable and were skipped", DataWarning, stacklevel=2)
    return feats, present, bad


def build_image(ds: KGDataset, model: str = PAPER_IMAGE_MODEL, agg: str = "mean", batch_size: int = 16,
                imputation: str = "normal", seed: int = 0, cache: FeatureCache | None = None, force: bool = False,
                progress: bool = True, allow_outside: bool = False) -> ModalityTable:
    """The ``image`` modality of ``ds``, cached by (model, aggregation, image list and file sizes)."""
    images = read_images_tsv(ds, allow_outside=allow_outside)
    listing = [f"{e}\t{p}\t{os.stat(p).st_size if regular_file(p) else -1}"
               for e, ps in sorted(images.paths.items()) for p in ps]
    key = digest([Path(model).name if Path(model).exists() else model, agg, imputation, str(seed), *listing])

    def build() -> ModalityTable:
        feats, present, bad = encode_images(images, ds.num_entities, model, agg, batch_size, progress)
        return ModalityTable.from_partial("image", feats, present, imputation=imputation, seed=seed,
                                          source=f"image model {model}, CLS of last hidden state, {agg} over images, "
                                                 f"{bad} unreadable")

    table, _ = (cache or FeatureCache()).get_or_build(ds.name, "image", key, build, force=force)
    return table


def source(ds: KGDataset, fc: FeaturesConfig, cache: FeatureCache, force: bool,
           progress: bool) -> tuple[ModalityTable, bool | None]:
    """The registry's builder (:data:`dsom.features.build.SOURCES`): the image table as ``features.*`` configures it."""
    return build_image(ds, fc.image_model, fc.image_agg, imputation=fc.imputation, seed=fc.seed, cache=cache,
                       force=force, progress=progress, allow_outside=fc.allow_outside_paths), None
