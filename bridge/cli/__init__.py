"""The `jaxq` command line: `jaxq demo`, `jaxq quantize` (`quantize.py`), `jaxq quantize-weights`."""
