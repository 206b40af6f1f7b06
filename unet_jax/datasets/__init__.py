"""Data: the SOURCES table and its loaders, image reading and the intensity rule, the in-memory
Dataset, grain pipelines, the procedural set and the paper's weight maps."""
