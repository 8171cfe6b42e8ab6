"""Text-guided generation of extra normal images (CVPR 2024, "Text-Guided Variational Image
Generation for Industrial Anomaly Detection and Segmentation"): compute code, no Ray.

- `wordnet`: WordNet 3.0 installed offline, and the words related to a category's object word.
- `prompts`: prompts from those words, outlier removal and the choice of the best prompt.
- `embedders`: what embeds images and prompts: CLIP (open_clip, from a local checkpoint) or the
  pretrained EfficientNet-Lite features (`selection: features`, which cannot embed text).
- `integrator`: scores candidate image sets and keeps the best.
The VQGAN itself is a method (`pipelines.models.vqgan`); the `generate` stage puts them together.
"""
