"""Input pipeline: data sources (TFDS without TensorFlow, VTAB-1k, FGVC, list folders, the
synthetic demo set), host-side preprocessing presets, samplers, and sharded checkpointable
train / eval batch iterators. Import the submodules (`jvt.data.pipeline`, ...) directly.
"""
