"""The HTTP API of `mnist-cnn serve`, through FastAPI's TestClient: good requests give the
documented JSON, hostile ones a 4xx with {"error": ...}, never a 5xx, and the app keeps
answering afterwards."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, cli, require_module, user_png

require_module("fastapi")  # required: in CI its absence fails, not skips
from fastapi.testclient import TestClient  # noqa: E402

from mnist_cnn import __version__, runs  # noqa: E402
from mnist_cnn.preprocess import preprocess_file  # noqa: E402
from mnist_cnn.serve.app import ServeSettings, create_app, load_models  # noqa: E402

KEYS = {"label", "name", "probability", "probabilities", "top", "model"}  # required
ANSWER_KEYS = KEYS | {"unsure", "min_confidence"}


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png() -> bytes:
    """A valid PNG header announcing 100,000 x 100,000 pixels (10 gigapixels) in 100 bytes."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + png_chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def model_dirs(shipped_model, tmp_path_factory) -> list[Path]:
    """Two folders holding the shipped model, named 'digits' and 'other'."""
    root = tmp_path_factory.mktemp("serve-models")
    folders = []
    for name in ("digits", "other"):
        folder = root / name
        folder.mkdir()
        for file in (runs.MODEL_FILE, runs.MODEL_INFO_FILE, runs.CONFIG_FILE):
            if (shipped_model / file).is_file():
                shutil.copy(shipped_model / file, folder / file)
        folders.append(folder)
    return folders


@pytest.fixture(scope="module")
def models(model_dirs):
    return load_models(ServeSettings(model_paths=tuple(model_dirs), device="cpu"))


@pytest.fixture(scope="module")
def client(models, model_dirs):
    return TestClient(create_app(ServeSettings(model_paths=tuple(model_dirs), device="cpu",
                                               max_body_bytes=2_000_000, max_batch_files=8),
                                 models=models))


@pytest.fixture(scope="module")
def digits(mnist):
    images, labels = mnist["test"]
    return images[:24], labels[:24]


def post_image(client, data: bytes, *, content_type="image/png", query=""):
    return client.post(f"/api/predict{query}", content=data, headers={"content-type": content_type})


