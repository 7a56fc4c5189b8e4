"""The web app of a trained model (`hf-histo app`, and the `app.py` of a model folder pushed as a Gradio Space)."""

# Self-contained on purpose: stdlib, gradio, numpy, PIL, torch and transformers only. `hf_histo.hub.save_for_hub` copies this
# file as `app.py` into every model folder, where it runs without hf_histo (a Space): the model then comes from the
# folder's shipped pipeline code (`trust_remote_code`) and the explanation from its shipped saliency.py; the batch
# CSV, which needs hf_histo, is left out and said so in the page. With hf_histo installed, the library's engine, explanation and
# `predict` CSV are used. Either way one engine path computes the label: the pipeline's.

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: offline, no telemetry

import csv
import html
import io
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image, ImageDraw

TASK = "histo-image-classification"
DISPLAY_SIDE = (512, 1024)  # the patch map is drawn on the image scaled to a long side in this range
EXPLAIN_SIDE = 256  # the most confident patch is shown at this size
MASK_OUTLINE = (0, 224, 0)
TOP_PATCH_OUTLINE = (0, 0, 0)
# Blue -> pale yellow -> red (ColorBrewer RdYlBu, reversed): patch probabilities and saliency from 0 to 1.
COLOUR_SCALE = np.array([[49, 54, 149], [116, 173, 209], [255, 255, 191], [244, 109, 67], [165, 0, 38]], float)
NO_EXPLANATION = (
    "no explanation: this model folder has no saliency.py (saved by an older hf-histo); `hf-histo app --model ...` "
    "explains with the library's"
)
NO_BATCH = (
    "The CSV of several images needs the hf-histo library: `hf-histo app --model MODEL` serves this app with it, "
    "and `hf-histo predict` writes the same CSV from a folder."
)


@dataclass
class AppModel:
    """What the app serves: a model's inference engine, plus what hf_histo adds when it is installed.

    Attributes:
        engine: The model's `InferenceEngine` (hf_histo's, or the copy shipped in the model folder).
        name: The model folder or Hub id, shown in the page.
        saliency: `patch_saliency` of hf_histo's saliency module, or of the copy shipped in the model folder.
        predict_folder: `hf_histo.inference.predict.predict_folder` of this model (`data_dir, out_csv, **options`
            -> CSV path); None without hf_histo.
        work_dir: Where the batch tab writes its CSVs; removed with the app.
    """

    engine: Any
    name: str
    saliency: Callable[..., tuple[np.ndarray, str]] | None = None
    predict_folder: Callable[..., Path] | None = None
    work_dir: Any = field(default_factory=lambda: tempfile.TemporaryDirectory(prefix="hf_histo_app_"))

    @property
    def engine_module(self) -> Any:
        """The module of the engine's class: its TTA and aggregation names and the errors a bad input raises."""
        return sys.modules[type(self.engine).__module__]


def load_model(model: str | os.PathLike, max_image_pixels: int | None = None) -> AppModel:
    """Load a trained model folder or Hub id: with hf_histo when installed, else from the folder's shipped code.

    Args:
        model: Model folder, Hub id, or (with hf_histo) a cross-validation root.
        max_image_pixels: Raise PIL's decompression-bomb limit for trusted large images.
    """
    try:
        from hf_histo.inference.loading import load_engine
        from hf_histo.inference.predict import predict_folder
    except ImportError:  # a Space: the model folder alone, its pipeline code loaded by transformers
        import torch
        from transformers import pipeline
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        device = "cuda" if torch.cuda.is_available() else "cpu"
        engine = pipeline(TASK, model=os.fspath(model), trust_remote_code=True, device=device).engine
        engine.max_image_pixels = max_image_pixels
        try:  # folders saved before saliency.py shipped have none: the page then says there is no explanation
            saliency = get_class_from_dynamic_module("saliency.patch_saliency", os.fspath(model))
        except (OSError, AttributeError):
            saliency = None
        return AppModel(engine, _display_name(model), saliency)

    engine = load_engine(model, max_image_pixels=max_image_pixels)

    def predict_csv(data_dir: Path, out_csv: Path, **options: Any) -> Path:
        return predict_folder(engine, data_dir, out_csv, **options)  # the loaded model, not a second copy

    from hf_histo.inference.saliency import patch_saliency

    return AppModel(engine, _display_name(model), patch_saliency, predict_csv)


