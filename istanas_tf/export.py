"""A servable SavedModel of an evaluation network (docs/design.md decision 7).

:func:`export_saved_model` writes ``<export_dir>/<model_name>/<version>/``, the layout
TF Serving polls, through ``keras.export.ExportArchive``. The signatures take raw pixels
or encoded images and do the normalisation themselves, so a client needs no knowledge
of the training statistics (``serving`` describes them; docs/serving.md shows requests):

  ``serving_default`` / ``serve``
    input  ``images``: float32 ``[N, H, W, 3]``, raw 0-255 pixel values
    output ``logits``: float32 ``[N, classes]`` (the network in inference mode)
           ``probabilities``: float32 ``[N, classes]``, softmax of the logits
           ``classes``: int64 ``[N]``, argmax of the logits
           ``class_names``: string ``[N]``, only when class names are given
  ``serving_uint8``: input ``images`` uint8 ``[N, H, W, 3]``; the same outputs
  ``serving_bytes``: input ``image_bytes`` string ``[N]``, encoded JPEG / PNG images
    prepared as evaluation images are; the same outputs

The batch size is dynamic. The class names are a constant in the graph (behind the
``class_names`` output) and a plain text file, one name a line, in
``assets.extra/class_names.txt`` for clients that only want the label map.

For fine-tuning, the version also holds the network as Keras knows it, in
``assets.extra/keras/``: ``network.weights.h5`` (``model.save_weights``) and
``network.json`` (what ``networks.build_network`` needs, and the normalisation);
:func:`load_for_finetuning` rebuilds it. Inside the version directory, the files appear
and disappear with the SavedModel they belong to; TF Serving does not read them
(``assets.extra`` holds only its optional warmup requests).

A version directory appears in one ``os.rename``: the archive is written into a hidden
sibling (``.tmp-<version>-<host>-<pid>-<random>``, a name TF Serving ignores; its process
named, so that a later run can tell a killed export's folder from a live one) and renamed
at the end, so a crash never leaves a half-written version behind. Only local file systems are
supported (an object store has no atomic directory rename).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Sequence

import keras
from absl import logging

from istanas_tf import networks, serving

ENDPOINT = "serve"
CLASS_NAMES_FILE = os.path.join("assets.extra", "class_names.txt")
KERAS_DIR = os.path.join("assets.extra", "keras")  # the fine-tuning artifact
KERAS_SPEC = "network.json"
KERAS_WEIGHTS = "network.weights.h5"
KERAS_FORMAT = 1  # version of network.json
# The network arguments network.json records (networks._Network.get_config's keys).
_NETWORK_ARGUMENTS = (
    "genotype",
    "channels",
    "num_cells",
    "num_classes",
    "auxiliary",
    "drop_path_rate",
    "bn_after_param_free_ops",
    "seed",
)

_VERSION_DIR = re.compile(r"[0-9]+")


def existing_versions(model_dir: str) -> list[int]:
    """Versions already under ``model_dir``: its subdirectories named by an integer."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(
        int(name)
        for name in os.listdir(model_dir)
        if _VERSION_DIR.fullmatch(name) and os.path.isdir(os.path.join(model_dir, name))
    )


def next_version(model_dir: str) -> int:
    """One more than the largest existing version, or 1 for a new model directory."""
    versions = existing_versions(model_dir)
    return versions[-1] + 1 if versions else 1


