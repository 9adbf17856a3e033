"""Parameter constraints shared by the estimators (scikit-learn's ``_parameter_constraints``).

scikit-learn's ``Interval(Integral, ...)`` and ``Interval(Real, ...)``
accept ``True`` and ``False`` (``bool`` is an ``int`` in Python), and no
constraint of scikit-learn's knows torch devices. :class:`NumberInterval`
and :class:`TorchDevice` fill the two gaps; both are constraint objects of
the kinds scikit-learn's ``validate_parameter_constraints`` accepts, so the
estimators' ``_parameter_constraints`` stay declarative and every bad
parameter raises scikit-learn's ``InvalidParameterError`` at ``fit``,
naming the parameter, the estimator, what it must be and the value got.

This relies on ``sklearn.utils._param_validation``, a private module of
scikit-learn (hence the upper bound on scikit-learn in pyproject.toml).
"""

from __future__ import annotations

from numbers import Integral, Real

from sklearn.utils._param_validation import Interval, Options


class NumberInterval(Interval):
    """scikit-learn's ``Interval`` without booleans: ``True`` is not the number 1.

    Parameters
    ----------
    type : {numbers.Integral, numbers.Real}
    left, right : number or None
        Bounds (None: unbounded).
    closed : {"left", "right", "both", "neither"}

    Examples
    --------
    >>> from numbers import Integral
    >>> from skpatchcore._param_constraints import NumberInterval
    >>> positive = NumberInterval(Integral, 1, None, closed="left")
    >>> positive.is_satisfied_by(3), positive.is_satisfied_by(True)
    (True, False)
    """

    def is_satisfied_by(self, val) -> bool:
        return not isinstance(val, bool) and super().is_satisfied_by(val)

    def __str__(self) -> str:
        text = super().__str__()
        kind = "an int" if self.type is Integral else "a float"
        return text.replace(kind, f"{kind} (not a bool)", 1)


class TorchDevice(Options):
    """``"auto"``, a ``torch.device``, or a device string that torch knows.

    ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``... are accepted whether
    or not this machine has such a device (a model may be configured on one
    machine and fitted on another); using a device that is missing fails
    where it is used, with its own message.

    Examples
    --------
    >>> from skpatchcore._param_constraints import TorchDevice
    >>> [TorchDevice().is_satisfied_by(v) for v in ("auto", "cuda:1", "banana", 0)]
    [True, True, False, False]
    """

    def __init__(self):
        super().__init__(str, {"auto"})

    def is_satisfied_by(self, val) -> bool:
        import torch

        if isinstance(val, torch.device):
            return True
        if not isinstance(val, str):
            return False
        if val == "auto":
            return True
        try:
            torch.device(val)
        except (RuntimeError, ValueError, TypeError):
            return False
        return True

    def __str__(self) -> str:
        return "'auto', a torch.device or a device string that torch knows ('cpu', 'cuda', 'cuda:1', 'mps'...)"


def positive_int() -> NumberInterval:
    """The constraint of a count: an int >= 1 (not a bool)."""
    return NumberInterval(Integral, 1, None, closed="left")


#: ``device`` of every estimator.
DEVICE = [TorchDevice()]
#: ``n_jobs`` (threads, scikit-learn style): None, a positive count, or -1, -2... (all cores, all but one...).
N_JOBS = [NumberInterval(Integral, 1, None, closed="left"), NumberInterval(Integral, None, -1, closed="right"), None]
#: ``working_memory``: a budget in MiB, or None for scikit-learn's ``working_memory`` setting.
WORKING_MEMORY = [NumberInterval(Real, 0, None, closed="neither"), None]
#: A fraction of rows in (0, 1].
FRACTION = NumberInterval(Real, 0, 1, closed="right")
