"""Empirical privacy auditing: ``stats`` (pure numpy/scipy) and the training glue (``canaries``, ``runner``)."""
