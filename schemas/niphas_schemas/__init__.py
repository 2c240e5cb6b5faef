"""Versioned event bodies for the Niphas subjects (the only contract between services)."""
