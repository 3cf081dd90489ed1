"""A Hugging Face model folder (local, offline) -> ONNX via optimum, reference = the PyTorch original.

Embeddings (``feature-extraction``): the graph is exported with the plain
``transformers`` library, giving ``last_hidden_state``; the runtime pools and
L2-normalises as the folder says.  A sentence-transformers folder
(``modules.json``) gives the pooling of its ``Pooling`` module (``cls`` or
``mean``; ``1_Pooling/config.json``) and normalizes when it has a ``Normalize``
module; any other module (``Dense``, ``max`` pooling, ...) or a default prompt is
refused with a SourceError naming it, as the package could not compute it.  A
plain transformers folder is mean-pooled and normalized.  Why not keep the pooling in the graph (sentence-transformers
export)?  The plain BERT graph is what ORT's transformer optimizer fuses
(Attention, SkipLayerNorm, BiasGelu), which the INT8 recipes build on; pooling
in numpy costs microseconds and stays in fp32 whatever the variant, so the
quantized graph ends at the last LayerNorm and nothing after it is quantized.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from export.samples import GENERATED, PROJECT_TEXTS, check_shapes, default_texts, read_arrays, read_texts, sources_of
from export.sources import Feeds, Prepared, hash_path, onnx_io, tile_rows
from export.spec import STREAM_BATCH, STREAM_SCENARIO, STREAM_TOKENS
from runtime.errors import CalibrationError, ManifestError, SourceError
from runtime.manifest import TensorSpec, TextConfig

if TYPE_CHECKING:
    from export.spec import ExportSpec

__all__ = ["TOKENIZER_FILES", "VALIDATION_BATCH", "prepare"]

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
#: validation runs in batches of this size, in file order (mixed lengths, padded as the server pads)
VALIDATION_BATCH = 16
_TEXT_TASKS = ("feature-extraction", "text-classification")
_HF_TASKS = (*_TEXT_TASKS, "image-classification")


def prepare(spec: ExportSpec, staging: Path) -> Prepared:
    folder = Path(spec.source)
    if not folder.exists():
        raise SourceError(f"source {folder} does not exist; give a Hugging Face model folder, an .onnx file or module")
    if not (folder / "config.json").is_file():
        raise SourceError(f"{folder} is not a Hugging Face model folder (no config.json); pass the folder holding it")
    if spec.task not in _HF_TASKS:
        raise SourceError(f"task {spec.task!r} is not supported for a Hugging Face folder; use one of {_HF_TASKS}")
    config = _read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise SourceError(f"{folder / 'config.json'} holds no JSON object; is it the model's config.json?")
    if spec.task in _TEXT_TASKS and not (folder / "tokenizer.json").is_file():
        older = " (it has vocab.txt: an older tokenizer)" if (folder / "vocab.txt").is_file() else ""
        raise SourceError(
            f"{folder} has no tokenizer.json{older}; a text task needs the fast tokenizer file in the folder: "
            "write it with transformers (offline): AutoTokenizer.from_pretrained(FOLDER).save_pretrained(FOLDER)"
        )
    if spec.task == "feature-extraction":
        _st_pipeline(folder)  # refuse modules the package cannot reproduce before the slow export
    if spec.task in _TEXT_TASKS:
        return _prepare_text(spec, folder, staging, config)
    return _prepare_image(spec, folder, staging, config)


def _export_base(spec: ExportSpec, folder: Path, staging: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The slow part: the fp32 ONNX export, and the fields of :class:`Prepared` it gives."""
    onnx_path = staging / "onnx" / "model.onnx"
    _export_onnx(folder, spec.task, onnx_path)
    inputs, outputs = onnx_io(onnx_path)
    return {
        "kind": "hf",
        "task": spec.task,
        "source": str(folder.resolve()),
        "source_sha256": hash_path(folder),
        "onnx_path": onnx_path,
        "inputs": inputs,
        "outputs": outputs,
        "reference_name": "pytorch",
        "bert": _bert_dims(config),
    }


#: the transformers class the reference is loaded with, per task
_AUTO_CLASSES = {
    "feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
    "image-classification": "AutoModelForImageClassification",
}
#: the transformers mapping (``transformers.models.auto.modeling_auto``) of the model types with a model per task
_TASK_MAPPINGS = {
    "feature-extraction": "MODEL_MAPPING_NAMES",
    "text-classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "image-classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
}
#: what a text export serves: encoder models of the BERT family (their graph takes ids, mask and types)
_TEXT_FAMILIES = "encoder models of the BERT family (bert, distilbert, roberta, xlm-roberta, mpnet, electra, ...)"
#: tasks whose head (the classifier) must come from the checkpoint
_HEAD_TASKS = ("text-classification", "image-classification")
_SHOWN_KEYS = 5


