"""Render the docs' pictures into docs/figures/ (thin wrapper over `waveclip_hf.figures.diagrams` and the processor).

    python scripts/make_figures.py
"""

from pathlib import Path

import skimage.data

from waveclip_hf import WaveCLIPVisionConfig
from waveclip_hf.figures.diagrams import plot_attention_mask, plot_stage_tokens
from waveclip_hf.figures.diagrams import plot_subband_pyramid
from waveclip_hf.models.waveclip.image_processing_waveclip import WaveCLIPImageProcessor

OUT = Path(__file__).resolve().parents[1] / "docs" / "figures"


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    photo = skimage.data.astronaut()
    for levels in (1, 2, 3):
        pixel_values = WaveCLIPImageProcessor(levels=levels)(images=photo, return_tensors="pt")["pixel_values"][0]
        plot_subband_pyramid(pixel_values, levels, OUT / f"subband_pyramid_L{levels}.png")
        config = WaveCLIPVisionConfig(levels=levels)
        plot_attention_mask(config, OUT / f"attention_mask_L{levels}.png")
        plot_stage_tokens(pixel_values, config, OUT / f"stage_tokens_L{levels}.png")
    print(f"wrote {sorted(p.name for p in OUT.glob('*.png'))} to {OUT}")


if __name__ == "__main__":
    main()