def export_saved_model(
    model: keras.Model,
    export_dir: str,
    model_name: str,
    version: int | None,
    *,
    image_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str] | None = None,
    overwrite: bool = False,
    preprocessing: str | None = None,
) -> str:
    """Writes a servable SavedModel to ``<export_dir>/<model_name>/<version>/``.

    Args:
      model: a built network (e.g. from ``networks.build_network``); it runs with
        ``training=False``.
      export_dir: the model base directory TF Serving is pointed at (local path).
      model_name: the subdirectory for this model.
      version: a non-negative integer, or None for one more than the largest existing.
      image_size: ``(H, W)`` of the images the signature accepts.
      mean, std: per-channel normalisation in [0, 1] units (``DatasetInfo.mean/std``).
      class_names: optional label names, exported as the ``class_names`` output.
      overwrite: replace an existing version directory instead of refusing.
      preprocessing: how ``serving_bytes`` prepares a decoded image, ``"cifar"`` or
        ``"imagenet"`` (the data's ``augmentation``); default: ``"imagenet"`` for a
        ``NetworkImageNet``, else ``"cifar"``.

    Returns:
      The version directory, which also holds the fine-tuning artifact (for a
      ``networks`` evaluation network; another model gets none, with a warning).

    Raises:
      FileExistsError: the version exists and ``overwrite`` is False.
      ValueError: an invalid name, version, size, normalisation or preprocessing.
    """
    image_size = _check_arguments(model_name, version, image_size, mean, std, class_names)
    if preprocessing is None:
        preprocessing = "imagenet" if getattr(model, "imagenet", False) else "cifar"
    serving.check_preprocessing(preprocessing, image_size)
    model_dir = os.path.join(export_dir, model_name)
    os.makedirs(model_dir, exist_ok=True)
    if version is None:
        version = next_version(model_dir)
    version_dir = os.path.join(model_dir, str(version))
    if not overwrite:
        _refuse_existing(version_dir)

    # os.mkdir rather than tempfile.mkdtemp: mkdtemp's mode 0700 would stay on the
    # version directory and hide it from a server running as another user.
    temp_dir = os.path.join(model_dir, _temp_name(version))
    os.mkdir(temp_dir)
    try:
        archive = keras.export.ExportArchive()
        archive.track(model)
        serving.add_endpoints(
            archive,
            serving.make_serving_fn(
                model, image_size=image_size, mean=mean, std=std, class_names=class_names
            ),
            endpoint=ENDPOINT,
            image_size=image_size,
            preprocessing=preprocessing,
        )
        archive.write_out(temp_dir, verbose=False)
        if class_names is not None:
            _write_class_names(os.path.join(temp_dir, CLASS_NAMES_FILE), class_names)
        spec = dict(
            image_size=list(image_size),
            mean=list(mean),
            std=list(std),
            class_names=None if class_names is None else list(class_names),
            preprocessing=preprocessing,
        )
        _write_keras_artifact(os.path.join(temp_dir, KERAS_DIR), model, spec)
        _move_into_place(temp_dir, version_dir, overwrite)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    logging.info(
        "Exported SavedModel (signatures serving_default, serving_uint8 on images "
        "[N, %d, %d, 3], serving_bytes on encoded images) to %s",
        image_size[0],
        image_size[1],
        version_dir,
    )
    return version_dir


def _temp_name(version: int) -> str:
    """``.tmp-<version>-<host>-<pid>-<random>``: a name TF Serving ignores, which says
    which process writes it (see :func:`stale_temporaries`)."""
    return f".tmp-{version}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def stale_temporaries(versions_dir: str) -> list[str]:
    """The temporary version folders in ``<export_dir>/<model_name>`` that an export
    killed midway left behind: written on this host by a process that has ended.

    Folders of live processes, or of other hosts (a shared filesystem), are never
    listed: another export may be writing them.
    """
    if not os.path.isdir(versions_dir):
        return []
    host, stale = socket.gethostname(), []
    for name in os.listdir(versions_dir):
        if not name.startswith(".tmp-"):
            continue
        writer, pid, _ = name.rsplit("-", 2)
        parts = writer.split("-", 2)  # ".tmp", version, host (which may hold "-")
        if len(parts) == 3 and parts[2] == host and pid.isdigit():
            if not _process_alive(int(pid)):
                stale.append(os.path.join(versions_dir, name))
    return stale


def export_for_dataset(
    model: keras.Model,
    info,
    export_dir: str,
    model_name: str,
    version: int | None = None,
    overwrite: bool = False,
) -> str:
    """:func:`export_saved_model` with the image size, normalisation and class names of
    the data the model was trained on (a ``data.DatasetInfo`` or the
    ``run_dir.RecordedDatasetInfo`` a run directory keeps)."""
    return export_saved_model(
        model,
        export_dir,
        model_name,
        version,
        image_size=tuple(info.image_size),
        mean=info.mean,
        std=info.std,
        class_names=info.class_names,
        overwrite=overwrite,
        preprocessing=info.augmentation,
    )


