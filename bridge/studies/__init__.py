"""Studies of a calibrated model: per-layer sensitivity, fallback, accuracy control."""
