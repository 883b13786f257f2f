"""Accelerator helpers shared by the segmenter, the style network and the pipeline (CUDA graphs, precision choice,
host-to-GPU copies that do not wait)."""