def _load_model(folder: Path, task: str, config: dict[str, Any]) -> Any:
    """The folder's PyTorch model for ``task`` (the reference), loaded once, before the slow export.

    Weights that do not load are a SourceError naming them (optimum would report a missing
    TensorFlow instead).  For a classifier, weights the checkpoint lacks are refused: transformers
    only warns and draws them at random, and so would the ONNX export, each its own draw, so the
    accuracy check compared two random heads (and could sign a package holding one)."""
    from runtime.offline import stay_offline

    stay_offline()
    import transformers

    _check_architecture(folder, task, config)
    auto = getattr(transformers, _AUTO_CLASSES[task])
    try:
        model, info = auto.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except Exception as exc:
        raise SourceError(
            f"the model in {folder} does not load ({type(exc).__name__}: {exc}); repair or replace its weights "
            "(model.safetensors or pytorch_model.bin: save the model again with transformers' save_pretrained)"
        ) from exc
    # a buffer the checkpoint lacks (BatchNorm's num_batches_tracked, Swin's relative_position_index) is
    # rebuilt the same way every time, or unused in eval mode: only weights would be drawn at random
    buffers = {name for name, _ in model.named_buffers()}
    missing = sorted(str(k) for k in info.get("missing_keys") or () if str(k) not in buffers)
    if missing and task in _HEAD_TASKS:
        raise SourceError(_missing_head(folder, task, config, missing))
    return model.eval()


def _check_architecture(folder: Path, task: str, config: dict[str, Any]) -> None:
    """Refuse, before anything loads, a model type transformers does not know (advice to upgrade it or
    to repair the weights was wrong: offline, with good weights), one without a model for ``task`` (a 2 KB
    list of config classes was the message), and a text generator or encoder-decoder for a text task (it
    failed after the slow export, on an input the graph had: position_ids, decoder_input_ids)."""
    import transformers
    from transformers.models.auto import configuration_auto, modeling_auto

    kind = config.get("model_type")
    known = configuration_auto.CONFIG_MAPPING_NAMES
    if not isinstance(kind, str) or kind not in known:
        archs = config.get("architectures")
        arch = f" (architectures: {', '.join(map(str, archs))})" if isinstance(archs, list) and archs else ""
        raise SourceError(
            f"{folder / 'config.json'}: model_type {kind!r}{arch} is not one transformers {transformers.__version__} "
            "knows, and the appliance never runs a model's own code (trust_remote_code); export the model to ONNX "
            "where its code runs and give the .onnx file (--task tensor), or give a model of a known type"
        )
    text = task in ("feature-extraction", "text-classification")
    masked = modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if text and (config.get("is_encoder_decoder") or kind not in masked):
        what = "an encoder-decoder" if config.get("is_encoder_decoder") else "a text generator (decoder)"
        raise SourceError(
            f"{folder}: model_type {kind!r} is {what}; a text export serves {_TEXT_FAMILIES}: give such a model "
            "(a sentence-transformers checkpoint, a fine-tuned BERT classifier)"
        )
    if kind not in getattr(modeling_auto, _TASK_MAPPINGS[task]):
        has = [t for t, mapping in _TASK_MAPPINGS.items() if kind in getattr(modeling_auto, mapping)]
        raise SourceError(
            f"{folder}: transformers has no {task} model for model_type {kind!r}"
            + (f"; it has {', '.join(has)}: pass --task {has[0]}" if has else "")
        )


def _missing_head(folder: Path, task: str, config: dict[str, Any], missing: list[str]) -> str:
    """Why a classifier cannot be exported from ``folder``: the weights its checkpoint lacks."""
    archs = config.get("architectures")
    arch = ", ".join(map(str, archs)) if isinstance(archs, list) and archs else "not given"
    more = f" and {len(missing) - _SHOWN_KEYS} more" if len(missing) > _SHOWN_KEYS else ""
    keys = ", ".join(missing[:_SHOWN_KEYS]) + more
    fix = "export it with --task feature-extraction, or " if task == "text-classification" else ""
    return (
        f"the model in {folder} has no classification head for {task} (architectures: {arch}; weights missing "
        f"from the checkpoint: {keys}), so it would be drawn at random; {fix}fine-tune a classifier first"
    )


