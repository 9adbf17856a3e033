"""Links from the estimators' HTML representation to the API reference.

scikit-learn's HTML repr (``_repr_html_``, shown by Jupyter) puts a "?" link
on every estimator of ``_doc_link_module``, built from ``_doc_link_template``
(see ``sklearn.utils._repr_html.base._HTMLDocumentationLinkMixin``). Without
these attributes, skpatchcore estimators would get no link.
"""

#: The anchor Sphinx gives each ``autoclass`` of docs/api.rst (``currentmodule: skpatchcore``).
DOC_LINK_TEMPLATE = "https://skpatchcore.readthedocs.io/en/latest/api.html#skpatchcore.{estimator_name}"


class DocLinkMixin:
    """Point the HTML repr's documentation link at skpatchcore's API page."""

    _doc_link_module = "skpatchcore"
    _doc_link_template = DOC_LINK_TEMPLATE
