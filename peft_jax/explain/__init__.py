"""Explanations of classifiers, scored against segmentation masks: attribution maps (``attribution``),
their scores and bootstrap intervals (``scores``), masks in the evaluation frame (``masks``), pictures
(``overlay``) and the explanation of a finished run (``run``, behind ``launch/explain.py``)."""
