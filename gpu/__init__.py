"""GPU helpers shared by the segmenter and the style network."""
