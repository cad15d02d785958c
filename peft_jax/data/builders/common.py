"""What every medical-image TFDS builder shares: validated image bytes, grouped stratified splits.

Builders write `array_record` files, which TFDS reads and writes without TensorFlow. Images
are stored as their original encoded bytes (so preparing is fast and lossless) unless their
shorter side exceeds `max_side`, in which case they are downscaled once at preparation time:
training never needs full-resolution X-rays, and decoding them every step would starve the
accelerator.
"""
from __future__ import annotations

import collections
import io
import pathlib
import warnings
from typing import Iterable, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from peft_jax.data.images import require_8bit
from peft_jax.errors import UserError

MAX_SIDE = 512
SPLIT_SEED = 20240501  # Fixed: splits must not change with the experiment's seed.


class BadFileError(UserError):
    """An image that cannot be read, or a metadata row whose image is absent."""


class MedicalImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base class: an image, a label, the example's id and group (patient / lesion), subgroups.

    Subclasses set CLASS_NAMES (or per-config names), CHANNELS, HOMEPAGE, CITATION, LAYOUT and
    SUBGROUPS (string / float features kept for fairness reports; an `age` becomes the
    `age_group` subgroup when read), EXTRA_FEATURES (other stored fields, such as report
    text), and implement `_split_generators`.
    """

    VERSION = tfds.core.Version("1.0.0")
    CLASS_NAMES: Sequence[str] = ()
    CHANNELS = 3
    HOMEPAGE = ""
    LICENSE = ""
    CITATION = ""
    LAYOUT = ""
    SUBGROUPS: dict[str, tfds.features.FeatureConnector | type] = {}
    EXTRA_FEATURES: dict[str, tfds.features.FeatureConnector | type] = {}  # e.g. report text
    # Segmentation masks the release ships beside the images, as paths relative to the manual directory
    # with "{id}" for the example id (peft_jax/explain scores explanations against them); the first
    # pattern whose folder exists is used. Not stored in the prepared dataset.
    MASKS: Sequence[str] = ()

    def __init__(self, *, skip_bad_files: bool = False, max_side: int = MAX_SIDE, **kwargs):
        self.skip_bad_files = skip_bad_files
        self.max_side = max_side
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        """No checksums file: these builders download nothing. (TFDS's own lookup of the builder's
        source path imports the `importlib_resources` backport, which is not a dependency.)"""
        return None

    def _log_download_bytes(self) -> None:
        """Silenced: TFDS's "Downloading and preparing dataset Unknown size..." is untrue here (nothing is
        downloaded); tfds_loader.prepare prints what happens instead."""

    def _log_download_done(self) -> None:
        """Silenced: TFDS's "Dataset ... downloaded and prepared" (see _log_download_bytes)."""

    @classmethod
    def manual_instructions(cls) -> str:
        return f"Download the release from {cls.HOMEPAGE} (license: {cls.LICENSE}) and lay it out as:\n{cls.LAYOUT}"

    @property
    def MANUAL_DOWNLOAD_INSTRUCTIONS(self) -> str:  # pylint: disable=invalid-name
        return self.manual_instructions()

    def class_names(self) -> list[str]:
        return list(self.CLASS_NAMES)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "image": tfds.features.Image(shape=(None, None, self.CHANNELS)),
            "label": tfds.features.ClassLabel(names=self.class_names()),
            "id": tfds.features.Text(),
            "group": tfds.features.Text(),
            **self.SUBGROUPS,
            **self.EXTRA_FEATURES,
        }
        return tfds.core.DatasetInfo(
            builder=self, description=(type(self).__doc__ or "").strip(), features=tfds.features.FeaturesDict(features),
            supervised_keys=("image", "label"), homepage=self.HOMEPAGE, citation=self.CITATION,
            license=self.LICENSE)

    def _manual_root(self, dl_manager, marker: str, alternatives: Sequence[str] = ()) -> pathlib.Path:
        """The folder holding `marker`: the manual dir itself or one of its `alternatives` sub-folders."""
        try:
            manual = pathlib.Path(dl_manager.manual_dir)
        except AssertionError as e:  # TFDS asserts when the manual dir is unset, absent or empty.
            raise FileNotFoundError(f"{self.name}: no usable manual directory ({e})") from None
        for candidate in [manual, *(manual / a for a in alternatives)]:
            if (candidate / marker).exists():
                return candidate
        raise FileNotFoundError(
            f"{self.name}: {marker!r} not found in the manual directory {str(manual)!r}"
            f"{' (or its sub-folders ' + ', '.join(alternatives) + ')' if alternatives else ''}. "
            f"{self.manual_instructions()}")

    def _bad(self, message: str, skipped: collections.Counter) -> None:
        """Raises on a bad file, or counts it when skip_bad_files is set (never a silent drop)."""
        if not self.skip_bad_files:
            raise BadFileError(
                f"{self.name}: {message} (set dataset.skip_bad_files=True to skip such files with a warning)")
        skipped[message.split(":")[0]] += 1

    def _warn_skipped(self, split: str, skipped: collections.Counter) -> None:
        if skipped:
            warnings.warn(f"{self.name} {split}: skipped {sum(skipped.values())} bad files ({dict(skipped)}).")

    def _image_bytes(self, path: pathlib.Path, skipped: collections.Counter) -> bytes | None:
        """The image file's bytes, checked to decode, downscaled if its shorter side exceeds max_side."""
        if not path.is_file():
            self._bad(f"missing image: {path}", skipped)
            return None
        try:
            data = path.read_bytes()
            return encode_image(data, self.max_side, self.CHANNELS)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            self._bad(f"unreadable image: {path} ({e})", skipped)
            return None


