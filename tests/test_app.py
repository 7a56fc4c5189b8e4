"""The web app: a real browser, the `/predict` API, bad inputs, the batch CSV, and the Space's app.py without hf_histo."""

import csv
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image
from tiny_models import tiny_model, tissue_image

import hf_histo
from hf_histo.app import EXPLAIN_SIDE, NO_EXPLANATION, AppModel, classify, describe, predict_many, serve
from hf_histo.data.patching import PatchingConfig
from hf_histo.data.stain import TORCHSTAIN_REQUIREMENT
from hf_histo.hub import save_for_hub
from hf_histo.hub.folder import SPACE_REQUIREMENTS, TIMM_REQUIREMENT, write_space_files
from hf_histo.inference.loading import load_pipeline
from hf_histo.models import HistoClassifierConfig, tiny_backbone_config

pytestmark = pytest.mark.filterwarnings("ignore:::gradio.queueing")  # gradio's own pandas 3 deprecations

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-6


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny ViT model folder written by save_for_hub, two generated images, a mask and bad inputs."""
    root = tmp_path_factory.mktemp("app")
    save_for_hub(tiny_model(), root / "model", image_processor=32)
    paths = {"model": root / "model"}
    for name, seed in (("a", 0), ("b", 1)):
        paths[name] = root / f"{name}.png"
        Image.fromarray(tissue_image(160, seed)).save(paths[name])
    mask = np.zeros((160, 160), dtype=np.uint8)
    mask[40:130, 30:120] = 255
    paths["mask"] = root / "masks" / "a.png"  # named like its image, for the batch tab
    paths["mask"].parent.mkdir()
    Image.fromarray(mask).save(paths["mask"])
    paths["small_mask"] = root / "small_mask.png"
    Image.fromarray(mask[:100, :100]).save(paths["small_mask"])
    paths["not_image"] = root / "notes.png"
    paths["not_image"].write_text("these are notes, not pixels")
    paths["huge"] = root / "huge.png"
    paths["huge"].write_bytes(_png_header_only(30_000, 30_000))
    return paths


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` pixels (past PIL's decompression-bomb limit) in a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 9)) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def pipe(files):
    return load_pipeline(files["model"])


def expected(pipe, image, mask=None, **options) -> dict[str, float]:
    """The pipeline's label probabilities of an image: what the app must show."""
    return {s["label"]: s["score"] for s in pipe(str(image), mask=mask and str(mask), top_k=100, **options)}


@pytest.fixture(scope="module")
def server(files):
    demo = serve(files["model"], port=None, block=False)
    yield demo.local_url
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server, verbose=False)


def confidences(label_value: dict) -> dict[str, float]:
    return {c["label"]: c["confidence"] for c in label_value["confidences"]}


# ---- the API endpoint -----------------------------------------------------------------------------------------------
def test_predict_endpoint_returns_the_pipeline_label(client, files, pipe):
    want = expected(pipe, files["a"])
    got = client.predict(handle_file(str(files["a"])), None, api_name="/predict")
    assert got["label"] == max(want, key=want.get)
    assert confidences(got) == pytest.approx(want, abs=TOL)


@pytest.mark.parametrize(("tta", "aggregation"), [("flips", "hard"), ("d4", "mask_weighted")])
def test_predict_endpoint_takes_the_mask_tta_and_aggregation(client, files, pipe, tta, aggregation):
    want = expected(pipe, files["a"], files["mask"], tta=tta, aggregation=aggregation)
    got = client.predict(
        handle_file(str(files["a"])), handle_file(str(files["mask"])), tta, aggregation, api_name="/predict"
    )
    assert confidences(got) == pytest.approx(want, abs=TOL)


BAD_INPUTS = [
    ("not_image", None, r"^notes\.png: not an image file PIL can read"),
    ("a", "small_mask", r"small_mask\.png.*(size|shape)"),
    ("huge", None, r"^huge\.png: the image is larger than the decompression-bomb limit"),
    (None, None, r"^Upload an image first"),
]


@pytest.mark.parametrize(("image", "mask", "message"), BAD_INPUTS, ids=["not_image", "mask_size", "huge", "none"])
def test_bad_input_gives_a_message_and_the_server_keeps_serving(client, files, pipe, image, mask, message):
    from gradio_client.exceptions import AppError

    def upload(key):
        return None if key is None else handle_file(str(files[key]))

    with pytest.raises(AppError) as error:
        client.predict(upload(image), upload(mask), api_name="/predict")
    text = str(error.value)
    assert re.search(message, text), text
    assert "Traceback" not in text and str(files["model"].parent) not in text and "/gradio/" not in text
    got = client.predict(handle_file(str(files["b"])), None, api_name="/predict")
    assert confidences(got) == pytest.approx(expected(pipe, files["b"]), abs=TOL)


