"""Render the docs' pictures into docs/figures/ (thin wrapper over `waveclip_hf.figures` and the processor).

    python scripts/make_figures.py                      # into docs/figures/ of this checkout
    python scripts/make_figures.py --output-dir runs/figures

The pictures of measured results (e2e_*.png) are drawn by the main job, not here.
"""

import argparse
from pathlib import Path

import skimage.data

from waveclip_hf import WaveCLIPVisionConfig
from waveclip_hf.figures.architecture import plot_architecture
from waveclip_hf.figures.diagrams import plot_attention_mask, plot_stage_tokens, plot_subband_pyramid
from waveclip_hf.figures.package_graph import plot_package_graph
from waveclip_hf.models.waveclip.image_processing_waveclip import WaveCLIPImageProcessor


DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "figures"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    out = parser.parse_args(argv).output_dir
    out.mkdir(parents=True, exist_ok=True)
    photo = skimage.data.astronaut()
    for levels in (1, 2, 3):
        pixel_values = WaveCLIPImageProcessor(levels=levels)(images=photo, return_tensors="pt")["pixel_values"][0]
        plot_subband_pyramid(pixel_values, levels, out / f"subband_pyramid_L{levels}.png")
        config = WaveCLIPVisionConfig(levels=levels)
        plot_attention_mask(config, out / f"attention_mask_L{levels}.png")
        plot_stage_tokens(pixel_values, config, out / f"stage_tokens_L{levels}.png")
    plot_architecture(out / "architecture.png")
    plot_package_graph(out / "package_imports.png")
    print(f"wrote {sorted(p.name for p in out.glob('*.png'))} to {out}")


if __name__ == "__main__":
    main()