def encode_image(data: bytes, max_side: int, channels: int) -> bytes:
    """`data` itself if it decodes and is small enough, else a downscaled PNG / JPEG re-encoding.

    Colour images and JPEG sources are re-encoded as JPEG (quality 95): a grey X-ray that was
    already lossy (MIMIC-CXR-JPG) would take several times the space as PNG.
    """
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # Decodes fully: truncated or corrupt files fail here, not during training.
        require_8bit(image, "the image")
        source_format = image.format
        if min(image.size) <= max_side and source_format in ("PNG", "JPEG") and _channels_ok(image, channels):
            return data
        image = image.convert("L" if channels == 1 else "RGB")
        scale = min(1.0, max_side / min(image.size))
        if scale < 1.0:
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.BILINEAR)
        out = io.BytesIO()
        if channels == 3 or source_format == "JPEG":
            image.save(out, format="JPEG", quality=95)
        else:
            image.save(out, format="PNG")
        return out.getvalue()


def _channels_ok(image: Image.Image, channels: int) -> bool:
    """Whether TFDS-free decoding of this file yields the declared channel count."""
    return image.mode == ("L" if channels == 1 else "RGB")


def array_to_png(array: np.ndarray, max_side: int) -> bytes:
    """A uint8 grey image (from DICOM pixels) as PNG bytes, downscaled to max_side."""
    image = Image.fromarray(array)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return encode_image(out.getvalue(), max_side, 1)


def grouped_stratified_split(labels: Sequence[int], groups: Sequence[str], fractions: dict[str, float],
                             seed: int = SPLIT_SEED) -> np.ndarray:
    """The split name of every example: stratified by label, never splitting a group.

    A group (patient, lesion) takes its most frequent label; within each label the groups are
    shuffled by `seed` and filled into the splits in order until each holds its fraction of
    that label's examples. Deterministic for fixed inputs.
    """
    labels = np.asarray(labels)
    groups = np.asarray(groups, dtype=object)
    names = list(fractions)
    bounds = np.cumsum([fractions[n] for n in names])
    bounds = bounds / bounds[-1]
    members: dict[str, list[int]] = collections.defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    group_label = {g: collections.Counter(labels[idx].tolist()).most_common(1)[0][0] for g, idx in members.items()}
    assignment = np.empty(len(labels), dtype=object)
    rng = np.random.default_rng(seed)
    for cls in sorted(set(group_label.values())):
        cls_groups = sorted(g for g, lab in group_label.items() if lab == cls)
        cls_groups = [cls_groups[i] for i in rng.permutation(len(cls_groups))]
        total = sum(len(members[g]) for g in cls_groups)
        seen = 0
        for g in cls_groups:
            position = (seen + len(members[g]) / 2) / total  # The group's midpoint decides its split.
            split = names[min(int(np.searchsorted(bounds, position, side="right")), len(names) - 1)]
            assignment[members[g]] = split
            seen += len(members[g])
    return assignment


def listdir_images(folder: pathlib.Path, suffixes: Iterable[str]) -> list[pathlib.Path]:
    """Image files in `folder`, sorted by name so that generation is deterministic."""
    suffixes = tuple(s.lower() for s in suffixes)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
