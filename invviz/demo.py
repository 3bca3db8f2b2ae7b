"""``invviz demo``: reconstructions of a sample photo through the depth of the bundled model."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from torch import Tensor

from .engine import InversionResult, Settings, invert, resolve_device
from .images import load_image, roughness, sample_path, save_image, to_uint8
from .representations import representation
from .representations._base import DEFAULT_ITERS

MODEL = "efficientnet_lite0"
#: Six depths of EfficientNet-Lite0, from edges to object parts.
DEMO_LAYERS = ("stem", "blocks.1", "blocks.4", "blocks.8", "blocks.12", "blocks.15")


def output_files(out: Path, layers: tuple[str, ...] = DEMO_LAYERS) -> list[Path]:
    """The files ``run_demo`` writes into ``out``: one PNG per layer, the grid and the metrics."""
    return [*(_layer_file(out, layer) for layer in layers), out / "demo.png", out / "metrics.json"]


def _layer_file(out: Path, layer: str) -> Path:
    return out / f"{layer.replace('.', '_')}.png"


def _roughness_ratio(image: Tensor, reference: float) -> float | None:
    """Roughness of ``image`` over the original's; ``None`` for a flat original (no roughness)."""
    return roughness(image) / reference if reference > 0 else None


def run_demo(
    out: Path,
    *,
    iters: int = DEFAULT_ITERS,
    image: str | None = None,
    device: str = "auto",
    layers: tuple[str, ...] = DEMO_LAYERS,
    progress: bool = True,
) -> dict[str, InversionResult]:
    """Invert ``layers`` of the bundled model for one photo; write a captioned grid and a table.

    Writes ``out/demo.png`` (the grid), ``out/<layer>.png`` and ``out/metrics.json``.
    """
    from .cli import ProgressBar

    original = load_image(image or sample_path("chelsea"), 224)
    resolve_device(device)  # bad input fails before anything is written
    out.mkdir(parents=True, exist_ok=True)
    reference_roughness = roughness(original)
    results: dict[str, InversionResult] = {}
    ratios: dict[str, float | None] = {}  # roughness over the original's, for the table and the metrics
    print(f"{'layer':<10} {'code shape':<14} {'feature error':>13} {'roughness':>10} {'seconds':>8}")
    for layer in layers:
        rep = representation(MODEL, layer=layer)
        result = invert(
            rep, original, settings=Settings(iters=iters), device=device, on_step=ProgressBar(f"{layer:<10}", progress)
        )
        results[layer] = result
        save_image(result.image, _layer_file(out, layer))
        shape = "×".join(str(n) for n in rep.code_shape(224, 224))
        ratio = ratios[layer] = _roughness_ratio(result.image, reference_roughness)
        rough = f"{ratio:>9.2f}×" if ratio is not None else f"{'-':>10}"
        print(f"{layer:<10} {shape:<14} {result.feature_error[0]:>13.3f} {rough} {result.seconds:>8.1f}", flush=True)
    _grid(original, results, out / "demo.png")
    (out / "metrics.json").write_text(
        json.dumps(
            {
                "rep": MODEL,
                "iters": iters,
                "seconds": sum(r.seconds for r in results.values()),
                "results": [
                    {
                        "file": str(_layer_file(out, layer)),
                        "layer": layer,
                        "feature_error": r.feature_error[0],
                        "roughness_ratio": ratios[layer],
                        "seconds": r.seconds,
                    }
                    for layer, r in results.items()
                ],
            },
            indent=2,
        )
    )
    print(f"wrote {out / 'demo.png'}")
    return results


def _grid(original, results: dict[str, InversionResult], path: Path) -> None:  # type: ignore[no-untyped-def]
    panels = [("original", original, "")] + [
        (layer, r.image, f"error {r.feature_error[0]:.2f}") for layer, r in results.items()
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.6), dpi=110)
    for axis, (title, picture, caption) in zip(axes, panels):
        axis.imshow(to_uint8(picture))
        axis.set_title(title, fontsize=10)
        axis.set_xlabel(caption, fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(f"What each layer of {MODEL} keeps: images reconstructed from its code", fontsize=11)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