def _check_tokenizer(folder: Path) -> None:
    """The folder's tokenizer.json must load (checked before the slow export, naming the source file)."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    try:
        Tokenizer.from_file(str(path))
    except Exception as exc:
        raise SourceError(
            f"{path}: cannot load the tokenizer ({exc}); repair or replace it (save the tokenizer again with "
            "transformers: AutoTokenizer.from_pretrained(...).save_pretrained(folder))"
        ) from exc


def _read_json(path: Path) -> Any:
    """A JSON file of the source folder; unreadable or malformed -> SourceError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SourceError(
            f"{path} is not readable JSON ({type(exc).__name__}: {exc}); fix or replace the file"
        ) from exc


#: sentence-transformers modules the package reproduces (by class name)
_ST_SUPPORTED = ("Transformer", "Pooling", "Normalize")
_ST_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def _st_modes(path: Path) -> list[str]:
    """The pooling modes a sentence-transformers ``Pooling`` config turns on (new or legacy keys)."""
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise SourceError(f"{path} holds no JSON object; is it a sentence-transformers Pooling config?")
    mode = cfg.get("pooling_mode")
    if isinstance(mode, str):
        return [mode]
    if isinstance(mode, list) and all(isinstance(m, str) for m in mode):
        return list(mode)
    return [name for key, name in _ST_POOLING_KEYS.items() if cfg.get(key) is True]


def _st_pipeline(folder: Path) -> tuple[str, bool] | None:
    """(pooling, normalize) of a sentence-transformers folder (``modules.json``); None for a plain
    transformers folder.  Modules the package cannot reproduce -> SourceError naming them."""
    path = folder / "modules.json"
    if not path.is_file():
        return None
    modules = _read_json(path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise SourceError(f"{path} is not a list of modules; is it a sentence-transformers modules.json?")
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    unsupported = [
        f"{m.get('path') or m.get('name')} ({m.get('type')})"
        for m, k in zip(modules, kinds, strict=True)
        if k not in _ST_SUPPORTED
    ]
    if unsupported:
        raise SourceError(
            f"{path}: modules {', '.join(unsupported)} are not supported (a package runs only "
            f"{', '.join(_ST_SUPPORTED)}); export a model without them or use a plain transformers folder"
        )
    if not kinds or kinds[0] != "Transformer" or modules[0].get("path", "") not in ("", "."):
        raise SourceError(f"{path}: the first module must be the Transformer in the folder itself; got {kinds}")
    if kinds.count("Pooling") != 1 or kinds.count("Normalize") > 1 or kinds.count("Transformer") != 1:
        raise SourceError(f"{path}: expected Transformer, one Pooling and at most one Normalize; got {kinds}")
    if "Normalize" in kinds and kinds.index("Normalize") < kinds.index("Pooling"):
        raise SourceError(f"{path}: Normalize before Pooling is not supported; got {kinds}")
    pooling_dir = folder / str(modules[kinds.index("Pooling")].get("path", ""))
    modes = _st_modes(pooling_dir / "config.json")
    if modes not in (["cls"], ["mean"]):
        raise SourceError(
            f"{pooling_dir / 'config.json'}: pooling {modes or 'none'} is not supported; "
            "a package pools with 'cls' or 'mean' only"
        )
    st_config = folder / "config_sentence_transformers.json"
    if st_config.is_file():
        cfg = _read_json(st_config)
        if isinstance(cfg, dict) and cfg.get("default_prompt_name"):
            raise SourceError(
                f"{st_config}: default_prompt_name {cfg['default_prompt_name']!r} is not supported (the package "
                "does not add prompts); remove it and add the prompt to the texts sent instead"
            )
    return modes[0], "Normalize" in kinds


def _export_onnx(folder: Path, task: str, onnx_path: Path) -> None:
    from runtime.offline import stay_offline

    stay_offline()  # HF hub offline / no telemetry before optimum and transformers load
    from optimum.exporters.onnx import main_export

    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="inferbox-export-") as tmp:
        try:
            main_export(
                str(folder),
                output=tmp,
                task=task,
                library_name="transformers",
                do_validation=False,
                local_files_only=True,
            )
        except Exception as exc:
            raise SourceError(
                f"optimum could not export {folder} for task {task!r} ({type(exc).__name__}: {exc}); "
                "check that the folder holds a model of a supported architecture for this task"
            ) from exc
        produced = Path(tmp) / "model.onnx"
        if not produced.is_file():
            raise SourceError(
                f"optimum exported no model.onnx for {folder}; got {sorted(p.name for p in Path(tmp).iterdir())}"
            )
        if any(p.name.startswith("model.onnx_data") for p in Path(tmp).iterdir()):
            from export.sources.onnx_file import inline_external_data

            inline_external_data(produced, onnx_path)  # fold external data into one file (up to 2 GiB)
        else:
            shutil.move(str(produced), onnx_path)