def test_a_taken_port_is_one_clear_error(server, files):
    port = int(server.rstrip("/").rsplit(":", 1)[1])
    with pytest.raises(OSError, match=f"cannot serve on 127.0.0.1:{port} .*choose another --port"):
        serve(files["model"], port=port, block=False)


# ---- the batch tab --------------------------------------------------------------------------------------------------
def test_batch_tab_writes_the_predict_csv(client, files, pipe):
    images = [handle_file(str(files[k])) for k in ("a", "b", "not_image")]
    csv_path, table, status = client.predict(
        images, [handle_file(str(files["mask"]))], "none", "soft", api_name="/predict_many"
    )
    with open(csv_path, newline="", encoding="utf-8") as f:
        header, *rows = list(csv.reader(f))
    labels = list(pipe.model.config.id2label.values())
    assert header == ["sample_index", "label", *labels, "error"]
    assert table["headers"] == header and table["data"] == rows
    by_name = {row[0]: row for row in rows}
    assert sorted(by_name) == ["a.png", "b.png", "notes.png"]
    for name, mask in (("a.png", files["mask"]), ("b.png", None)):
        want = expected(pipe, files[name[0]], mask)
        row = by_name[name]
        assert row[1] == max(want, key=want.get) and row[-1] == ""
        assert [float(p) for p in row[2:-1]] == pytest.approx([want[label] for label in labels], abs=1e-6)
    assert by_name["notes.png"][1] == "" and by_name["notes.png"][-1].startswith("notes.png: not an image file")
    assert "1 masks matched by name" in status


