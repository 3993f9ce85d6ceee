"""Media: opening containers and devices with PyAV, decoding, scaling, RGB conversion, hardware decoding."""
