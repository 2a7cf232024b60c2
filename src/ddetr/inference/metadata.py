"""What an exported model carries besides its graph, so that it runs without its checkpoint.

One JSON object under the key ``ddetr`` of the ONNX ``metadata_props`` or the OpenVINO ``rt_info``:

- ``kind``: ``"ddetr-detector"`` (a model of another kind lacks it);
- ``class_names``: one name per class index; ``label_to_category_id``: the category id of each;
- ``size`` / ``max_size``: the evaluation resize (shortest side, longest-side cap);
- ``mean`` / ``std``: the normalisation of the RGB values in [0, 1];
- ``num_select``: detections kept per image by the post-processing;
- ``with_mask``: whether the model takes the padding mask (batches of different image sizes);
- ``attn_backend``, ``quantize``, ``source``: how it was made (the checkpoint's path).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

KEY = "ddetr"
KIND = "ddetr-detector"


@dataclass(frozen=True)
class ModelMetadata:
    """Pre- and post-processing settings of an exported detector (see the module docstring)."""

    class_names: list[str]
    label_to_category_id: list[int]
    size: int
    max_size: int
    mean: list[float]
    std: list[float]
    num_select: int
    with_mask: bool
    attn_backend: str = "gather"
    quantize: str | None = None
    source: str = ""
    kind: str = field(default=KIND)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str, where: str) -> ModelMetadata:
        """Parses ``text``; ``ValueError`` naming ``where`` (the file) for anything that is not ddetr's."""
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: the '{KEY}' metadata is not JSON ({error.msg})") from None
        if not isinstance(values, dict) or values.get("kind") != KIND:
            raise ValueError(f"{where}: the '{KEY}' metadata is not that of a ddetr detector")
        known = {name: values[name] for name in cls.__dataclass_fields__ if name in values}
        missing = sorted(set(cls.__dataclass_fields__) - set(known) - {"attn_backend", "quantize", "source"})
        if missing:
            raise ValueError(f"{where}: the '{KEY}' metadata lacks {missing}")
        return cls(**known)


def metadata_of_module(
    module,
    size: int,
    max_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str],
    **how: Any,
) -> ModelMetadata:
    """The metadata of a ``DeformableDETRModule`` evaluated at ``size`` / ``max_size``; ``how`` gives
    ``with_mask``, ``attn_backend``, ``quantize`` and ``source``."""
    return ModelMetadata(
        class_names=[str(name) for name in class_names],
        label_to_category_id=[int(c) for c in module.label_to_category_id],
        size=int(size),
        max_size=int(max_size),
        mean=[float(v) for v in mean],
        std=[float(v) for v in std],
        num_select=int(module.postprocess.num_select),
        **how,
    )
