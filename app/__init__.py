"""QuantLab Collector: a RAW recorder of crypto perpetual futures market data."""
__version__ = "0.1.0"
