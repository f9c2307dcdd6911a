"""A self-hosted HTTP message broker: Redis lists for hand-off, a SQLite journal for durability."""

__version__ = "0.1.0"