def _display_name(model: str | os.PathLike) -> str:
    """A local folder's name (a Space's model is `.`), or the Hub id."""
    return Path(model).resolve().name if Path(model).is_dir() else os.fspath(model)


# ---- drawing (numpy + PIL: the Space has no matplotlib) --------------------------------------------------------------
def colourise(values: np.ndarray) -> np.ndarray:
    """uint8 RGB ``[..., 3]`` of values in [0, 1] on the blue-yellow-red scale."""
    position = np.clip(np.nan_to_num(values), 0.0, 1.0) * (len(COLOUR_SCALE) - 1)
    low = np.minimum(position.astype(int), len(COLOUR_SCALE) - 2)
    weight = (position - low)[..., None]
    return np.rint(COLOUR_SCALE[low] * (1 - weight) + COLOUR_SCALE[low + 1] * weight).astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of a boolean mask that touch a pixel outside it, two pixels thick."""
    inner = mask.copy()
    for _ in range(2):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def draw_patch_map(image: Image.Image, mask: np.ndarray, boxes: np.ndarray, values: np.ndarray, top: int, title: str):
    """The image with its mask outline and every patch coloured by its value (overlapping patches averaged).

    Args:
        image: The RGB image.
        mask: Boolean ``[H, W]`` region the patches were cut from (the given mask or detected tissue).
        boxes: ``[N, 5]`` patch boxes (x, y, w, h, mask pixels).
        values: One value in [0, 1] per patch (the probability of the predicted class).
        top: Row of the patch outlined in black (the most confident one).
        title: Legend text under the colour bar.
    """
    scale = min(max(max(image.size), DISPLAY_SIDE[0]), DISPLAY_SIDE[1]) / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    shown = image if scale == 1.0 else image.resize(size, Image.BILINEAR if scale < 1 else Image.NEAREST)
    total, count = np.zeros(size[::-1]), np.zeros(size[::-1])
    scaled = [[round(v * scale) for v in box[:4]] for box in boxes.tolist()]
    for (x, y, w, h), value in zip(scaled, values.tolist()):
        total[max(y, 0) : y + h, max(x, 0) : x + w] += value
        count[max(y, 0) : y + h, max(x, 0) : x + w] += 1
    pixels = np.asarray(shown, dtype=np.float64).copy()
    covered = count > 0
    colours = colourise(np.divide(total, count, out=np.zeros_like(total), where=covered))
    pixels[covered] = 0.45 * pixels[covered] + 0.55 * colours[covered]
    small_mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
    pixels[_outline(small_mask)] = MASK_OUTLINE
    drawn = Image.fromarray(np.rint(pixels).astype(np.uint8))
    x, y, w, h = scaled[top]
    ImageDraw.Draw(drawn).rectangle((x, y, x + w - 1, y + h - 1), outline=TOP_PATCH_OUTLINE, width=3)
    return _with_legend(drawn, title)


def _with_legend(image: Image.Image, title: str) -> Image.Image:
    """The image above a colour bar from 0 to 1 and its title."""
    bar_width = max(min(image.width // 2, 256), 2)
    legend = Image.new("RGB", (image.width, 36), "white")
    legend.paste(Image.fromarray(colourise(np.linspace(0.0, 1.0, bar_width))[None].repeat(12, axis=0)), (10, 4))
    draw = ImageDraw.Draw(legend)
    draw.text((10, 20), "0", fill="black")
    draw.text((4 + bar_width, 20), "1", fill="black")
    draw.text((bar_width + 24, 4), title, fill="black")
    out = Image.new("RGB", (image.width, image.height + legend.height), "white")
    out.paste(image, (0, 0))
    out.paste(legend, (0, image.height))
    return out


def draw_explanation(crop: Image.Image, heat: np.ndarray | None) -> Image.Image:
    """The patch, and beside it the patch under its relevance map (when there is one)."""
    patch = crop.resize((EXPLAIN_SIDE, EXPLAIN_SIDE), Image.BILINEAR)
    if heat is None:
        return patch
    relevance = Image.fromarray(heat.astype(np.float32), mode="F").resize(patch.size, Image.BILINEAR)
    blended = 0.55 * np.asarray(patch, np.float64) + 0.45 * colourise(np.asarray(relevance))
    out = Image.new("RGB", (2 * EXPLAIN_SIDE + 8, EXPLAIN_SIDE), "white")
    out.paste(patch, (0, 0))
    out.paste(Image.fromarray(np.rint(blended).astype(np.uint8)), (EXPLAIN_SIDE + 8, 0))
    return out


# ---- what the buttons run -----------------------------------------------------------------------------------------
def _readable(error: BaseException, paths: dict[str, str]) -> str:
    """The error's message with upload paths shortened to the file names the user gave, HTML-escaped."""
    message = str(error) or type(error).__name__
    for path, name in paths.items():
        message = message.replace(path, name)
    return html.escape(message)


