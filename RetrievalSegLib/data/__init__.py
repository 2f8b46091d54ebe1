"""Volumes and files: Volume (array + exact ITK geometry), reading and writing images, atomic writes, Slicer .seg.nrrd, the synthetic study."""