def _bert_dims(config: dict[str, Any]) -> tuple[int, int] | None:
    if config.get("model_type") in ("bert", "roberta", "distilbert", "xlm-roberta", "mpnet"):
        heads = config.get("num_attention_heads") or config.get("n_heads")
        hidden = config.get("hidden_size") or config.get("dim")
        if heads and hidden:
            return int(heads), int(hidden)
    return None


def _max_length(spec: ExportSpec, folder: Path, config: dict[str, Any]) -> int:
    if spec.max_length:
        return spec.max_length
    st = folder / "sentence_bert_config.json"
    if st.is_file():
        value = _dict(st).get("max_seq_length")
        if value:
            return int(value)
    limit = int(config.get("max_position_embeddings") or 512)
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        value = _dict(tc).get("model_max_length")
        if isinstance(value, int) and 0 < value < limit:
            limit = value
    return limit


def _dict(path: Path) -> dict[str, Any]:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise SourceError(f"{path} holds no JSON object; fix or replace the file")
    return data


def _texts(given: Path | Sequence[str] | Any, kind: str) -> list[str]:
    if given is None:
        return default_texts(kind)
    if isinstance(given, str | Path):
        return read_texts(Path(given))
    texts = list(given)
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise SourceError(f"{kind} samples for a text task must be non-empty strings")
    return texts


def _prepare_text(spec: ExportSpec, folder: Path, staging: Path, config: dict[str, Any]) -> Prepared:
    from runtime.text import FEED_KINDS, TextEncoder

    # what is wrong with the folder or the sample files is found before the slow export
    max_length = _max_length(spec, folder, config)
    _check_tokenizer(folder)
    # the customer's own texts for both when only one kind was given
    val_texts = _texts(spec.validation if spec.validation is not None else spec.calibration, "validation")
    cal_texts = _texts(spec.calibration if spec.calibration is not None else spec.validation, "calibration")
    model = _load_model(folder, spec.task, config)
    if (folder / "modules.json").is_file():
        model = None  # loaded to check it: the reference is sentence-transformers' own load of the folder
    base = _export_base(spec, folder, staging, config)
    tok_dir = staging / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, tok_dir / name)
    names = [i.name for i in base["inputs"]]
    unknown = [n for n in names if n not in FEED_KINDS]
    if unknown:
        raise SourceError(f"the exported graph has inputs {unknown} that are not {list(FEED_KINDS)}")
    embeddings = spec.task == "feature-extraction"
    output = "last_hidden_state" if embeddings else "logits"
    if output not in [o.name for o in base["outputs"]]:
        raise SourceError(f"the exported graph has no {output!r} output; got {[o.name for o in base['outputs']]}")
    pooling, normalize = "none", False
    if embeddings:
        # a sentence-transformers folder pools (and normalizes) as its modules say; plain: mean, normalized
        pooling, normalize = _st_pipeline(folder) or ("mean", True)
    text = TextConfig(
        max_length=max_length,
        input_map={n: n for n in names},
        output=output,
        pooling=pooling,  # type: ignore[arg-type]
        normalize=normalize,
    )
    try:
        encoder = TextEncoder.from_dir(tok_dir, text)
    except ManifestError as exc:  # the runtime's words name the staging copy and a re-export
        raise SourceError(
            f"{folder / 'tokenizer.json'}: the tokenizer cannot be used ({exc}); repair or replace it "
            "(save the tokenizer again with transformers)"
        ) from exc

    def encode(texts: list[str]) -> Feeds:
        return dict(encoder.encode(texts, truncate=True).feeds)

    cross_encoder = not embeddings and _one_label(config)
    if cross_encoder:
        # a reranker reads (query, document) pairs ([CLS] q [SEP] d [SEP], type ids 0/1): validated
        # and calibrated on single sentences its scores sit near one end and a gate cannot fail
        def encode_pairs(pairs: list[tuple[str, str]]) -> Feeds:
            tokens = [encoder.tokenize_pairs(q, [d], truncate=True)[0] for q, d in pairs]
            return dict(encoder.pad(tokens).feeds)

        val_pairs = _pairs(val_texts)
        validation = [
            encode_pairs(val_pairs[i : i + VALIDATION_BATCH]) for i in range(0, len(val_pairs), VALIDATION_BATCH)
        ]
        calibration = [encode_pairs([p]) for p in _pairs(cal_texts)]
    else:
        validation = [encode(val_texts[i : i + VALIDATION_BATCH]) for i in range(0, len(val_texts), VALIDATION_BATCH)]
        calibration = [encode([t]) for t in cal_texts]
    if embeddings:
        reference = _embed_reference(folder, model, val_texts, validation, text.max_length)
    else:
        reference = _logits_reference(model, validation)
    lengths = [int(b["attention_mask"].sum(axis=1).max()) if "attention_mask" in b else 0 for b in validation]
    typical = min(128, text.max_length)
    stream_tokens = min(STREAM_TOKENS, text.max_length)
    longest = max(val_texts, key=len)
    timing: dict[str, tuple[Feeds, int | None]] = {
        "b1": (_timing_feeds(encode, longest, 1, typical), typical),
        "b32-typical": (_timing_feeds(encode, longest, 32, typical), typical),
        "b32-max": (_timing_feeds(encode, longest, 32, text.max_length), text.max_length),
        STREAM_SCENARIO: (_timing_feeds(encode, longest, STREAM_BATCH, stream_tokens), stream_tokens),
    }
    labels = _labels(config) if not embeddings else None
    return Prepared(
        **base,
        validation=validation,
        calibration=calibration,
        reference=reference,
        timing=timing,
        output=output,
        text=text,
        labels=labels,
        validation_labels=spec.validation_labels,
        notes={
            "validation_samples": str(len(val_texts)),
            "calibration_samples": str(len(cal_texts)),
            **sources_of(spec, made=PROJECT_TEXTS),
            "validation_max_tokens": str(max(lengths, default=0)),
            **({"validation_inputs": "query-document pairs of the samples"} if cross_encoder else {}),
        },
        encode=(lambda texts: encode_pairs(_pairs(texts))) if cross_encoder else encode,
    )


