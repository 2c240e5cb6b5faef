"""What every Niphas service shares: settings, logging, tracing, the JetStream spine,
the embedded NATS launcher and the CLI that finds services through entry points."""