# ---- in a real browser ----------------------------------------------------------------------------------------------
def _browser():
    """Headless Chromium from the system packages through chromedriver; skip when either is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip(
            "no system Chromium + chromedriver: `apt-get install chromium chromium-driver` (.ci/run installs them)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    return webdriver.Chrome(options=options, service=Service(driver))


@pytest.mark.slow
def test_browser_shows_the_pipeline_label_the_patch_map_and_errors(server, files, pipe, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    want = expected(pipe, files["a"])
    browser = _browser()
    try:
        browser.get(server)
        wait = WebDriverWait(browser, 60)
        upload = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))[0]
        upload.send_keys(str(files["a"]))
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#image img"))
        browser.find_element(By.CSS_SELECTOR, "#classify").click()
        shown = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#label [data-testid=label-output-value]"))
        assert shown[0].text == max(want, key=want.get)
        bars = browser.find_elements(By.CSS_SELECTOR, "#label meter")
        assert {b.get_attribute("aria-label"): float(b.get_attribute("value")) for b in bars} == pytest.approx(
            want, abs=TOL
        )
        patch_map_width = "const img = document.querySelector('#patch_map img'); return img ? img.naturalWidth : 0;"
        assert wait.until(lambda b: b.execute_script(patch_map_width)) >= 512
        wait.until(lambda b: "Time:" in b.find_element(By.CSS_SELECTOR, "#summary").text)
        browser.save_screenshot(str(tmp_path / "app.png"))
        requests = [json.loads(entry["message"])["message"] for entry in browser.get_log("performance")]
        urls = {r["params"]["request"]["url"] for r in requests if r["method"] == "Network.requestWillBeSent"}
        assert any(u.startswith(server) for u in urls)  # the log works
        assert {u for u in urls if not u.startswith((server, "data:", "blob:"))} == set()  # offline: nothing leaves
        with Image.open(tmp_path / "app.png") as shot:
            assert shot.width >= 1000

        # Not an image: a readable message in the page, and the next image is classified.
        browser.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(files["not_image"]))
        browser.find_element(By.CSS_SELECTOR, "#classify").click()
        toast = wait.until(lambda b: [t.text for t in b.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body]")])
        assert "notes.png: not an image file PIL can read" in toast[0] and "Traceback" not in toast[0]
        browser.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(files["a"]))
        browser.find_element(By.CSS_SELECTOR, "#classify").click()
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#label [data-testid=label-output-value]"))
        assert browser.find_element(By.CSS_SELECTOR, "#label [data-testid=label-output-value]").text == shown[0].text
    finally:
        browser.quit()


# ---- the model folder as a Space ------------------------------------------------------------------------------------
def test_saved_folder_holds_the_app_and_its_requirements(files):
    folder = files["model"]
    assert (folder / "app.py").read_text(encoding="utf-8") == Path(hf_histo.__file__).with_name("app.py").read_text(
        encoding="utf-8"
    )
    assert (folder / "requirements.txt").read_text(encoding="utf-8").splitlines() == list(SPACE_REQUIREMENTS)
    assert "[app.py](app.py)" in (folder / "README.md").read_text(encoding="utf-8")


def test_a_timm_backbone_and_stain_normalisation_add_their_requirements(tmp_path):
    config = HistoClassifierConfig(backbone_config=tiny_backbone_config("timm"))
    write_space_files(tmp_path, config)
    assert (tmp_path / "requirements.txt").read_text(encoding="utf-8").splitlines() == [
        *SPACE_REQUIREMENTS,
        TIMM_REQUIREMENT,
    ]
    config = HistoClassifierConfig(patching=PatchingConfig(stain_norm="macenko"))
    write_space_files(tmp_path, config)
    assert (tmp_path / "requirements.txt").read_text(encoding="utf-8").splitlines() == [
        *SPACE_REQUIREMENTS,
        TORCHSTAIN_REQUIREMENT,
    ]


def test_space_requirements_have_the_floors_of_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = [*project["dependencies"], *project["optional-dependencies"]["app"]]
    floors = {req.split(">=")[0].strip().lower(): req.split(";")[0].replace(" ", "") for req in declared}
    for requirement in (*SPACE_REQUIREMENTS, TIMM_REQUIREMENT, TORCHSTAIN_REQUIREMENT):
        assert floors[requirement.split(">=")[0].lower()] == requirement


# `python app.py` in the model folder, as a Space runs it, with `import hf_histo` failing.
SPACE_CHILD = "import runpy, sys; sys.modules['hf_histo'] = None; runpy.run_path('app.py', run_name='__main__')"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_space_app_runs_without_hf_histo(files, pipe, tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    env.update(GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port))  # what a Space sets (0.0.0.0 there)
    log = open(tmp_path / "space.log", "w+", encoding="utf-8")  # noqa: SIM115 - read after the process ends
    space = subprocess.Popen(
        [sys.executable, "-I", "-c", SPACE_CHILD], cwd=files["model"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert space.poll() is None, (tmp_path / "space.log").read_text()[-3000:]
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:  # noqa: BLE001 - not listening yet
                assert time.monotonic() < deadline, (tmp_path / "space.log").read_text()[-3000:]
                time.sleep(1)
        got = client.predict(handle_file(str(files["a"])), None, api_name="/predict")
        assert confidences(got) == pytest.approx(expected(pipe, files["a"]), abs=TOL)
        assert "/predict_many" not in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    finally:
        space.terminate()
        space.wait(timeout=60)
        log.close()


# The Space's model: its engine and explanation come from the folder's shipped code (saliency.py included).
SPACE_EXPLAIN = (
    "import sys; sys.modules['hf_histo'] = None; sys.path.insert(0, '.'); import app; model = app.load_model('.'); "
    "result = app.classify(model, sys.argv[1], None, 'none', 'soft')[1]; print(app.describe(model, result)[2])"
)


def test_space_app_explains_with_the_shipped_saliency_code(files, tmp_path):
    assert (files["model"] / "saliency.py").is_file()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    done = subprocess.run(
        [sys.executable, "-I", "-c", SPACE_EXPLAIN, str(files["a"])],
        cwd=files["model"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "attention rollout" in done.stdout and NO_EXPLANATION not in done.stdout  # a tiny ViT: rollout


def test_without_saliency_code_the_page_says_what_it_lacks(files, pipe):
    app = AppModel(pipe.engine, "model")  # a folder saved before saliency.py shipped, without hf_histo
    scores, result = classify(app, str(files["a"]), None, "none", "soft")
    assert scores == pytest.approx(expected(pipe, files["a"], tta="none", aggregation="soft"), abs=TOL)
    patch_map, explanation, summary = describe(app, result)
    assert NO_EXPLANATION in summary and explanation.size == (EXPLAIN_SIDE, EXPLAIN_SIDE)
    assert patch_map.width >= 512
    with pytest.raises(gr.Error, match="needs the hf-histo library"):
        predict_many(app, [str(files["a"])], None, "none", "soft")
