"""The HTTP scoring service: in-process (FastAPI's TestClient) and one real uvicorn in a subprocess."""

import base64
import io
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import joblib
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

import skpatchcore  # noqa: E402
from skpatchcore.serve import create_app, default_workers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(category):
    return sorted(str(p) for p in (category / "test").glob("*/*.png"))


@pytest.fixture(scope="module")
def model(model_path):
    return skpatchcore.load(model_path)


@pytest.fixture(scope="module")
def client(model_path):
    return TestClient(create_app(model_path, workers=2, threads=1, max_images=4, max_request_bytes=300_000))


def upload(paths):
    return [("files", (Path(p).name, Path(p).read_bytes(), "image/png")) for p in paths]


def test_health_and_model_describe_the_served_model(client, model):
    assert client.get("/health").status_code == 200
    info = client.get("/model").json()
    detector = model.steps[-1][1]
    assert info["backbone"] == "resnet18" and info["layers"] == ["layer2", "layer3"]
    assert info["recipe"] == "recommended" and info["input_size"] == [64, 64]
    assert info["threshold"] == pytest.approx(-detector.offset_)
    assert info["model_format_version"] == skpatchcore.io.versioning.MODEL_FORMAT_VERSION
    assert info["file_format_version"] == skpatchcore.io.model_file.FILE_FORMAT_VERSION
    assert info["max_images"] == 4 and info["workers"] == 2 and info["threads"] == 1


def test_openapi_page_documents_the_contract(client):
    schema = client.get("/openapi.json").json()
    assert {"/score", "/health", "/model"} <= set(schema["paths"])
    body = schema["paths"]["/score"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert "files" in str(client.get("/openapi.json").text) and body
    assert client.get("/docs").status_code == 200


def test_score_returns_the_models_results_in_upload_order(client, model, images):
    chosen = [images[3], images[0], images[4]]
    response = client.post("/score", files=upload(chosen))
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["filename"] for r in results] == [Path(p).name for p in chosen]
    scores = model.score_samples(chosen)
    np.testing.assert_allclose([r["anomaly_score"] for r in results], -scores, rtol=1e-6)
    assert [r["anomalous"] for r in results] == list(model.predict(chosen) == -1)
    np.testing.assert_allclose([r["p_value"] for r in results], model.pvalues(chosen))
    np.testing.assert_allclose([r["decision"] for r in results], model.decision_function(chosen), rtol=1e-6)
    assert "anomaly_map_png" not in results[0]


def test_score_with_maps_returns_the_anomaly_map_as_a_png(client, model, images):
    response = client.post("/score", params={"maps": "true"}, files=upload(images[-1:]))
    result = response.json()["results"][0]
    grey = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["anomaly_map_png"]))))
    _, maps = model.score_and_maps(images[-1:])
    low, high = client.get("/model").json()["anomaly_map_range"]
    assert grey.shape == (64, 64) and grey.dtype == np.uint8
    expected = np.rint(np.clip((maps[0] - low) / (high - low), 0, 1) * 255)
    assert np.abs(grey.astype(float) - expected).max() <= 1


def png_bytes(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name, data, expected", [
    ("notes.txt", b"not an image at all", "Cannot read image notes.txt: not an image"),
    ("empty.png", b"", "Cannot read image empty.png"),
    ("cut.png", None, "Cannot read image cut.png: image file is truncated"),
])
def test_unreadable_uploads_get_a_422_naming_the_file_and_the_service_goes_on(client, images, name, data,
                                                                              expected):
    if data is None:
        whole = png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        data = whole[: len(whole) // 2]
    files = upload(images[:1]) + [("files", (name, data, "image/png"))]
    response = client.post("/score", files=files)
    assert response.status_code == 422
    assert expected in response.json()["detail"] and images[0] not in response.json()["detail"]
    assert client.post("/score", files=upload(images[:1])).status_code == 200


def test_decompression_bombs_are_refused_before_decoding(client, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 700)
    data = png_bytes(np.zeros((40, 40), dtype=np.uint8))  # 1,600 pixels: PIL's own refusal (over twice the limit)
    response = client.post("/score", files=[("files", ("bomb.png", data, "image/png"))])
    assert response.status_code == 422
    assert "bomb.png" in response.json()["detail"] and "MAX_IMAGE_PIXELS = 700" in response.json()["detail"]


def test_too_many_images_and_too_large_requests_get_413(client, images):
    response = client.post("/score", files=upload(images[:5]))
    assert response.status_code == 413 and "Too many images: 5 uploaded, at most 4" in response.json()["detail"]
    big = [("files", ("big.png", b"\0" * 400_000, "image/png"))]
    response = client.post("/score", files=big)
    assert response.status_code == 413 and "Request body too large" in response.json()["detail"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b"x" * 10_000

    response = client.post("/score", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413 and "more than 300000 bytes sent" in response.json()["detail"]
    assert client.post("/score", files=upload(images[:1])).status_code == 200


def test_a_request_without_files_gets_a_422_naming_the_field(client):
    response = client.post("/score", data={"image": "x"})
    assert response.status_code == 422 and "files" in str(response.json()["detail"])


def test_the_service_loads_only_the_safe_format(model, tmp_path):
    pickled = tmp_path / "model.joblib"
    joblib.dump(model, pickled)
    with pytest.raises(ValueError, match="pickle.*never loads one"):
        create_app(pickled)
    with pytest.raises(ValueError, match="not a fitted PatchCore image pipeline"):
        create_app(skpatchcore.PatchCoreDetector())
    with pytest.raises(ValueError, match="max_images must be a positive integer"):
        create_app(model, max_images=0)


def test_concurrent_requests_each_get_their_own_results(model_path, model, images):
    client = TestClient(create_app(model_path, workers=4, threads=1))
    expected = dict(zip(images, -model.score_samples(images)))
    barrier = threading.Barrier(8)

    def post(path):
        barrier.wait(timeout=60)
        result = client.post("/score", files=upload([path])).json()["results"][0]
        return path, result

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(post, [images[i % len(images)] for i in range(8)]))
    for path, result in outcomes:
        assert result["filename"] == Path(path).name
        assert result["anomaly_score"] == pytest.approx(expected[path], rel=1e-6)


def test_default_workers_fill_the_cores():
    assert default_workers(1) == (1, 1)
    assert default_workers(2) == (2, 1)
    assert default_workers(16) == (4, 4)


def test_skpatchcore_serve_runs_uvicorn_on_a_free_port(model_path, model, images):
    environment = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "skpatchcore", "serve", str(model_path), "--host", "127.0.0.1",
               "--port", "0", "--workers", "2", "--threads", "1", "--max-images", "2"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
    try:
        lines = []
        while not (lines and lines[-1].startswith("Serving ")):  # after uvicorn's own log lines
            lines.append(server.stdout.readline())
            assert lines[-1] or server.poll() is None, "".join(lines)
        url = lines[-1].split(" on ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        response = httpx.post(f"{url}/score", files=upload(images[:2]), timeout=120)
        assert response.status_code == 200
        got = [r["anomaly_score"] for r in response.json()["results"]]
        np.testing.assert_allclose(got, -model.score_samples(images[:2]), rtol=1e-6)
        bad = httpx.post(f"{url}/score", files=upload(images[:3]), timeout=120)
        assert bad.status_code == 413
        assert httpx.post(f"{url}/score", files=upload(images[2:3]), timeout=120).status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=60)
