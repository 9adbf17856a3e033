"""Files in and out: images, datasets on disk, model files and atomic writes.

- :mod:`skpatchcore.io.images` -- reading images and turning them into backbone input;
- :mod:`skpatchcore.io.datasets` -- the MVTec AD folder layout, read and written;
- :mod:`skpatchcore.io.model_file` -- the safe ``.skpc`` model format
  (:func:`skpatchcore.save`, :func:`skpatchcore.load`);
- :mod:`skpatchcore.io.model_graph` -- a backbone's graph as data inside a model file;
- :mod:`skpatchcore.io.versioning` -- format versions and the errors of loading;
- :mod:`skpatchcore.io.atomic` -- writes that are renamed into place whole.
"""
