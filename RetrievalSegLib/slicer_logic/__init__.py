"""The Slicer module's logic without Qt: MRML <-> library, results, corrections."""
