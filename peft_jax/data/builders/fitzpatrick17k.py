"""Fitzpatrick17k: clinical skin-condition photographs with Fitzpatrick skin types (Groh et al. 2021)."""
from __future__ import annotations

import collections
import csv
import pathlib

import tensorflow_datasets as tfds

from peft_jax.data.builders import common
from peft_jax.errors import UserError

THREE = ("non-neoplastic", "benign", "malignant")
NINE = ("benign dermal", "benign epidermal", "benign melanocyte", "genodermatoses", "inflammatory",
        "malignant cutaneous lymphoma", "malignant dermal", "malignant epidermal", "malignant melanoma")
# The 114 `label` values of fitzpatrick17k.csv (mattgroh/fitzpatrick17k), sorted.
ALL = (
    "acanthosis nigricans", "acne", "acne vulgaris", "acquired autoimmune bullous diseaseherpes gestationis",
    "acrodermatitis enteropathica", "actinic keratosis", "allergic contact dermatitis", "aplasia cutis",
    "basal cell carcinoma", "basal cell carcinoma morpheiform", "becker nevus", "behcets disease",
    "calcinosis cutis", "cheilitis", "congenital nevus", "dariers disease", "dermatofibroma",
    "dermatomyositis", "disseminated actinic porokeratosis", "drug eruption",
    "drug induced pigmentary changes", "dyshidrotic eczema", "eczema", "ehlers danlos syndrome",
    "epidermal nevus", "epidermolysis bullosa", "erythema annulare centrifigum", "erythema elevatum diutinum",
    "erythema multiforme", "erythema nodosum", "factitial dermatitis", "fixed eruptions", "folliculitis",
    "fordyce spots", "granuloma annulare", "granuloma pyogenic", "hailey hailey disease", "halo nevus",
    "hidradenitis", "ichthyosis vulgaris", "incontinentia pigmenti", "juvenile xanthogranuloma",
    "kaposi sarcoma", "keloid", "keratosis pilaris", "langerhans cell histiocytosis", "lentigo maligna",
    "lichen amyloidosis", "lichen planus", "lichen simplex", "livedo reticularis", "lupus erythematosus",
    "lupus subacute", "lyme disease", "lymphangioma", "malignant melanoma", "melanoma", "milia", "mucinosis",
    "mucous cyst", "mycosis fungoides", "myiasis", "naevus comedonicus", "necrobiosis lipoidica",
    "nematode infection", "neurodermatitis", "neurofibromatosis", "neurotic excoriations",
    "neutrophilic dermatoses", "nevocytic nevus", "nevus sebaceous of jadassohn",
    "papilomatosis confluentes and reticulate", "paronychia", "pediculosis lids", "perioral dermatitis",
    "photodermatoses", "pilar cyst", "pilomatricoma", "pityriasis lichenoides chronica", "pityriasis rosea",
    "pityriasis rubra pilaris", "porokeratosis actinic", "porokeratosis of mibelli", "porphyria",
    "port wine stain", "prurigo nodularis", "psoriasis", "pustular psoriasis", "pyogenic granuloma",
    "rhinophyma", "rosacea", "sarcoidosis", "scabies", "scleroderma", "scleromyxedema",
    "seborrheic dermatitis", "seborrheic keratosis", "solid cystic basal cell carcinoma",
    "squamous cell carcinoma", "stasis edema", "stevens johnson syndrome", "striae", "sun damaged skin",
    "superficial spreading melanoma ssm", "syringoma", "telangiectases", "tick bite", "tuberous sclerosis",
    "tungiasis", "urticaria", "urticaria pigmentosa", "vitiligo", "xanthomas", "xeroderma pigmentosum",
)
_COLUMNS = {"three": "three_partition_label", "nine": "nine_partition_label", "all": "label"}
_NAMES = {"three": THREE, "nine": NINE, "all": ALL}


class Fitzpatrick17k(common.MedicalImageBuilder):
    """16,577 clinical images of 114 skin conditions, annotated with Fitzpatrick skin type 1-6.

    Source: https://github.com/mattgroh/fitzpatrick17k (the CSV; the images are downloaded from
    the `url` column by the authors' script and saved as `<md5hash>.jpg`).
    License: CC BY-NC-SA 3.0.
    Layout (the manual directory):
      fitzpatrick17k.csv     md5hash,fitzpatrick_scale,...,label,nine_partition_label,three_partition_label,...
      images/<md5hash>.jpg   (or the .jpg files directly in the manual directory)
    Configs choose the label: `three` (non-neoplastic / benign / malignant, default), `nine`,
    `all` (114 conditions). No official split and no patient ids: train / validation / test are
    70 / 10 / 20 %, stratified by the 114-way label with a fixed seed, so every config shares
    the same split. The skin type is kept as the `skin_type` subgroup ("1".."6", "unknown" for -1).
    """

    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n, description=f"{_COLUMNS[n]} as the label")
                       for n in ("three", "nine", "all")]
    CHANNELS = 3
    HOMEPAGE = "https://github.com/mattgroh/fitzpatrick17k"
    LICENSE = "CC BY-NC-SA 3.0"
    CITATION = ("Groh M, Harris C, Soenksen L, et al. Evaluating Deep Neural Networks Trained on Clinical Images "
                "in Dermatology with the Fitzpatrick 17k Dataset. CVPR Workshops 2021.")
    LAYOUT = "  fitzpatrick17k.csv\n  images/<md5hash>.jpg"
    SUBGROUPS = {"skin_type": tfds.features.Text()}

    def class_names(self) -> list[str]:
        return list(_NAMES[self.builder_config.name])

    def _split_generators(self, dl_manager):
        root = self._manual_root(dl_manager, "fitzpatrick17k.csv")
        with open(root / "fitzpatrick17k.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        column = _COLUMNS[self.builder_config.name]
        names = self.class_names()
        for i, row in enumerate(rows):
            if row.get(column) not in names or row.get("label") not in ALL:
                raise UserError(f"fitzpatrick17k: row {i + 2} of {root / 'fitzpatrick17k.csv'} has {column}="
                                 f"{row.get(column)!r}, not one of the release's classes.")
        folder = root / "images" if (root / "images").is_dir() else root
        assignment = common.grouped_stratified_split([ALL.index(r["label"]) for r in rows],
                                                     [r["md5hash"] for r in rows],
                                                     {"train": 0.7, "validation": 0.1, "test": 0.2})
        return {split: self._generate_examples([r for r, a in zip(rows, assignment) if a == split], folder, column,
                                               split)
                for split in ("train", "validation", "test")}

    def _generate_examples(self, rows, folder: pathlib.Path, column: str, split: str):
        skipped = collections.Counter()
        names = self.class_names()
        for row in rows:
            image = self._image_bytes(folder / f"{row['md5hash']}.jpg", skipped)
            if image is None:
                continue
            skin = row["fitzpatrick_scale"] if row["fitzpatrick_scale"] in {"1", "2", "3", "4", "5", "6"} else "unknown"
            yield row["md5hash"], {"image": image, "label": names.index(row[column]), "id": row["md5hash"],
                                   "group": row["md5hash"], "skin_type": skin}
        self._warn_skipped(split, skipped)
