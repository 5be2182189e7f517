"""clara-edge: on-device compression-native RAG (CLaRa)."""
__version__ = "0.1.0"
