"""Accelerator helpers shared by the segmenter and the style network (CUDA graphs, precision choice)."""