def counter(text: str, name: str, **labels) -> float:
    """A sample's value in Prometheus text format (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            return float(match.group(2))
    return 0.0


def test_predict_multipart_matches_the_cli_path(client, models, digits):
    images, labels = digits
    correct = 0
    for digit, label in zip(images, labels):
        data = user_png(digit)
        response = client.post("/api/predict", files={"file": ("digit.png", data, "image/png")})
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == ANSWER_KEYS
        assert body["unsure"] == (body["probability"] < body["min_confidence"])
        # Exactly what `mnist-cnn predict` computes: the same preprocessing, the same model.
        expected = models[0].predictor.probabilities(preprocess_file(data)[None])[0]
        np.testing.assert_allclose(body["probabilities"], expected, rtol=1e-5, atol=1e-6)
        assert body["label"] == int(np.argmax(expected)) and body["name"] == str(body["label"])
        assert body["probability"] == pytest.approx(max(body["probabilities"]))
        assert sum(body["probabilities"]) == pytest.approx(1, abs=1e-4)
        assert [t["probability"] for t in body["top"]] == sorted((t["probability"] for t in body["top"]), reverse=True)
        assert body["top"][0]["label"] == body["label"] and len(body["top"]) == 3
        assert body["model"] == "digits"
        correct += body["label"] == int(label)
    assert correct >= 22, f"{correct}/24 user-style digits read correctly"


def test_the_api_answers_with_the_record_predict_json_prints(client, model_dirs, digits, tmp_path):
    # One prediction record, built in one place: the server's answer is `predict --json`'s
    # line without the path, with the model's name.
    image = tmp_path / "digit.png"
    image.write_bytes(user_png(digits[0][3]))
    printed = cli("predict", str(image), "--json", "--model", str(model_dirs[0]), "--device", "cpu")
    assert printed.returncode == 0, printed.stderr
    line = json.loads(printed.stdout)
    body = client.post("/api/predict", files={"file": ("digit.png", image.read_bytes(), "image/png")}).json()
    assert line.pop("path") == str(image) and body.pop("model") == "digits"
    assert list(body) == list(line)  # the same keys, in the same order
    # The same numbers up to float rounding (the server may run on fewer torch threads).
    np.testing.assert_allclose(body["probabilities"], line["probabilities"], rtol=1e-5, atol=1e-7)
    assert (body["label"], body["name"], body["unsure"], body["min_confidence"]) == \
        (line["label"], line["name"], line["unsure"], line["min_confidence"])
    assert [t["label"] for t in body["top"]] == [t["label"] for t in line["top"]]


def test_raw_body_jpeg_and_preprocessed_image(client, digits):
    digit = digits[0][0]
    multipart = client.post("/api/predict", files={"file": ("d.png", user_png(digit), "image/png")}).json()
    raw = post_image(client, user_png(digit), query="?preprocessed=1").json()
    assert raw["probabilities"] == multipart["probabilities"]
    seen = Image.open(io.BytesIO(base64.b64decode(raw["preprocessed"])))
    assert seen.format == "PNG" and seen.size == (28, 28) and seen.mode == "L"
    np.testing.assert_array_equal(np.asarray(seen), preprocess_file(user_png(digit)))
    assert "preprocessed" not in multipart
    jpeg = post_image(client, user_png(digit, fmt="JPEG", mode="RGB"), content_type="image/jpeg")
    assert jpeg.status_code == 200 and jpeg.json()["label"] == int(digits[1][0])


def animated_gif() -> bytes:
    frames = [Image.new("L", (64, 64), 255), Image.new("L", (64, 64), 0)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def hostile_cases(digit: np.ndarray):
    png = user_png(digit)
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="28" height="28"><path d="M14 2v24"/></svg>'
    sixteen = Image.fromarray(np.asarray(Image.open(io.BytesIO(png))).astype(np.uint16) * 257)
    cmyk = Image.open(io.BytesIO(png)).convert("CMYK")
    multipart = lambda name, data: {"files": {"file": (name, data, "image/png")}}  # noqa: E731
    raw = lambda data, kind="image/png": {"content": data, "headers": {"content-type": kind}}  # noqa: E731
    return {
        # name: (request keyword arguments, status, a fragment of the error)
        "empty body": (raw(b""), 422, "empty"),
        "empty file": (multipart("x.png", b""), 422, "empty"),
        "not an image": (raw(b"hello, world" * 10), 422, "not an image"),
        "truncated PNG": (raw(png[: len(png) // 2]), 422, "broken image"),
        "decompression bomb": (raw(bomb_png()), 422, "pixels"),
        "animated GIF": (raw(animated_gif(), "image/gif"), 422, "animated"),
        "16-bit PNG": (raw(encoded(sixteen)), 422, "16-bit"),
        "CMYK JPEG": (raw(encoded(cmyk, "JPEG"), "image/jpeg"), 422, "CMYK"),
        "SVG named .png": (multipart("digit.png", svg), 422, "SVG files are not supported"),
        "blank page": (raw(encoded(Image.new("L", (200, 200), 255))), 422, "no digit found"),
        "text/plain": (raw(png, "text/plain"), 415, "content type"),
        "application/json": (raw(b'{"path": "/etc/passwd"}', "application/json"), 415, "content type"),
        "no content type": ({"content": png}, 415, "content type"),
        "multipart without 'file'": ({"files": {"image": ("x.png", png, "image/png")}}, 422, "'file'"),
        "two files": ({"files": [("file", ("a.png", png, "image/png")), ("file", ("b.png", png, "image/png"))]},
                      422, "batch"),
        "multipart without boundary": (raw(b"--x\r\n\r\n", "multipart/form-data"), 422, "multipart"),
        "body over the limit": (raw(b"\x89PNG" + b"\0" * 2_100_000), 413, "limit"),
    }


@pytest.mark.parametrize("case", list(hostile_cases(np.zeros((28, 28), np.uint8))))
def test_hostile_uploads_are_refused_with_one_line(client, digits, case):
    request, status, fragment = hostile_cases(digits[0][0])[case]
    response = client.post("/api/predict", **request)
    assert response.status_code == status, (case, response.text)
    body = response.json()
    assert set(body) == {"error"} and fragment in body["error"], (case, body)
    assert "\n" not in body["error"] and "Traceback" not in response.text
    assert client.get("/api/health").json()["status"] == "ok"  # still answering


def test_bad_parameters_and_routes(client, digits):
    png = user_png(digits[0][0])
    unknown = post_image(client, png, query="?model=../../etc/passwd")
    assert unknown.status_code == 404 and "unknown model" in unknown.json()["error"]
    assert "digits" in unknown.json()["error"]
    bad_flag = post_image(client, png, query="?preprocessed=perhaps")
    assert bad_flag.status_code == 422 and "preprocessed" in bad_flag.json()["error"]
    missing = client.get("/static/../../../../etc/passwd")
    assert missing.status_code == 404 and set(missing.json()) == {"error"}
    wrong_method = client.get("/api/predict")
    assert wrong_method.status_code == 405 and set(wrong_method.json()) == {"error"}
    chosen = post_image(client, png, query="?model=other")
    assert chosen.status_code == 200 and chosen.json()["model"] == "other"


def test_body_over_the_limit_without_content_length(client):
    def chunks():  # chunked: no Content-Length, so the limit is checked on the bytes received
        for _ in range(30):
            yield b"\0" * 100_000

    response = client.post("/api/predict", content=chunks(), headers={"content-type": "image/png"})
    assert response.status_code == 413 and "limit" in response.json()["error"]
    # (that it answers before the whole body arrived is tested on a real socket in test_serve_browser)


def test_batch_reports_each_file_in_order(client, digits):
    images, labels = digits
    files = [("files", (f"{i}.png", user_png(images[i]), "image/png")) for i in range(3)]
    files.insert(1, ("files", ("broken.png", b"not an image", "image/png")))
    response = client.post("/api/predict/batch?preprocessed=1", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "digits"
    results = body["results"]
    assert [r["filename"] for r in results] == ["0.png", "broken.png", "1.png", "2.png"]
    assert set(results[1]) == {"filename", "error"} and "not an image" in results[1]["error"]
    for result, label in zip([results[0], *results[2:]], labels[:3]):
        assert KEYS <= set(result) and result["label"] == int(label)
        assert Image.open(io.BytesIO(base64.b64decode(result["preprocessed"]))).size == (28, 28)
    for count in (9, 30):
        files = [("files", (f"{i}.png", b"x", "image/png")) for i in range(count)]
        too_many = client.post("/api/predict/batch", files=files)
        assert too_many.status_code == 422 and "at most 8" in too_many.json()["error"]
    assert client.post("/api/predict/batch", files={"other": ("a.png", b"x", "image/png")}).status_code == 422
    raw = client.post("/api/predict/batch", content=b"x", headers={"content-type": "image/png"})
    assert raw.status_code == 415 and set(raw.json()) == {"error"}


def test_health_and_models(client, models, model_dirs, shipped_model):
    assert client.get("/api/health").json() == {"status": "ok", "version": __version__,
                                                "models": ["digits", "other"]}
    response = client.get("/api/models")
    body = response.json()
    assert body["default"] == "digits" and [m["name"] for m in body["models"]] == ["digits", "other"]
    info = body["models"][0]
    model = models[0].predictor.model
    assert info["architecture"] == "bn" and info["dataset"] == "mnist" and info["backend"] == "torch"
    assert info["parameters"] == sum(p.numel() for p in model.parameters()) == 171506
    assert info["classes"] == [str(d) for d in range(10)]
    document = json.loads((shipped_model / runs.MODEL_INFO_FILE).read_text())
    assert {k: info["recipe"][k] for k in ("preset", "epochs", "lr")} == {k: document["config"][k] for k in ("preset", "epochs", "lr")}
    recorded = document["metrics"]["test_accuracy"]
    assert info["test_accuracy"] == pytest.approx(recorded) and 0.97 < info["test_accuracy"] <= 1
    assert str(model_dirs[0].parent) not in response.text  # no server path is ever shown


def test_metrics_count_requests_and_inference(client, digits):
    before = client.get("/metrics").text
    png = user_png(digits[0][0])
    for _ in range(3):
        assert post_image(client, png).status_code == 200
    assert post_image(client, b"junk").status_code == 422
    after = client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    ok = dict(route="/api/predict", method="POST", status="200")
    refused = dict(route="/api/predict", method="POST", status="422")
    assert counter(text, "mnist_cnn_http_requests_total", **ok) == counter(before, "mnist_cnn_http_requests_total", **ok) + 3
    assert counter(text, "mnist_cnn_http_requests_total", **refused) == counter(before, "mnist_cnn_http_requests_total", **refused) + 1
    inference = counter(text, "mnist_cnn_inference_seconds_count", model="digits")
    assert inference == counter(before, "mnist_cnn_inference_seconds_count", model="digits") + 3
    latency = counter(text, "mnist_cnn_http_request_duration_seconds_count", route="/api/predict")
    assert latency >= counter(before, "mnist_cnn_http_request_duration_seconds_count", route="/api/predict") + 4


def test_docs_and_page_are_served_locally(client):
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui-bundle.js" in docs.text
    assert not re.search(r"https?://", docs.text), "the docs page refers to another host"
    for asset in re.findall(r'(?:src|href)="(/docs-assets/[^"]+)"', docs.text):
        assert client.get(asset).status_code == 200, asset
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/api/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/*"} <= set(body)
    assert set(schema["components"]["schemas"]["PredictResponse"]["required"]) == KEYS
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/style.css"):
        text = client.get(asset).text
        assert text and not re.search(r"https?://", text), asset
    assert not re.search(r"(src|href)=\"https?://", page.text)


def test_cors_is_off_unless_asked(models, model_dirs, digits):
    origin = {"origin": "https://elsewhere.example"}
    plain = TestClient(create_app(ServeSettings(model_paths=tuple(model_dirs)), models=models))
    assert "access-control-allow-origin" not in plain.get("/api/health", headers=origin).headers
    allowed = TestClient(create_app(ServeSettings(model_paths=tuple(model_dirs),
                                                  cors_origins=("https://elsewhere.example",)), models=models))
    assert allowed.get("/api/health", headers=origin).headers["access-control-allow-origin"] == "https://elsewhere.example"


def test_each_app_has_its_own_state_and_models_are_named_by_folder(models, model_dirs, digits, tmp_path):
    from mnist_cnn.serve.app import model_name

    first, second = (TestClient(create_app(ServeSettings(), models=models)) for _ in range(2))
    assert post_image(first, user_png(digits[0][0])).status_code == 200
    ok = dict(route="/api/predict", method="POST", status="200")
    assert counter(first.get("/metrics").text, "mnist_cnn_http_requests_total", **ok) == 1
    assert counter(second.get("/metrics").text, "mnist_cnn_http_requests_total", **ok) == 0
    assert model_name(model_dirs[0]) == model_name(model_dirs[0] / runs.MODEL_FILE) == "digits"
    assert model_name(tmp_path / "tutorial_weights.pt") == "tutorial_weights"


def test_an_internal_failure_is_one_line_and_the_app_survives(models, model_dirs, digits):
    class Broken:
        classes = models[0].predictor.classes

        def probabilities(self, digits):
            raise RuntimeError("secret internal detail")

    from mnist_cnn.serve.app import ServedModel

    broken = [ServedModel(name="broken", predictor=Broken(), info=models[0].info), models[0]]
    client = TestClient(create_app(ServeSettings(), models=broken), raise_server_exceptions=False)
    response = post_image(client, user_png(digits[0][0]))
    assert response.status_code == 500 and set(response.json()) == {"error"}
    assert "secret" not in response.text and "Traceback" not in response.text
    assert post_image(client, user_png(digits[0][0]), query="?model=digits").status_code == 200


def test_onnxruntime_backend_agrees_with_torch(client, model_dirs, tmp_path, digits):
    require_module("onnxruntime")
    from mnist_cnn.export import export_model

    folder = tmp_path / "exported"
    shutil.copytree(model_dirs[0], folder)
    export_model(folder, format="onnx")
    settings = ServeSettings(model_paths=(folder,), backend="onnxruntime")
    onnx = TestClient(create_app(settings))
    info = onnx.get("/api/models").json()["models"][0]
    assert info["backend"] == "onnxruntime" and info["architecture"] == "bn" and info["classes"][7] == "7"
    for digit in digits[0][:4]:
        ours, theirs = (post_image(c, user_png(digit)).json() for c in (onnx, client))
        assert ours["label"] == theirs["label"]
        np.testing.assert_allclose(ours["probabilities"], theirs["probabilities"], atol=1e-5)


def test_serve_command_errors_are_one_line(tmp_path):
    assert_one_line_error(cli("serve", "--model", str(tmp_path / "missing")), "missing")
    assert_one_line_error(cli("serve", "--port", "70000"), "port")
