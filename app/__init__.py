"""QuantLab Collector: a RAW recorder of crypto perpetual futures market data."""
import os

__version__ = "0.1.0"

# Arrow's allocator for the whole process, set before pyarrow is first imported (its C++ default
# pool is chosen once, from this variable; pa.set_memory_pool only changes what Python-level
# calls use, while Acero and the readers kept allocating from mimalloc). mimalloc and jemalloc
# keep freed pages for reuse: ~30 MB more resident at 20k frames/s, for no measurable speed
# gain here (bench/run.py). The system allocator gives them back (app/cli.py tunes it).
# An operator's own ARROW_DEFAULT_MEMORY_POOL still wins.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
