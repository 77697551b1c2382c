"""Models shipped with jaxq (small, trained offline, weights inside the package)."""
