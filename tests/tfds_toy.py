"""A tiny custom tfds builder for tests: an importable module, written as array_record with no TensorFlow."""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

WORDS = ["good", "bad", "fine", "tea", "snack", "was", "really", "the"]


def toy_text(i: int) -> str:
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 7))


class ToyText(tfds.core.GeneratorBasedBuilder):
    """12 train and 5 test sentences with a ClassLabel (names deliberately unsorted: ids must be kept)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo(builder=self, ...) rather than dataset_info_from_configs: the latter reads metadata
        # files through importlib resources of the module's top-level package (a plain module fails).
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "label": tfds.features.ClassLabel(names=["pos", "neg"])}
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 12), "test": self._generate_examples(100, 5)}

    def _generate_examples(self, start: int, n: int):
        for i in range(start, start + n):
            yield i, {"text": toy_text(i), "label": i % 2}


class ToyImages(tfds.core.GeneratorBasedBuilder):
    """Black and white 6x5 images. Yielded as PIL images: encoding numpy arrays would need TensorFlow."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(6, 5, 3)),
                    "label": tfds.features.ClassLabel(names=["b", "w"]),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(8)}

    def _generate_examples(self, n: int):
        for i in range(n):
            yield i, {"image": Image.fromarray(np.full((6, 5, 3), 255 * (i % 2), np.uint8)), "label": i % 2}
