"""The JetStream spine: connections, streams and consumers, publish, consume, inspect."""
