"""Constants shared with TinyLLaVA_Factory (tinyllava/utils/constants.py)."""

IGNORE_INDEX = -100  # label value the loss skips
IMAGE_TOKEN_INDEX = -200  # placeholder id in input_ids where the image features go
DEFAULT_IMAGE_TOKEN = "<image>"
