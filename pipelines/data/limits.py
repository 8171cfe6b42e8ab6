"""Limits on what an image may be, shared by the decoding code and the job specs that set them.

Plain constants, importing nothing: the stage parameter classes (`pipelines.params`) take their
defaults from here without importing PIL or numpy.
"""

DEFAULT_MAX_PIXELS = 64_000_000  # per image, width x height: the default of every `max_image_pixels`