def classify(app: AppModel, image: str | None, mask: str | None, tta: str, aggregation: str):
    """Label probabilities of one uploaded image, exactly as the pipeline computes them.

    Returns:
        ``({label: probability}, result)``: the `gr.Label` value, and the patched image, its prediction and the
        seconds taken, kept in the page's state for the drawings.

    Raises:
        gr.Error: The image or mask cannot be used; the message says why (the server goes on).
    """
    if image is None:
        raise gr.Error("Upload an image first.", print_exception=False)
    engine = app.engine
    paths = {p: Path(p).name for p in (image, mask) if p}
    start = time.perf_counter()
    try:
        patched = engine.patch(engine.decode(image), mask, name=Path(image).name)
        probs = engine.patch_probs(patched, tta)
    except (*app.engine_module.ITEM_ERRORS, MemoryError) as e:
        raise gr.Error(_readable(e, paths), duration=None, print_exception=False) from e
    prediction = engine.prediction(patched, probs, aggregation=aggregation, tta=tta)
    seconds = time.perf_counter() - start
    scores = {entry["label"]: entry["score"] for entry in prediction.scores()}
    return scores, {"patched": patched, "prediction": prediction, "seconds": seconds}


def describe(app: AppModel, result: dict | None) -> tuple[Image.Image | None, Image.Image | None, str]:
    """The patch map, the explanation of the most confident patch and a summary with the time taken."""
    if not result:
        return None, None, ""
    patched, prediction = result["patched"], result["prediction"]
    target = int(np.argmax(prediction.probs))
    label = prediction.labels[target]
    values, legend = prediction.patch_probs[:, target], f"P({label}) per patch"
    if prediction.attention is not None:  # attention MIL: the weights the label came from, scaled to their maximum
        values, legend = prediction.attention / prediction.attention.max(), "attention per patch / its maximum"
    top = int(np.argmax(values))
    patch_map = draw_patch_map(patched.image, patched.mask, patched.boxes, values, top, legend)
    (crop,) = app.engine.crops(patched, [top])
    start = time.perf_counter()
    heat, method = None, NO_EXPLANATION
    if app.saliency is not None:
        try:
            heat, method = app.saliency(app.engine.model, app.engine.preprocess([crop]), target)
        except Exception as e:  # noqa: BLE001 - the explanation is an extra: the label stands, the summary says why
            method = f"no explanation ({_readable(e, {})})"
    explain_seconds = time.perf_counter() - start
    fallback = f" Fallback: `{prediction.fallback}`." if prediction.fallback else ""
    summary = (
        f"**{html.escape(label)}** ({prediction.probs[target]:.3f}) from {len(patched.boxes)} patches "
        f"(region: {prediction.mask_source}), `{prediction.aggregation}` aggregation, TTA `{prediction.tta}`."
        f"{fallback}\n\nTime: **{result['seconds']:.2f} s** for the label, {explain_seconds:.2f} s for the "
        f"explanation.\n\nPatch map: each patch coloured by {html.escape(legend)}, blue 0 to red 1; green: the "
        f"region outline; black box: the top patch ({values[top]:.3f}), explained on the right: "
        f"{method}."
    )
    return patch_map, draw_explanation(crop, heat), summary


