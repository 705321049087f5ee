"""Tests for istanas_tf.export: the served SavedModel against the in-memory network.

The oracle is the network itself, called as the training code calls it:
``network(normalize(images / 255, mean, std), training=False)``; the SavedModel is read
back in a fresh process, by ``tf.saved_model.load`` and by ``saved_model_cli``. The
uint8 and encoded-image signatures are checked against the float32 one, the request
bodies of docs/serving.md against direct calls, and the fine-tuning artifact against
the SavedModel.
"""

import base64
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from testing import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD

from istanas_tf import data, export, networks, serving
from istanas_tf.data.augment import imagenet_eval_image

IMAGE_SIZE = (32, 32)
MEAN, STD, CLASS_NAMES = CIFAR10_MEAN, CIFAR10_STD, CIFAR10_CLASSES
EXPECTED_INPUT = "images must be float32 [N, 32, 32, 3] raw 0-255 pixels"
CLI = [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
SERVING_DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "serving.md"


def _read_images(folder: pathlib.Path, classes, per_class: int) -> np.ndarray:
    """The first ``per_class`` images of each class, float32 [N, 32, 32, 3] in 0-255."""
    images = []
    for name in classes:
        for path in sorted((folder / "test" / name).glob("*.jpg"))[:per_class]:
            images.append(tf.io.decode_jpeg(tf.io.read_file(str(path)), channels=3))
    return tf.cast(tf.stack(images), tf.float32).numpy()


def _png(image) -> bytes:
    """One [H, W, 3] image of 0-255 values as PNG bytes (lossless)."""
    return tf.io.encode_png(tf.cast(image, tf.uint8)).numpy()


def _in_memory_logits(network, images, training=False) -> np.ndarray:
    return network(data.normalize(images / 255.0, MEAN, STD), training=training).numpy()


def _run(command, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def images(cifar10_folder) -> np.ndarray:
    return _read_images(cifar10_folder, ["airplane", "cat", "ship", "truck"], per_class=2)


@pytest.fixture(scope="module")
def network(cifar10_folder):
    """A small evaluation network whose BN statistics are no longer the initial 0 / 1."""
    network = networks.build_network("cifar", "ISTA_twostage", 8, 5, 10, 32)
    train = _read_images(cifar10_folder, CLASS_NAMES, per_class=2)
    for _ in range(3):
        network(data.normalize(train / 255.0, MEAN, STD), training=True)
    return network


@pytest.fixture(scope="module")
def version_dir(network, tmp_path_factory) -> str:
    export_dir = tmp_path_factory.mktemp("export")
    return export.export_saved_model(
        network,
        str(export_dir),
        "cifar_net",
        3,
        image_size=IMAGE_SIZE,
        mean=MEAN,
        std=STD,
        class_names=CLASS_NAMES,
    )


@pytest.fixture(scope="module")
def loaded(version_dir):
    return tf.saved_model.load(version_dir)


@pytest.fixture
def fake_write_out(monkeypatch):
    """Replaces the (slow) SavedModel writing by a marker file; returns the call paths."""
    calls = []

    def write_out(self, filepath, options=None, verbose=True):
        calls.append(filepath)
        pathlib.Path(filepath, "saved_model.pb").write_text("fake")

    monkeypatch.setattr(type(keras.export.ExportArchive()), "write_out", write_out)
    return calls


def _hidden(model_dir: pathlib.Path) -> list[str]:
    return [p.name for p in model_dir.iterdir() if p.name.startswith(".")]


def test_fresh_process_load_matches_in_memory_network(network, images, version_dir, tmp_path):
    np.save(tmp_path / "images.npy", images)
    script = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf
        serve = tf.saved_model.load({version_dir!r}).signatures["serving_default"]
        images = np.load({str(tmp_path / "images.npy")!r})
        outputs = {{k: v.numpy() for k, v in serve(images=tf.constant(images)).items()}}
        outputs["class_names"] = outputs["class_names"].astype(str)
        outputs["batch1_logits"] = serve(images=tf.constant(images[:1]))["logits"].numpy()
        outputs["batch5_logits"] = serve(images=tf.constant(images[:5]))["logits"].numpy()
        np.savez({str(tmp_path / "outputs.npz")!r}, **outputs)
    """)
    _run([sys.executable, "-c", script])
    outputs = np.load(tmp_path / "outputs.npz")

    expected = _in_memory_logits(network, images)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(outputs["logits"], expected, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(outputs["batch1_logits"], expected[:1], rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(outputs["batch5_logits"], expected[:5], rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(
        outputs["probabilities"], tf.nn.softmax(expected).numpy(), rtol=1e-5, atol=1e-7
    )
    assert outputs["logits"].dtype == np.float32
    assert outputs["classes"].dtype == np.int64
    np.testing.assert_array_equal(outputs["classes"], expected.argmax(-1))
    np.testing.assert_array_equal(
        outputs["class_names"], np.array(CLASS_NAMES)[expected.argmax(-1)]
    )
    # The export runs the network in inference mode: batch statistics would differ.
    # (A training call updates the BN moving statistics, hence the restore.)
    weights = network.get_weights()
    training_logits = _in_memory_logits(network, images, training=True)
    network.set_weights(weights)
    assert np.abs(training_logits - expected).max() > 1e-3 * scale


def _signature_section(shown: str, name: str) -> str:
    start = shown.index(f"signature_def['{name}']:")
    return shown[start : shown.find("signature_def[", start + 1)]


def test_saved_model_cli_show_lists_the_serving_signatures(version_dir):
    shown = _run([*CLI, "show", "--all", "--dir", version_dir]).stdout
    for name, input_name, dtype, shape in [
        ("serving_default", "images", "DT_FLOAT", r"\(-1, 32, 32, 3\)"),
        ("serving_uint8", "images", "DT_UINT8", r"\(-1, 32, 32, 3\)"),
        ("serving_bytes", "image_bytes", "DT_STRING", r"\(-1\)"),
    ]:
        signature = _signature_section(shown, name)
        assert re.search(
            rf"inputs\['{input_name}'\] tensor_info:\s+dtype: {dtype}\s+shape: {shape}", signature
        ), signature
        for output, dtype, shape in [
            ("logits", "DT_FLOAT", r"\(-1, 10\)"),
            ("probabilities", "DT_FLOAT", r"\(-1, 10\)"),
            ("classes", "DT_INT64", r"\(-1\)"),
            ("class_names", "DT_STRING", r"\(-1\)"),
        ]:
            assert re.search(
                rf"outputs\['{output}'\] tensor_info:\s+dtype: {dtype}\s+"
                rf"shape: {shape}",
                signature,
            ), (name, output, signature)
    assert pathlib.Path(version_dir, export.CLASS_NAMES_FILE).read_text().split() == list(
        CLASS_NAMES
    )


def test_saved_model_cli_run_gives_in_memory_classes(network, images, version_dir, tmp_path):
    np.save(tmp_path / "images.npy", images)
    _run(
        [
            *CLI,
            "run",
            "--dir",
            version_dir,
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
            "--inputs",
            f"images={tmp_path / 'images.npy'}",
            "--outdir",
            str(tmp_path / "out"),
        ]
    )
    expected = _in_memory_logits(network, images)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "classes.npy"), expected.argmax(-1))
    np.testing.assert_allclose(
        np.load(tmp_path / "out" / "logits.npy"),
        expected,
        rtol=1e-5,
        atol=1e-5 * np.abs(expected).max(),
    )


@pytest.mark.parametrize(
    "shape", [(2, 32, 32, 1), (2, 28, 28, 3), (32, 32, 3), (1, 2, 32, 32, 3), (2, 32, 32, 3, 1)]
)
def test_wrong_shape_fails_with_expected_input(loaded, shape):
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(EXPECTED_INPUT)):
        loaded.signatures["serving_default"](images=tf.zeros(shape, tf.float32))
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=re.escape("images must be uint8 [N, 32, 32, 3] pixels; got shape"),
    ):
        loaded.signatures["serving_uint8"](images=tf.zeros(shape, tf.uint8))


@pytest.mark.parametrize("shape", [(), (2, 1)])
def test_encoded_images_of_wrong_shape_fail_with_expected_input(loaded, shape):
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=re.escape("image_bytes must be string [N], one encoded JPEG, PNG, GIF or BMP"),
    ):
        loaded.signatures["serving_bytes"](image_bytes=tf.fill(shape, _png(np.zeros([32, 32, 3]))))


def test_undecodable_bytes_fail_naming_the_formats(loaded):
    with pytest.raises(tf.errors.InvalidArgumentError, match="Unknown image file format"):
        loaded.signatures["serving_bytes"](image_bytes=tf.constant([b"not an image"]))


@pytest.mark.parametrize(
    "signature, name, shape, dtype",
    [
        ("serving_default", "images", [0, 32, 32, 3], tf.float32),
        ("serving_uint8", "images", [0, 32, 32, 3], tf.uint8),
        ("serving_bytes", "image_bytes", [0], tf.string),
    ],
)
def test_an_empty_batch_gets_empty_outputs(loaded, signature, name, shape, dtype):
    outputs = loaded.signatures[signature](**{name: tf.zeros(shape, dtype)})
    assert outputs["logits"].shape == (0, len(CLASS_NAMES))
    assert outputs["probabilities"].shape == (0, len(CLASS_NAMES))
    assert outputs["classes"].shape == (0,)
    assert outputs["class_names"].shape == (0,)


def test_wrong_dtype_fails_naming_the_expected_dtype(loaded):
    images = tf.zeros([2, 32, 32, 3], tf.uint8)
    # The runtime checks the dtype before the graph runs, so the message is TF's own.
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="expected to be a float tensor but is a uint8 tensor"
    ):
        loaded.signatures["serving_default"](images=images)
    with pytest.raises(
        TypeError,
        match=re.escape("TensorSpec(shape=(None, 32, 32, 3), dtype=tf.float32, name='images')"),
    ):
        getattr(loaded, export.ENDPOINT)(images)


def test_version_none_picks_next_integer(network, tmp_path, fake_write_out):
    model_dir = tmp_path / "net"
    for name in ["3", "11", "notaversion"]:
        (model_dir / name).mkdir(parents=True)
    (model_dir / "40").write_text("a file, not a version")
    path = export.export_saved_model(
        network, str(tmp_path), "net", None, image_size=IMAGE_SIZE, mean=MEAN, std=STD
    )
    assert path == str(model_dir / "12")
    assert (model_dir / "12" / "saved_model.pb").is_file()
    # Made with the process umask, like any directory (not a private temp dir's 0700).
    assert (model_dir / "12").stat().st_mode == (model_dir / "3").stat().st_mode
    assert _hidden(model_dir) == []
    assert export.next_version(str(tmp_path / "new")) == 1


def test_failure_mid_export_leaves_no_directory(network, tmp_path, monkeypatch):
    def failing_write_out(self, filepath, options=None, verbose=True):
        pathlib.Path(filepath, "saved_model.pb").write_text("half written")
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(keras.export.ExportArchive()), "write_out", failing_write_out)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_saved_model(
            network, str(tmp_path), "net", 1, image_size=IMAGE_SIZE, mean=MEAN, std=STD
        )
    assert list((tmp_path / "net").iterdir()) == []

    # With overwrite, a failed export keeps the old version as it was.
    (tmp_path / "net" / "1").mkdir()
    (tmp_path / "net" / "1" / "old").write_text("old version")
    with pytest.raises(RuntimeError, match="disk full"):
        _overwrite_version_1(network, tmp_path)
    assert [p.name for p in (tmp_path / "net").iterdir()] == ["1"]
    assert [p.name for p in (tmp_path / "net" / "1").iterdir()] == ["old"]


def _overwrite_version_1(network, tmp_path):
    """Exports ``network`` over version 1 of ``tmp_path/net``."""
    return export.export_saved_model(
        network, str(tmp_path), "net", 1, image_size=IMAGE_SIZE, mean=MEAN, std=STD, overwrite=True
    )


def test_existing_version_refused_unless_overwrite(network, tmp_path, fake_write_out):
    version_dir = tmp_path / "net" / "2"
    version_dir.mkdir(parents=True)
    (version_dir / "old").write_text("old version")
    refusal = re.escape(str(version_dir)) + ".*--overwrite"
    with pytest.raises(FileExistsError, match=refusal):
        export.export_saved_model(
            network, str(tmp_path), "net", 2, image_size=IMAGE_SIZE, mean=MEAN, std=STD
        )
    assert fake_write_out == []  # refused before any work
    assert [p.name for p in version_dir.iterdir()] == ["old"]

    path = export.export_saved_model(
        network, str(tmp_path), "net", 2, image_size=IMAGE_SIZE, mean=MEAN, std=STD, overwrite=True
    )
    assert path == str(version_dir)
    assert sorted(p.name for p in version_dir.iterdir()) == ["assets.extra", "saved_model.pb"]
    assert _hidden(tmp_path / "net") == []


def test_overwrite_restores_old_version_when_rename_fails(
    network, tmp_path, fake_write_out, monkeypatch
):
    version_dir = tmp_path / "net" / "1"
    version_dir.mkdir(parents=True)
    (version_dir / "old").write_text("old version")
    rename = os.rename

    def failing_rename(src, dst):
        if os.path.basename(src).startswith(".tmp-"):
            raise OSError("rename failed")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="rename failed"):
        _overwrite_version_1(network, tmp_path)
    assert [p.name for p in (tmp_path / "net").iterdir()] == ["1"]
    assert [p.name for p in version_dir.iterdir()] == ["old"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(version=-1), "non-negative integer"),
        (dict(model_name="a/b"), "plain directory name"),
        (dict(std=(0.2, 0.0, 0.2)), "std positive"),
        (dict(class_names=("a", "b")), "2 class names given for a model with 10 classes"),
    ],
)
def test_invalid_arguments(network, tmp_path, fake_write_out, kwargs, message):
    arguments = dict(model_name="net", version=1, image_size=IMAGE_SIZE, mean=MEAN, std=STD)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        export.export_saved_model(network, str(tmp_path), **arguments)
    assert not (tmp_path / "net" / "1").exists()


def _three_signatures(loaded, images: np.ndarray) -> list[dict]:
    """The outputs of float32, uint8 and PNG-encoded ``images`` through the signatures."""
    return [
        loaded.signatures["serving_default"](images=tf.constant(images)),
        loaded.signatures["serving_uint8"](images=tf.constant(images.astype(np.uint8))),
        loaded.signatures["serving_bytes"](image_bytes=tf.constant([_png(i) for i in images])),
    ]


def test_the_three_signatures_agree(network, images, loaded):
    default, uint8, encoded = _three_signatures(loaded, images)
    expected = _in_memory_logits(network, images)
    np.testing.assert_allclose(
        default["logits"].numpy(), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max()
    )
    for outputs in (uint8, encoded):
        assert sorted(outputs) == sorted(default)
        for name in default:
            np.testing.assert_array_equal(outputs[name].numpy(), default[name].numpy(), name)


def test_encoded_images_of_another_size_are_resized(loaded, images):
    # CIFAR-style: an image of another size is resized to 32 x 32 (antialiased
    # bilinear), one of the right size is used as decoded (the test above).
    large = tf.image.resize(images[:2], [48, 40], antialias=True).numpy().round()
    resized = tf.image.resize(large.astype(np.uint8), [32, 32], antialias=True)
    encoded = loaded.signatures["serving_bytes"](image_bytes=tf.constant([_png(i) for i in large]))
    direct = loaded.signatures["serving_default"](images=tf.clip_by_value(resized, 0.0, 255.0))
    np.testing.assert_allclose(encoded["logits"], direct["logits"], rtol=1e-5, atol=1e-5)


def test_imagenet_preprocessing_is_the_evaluation_pipelines(images):
    # A 300 x 260 PNG: shorter side to 256, centre crop 224, as evaluation images.
    large = tf.image.resize(images[:1], [300, 260]).numpy()[0].round()
    decoded = serving.decode_image(tf.constant(_png(large)), (224, 224), "imagenet")
    expected = imagenet_eval_image(tf.constant(_png(large))) * 255.0
    assert decoded.shape == (224, 224, 3)
    np.testing.assert_array_equal(decoded.numpy(), expected.numpy())
    with pytest.raises(ValueError, match="crops 224x224 images"):
        serving.check_preprocessing("imagenet", (32, 32))


def _code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", SERVING_DOC.read_text(), re.M | re.S)


def _as_tf_serving_decodes(body: dict, signature) -> dict:
    """The tensors TF Serving feeds ``signature`` for a row-format JSON ``body``:
    ``{"b64": ...}`` values base64-decoded, each named input stacked over the instances."""
    body = json.loads(json.dumps(body))  # what travels is JSON

    def decode(value):
        if isinstance(value, dict):
            assert list(value) == ["b64"], value
            return base64.b64decode(value["b64"])
        return [decode(v) for v in value] if isinstance(value, list) else value

    specs = signature.structured_input_signature[1]
    instances = body["instances"]
    assert all(sorted(instance) == sorted(specs) for instance in instances), instances
    return {
        name: tf.constant([decode(instance[name]) for instance in instances], spec.dtype)
        for name, spec in specs.items()
    }


def test_documented_json_request_gets_the_direct_answer(loaded):
    (request,) = _code_blocks("json")
    body = json.loads(request)
    signature = loaded.signatures[body["signature_name"]]
    served = signature(**_as_tf_serving_decodes(body, signature))
    # The direct call: the PNG decoded and resized here, through the float32 signature.
    png = base64.b64decode(body["instances"][0]["image_bytes"]["b64"])
    pixels = tf.image.resize(
        tf.io.decode_png(png, channels=3)[tf.newaxis], [32, 32], antialias=True
    )
    direct = loaded.signatures["serving_default"](images=tf.clip_by_value(pixels, 0.0, 255.0))
    assert body["signature_name"] == "serving_bytes"
    np.testing.assert_allclose(served["logits"], direct["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(served["class_names"], direct["class_names"])


@pytest.mark.parametrize("signature_name", ["serving_default", "serving_uint8", "serving_bytes"])
def test_documented_request_builder_gets_the_direct_answer(
    loaded, images, tmp_path, signature_name
):
    (builder,) = [code for code in _code_blocks("python") if "def predict_request" in code]
    namespace = {}
    exec(builder, namespace)  # noqa: S102 - the documentation's own code
    paths = []
    for i, image in enumerate(images[:3]):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(_png(image))
    body = namespace["predict_request"]([str(p) for p in paths], signature_name)
    assert body["signature_name"] == signature_name
    signature = loaded.signatures[signature_name]
    served = signature(**_as_tf_serving_decodes(body, signature))
    direct = loaded.signatures["serving_default"](images=tf.constant(images[:3]))
    for name in direct:
        np.testing.assert_array_equal(served[name].numpy(), direct[name].numpy(), name)


def test_finetuning_network_matches_the_saved_model_and_trains(loaded, version_dir, images):
    network = export.load_for_finetuning(version_dir)
    spec = export.finetuning_spec(version_dir)
    assert spec["image_size"] == [32, 32] and spec["class_names"] == list(CLASS_NAMES)
    assert spec["preprocessing"] == "cifar"
    normalised = data.normalize(images / 255.0, spec["mean"], spec["std"])
    served = loaded.signatures["serving_default"](images=tf.constant(images))["logits"]
    rebuilt = network(normalised, training=False).numpy()
    np.testing.assert_allclose(rebuilt, served, rtol=1e-5, atol=1e-5 * np.abs(rebuilt).max())

    network.compile(keras.optimizers.SGD(0.1))
    before = [w.numpy() for w in network.trainable_weights]
    # As docs/serving.md: fit on (images, labels) batches (the network's train_step
    # takes pairs, so not train_on_batch, which adds sample weights).
    labels = tf.range(len(images)) % 10
    network.fit(tf.data.Dataset.from_tensors((normalised, labels)), shuffle=False, verbose=0)
    changed = [not np.array_equal(b, w.numpy()) for b, w in zip(before, network.trainable_weights)]
    assert all(changed), sum(changed)


def test_finetuning_artifact_keeps_the_auxiliary_head(tmp_path, fake_write_out):
    network = networks.build_network(
        "cifar", "ISTA_twostage", 8, 5, 10, 32, auxiliary=True, drop_path_rate=0.2
    )
    path = export.export_saved_model(
        network, str(tmp_path), "net", 1, image_size=IMAGE_SIZE, mean=MEAN, std=STD
    )
    rebuilt = export.load_for_finetuning(os.path.join(path, export.KERAS_DIR))
    assert rebuilt.auxiliary_head is not None
    assert float(rebuilt.drop_path_rate.numpy()) == pytest.approx(0.2)
    assert len(rebuilt.weights) == len(network.weights)
    for original, loaded_weight in zip(network.weights, rebuilt.weights):
        np.testing.assert_array_equal(original.numpy(), loaded_weight.numpy(), original.path)


def test_finetuning_spec_of_an_export_without_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="no fine-tuning artifact"):
        export.finetuning_spec(str(tmp_path))
