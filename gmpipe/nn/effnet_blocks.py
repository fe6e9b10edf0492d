"""EfficientNet-Lite0's MBConv blocks as the perceptual losses name them, in a module without torch, so that the
params schema checks block indices against the same numbers the network uses."""

NUM_BLOCKS = 16
# The last block at strides 2, 4, 8 and 16: (16, 24, 40, 112) channels.
DEFAULT_MAP_BLOCKS = (0, 2, 4, 10)