def predict_many(app: AppModel, images: list[str] | None, masks: list[str] | None, tta: str, aggregation: str):
    """The `predict` CSV (with probabilities and an error column) of several uploads; masks matched by file name.

    Returns:
        ``(csv path, table, status)``.
    """
    if app.predict_folder is None:
        raise gr.Error(NO_BATCH, print_exception=False)
    if not images:
        raise gr.Error("Upload one or more images first.", print_exception=False)
    names = [Path(p).name for p in images]
    for uploads in (names, [Path(p).name for p in masks or []]):
        duplicates = sorted({n for n in uploads if uploads.count(n) > 1})
        if duplicates:
            raise gr.Error(f"Two uploads share a name ({html.escape(', '.join(duplicates))}); rename one.")
    work = Path(tempfile.mkdtemp(dir=app.work_dir.name))
    for folder, files in (("images", images), ("masks", masks or [])):
        (work / folder).mkdir()
        for path in files:
            shutil.copyfile(path, work / folder / Path(path).name)
    stems = {Path(n).stem for n in names}
    unmatched = sorted(Path(p).name for p in masks or [] if Path(p).stem not in stems)
    out_csv = work / "predictions.csv"
    try:
        app.predict_folder(
            work, out_csv, probs=True, tta=tta, aggregation=aggregation, on_error="skip", progress=False
        )
    except (*app.engine_module.ITEM_ERRORS, MemoryError) as e:
        raise gr.Error(_readable(e, {f"{work}{os.sep}": ""}), duration=None, print_exception=False) from e
    finally:
        for folder in ("images", "masks"):
            shutil.rmtree(work / folder, ignore_errors=True)
    text = out_csv.read_text(encoding="utf-8")  # error cells name the files as uploaded, not this server's copies
    for folder in ("images", "masks"):
        text = text.replace(f"{work / folder}{os.sep}", "")
    out_csv.write_text(text, encoding="utf-8")
    header, *rows = list(csv.reader(io.StringIO(text)))
    status = f"{len(rows)} images, {len(masks or []) - len(unmatched)} masks matched by name."
    if unmatched:
        status += f" Masks that match no image (name them like their image): {', '.join(unmatched)}."
    return str(out_csv), {"headers": header, "data": rows}, html.escape(status)


# ---- the page -------------------------------------------------------------------------------------------------------
def image_upload(**kwargs: Any) -> gr.Image:
    """`gr.Image` (a file path) that hands the app the uploaded file unopened, so the engine's decode says what is wrong.

    The stock component opens every upload with PIL before the app sees it, where a file that is not an image, or
    one past PIL's pixel limit, fails with PIL's message about a temporary file. The override is per instance: a
    `gr.Image` subclass would make gradio write an `app.pyi` stub next to this file (in site-packages, or in the
    model folder of a Space) each time the module is imported.
    """
    component = gr.Image(type="filepath", **kwargs)
    stock = component.preprocess

    def preprocess(payload: Any) -> Any:
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            return payload.path
        return stock(payload)  # pasted (base64) images

    component.preprocess = preprocess
    return component


