"""Version stamps in pickled estimators, checked when a model is loaded, and the
errors of model files (pickled or in the safe format of :mod:`skpatchcore.io.model_file`)."""

from __future__ import annotations

#: Bumped whenever fitted attributes change meaning or layout. A model saved
#: under another format version is refused with a clear error instead of
#: scoring silently wrong.
# 3: PatchFeatureTransformer.mean_ / std_ (mean="auto"); 4: resize_, crop_size_, interpolation_ (recipe);
# 5: tile_size, tile_overlap, tile_scale
MODEL_FORMAT_VERSION = 5
#: Formats this version loads: a format-4 model has no tiling parameters,
#: which take their defaults (whole images), so it scores as it did.
READABLE_MODEL_FORMATS = (4, 5)


class IncompatibleModelError(ValueError):
    """A saved model was written by an incompatible skpatchcore version."""


class VersionedStateMixin:
    """Adds skpatchcore's version to the pickled state and checks it on load."""

    def __getstate__(self):
        from .._version import __version__

        state = super().__getstate__()
        state = dict(state)
        state["_skpatchcore_format"] = MODEL_FORMAT_VERSION
        state["_skpatchcore_version"] = __version__
        return state

    def __setstate__(self, state):
        from .._version import __version__

        saved_format = state.pop("_skpatchcore_format", None)
        saved_version = state.pop("_skpatchcore_version", "unknown")
        if saved_format not in READABLE_MODEL_FORMATS:
            hint = "" if saved_version == __version__ else f", or load it with skpatchcore {saved_version}"
            raise IncompatibleModelError(
                f"This {type(self).__name__} was saved by skpatchcore {saved_version} "
                f"(model format {saved_format}); skpatchcore {__version__} reads model "
                f"format {MODEL_FORMAT_VERSION}. Refit the model{hint}."
            )
        # Parameters added after the model was saved take their defaults.
        for name, default in _init_defaults(type(self)).items():
            state.setdefault(name, default)
        super().__setstate__(state)


def _init_defaults(cls) -> dict:
    """``{parameter: default}`` of `cls`'s ``__init__`` (parameters with a default only)."""
    import inspect

    return {
        name: parameter.default
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
        and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    }


class CorruptModelError(ValueError):
    """A saved model file is damaged (checksum mismatch, truncated) or not a model file."""
