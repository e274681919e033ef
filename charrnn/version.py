"""charrnn's version, in one place: the package, the build (pyproject.toml) and every
checkpoint header read it from here."""

__version__ = "0.1.0"
