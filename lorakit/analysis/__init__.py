"""The paper's studies of trained adapters (section 7): ``analyze``, ``resize`` and ``sweep``."""