def build_app(app: AppModel) -> gr.Blocks:
    """The Gradio Blocks page of a model: one image tab (API endpoint `/predict`) and a batch CSV tab.

    `gradio_client.Client(url).predict(image, mask, api_name="/predict")` (mask may be None; `tta` and
    `aggregation` default to the model's) returns the `gr.Label` value of the image.
    """
    module, engine = app.engine_module, app.engine
    labels = engine.labels
    with gr.Blocks(title=f"hf-histo: {app.name}", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            f"## {html.escape(app.name)}\nClasses: {', '.join(map(html.escape, labels))}. The image is cut into "
            "patches (inside the mask when given, else inside detected tissue), each patch is classified and the "
            "patch probabilities are aggregated into one label. Research use only: not a medical device."
        )
        with gr.Row():
            tta = gr.Radio(list(module.TTA_MODES), value=engine.tta, label="Test-time augmentation (TTA)")
            votes = [a for a in module.AGGREGATIONS if a != "attention" or getattr(engine, "embeds", False)]
            aggregation = gr.Radio(votes, value=engine.aggregation, label="Aggregation")
        with gr.Tab("One image"):
            with gr.Row():
                image = image_upload(label="Image", sources=["upload", "clipboard"], elem_id="image", height=300)
                mask = image_upload(
                    label="Mask (optional)",
                    sources=["upload", "clipboard"],
                    elem_id="mask",
                    height=300,
                )
            button = gr.Button("Classify", variant="primary", elem_id="classify")
            with gr.Row():
                label = gr.Label(num_top_classes=len(labels), label="Image label", elem_id="label")
                summary = gr.Markdown(elem_id="summary")
            with gr.Row():
                patch_map = gr.Image(
                    label="Patches coloured by probability", type="pil", elem_id="patch_map", height=420
                )
                explanation = gr.Image(label="Most confident patch", type="pil", elem_id="explanation", height=420)
            result = gr.State()
            outputs = [patch_map, explanation, summary]
            button.click(lambda: (None, None, ""), None, outputs, queue=False, api_visibility="private").then(
                partial(classify, app), [image, mask, tta, aggregation], [label, result], api_name="predict"
            ).success(partial(describe, app), result, outputs, api_visibility="private")
        with gr.Tab("Several images (CSV)"):
            if app.predict_folder is None:
                gr.Markdown(NO_BATCH)
            else:
                with gr.Row():
                    images = gr.File(file_count="multiple", file_types=["image"], label="Images")
                    masks = gr.File(file_count="multiple", file_types=["image"], label="Masks (optional, same names)")
                batch_button = gr.Button("Predict all", variant="primary", elem_id="predict_all")
                status = gr.Markdown(elem_id="batch_status")
                csv_file = gr.File(label="predictions.csv (the `hf-histo predict` format)")
                table = gr.Dataframe(label="Predictions", interactive=False)
                batch_button.click(
                    partial(predict_many, app),
                    [images, masks, tta, aggregation],
                    [csv_file, table, status],
                    api_name="predict_many",
                )
    return demo


def serve(
    model: str | os.PathLike,
    host: str | None = "127.0.0.1",
    port: int | None = 7860,
    max_image_pixels: int | None = None,
    block: bool = True,
) -> gr.Blocks:
    """Load a model and serve its app (offline: no analytics, no share link) until interrupted.

    Args:
        model: Model folder, Hub id or (with hf_histo) cross-validation root.
        host: Address to listen on; None uses `GRADIO_SERVER_NAME` (set in a Space) or 127.0.0.1.
        port: Port; None uses `GRADIO_SERVER_PORT` or the first free one from 7860.
        max_image_pixels: Raise PIL's decompression-bomb limit for trusted large images.
        block: Wait for the server (False returns at once, for tests; `demo.close()` stops it).

    Returns:
        The running `gr.Blocks` (its `local_url` says where).

    Raises:
        OSError: The port is taken (or cannot be opened).
    """
    app_model = load_model(model, max_image_pixels)
    demo = build_app(app_model)
    demo.queue(default_concurrency_limit=1)  # one prediction at a time: each uses every core
    try:
        demo.launch(
            server_name=host, server_port=port, share=False, show_error=True, prevent_thread_lock=True, quiet=True
        )
    except OSError as e:  # gradio's message is about its own launch() arguments
        where = f"{host or os.environ.get('GRADIO_SERVER_NAME', '127.0.0.1')}:{port or os.environ.get('GRADIO_SERVER_PORT')}"
        raise OSError(f"cannot serve on {where} ({str(e).split('.')[0]}); choose another --port") from e
    print(f"hf-histo app: {app_model.name} at {demo.local_url} (Ctrl+C stops it)", flush=True)
    if block:
        demo.block_thread()
    return demo


def main(argv: list[str] | None = None) -> None:
    """`python app.py [MODEL]`: serve MODEL, by default the folder holding this file (a model folder or Space)."""
    args = sys.argv[1:] if argv is None else argv
    serve(args[0] if args else os.path.dirname(os.path.abspath(__file__)), host=None, port=None)


if __name__ == "__main__":
    main()