def _write_keras_artifact(directory: str, model: keras.Model, spec: dict) -> None:
    """``network.weights.h5`` and ``network.json`` (see :func:`load_for_finetuning`)."""
    if not isinstance(model, tuple(networks.NETWORKS.values())):
        logging.warning(
            "%s is not a networks evaluation network: no fine-tuning artifact exported",
            type(model).__name__,
        )
        return
    os.makedirs(directory)
    model.save_weights(os.path.join(directory, KERAS_WEIGHTS))
    config = model.get_config()
    content = {
        "format": KERAS_FORMAT,
        "kind": "imagenet" if model.imagenet else "cifar",
        "network": {name: config[name] for name in _NETWORK_ARGUMENTS},
        **spec,
        "weights": KERAS_WEIGHTS,
    }
    with open(os.path.join(directory, KERAS_SPEC), "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2)
        f.write("\n")


def finetuning_spec(path: str) -> dict:
    """The ``network.json`` of an export: the network's kind and arguments, its input
    ``image_size``, ``mean`` / ``std`` and ``class_names``.

    Args:
      path: a version directory, its ``assets.extra/keras`` folder or the JSON file.
    """
    if os.path.isdir(os.path.join(path, KERAS_DIR)):
        path = os.path.join(path, KERAS_DIR)
    if os.path.isdir(path):
        path = os.path.join(path, KERAS_SPEC)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no fine-tuning artifact (exports before it existed have none; "
            "export the run again with --mode=export)"
        )
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    if spec.get("format") != KERAS_FORMAT:
        raise ValueError(f"{path}: format {spec.get('format')!r}, expected {KERAS_FORMAT}")
    spec["path"] = path
    return spec


def load_for_finetuning(path: str) -> keras.Model:
    """The exported evaluation network as a Keras model, its weights loaded, to train on.

    The network is rebuilt from ``network.json`` by ``networks.build_network`` and
    takes normalised images: ``data.normalize(pixels / 255, mean, std)`` with the
    ``mean`` and ``std`` of :func:`finetuning_spec`. It is not compiled; its
    ``compile(optimizer)`` sets the training recipe (auxiliary head, label smoothing).
    The drop path rate is a weight, exported as it was; ``network.set_drop_path_rate``
    changes it (``blocks.DropPathSchedule``).

    Args:
      path: a version directory, its ``assets.extra/keras`` folder or ``network.json``.

    Returns:
      A ``networks.NetworkCIFAR`` or ``NetworkImageNet`` with the exported weights.
    """
    spec = finetuning_spec(path)
    arguments = dict(spec["network"])
    network = networks.build_network(
        spec["kind"],
        arguments.pop("genotype"),
        arguments.pop("channels"),
        arguments.pop("num_cells"),
        arguments.pop("num_classes"),
        spec["image_size"][0],  # as the training builds it
        **arguments,
    )
    network.load_weights(os.path.join(os.path.dirname(spec["path"]), spec["weights"]))
    return network


def _check_arguments(model_name, version, image_size, mean, std, class_names):
    if (
        not model_name
        or model_name in (".", "..")
        or os.sep in model_name
        or (os.altsep and os.altsep in model_name)
    ):
        raise ValueError(f"model_name must be a plain directory name, got {model_name!r}")
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or version < 0
    ):
        raise ValueError(f"version must be a non-negative integer or None, got {version!r}")
    image_size = tuple(int(v) for v in image_size)
    if len(image_size) != 2 or min(image_size) < 1:
        raise ValueError(f"image_size must be (height, width), got {image_size}")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(
            f"mean and std need 3 values each, std positive; got mean={mean}, std={std}"
        )
    if class_names is not None and any("\n" in name for name in class_names):
        raise ValueError("class names must not contain newlines")
    return image_size


def _refuse_existing(version_dir: str) -> None:
    if os.path.exists(version_dir):
        raise FileExistsError(
            f"version directory {version_dir} already exists; pass overwrite=True "
            "(--overwrite) to replace it, or choose another version"
        )


def _write_class_names(path: str, class_names: Sequence[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(f"{name}\n" for name in class_names))


def _move_into_place(temp_dir: str, version_dir: str, overwrite: bool) -> None:
    """Renames the finished export to ``version_dir``.

    With ``overwrite``, the old version is first renamed to a hidden sibling and
    deleted only after the new one is in place (and renamed back if that fails), so the
    directory is at every moment either the old or the new version, or briefly absent.
    """
    if not os.path.exists(version_dir):
        os.rename(temp_dir, version_dir)
        return
    if not overwrite:
        _refuse_existing(version_dir)  # created by someone else while we exported
    model_dir, version = os.path.split(version_dir)
    old_dir = os.path.join(model_dir, f".old-{version}-{uuid.uuid4().hex[:8]}")
    os.rename(version_dir, old_dir)
    try:
        os.rename(temp_dir, version_dir)
    except BaseException:
        os.rename(old_dir, version_dir)
        raise
    shutil.rmtree(old_dir, ignore_errors=True)