def _one_label(config: dict[str, Any]) -> bool:
    """A sequence classifier with one output score: a cross-encoder (reranker)."""
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label) == 1
    return config.get("num_labels") == 1


def _pairs(texts: list[str]) -> list[tuple[str, str]]:
    """(query, document) pairs from a list of samples: every other sample with itself (a
    relevant pair, scored high by a trained cross-encoder) and the rest with a sample half the
    list away (mostly irrelevant, scored low), so that validation sees both ends of the scores."""
    n = len(texts)
    return [(t, t if i % 2 == 0 else texts[(i + n // 2) % n]) for i, t in enumerate(texts)]


def _timing_feeds(encode: Any, text: str, batch: int, length: int) -> Feeds:
    """``batch`` rows of exactly ``length`` real tokens (the longest validation text, repeated as needed)."""
    feeds: Feeds = encode([text])
    ids = feeds["input_ids"][0]
    body = ids[1:-1] if len(ids) > 2 else ids
    reps = -(-max(length - 2, 1) // len(body))
    row = np.concatenate([ids[:1], np.tile(body, reps)[: max(length - 2, 0)], ids[-1:]])[:length]
    out: Feeds = {}
    for name, value in feeds.items():
        if name == "input_ids":
            out[name] = np.tile(row, (batch, 1)).astype(value.dtype)
        elif name == "attention_mask":
            out[name] = np.ones((batch, len(row)), dtype=value.dtype)
        else:
            out[name] = np.zeros((batch, len(row)), dtype=value.dtype)
    return out


def _embed_reference(
    folder: Path, hf: Any, texts: list[str], batches: list[Feeds], max_length: int
) -> npt.NDArray[np.float32]:
    """Sentence embeddings from the original model (``hf``, loaded by :func:`_load_model`):
    sentence-transformers when the folder is one."""
    if (folder / "modules.json").is_file():
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
        model.max_seq_length = max_length
        # the folder's own modules decide pooling and normalization (checked by _st_pipeline)
        emb = model.encode(
            texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=False, show_progress_bar=False
        )
        return np.asarray(emb, dtype=np.float32)
    import torch

    out = []
    with torch.inference_mode():
        for b in batches:
            h = hf(**{k: torch.from_numpy(v) for k, v in b.items()}).last_hidden_state
            m = torch.from_numpy(b["attention_mask"]).unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
    return np.concatenate(out).astype(np.float32)


def _logits_reference(model: Any, batches: list[Feeds]) -> npt.NDArray[np.float32]:
    """The logits of the original model (loaded by :func:`_load_model`) on the validation batches."""
    import torch

    out = []
    with torch.inference_mode():
        for b in batches:
            out.append(model(**{k: torch.from_numpy(np.asarray(v)) for k, v in b.items()}).logits.float().numpy())
    return np.concatenate(out).astype(np.float32)


def _labels(config: dict[str, Any]) -> list[str] | None:
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    return [str(id2label.get(str(i), id2label.get(i, i))) for i in range(len(id2label))]


def _prepare_image(spec: ExportSpec, folder: Path, staging: Path, config: dict[str, Any]) -> Prepared:
    expected = {"pixel_values": "float32"}

    def read(given: Any) -> Any:
        return read_arrays(Path(given), expected) if isinstance(given, str | Path) else given

    # sample files are read before the slow export; their image size is checked against the graph's after it
    val_given, cal_given = read(spec.validation), read(spec.calibration)
    model = _load_model(folder, spec.task, config)
    base = _export_base(spec, folder, staging, config)
    inputs = base["inputs"]
    if [i.name for i in inputs] != ["pixel_values"]:
        raise SourceError(f"image-classification expects one input pixel_values; the graph has {inputs}")
    shape = _image_shape(folder, config, inputs[0].shape)
    # the graph leaves every axis dynamic; the model only accepts this image size
    base["inputs"] = [TensorSpec(name="pixel_values", dtype=inputs[0].dtype, shape=[-1, *shape])]
    rng = np.random.default_rng(0)

    def samples(given: Any, source: Any, n: int) -> Feeds:
        if given is None:
            return {"pixel_values": rng.standard_normal((n, *shape)).astype(np.float32)}
        if isinstance(source, str | Path):
            check_shapes(Path(source), given, {"pixel_values": shape})
            return dict(given)
        pixels = np.asarray(given["pixel_values"], dtype=np.float32)
        if pixels.ndim != 1 + len(shape) or tuple(pixels.shape[1:]) != tuple(shape):
            raise CalibrationError(
                f"pixel_values samples have shape {list(pixels.shape)}, the model takes [N, "
                f"{', '.join(map(str, shape))}]; resize or transpose the images to that shape"
            )
        return {"pixel_values": pixels}

    # the customer's own images for both when only one kind was given: random pixels decided what passed
    val = samples(*((val_given, spec.validation) if val_given is not None else (cal_given, spec.calibration)), 64)
    cal = samples(*((cal_given, spec.calibration) if cal_given is not None else (val_given, spec.validation)), 32)
    n = len(val["pixel_values"])
    validation = [{"pixel_values": val["pixel_values"][i : i + 32]} for i in range(0, n, 32)]
    calibration = [{"pixel_values": cal["pixel_values"][i : i + 1]} for i in range(len(cal["pixel_values"]))]
    reference = _logits_reference(model, validation)
    return Prepared(
        **base,
        validation=validation,
        calibration=calibration,
        reference=reference,
        timing={
            "b1": (tile_rows(val, 1), None),
            "b32-typical": (tile_rows(val, 32), None),
            STREAM_SCENARIO: (tile_rows(val, STREAM_BATCH), None),
        },
        output="logits",
        labels=_labels(config),
        validation_labels=spec.validation_labels,
        notes={
            "validation_samples": str(n),
            "calibration_samples": str(len(calibration)),
            **sources_of(spec, made=GENERATED),
        },
    )


def _image_shape(folder: Path, config: dict[str, Any], graph_shape: list[int]) -> tuple[int, ...]:
    if len(graph_shape) == 4 and all(d > 0 for d in graph_shape[1:]):
        return tuple(graph_shape[1:])
    channels = int(config.get("num_channels", 3))
    size = config.get("image_size", 224)
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        s = _dict(pre).get("size")
        if isinstance(s, dict):
            size = s.get("height") or s.get("shortest_edge") or size
        elif isinstance(s, int):
            size = s
    side = int(size[0] if isinstance(size, list | tuple) else size)
    return (channels, side, side)
